"""What an export validates against must be worth it, and what a frame becomes must fit the input (issue 14).

Found by trying third-party-style models from outside: a model whose second input was fed zeros ignored its
image and passed at top-1 agreement 1.0; one with Dropout left in training mode moved at every call, passed
fp16 and failed int8 with advice about int8; a uint8 input given --mean/--std for 0..1 pixels wrapped every
frame around 256 on the device, and validated, as its fp32 reference saw the same wrapped frames. Each model is
a real ONNX graph built here, exported through the public API or the CLI.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import lepton_edge
from conftest import run_cli
from lepton_edge.bundle import InputSpec
from lepton_edge.errors import BadInput
from lepton_edge.runtime.preprocess import normalise


def _save(path, nodes, inputs, outputs, inits=(), opset=13):
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _image(name="image", elem=TensorProto.FLOAT, dims=("N", 3, 8, 8)):
    return helper.make_tensor_value_info(name, elem, list(dims))


def _gain_model(path):
    """out = mean(image) * gain: a gain no rule knows is fed zeros, and the output is then 0 for every frame."""
    nodes = [helper.make_node("ReduceMean", ["image"], ["m"], axes=[1, 2, 3], keepdims=0),
             helper.make_node("Unsqueeze", ["m", "axis"], ["m1"]),
             helper.make_node("Mul", ["m1", "gain"], ["out"])]
    return _save(path, nodes, [_image(), helper.make_tensor_value_info("gain", TensorProto.FLOAT, ["N", 2])],
                 [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 2])],
                 [helper.make_tensor("axis", TensorProto.INT64, [1], [1])])


def _export(model, out, **kw):
    return lepton_edge.export(str(model), target="x86-cpu", precision="fp32", out=out, measure_latency=False, **kw)


def test_outputs_that_ignore_the_image_are_refused_and_the_constant_named(tmp_path):
    model = _gain_model(tmp_path / "gain.onnx")
    with pytest.raises(BadInput) as e:
        _export(model, tmp_path / "a")
    why = str(e.value)
    assert "the same outputs" in why and "ignores its image" in why, why
    assert "gain = [0.0, 0.0]" in why and "--input-value" in why, why
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").rglob("manifest.json"))
    # given the gain it needs, the same model follows its image, and exports
    res = _export(model, tmp_path / "b", input_values={"gain": [2, 0.5]})
    assert res.bundle.manifest.validation["passed"]


def test_a_model_that_moves_between_calls_is_refused_as_such(tmp_path):
    """Dropout in training mode (ONNX's training_mode input true): onnxruntime draws a new mask every call."""
    nodes = [helper.make_node("ReduceMean", ["image"], ["m"], axes=[2, 3], keepdims=0),
             helper.make_node("Dropout", ["m", "ratio", "train"], ["out"])]
    model = _save(tmp_path / "dropout.onnx", nodes, [_image()],
                  [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3])],
                  [helper.make_tensor("ratio", TensorProto.FLOAT, [], [0.5]),
                   helper.make_tensor("train", TensorProto.BOOL, [], [True])])
    with pytest.raises(BadInput) as e:
        _export(model, tmp_path / "a")
    assert "other outputs each time it runs on the same input" in str(e.value), e.value
    assert "training mode" in str(e.value)


def _uint8_model(path):
    """A model that normalises inside its graph: uint8 pixels in, Cast and scale there."""
    nodes = [helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["f", "k"], ["g"]),
             helper.make_node("ReduceMean", ["g"], ["out"], axes=[2, 3], keepdims=0)]
    return _save(path, nodes, [_image(elem=TensorProto.UINT8, dims=(1, 3, 8, 8))],
                 [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3])],
                 [helper.make_tensor("k", TensorProto.FLOAT, [], [1 / 255])])


def test_a_mean_and_std_a_uint8_input_cannot_hold_are_one_line(tmp_path):
    model = _uint8_model(tmp_path / "u8.onnx")
    r = run_cli("export", str(model), "--precision", "fp32", "--mean", "0.5,0.5,0.5", "--std", "0.2,0.2,0.2",
                "-o", str(tmp_path / "a"))
    assert r.returncode == 2, r.stderr[-800:]
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "takes uint8 values" in line[0] and "give no --mean/--std" in line[0], r.stderr
    assert "Traceback" not in r.stderr
    res = _export(model, tmp_path / "b")  # the raw pixels, as the model wants them
    assert res.bundle.manifest.inputs[0].dtype == "uint8"


def test_integer_inputs_are_clipped_never_wrapped():
    """A manifest (an older bundle, or a hand-made one) whose normalisation overshoots an integer input: the
    device gives the nearest value the type holds; wrapped around, pixel 255 reached an int8 model as -1."""
    pixels = np.array([0, 1, 51, 127, 128, 200, 255], np.uint8).reshape(1, 1, 7, 1).repeat(3, 3)
    spec = InputSpec(name="x", shape=[1, 1, 7, 3], dtype="int8", layout="NHWC", scale=1.0)
    assert normalise(pixels, spec)[0, 0, :, 0].tolist() == [0, 1, 51, 127, 127, 127, 127]
    spec = InputSpec(name="x", shape=[1, 1, 7, 3], dtype="uint8", layout="NHWC", scale=1.0, mean=[0.5], std=[0.2])
    assert normalise(pixels, spec)[0, 0, :, 0].tolist() == [0, 2, 252, 255, 255, 255, 255]


def test_open_dims_taken_at_the_targets_size_are_said(tmp_path):
    nodes = [helper.make_node("ReduceMean", ["image"], ["out"], axes=[2, 3], keepdims=0)]
    model = _save(tmp_path / "dyn.onnx", nodes, [_image(dims=("N", 3, "H", "W"))],
                  [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3])])
    r = run_cli("export", str(model), "--precision", "fp32", "-o", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr[-800:]
    assert "its open dims taken as [1, 3, 224, 224]" in r.stdout + r.stderr
    r = run_cli("export", str(model), "--precision", "fp32", "--input-shape", "1,3,32,48", "-o", str(tmp_path / "b"))
    assert r.returncode == 0 and "open dims" not in r.stdout + r.stderr


def test_an_empty_onnx_file_reads_the_same_to_every_command(tmp_path):
    f = tmp_path / "zero.onnx"
    f.write_bytes(b"")
    for args in (("export", str(f), "-o", str(tmp_path / "o")), ("inspect", str(f)),
                 ("run", str(f), "--source", str(tmp_path))):
        r = run_cli(*args)
        assert r.returncode == 2 and "empty file, not an ONNX model" in r.stderr, (args, r.stderr[-500:])


def test_a_profile_of_another_formats_recipes_still_gives_this_format_its_own():
    """x86-cpu lists onnxruntime's recipes; a TFLite export there kept nncf-default alone, and one quantizer
    failure (a TorchScript file's) failed int8 with every recipe skipped."""
    from lepton_edge import targets
    from lepton_edge.exporters.base import _recipes_for
    from lepton_edge.exporters.onnx import OnnxExporter
    from lepton_edge.exporters.tflite import TfliteExporter

    x86 = targets.load("x86-cpu")
    tfl = _recipes_for(TfliteExporter(), None, x86)
    assert tfl[0] == "nncf-default" and "s8-minmax" in tfl and len(tfl) == len(set(tfl)) > 1, tfl
    assert _recipes_for(OnnxExporter(), None, x86) == list(x86.quantization.recipes)  # (its own: unchanged)
    assert _recipes_for(TfliteExporter(), ["s8-minmax"], x86) == ["s8-minmax"]  # (asked for: only that)


def test_the_targets_default_layout_leaves_an_nhwc_model_as_it_is():
    from lepton_edge.exporters import layout

    spec = SimpleNamespace(layout="NHWC", shape=[1, 96, 96, 3])
    layout.apply(SimpleNamespace(input_spec=spec, kind="torch"), "NCHW", explicit=False)
    assert spec.layout == "NHWC"
    with pytest.raises(BadInput, match="give --layout NHWC"):
        layout.apply(SimpleNamespace(input_spec=spec, kind="torch"), "NCHW", explicit=True)


def test_a_mean_in_pixel_units_is_one_line_with_the_scaled_values(tmp_path):
    """ImageNet's mean and std in 0..255 units (how many model cards give them): after the 0..1 scaling every
    input value was about -2 for every frame, and the export went on."""
    nodes = [helper.make_node("ReduceMean", ["image"], ["out"], axes=[2, 3], keepdims=0)]
    model = _save(tmp_path / "m.onnx", nodes, [_image(dims=(1, 3, 16, 16))],
                  [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3])])
    r = run_cli("export", str(model), "--precision", "fp32", "--mean", "123.7,116.3,103.5", "--std", "58.4,57.1,57.4",
                "-o", str(tmp_path / "a"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-800:]
    assert "--mean 0.4851,0.4561,0.4059 --std 0.229,0.2239,0.2251" in r.stderr, r.stderr[-800:]
    r = run_cli("export", str(model), "--precision", "fp32", "--mean", "0.485,0.456,0.406", "--std",
                "0.229,0.224,0.225", "-o", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr[-800:]


def test_inputs_of_other_types_are_drawn_in_their_type_without_data(tmp_path):
    """With no --calib (an fp32 export validates on random inputs), a float16 or uint8 input was fed float32
    draws, which onnxruntime refuses: 'the onnx runtime cannot run the model'."""
    for elem, name in ((TensorProto.FLOAT16, "half"), (TensorProto.UINT8, "pixels")):
        nodes = [helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
                 helper.make_node("ReduceMean", ["f"], ["out"], axes=[2, 3], keepdims=0)]
        model = _save(tmp_path / f"{name}.onnx", nodes, [_image(elem=elem, dims=(1, 3, 16, 16))],
                      [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3])])
        res = _export(model, tmp_path / name)
        assert res.bundle.manifest.validation["passed"] and res.bundle.manifest.inputs[0].dtype in ("float16", "uint8")
