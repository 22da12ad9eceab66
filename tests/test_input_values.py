"""--input-value NAME=V1,V2,...: the constant a multi-input model's non-image input is fed (baked
into the graph as that input's default), recorded in the manifest and shown by `inspect` (issue 14).

The model is a real two-input ONNX graph built here: out = mean(image) * scale_factor, so the
constant it was given can be read back from what the exported bundle computes.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import lepton_edge
from conftest import run_cli
from lepton_edge.errors import BadInput


def _two_input_model(path, default: list[float] | None = None):
    """image [N,3,8,8] and scale_factor [N,2] (PaddleDetection's name and shape) -> [N,2]; with
    `default`, scale_factor carries that value as an initializer (an overridable default)."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 8, 8])
    scale = helper.make_tensor_value_info("scale_factor", TensorProto.FLOAT, ["N", 2])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 2])
    nodes = [helper.make_node("ReduceMean", ["image"], ["m"], axes=[1, 2, 3], keepdims=0),
             helper.make_node("Unsqueeze", ["m", "axis"], ["m1"]),
             helper.make_node("Mul", ["m1", "scale_factor"], ["out"])]
    inits = [helper.make_tensor("axis", TensorProto.INT64, [1], [1])]
    if default is not None:
        inits.append(helper.make_tensor("scale_factor", TensorProto.FLOAT, [1, 2], default))
    graph = helper.make_graph(nodes, "two_inputs", [image, scale], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture
def model(tmp_path):
    return _two_input_model(tmp_path / "two.onnx")


def _export(model, out, **kw):
    return lepton_edge.export(str(model), target="x86-cpu", precision="fp32", out=out, measure_latency=False, **kw)


def _run_frame_only(bundle, x):
    """What the device does: feed the image input alone; the model's default supplies the rest."""
    s = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    return s.run(None, {"image": x})[0]


def test_input_value_sets_the_constant_the_model_computes_with(model, tmp_path):
    x = np.random.default_rng(0).random((1, 3, 8, 8), dtype=np.float32)
    default = _export(model, tmp_path / "a", name="default").bundle
    given = _export(model, tmp_path / "b", name="given", input_values={"scale_factor": [2, 4]}).bundle
    np.testing.assert_allclose(_run_frame_only(default, x), x.mean() * np.array([[1, 1]]), rtol=1e-5)
    np.testing.assert_allclose(_run_frame_only(given, x), x.mean() * np.array([[2, 4]]), rtol=1e-5)
    m = given.manifest
    assert [i.name for i in m.inputs] == ["image", "scale_factor"] and m.inputs[1].value == [2.0, 4.0]
    assert m.compression["constant_inputs"] == [{"name": "scale_factor", "shape": [1, 2], "dtype": "float32",
                                                  "value": [2.0, 4.0], "rule": "set by --input-value"}]
    rule = default.manifest.compression["constant_inputs"][0]["rule"]
    assert default.manifest.inputs[1].value == [1.0, 1.0] and rule.startswith("ones")


def test_input_value_flag_and_inspect_of_the_bundle(model, tmp_path):
    r = run_cli("export", str(model), "--target", "x86-cpu", "--precision", "fp32", "--input-value",
                "scale_factor=0.5,3", "-o", str(tmp_path), "--name", "cli", "--json")
    assert r.returncode == 0, r.stderr
    bundle = json.loads(r.stdout)["bundle"]
    info = json.loads(run_cli("inspect", bundle, "--json").stdout)
    assert info["bundle"]["constant_inputs"] == [{"name": "scale_factor", "dtype": "float32", "shape": [1, 2],
                                                  "value": [0.5, 3.0], "rule": "set by --input-value"}]
    assert [i["name"] for i in info["inputs"]] == ["image"]  # the frame input; the constant is listed apart
    table = run_cli("inspect", bundle).stdout
    assert "scale_factor: float32 [1, 2] = [0.5, 3] (set by --input-value)" in table


def test_inspect_raw_onnx_lists_inputs_that_have_defaults(tmp_path):
    from lepton_edge.inspect import inspect_onnx, inspect_onnx_wire

    f = _two_input_model(tmp_path / "defaults.onnx", default=[1.5, -2.0])
    info = json.loads(run_cli("inspect", str(f), "--json").stdout)
    assert info["constant_inputs"] == [{"name": "scale_factor", "dtype": "float32", "shape": ["N", 2],
                                        "value": [1.5, -2.0]}]
    assert inspect_onnx_wire(f) == inspect_onnx(f)  # the device's reader (no onnx package) sees the same
    assert "scale_factor: float32 ['N', 2] = [1.5, -2]" in run_cli("inspect", str(f)).stdout
    plain = _two_input_model(tmp_path / "plain.onnx")  # no default: an ordinary input, no constant
    info = inspect_onnx(plain)
    assert info["constant_inputs"] == [] and [i["name"] for i in info["inputs"]] == ["image", "scale_factor"]
    # --input-value replaces the default the file has; without it the file's default stays.
    x = np.random.default_rng(1).random((1, 3, 8, 8), dtype=np.float32)
    kept = _export(f, tmp_path / "kept", name="kept").bundle
    np.testing.assert_allclose(_run_frame_only(kept, x), x.mean() * np.array([[1.5, -2.0]]), rtol=1e-5)
    given = _export(f, tmp_path / "given", name="given", input_values={"scale_factor": [3, 5]}).bundle
    np.testing.assert_allclose(_run_frame_only(given, x), x.mean() * np.array([[3, 5]]), rtol=1e-5)
    assert given.manifest.compression["constant_inputs"][0]["rule"] == "set by --input-value"


@pytest.mark.parametrize("values, message", [
    (["size=1,1"], "--input-value: the model has no input 'size'; its constant inputs: scale_factor"),
    (["image=1,1"], "--input-value: 'image' is the image input (the camera frame feeds it); its constant "
                    "inputs: scale_factor"),
    (["scale_factor=1,2,3"], "--input-value scale_factor: 3 value(s) given, the input [1, 2] takes 2"),
    (["scale_factor=1,x"], "--input-value: scale_factor: values must be finite numbers, got '1,x'"),
    (["scale_factor"], "--input-value: must look like NAME=V1,V2,... (e.g. scale_factor=1,1), got 'scale_factor'"),
    (["scale_factor=1,1", "scale_factor=2,2"], "--input-value: 'scale_factor' is given twice"),
])
def test_bad_input_values_are_one_line(model, tmp_path, values, message):
    flags = [a for v in values for a in ("--input-value", v)]
    out = tmp_path / "out"
    r = run_cli("export", str(model), "--target", "x86-cpu", "--precision", "fp32", *flags, "-o", str(out))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"error: {message}"
    assert not out.exists() or not list(out.iterdir())  # nothing written


def test_input_value_on_a_single_input_model_and_integer_inputs(tmp_path):
    import torch

    single = tmp_path / "single.onnx"
    torch.onnx.export(torch.nn.Conv2d(3, 2, 3), (torch.zeros(1, 3, 8, 8),), str(single), dynamo=False,
                      input_names=["pixels"])
    with pytest.raises(BadInput, match=r"^--input-value: single has one input \(pixels\), fed by the camera"):
        _export(single, tmp_path, input_values={"scale_factor": [1, 1]})
    with pytest.raises(BadInput, match=r"^--input-value sets the constant inputs of an ONNX model with several"):
        lepton_edge.export(torch.nn.Conv2d(3, 2, 3), target="x86-cpu", precision="fp32", out=tmp_path,
                           input_values={"x": [1]}, input_shape=[1, 3, 8, 8])
    with pytest.raises(BadInput, match=r"^input_values: x: values must be finite numbers"):
        _export(single, tmp_path, input_values={"x": [float("inf")]})
    # An integer input takes whole numbers.
    from lepton_edge.model_source import _given_value

    assert _given_value("k", [3, -1], [1, 2], np.int64).tolist() == [[3, -1]]
    with pytest.raises(BadInput, match=r"^--input-value k: the input is int64; give whole numbers"):
        _given_value("k", [1.5, 2], [1, 2], np.int64)
    # A bool input takes 0 or 1: 2 (or -1) was accepted and silently read as True.
    assert _given_value("flag", [0, 1], [2], np.bool_).tolist() == [False, True]
    for bad in ([2, 0], [0, -1]):
        with pytest.raises(BadInput, match=r"^--input-value flag: values out of bool's range \(0 to 1\)"):
            _given_value("flag", bad, [2], np.bool_)
    with pytest.raises(BadInput, match=r"^--input-value k: values out of uint8's range \(0 to 255\)"):
        _given_value("k", [256], [1], np.uint8)
