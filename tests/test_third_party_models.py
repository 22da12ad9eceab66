"""Plain model files the project did not make: dynamic shapes, NHWC, several outputs, a
YOLO-shaped detector; and `bench` over bundles and thread counts."""
from __future__ import annotations

import json
import time

import cv2
import numpy as np
import pytest
import torch

from conftest import run_cli
from lepton_edge.errors import BadInput
from lepton_edge.runtime import Runtime


class TwoHeads(torch.nn.Module):
    """Dynamic batch and spatial size; a class head and a feature map."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        f = torch.relu(self.conv(x))
        return self.fc(f.mean((2, 3))), f


class BrightSpotDetector(torch.nn.Module):
    """YOLOv8-shaped output [1, 4+nc, N] over a 4x4 grid of 16x16 cells on a 64x64 input: each
    cell is a candidate box, class 0 scored by the cell's brightness (a real, if simple, detector)."""

    def forward(self, x):
        cells = torch.nn.functional.avg_pool2d(x.mean(1, keepdim=True), 16).flatten(1)  # [1, 16]
        idx = torch.arange(16, dtype=torch.float32)
        cx, cy = (idx % 4) * 16 + 8, torch.div(idx, 4, rounding_mode="floor") * 16 + 8
        wh = torch.full((16,), 16.0)
        boxes = torch.stack([cx, cy, wh, wh])[None].expand(x.shape[0], 4, 16)
        scores = torch.stack([cells, 1 - cells], 1)  # [1, 2, 16]
        return torch.cat([boxes, scores], 1)


def _onnx(module, path, shape, dynamic=None, names=("input",), outputs=("out",)):
    torch.onnx.export(module.eval(), torch.zeros(shape), str(path), input_names=list(names),
                      output_names=list(outputs), dynamic_axes=dynamic, dynamo=False)
    return path


def test_dynamic_shape_model_with_two_outputs(tmp_path):
    path = _onnx(TwoHeads(), tmp_path / "dyn.onnx", (1, 3, 32, 32),
                 {"input": {0: "batch", 2: "h", 3: "w"}}, outputs=("logits", "features"))
    rt = Runtime.load(path)
    assert rt.spec.shape == [1, 3, 224, 224] and rt.task == "raw"  # dynamic size: the default, said in the spec
    outs = rt.predict(np.zeros((480, 640, 3), np.uint8))
    assert [list(o.shape) for o in outs] == [[1, 4], [1, 8, 224, 224]]
    rt = Runtime.load(path, input_spec="size=96x128;color=BGR", task="classify")
    assert rt.spec.hw() == (96, 128) and len(rt.predict(np.zeros((50, 50, 3), np.uint8))) == 4


def _open_hw_tflite(module, tmp_path, stored: list[int] | None = None):
    """`module` ([1,H,W,3] in) as a .tflite whose input signature leaves H and W open, as TensorFlow writes
    one exported with None dims; `stored`: the input's stored (default) shape, as TensorFlow's 1s."""
    import litert_torch
    from ai_edge_litert.tools import flatbuffer_utils as fu

    static = tmp_path / "static.tflite"
    litert_torch.convert(module, (torch.zeros(1, 32, 32, 3),)).export(str(static))
    model = fu.convert_bytearray_to_object(bytearray(static.read_bytes()))
    sg = model.subgraphs[0]
    sg.tensors[sg.inputs[0]].shapeSignature = np.array([1, -1, -1, 3], np.int32)
    if stored:
        sg.tensors[sg.inputs[0]].shape = np.array(stored, np.int32)
    path = tmp_path / "dynamic.tflite"
    path.write_bytes(bytes(fu.convert_object_to_bytearray(model)))
    return path


def test_tflite_with_dynamic_spatial_dims(tmp_path):
    """A .tflite whose input signature leaves H and W open (as TensorFlow exports with None dims
    make): the runtime fixes them (224 by default, or the --input-spec size) and computes what
    the model computes at that size."""
    pytest.importorskip("litert_torch")

    class Nhwc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, x):  # [1, H, W, 3] -> class scores and an NHWC feature map
            f = torch.relu(self.conv(x.permute(0, 3, 1, 2)))
            return self.fc(f.mean((2, 3))), f.permute(0, 2, 3, 1)

    torch.manual_seed(0)
    module = Nhwc().eval()
    path = _open_hw_tflite(module, tmp_path)

    rt = Runtime.load(path)
    assert rt.spec.shape == [1, 224, 224, 3] and rt.spec.layout == "NHWC"
    assert [o.shape for o in rt.predict(np.zeros((480, 640, 3), np.uint8))] == [(1, 4), (1, 224, 224, 8)]
    rt = Runtime.load(path, input_spec="size=96x128")
    frame = np.random.default_rng(0).integers(0, 255, (480, 640, 3), np.uint8)
    x = rt.preprocess(frame)
    assert x.shape == (1, 96, 128, 3)
    logits, fmap = rt.predict(x)
    with torch.no_grad():
        want = [t.numpy() for t in module(torch.from_numpy(x))]
    assert fmap.shape == (1, 96, 128, 8)
    np.testing.assert_allclose(logits, want[0], atol=1e-4)
    np.testing.assert_allclose(fmap, want[1], atol=1e-4)


def test_tflite_whose_dynamic_inputs_default_shape_cannot_be_allocated_runs_at_the_size_given(tmp_path):
    """TensorFlow stores an input with open dimensions as 1s ([1,1,1,3]): a strided 5x5 convolution cannot take
    1x1, and LiteRT's allocation at that default failed, so the file was refused ("XNNPack delegate failed to
    reshape") though it runs at any real size. It is now allocated at the size run gives it (probed first)."""
    pytest.importorskip("litert_torch")

    class Strided(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 5, stride=2)
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, x):  # [1, H, W, 3] -> class scores
            return self.fc(torch.relu(self.conv(x.permute(0, 3, 1, 2))).mean((2, 3)))

    torch.manual_seed(0)
    module = Strided().eval()
    path = _open_hw_tflite(module, tmp_path, stored=[1, 1, 1, 3])

    frame = np.random.default_rng(0).integers(0, 255, (120, 160, 3), np.uint8)
    for spec, hw in ((None, (224, 224)), ("size=64x80", (64, 80))):
        rt = Runtime.load(path, input_spec=spec, task="raw")
        assert rt.spec.hw() == hw
        x = rt.preprocess(frame)
        with torch.no_grad():
            want = module(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(rt.infer(x)[0], want, atol=1e-4)
    with pytest.raises(BadInput) as e:  # a size it cannot take either: one line
        Runtime.load(path, input_spec="size=2x2")
    assert "\n" not in str(e.value) and "cannot resize input to [1, 2, 2, 3]" in str(e.value), e.value
    from lepton_edge.inspect import inspect

    assert inspect(path)["xnnpack"] == {"note": "decided at the size the model is run at (its input's dimensions "
                                                "are open, and the default shape stored in the file cannot be "
                                                "allocated)"}  # (not 'LiteRT cannot load it')


def test_nhwc_model_and_input_spec_errors(tmp_path):
    class Nhwc(torch.nn.Module):
        def forward(self, x):  # [1, H, W, 3] -> class scores from the colour means
            return torch.softmax(x.mean((1, 2)) * 10, 1)

    path = _onnx(Nhwc(), tmp_path / "nhwc.onnx", (1, 48, 64, 3))
    rt = Runtime.load(path)
    assert (rt.spec.layout, rt.spec.hw(), rt.task) == ("NHWC", (48, 64), "classify")
    red = np.zeros((100, 100, 3), np.uint8)
    red[:, :, 2] = 255  # BGR red; the default colour order for a plain model is RGB
    assert rt.predict(red)[0]["index"] == 0
    assert Runtime.load(path, input_spec="color=BGR").predict(red)[0]["index"] == 2
    for bad, words in [("colour=RGB", "key one of"), ("scale=abc", "bad value for scale"),
                       ("layout=NCWH", "layout"), ("{bad json", "invalid JSON")]:
        r = run_cli("run", str(path), "--source", "0", "--input-spec", bad)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, (bad, r.stderr)


def test_yolo_shaped_detector_end_to_end(tmp_path):
    path = _onnx(BrightSpotDetector(), tmp_path / "det.onnx", (1, 3, 64, 64))
    frames = tmp_path / "frames"
    frames.mkdir()
    img = np.zeros((128, 256, 3), np.uint8)  # letterboxed into 64x64: scale 0.25, 16 px bars
    img[0:64, 192:256] = 255  # a bright patch filling the top-right cell
    cv2.imwrite(str(frames / "a.png"), img)
    jl = tmp_path / "d.jsonl"
    r = run_cli("run", str(path), "--source", str(frames), "--task", "detect", "--conf", "0.5",
                "--input-spec", "resize=letterbox", "--jsonl", str(jl), "--save", str(tmp_path / "d.avi"))
    assert r.returncode == 0, r.stderr
    (res,) = [json.loads(line) for line in jl.read_text().splitlines()]
    dets = [d for d in res["result"] if d["class"] == 0]
    assert len(dets) == 1 and dets[0]["score"] > 0.9
    assert dets[0]["box"] == [192.0, 0.0, 256.0, 64.0]  # the patch, in frame pixels
    assert (tmp_path / "d.avi").stat().st_size > 0


def test_bench_table_and_json(int8_bundle, rpi4_bundle):
    r = run_cli("bench", str(int8_bundle.bundle.path), str(rpi4_bundle.bundle.path), "--threads", "1,2",
                "--runs", "40", "--warmup", "5", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(row["format"], row["threads"]) for row in rows] == [("onnx", 1), ("onnx", 2), ("tflite", 1),
                                                                  ("tflite", 2)]
    for row in rows:
        inf = row["latency_ms"]["inference"]
        assert inf["n"] == 40 and 0 < inf["p50"] <= inf["p95"] <= inf["p99"] <= inf["max"]
        assert row["latency_ms"]["preprocess"]["p50"] > 0 and row["throughput_fps"] > 0
        assert 20e6 < row["peak_rss_bytes"] < 2e9
    r = run_cli("bench", str(int8_bundle.bundle.path), "--runs", "20")
    assert r.returncode == 0 and "inference" in r.stdout and "fashion-cnn-x86-cpu" in r.stdout and "MiB" in r.stdout
    r = run_cli("bench", str(int8_bundle.bundle.path), "--threads", "two")
    assert r.returncode == 2 and "--threads" in r.stderr


def _uint8_classifier(path) -> None:
    """uint8 [1,32,32,3] pixels in (the model scales and transposes them itself, as many exported
    detectors and Keras models do) -> Conv -> Relu -> pool -> Gemm -> 4 scores; no node has a name."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.5).astype(np.float32), "w")
    fc = numpy_helper.from_array((rng.standard_normal((8, 4)) * 0.5).astype(np.float32), "fc")
    k = numpy_helper.from_array(np.array(1 / 255, np.float32), "k")
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["xf", "k"], ["xs"]),
             helper.make_node("Transpose", ["xs"], ["xt"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["xt", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 32, 32, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w, fc, k])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_a_uint8_input_model_exports_int8_and_runs_on_raw_pixels(tmp_path):
    """The bundle feeds what the model takes: the 0..255 pixels as uint8 (its spec says so), in the
    export's calibration and validation as on the device."""
    from third_party import corpus

    _uint8_classifier(tmp_path / "u8.onnx")
    r = run_cli("export", str(tmp_path / "u8.onnx"), "--target", "x86-cpu", "--calib", str(corpus.calib_dir()),
                "--out", str(tmp_path / "out"), "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    (bundle,) = [p.parent for p in (tmp_path / "out").rglob("manifest.json")]
    man = json.loads((bundle / "manifest.json").read_text())
    (spec,) = man["inputs"]
    assert (spec["dtype"], spec["scale"], spec["layout"]) == ("uint8", 1.0, "NHWC"), spec
    assert man["precision"] == "int8"
    r = run_cli("run", str(bundle), "--source", str(corpus.eval_dir()), "-n", "5", "--jsonl", "-")
    assert r.returncode == 0, r.stderr[-2000:]
    assert len([ln for ln in r.stdout.splitlines() if ln.startswith("{")]) == 5


def test_an_input_that_is_not_an_image_takes_arrays_not_photos(tmp_path):
    """A 1-D signal input ([1, 400]): photos cannot feed it (one line, no traceback); a .npy of inputs,
    stacked [N, 400] or [N, 1, 400], can."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from third_party import corpus

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((400, 3)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 400])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "sig.onnx"))
    r = run_cli("export", str(tmp_path / "sig.onnx"), "--target", "x86-cpu", "--calib", str(corpus.calib_dir()),
                "--out", str(tmp_path / "a"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert "not an image" in line and ".npy" in line
    x = np.random.default_rng(1).standard_normal((64, 1, 400)).astype(np.float32)
    for name, arr in (("stack", x[:, 0]), ("batch1", x)):
        np.save(tmp_path / f"{name}.npy", arr)
        r = run_cli("export", str(tmp_path / "sig.onnx"), "--target", "x86-cpu",
                    "--calib", str(tmp_path / f"{name}.npy"), "--out", str(tmp_path / name))
        assert r.returncode == 0, (name, r.stderr[-2000:])
        assert list((tmp_path / name).rglob("manifest.json")), name
    # 4-D, but 64 channels (a feature map): the same, photos refused, arrays taken
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 64, 1, 1)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="mix")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "fmap.onnx"))
    r = run_cli("export", str(tmp_path / "fmap.onnx"), "--target", "x86-cpu", "--calib", str(corpus.calib_dir()),
                "--out", str(tmp_path / "f1"))
    assert r.returncode == 2 and "has 64 channels" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    np.save(tmp_path / "fmap.npy", np.random.default_rng(2).standard_normal((48, 64, 8, 8)).astype(np.float32))
    r = run_cli("export", str(tmp_path / "fmap.onnx"), "--target", "x86-cpu", "--calib", str(tmp_path / "fmap.npy"),
                "--out", str(tmp_path / "f2"))
    assert r.returncode == 0, r.stderr[-2000:]


def _with_external_weights(path, location: str | None = None) -> None:
    """A small NCHW classifier whose weights live in a file beside it (onnx's external data), as large
    exports and some converters write them; `location` rewrites where the model says they are."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("GlobalAveragePool", ["c"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["y"], name="flat")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=0)
    if location is not None:
        m = onnx.load(str(path), load_external_data=False)
        for e in m.graph.initializer[0].external_data:
            if e.key == "location":
                e.value = location
        onnx.save(m, str(path))


def test_a_model_with_external_weights_exports_as_one_file(tmp_path):
    """The weights beside the model are read in (the bundle ships one model file); a model that says its
    weights are outside its own folder is refused with one line, the file never read."""
    from third_party import corpus

    src = tmp_path / "src"
    src.mkdir()
    _with_external_weights(src / "ext.onnx")
    assert (src / "ext.onnx.data").stat().st_size > (src / "ext.onnx").stat().st_size
    r = run_cli("export", str(src / "ext.onnx"), "--target", "x86-cpu", "--precision", "fp32",
                "--calib", str(corpus.calib_dir()), "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-2000:]
    (bundle,) = [p.parent for p in (tmp_path / "out").rglob("manifest.json")]
    assert sorted(p.name for p in bundle.iterdir()) == ["manifest.json", "model.onnx"]
    r = run_cli("run", str(bundle), "--source", str(corpus.eval_dir()), "-n", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    _with_external_weights(src / "escape.onnx", location="../../../../etc/passwd")
    r = run_cli("export", str(src / "escape.onnx"), "--target", "x86-cpu", "--calib", str(corpus.calib_dir()),
                "--out", str(tmp_path / "bad"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "outside" in r.stderr and not (tmp_path / "bad").exists()


def _tiny(path, in_shape, out_shape, nodes, inits=()) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.example", 1)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_inputs_a_camera_frame_cannot_fill_are_one_line_and_a_scalar_output_exports(tmp_path):
    """Four channels, a fixed batch of 2, and --input-shape with a batch of 4: the device feeds one 1- or
    3-channel frame a run, so each is refused at load with one line, as is an operator of a custom domain
    (no custom-op library is ever loaded), named at once, at the top or inside an If branch. A model
    whose output is a scalar (one value a run) exports and runs."""
    import onnx
    from onnx import helper, numpy_helper

    from third_party import corpus

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32), "w")
    _tiny(tmp_path / "rgba.onnx", [1, 4, 32, 32], [1, 8, 32, 32],
          [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], name="conv")], [w])
    _tiny(tmp_path / "batch2.onnx", [2, 3, 32, 32], [2, 3, 32, 32], [helper.make_node("Relu", ["x"], ["y"], name="r")])
    _tiny(tmp_path / "dyn.onnx", ["N", 3, 32, 32], ["N", 3, 32, 32], [helper.make_node("Relu", ["x"], ["y"], name="r")])
    _tiny(tmp_path / "custom.onnx", [1, 3, 32, 32], [1, 3, 32, 32],
          [helper.make_node("Mystery", ["x"], ["y"], domain="com.example", name="m")])
    out = [helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [1, 3, 32, 32])]
    branch = {"then_branch": helper.make_graph([helper.make_node("Mystery", ["x"], ["b"], domain="com.example")],
                                               "then", [], out),
              "else_branch": helper.make_graph([helper.make_node("Relu", ["x"], ["b"])], "else", [], out)}
    _tiny(tmp_path / "branch.onnx", [1, 3, 32, 32], [1, 3, 32, 32],
          [helper.make_node("If", ["c"], ["y"], name="if", **branch)], [numpy_helper.from_array(np.array(True), "c")])
    # (a convolution before the mean: a graph of ReduceMean alone has nothing int8 quantizes, refused as such)
    w3 = numpy_helper.from_array(np.random.default_rng(1).standard_normal((3, 3, 3, 3)).astype(np.float32), "w3")
    _tiny(tmp_path / "scalar.onnx", [1, 3, 32, 32], [],
          [helper.make_node("Conv", ["x", "w3"], ["c"], pads=[1, 1, 1, 1], name="conv"),
           helper.make_node("ReduceMean", ["c"], ["y"], keepdims=0, name="mean")], [w3])
    calib = ("--calib", str(corpus.calib_dir()), "--target", "x86-cpu")
    for model, extra, words in [("rgba", (), "has 4 channels"), ("batch2", (), "fixed batch of 2"),
                                ("dyn", ("--input-shape", "4,3,32,32"), "asks for a batch of 4"),
                                ("custom", (), "custom operators com.example:Mystery"),
                                ("branch", (), "custom operators com.example:Mystery")]:
        r = run_cli("export", str(tmp_path / f"{model}.onnx"), *calib, *extra, "--out", str(tmp_path / model))
        assert r.returncode == 2 and "Traceback" not in r.stderr, (model, r.stderr[-2000:])
        (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert words in line, (model, line)
        assert not (tmp_path / model).exists()
    for precision in ("int8", "fp16"):
        r = run_cli("export", str(tmp_path / "scalar.onnx"), *calib, "--precision", precision,
                    "--out", str(tmp_path / f"scalar-{precision}"))
        assert r.returncode == 0, (precision, r.stderr[-2000:])
    (bundle,) = [p.parent for p in (tmp_path / "scalar-int8").rglob("manifest.json")]
    r = run_cli("run", str(bundle), "--source", str(corpus.eval_dir()), "-n", "3")
    assert r.returncode == 0, r.stderr[-2000:]


def test_inputs_that_would_not_fit_the_memory_budget_are_refused_before_they_are_read(tmp_path):
    """A 1024x1024 input and a folder of photos held as pixels for the whole export: over half the
    --max-memory budget is one line before any image is decoded (a 4096x4096 model once read 7 GB of
    pixels, and its noisy copy for the ceiling asked for 22 GB more, and the kernel killed the export)."""
    from onnx import helper

    from third_party import corpus

    _tiny(tmp_path / "big.onnx", [1, 3, 1024, 1024], [1, 3], [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0, name="mean"),
        helper.make_node("Softmax", ["m"], ["y"], name="softmax")])
    t0 = time.monotonic()
    r = run_cli("export", str(tmp_path / "big.onnx"), "--target", "x86-cpu", "--calib", str(corpus.calib_dir()),
                "--max-memory", "150M", "--out", str(tmp_path / "out"))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert "over half the export's memory budget" in line and "a --calib folder of at most" in line, line
    assert "load calibration data" not in r.stderr and time.monotonic() - t0 < 30
    r = run_cli("export", str(tmp_path / "big.onnx"), "--target", "x86-cpu", "--calib", str(corpus.calib_dir()),
                "--max-memory", "4G", "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-2000:]
