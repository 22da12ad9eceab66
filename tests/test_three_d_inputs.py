"""A model with a 3-D image input ([1,28,28], a Keras MNIST model's [N,28,28]) gets one answer everywhere:
`run` on the file, `export` from photos or from its own [N,28,28] tensors, and `run` on the bundle.

Why: `run` fed such a file the frame's tensor without one dim, `export` refused photos for it ("not an
image's 4 dimensions"), an export without --calib wrote a bundle with the 3-D shape that `run` then
refused, and a dynamic first dim ([N,28,28]) was "cannot tell the layout" (the layout it asked for then
fed 3 colour planes as a batch of 3). Exported, the model takes the 4-D frame tensor (lepton_edge/frame_input.py).
"""
from __future__ import annotations

import json

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import run_cli
from lepton_edge.runtime import Runtime


def _model(path, batch) -> None:
    """x [batch,28,28] -> Unsqueeze -> Conv (4 filters) -> Relu -> Flatten -> Gemm -> [batch,10]."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.5, (4, 1, 3, 3)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.normal(0, 0.05, (10, 4 * 26 * 26)).astype(np.float32), "fc")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    nodes = [helper.make_node("Unsqueeze", ["x", "axes"], ["x4"]), helper.make_node("Conv", ["x4", "w"], ["c"]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 28, 28])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])], [w, fc, axes])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, str(path))


def _photos(tmp_path, n: int = 24):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):  # smooth shapes, not noise: a frame a camera could give
        img = np.zeros((60, 80, 3), np.uint8)
        cv2.circle(img, (int(rng.integers(10, 70)), int(rng.integers(10, 50))), int(rng.integers(5, 25)),
                   tuple(int(v) for v in rng.integers(60, 255, 3)), -1)
        cv2.imwrite(str(folder / f"{i:02d}.png"), cv2.GaussianBlur(img, (5, 5), 0))
    return folder


def _expected(model, frame_bgr) -> np.ndarray:
    """The model's own output on the frame's gray pixels / 255 ([1,1,28,28] as the runtime prepares any gray
    input), fed as the model takes them: [1,28,28]."""
    x = Runtime.load(model, task="raw").preprocess(frame_bgr)
    assert x.shape == (1, 1, 28, 28)
    gray = cv2.resize(cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2GRAY), (28, 28), interpolation=cv2.INTER_AREA)
    assert np.abs(x[0, 0] - gray / 255).max() < 0.05  # (the runtime's own resize: a gray frame / 255 still)
    s = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x.reshape(1, 28, 28)})[0]


@pytest.mark.parametrize("batch", [1, "N"])
def test_a_3d_gray_model_runs_exports_from_photos_and_its_bundle_runs_alike(tmp_path, batch):
    model = tmp_path / "m.onnx"
    _model(model, batch)
    photos = _photos(tmp_path)
    frame = cv2.imread(str(photos / "00.png"))
    want = _expected(model, frame)
    plain = Runtime.load(model, task="raw")  # ([N,28,28]: was "cannot tell the layout of input 'x'")
    assert plain.spec.shape == [1, 1, 28, 28] and plain.spec.color == "GRAY"
    np.testing.assert_allclose(plain.predict(frame)[0], want, rtol=1e-4, atol=1e-4)
    for precision in ("fp32", "int8"):
        out = tmp_path / precision
        r = run_cli("export", str(model), "--target", "x86-cpu", "--calib", str(photos), "--precision", precision,
                    "--out", str(out), "--json")
        assert r.returncode == 0, r.stderr[-1500:]  # was: "images cannot feed it"
        bundle = json.loads(r.stdout)["bundle"]
        man = json.loads((out.glob("*/manifest.json").__next__()).read_text())
        assert man["inputs"][0]["shape"] == [1, 1, 28, 28] and man["inputs"][0]["color"] == "GRAY"
        rt = Runtime.load(bundle, task="raw")
        got = rt.predict(frame)[0]
        if precision == "fp32":
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        else:
            assert got.shape == want.shape and np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.95
        res = run_cli("run", bundle, "--source", str(photos), "-n", "2", "--jsonl", "-", "--no-show")
        assert res.returncode == 0 and len([ln for ln in res.stdout.splitlines() if ln.startswith("{")]) == 2, \
            res.stderr[-1500:]  # was: "shape [1, 28, 28] is not an image's 4 dimensions"


def test_a_3d_model_without_calibration_data_exports_a_bundle_that_runs(tmp_path):
    model = tmp_path / "m.onnx"
    _model(model, 1)
    r = run_cli("export", str(model), "--target", "x86-cpu", "--precision", "fp32", "--out", str(tmp_path / "o"),
                "--json")
    assert r.returncode == 0, r.stderr[-1500:]
    frame = cv2.imread(str(_photos(tmp_path, 1) / "00.png"))
    np.testing.assert_allclose(Runtime.load(json.loads(r.stdout)["bundle"], task="raw").predict(frame)[0],
                               _expected(model, frame), rtol=1e-4, atol=1e-4)  # was refused by `run`


def test_a_3d_models_own_tensors_calibrate_it_and_a_wrong_size_names_their_shape(tmp_path):
    model = tmp_path / "m.onnx"
    _model(model, "N")
    rng = np.random.default_rng(2)
    np.save(tmp_path / "x.npy", rng.uniform(0, 1, (40, 28, 28)).astype(np.float32))
    r = run_cli("export", str(model), "--target", "x86-cpu", "--calib", str(tmp_path / "x.npy"), "--precision", "fp32",
                "--input-shape", "1,28,28", "--out", str(tmp_path / "o"), "--json")
    assert r.returncode == 0, r.stderr[-1500:]
    assert json.loads(r.stdout)["bundle"]
    np.save(tmp_path / "bad.npy", rng.uniform(0, 1, (40, 27, 28)).astype(np.float32))
    r = run_cli("export", str(model), "--target", "x86-cpu", "--calib", str(tmp_path / "bad.npy"), "--out",
                str(tmp_path / "o2"))
    assert r.returncode == 2 and "array of shape [40, 27, 28]" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_the_dim_a_frame_adds_and_a_picture_of_any_size(tmp_path):
    """A dynamic first dim is a batch, unless the input is a picture of any size ([H,W,3]: a 1x224 row of
    pixels was fed, and export wrote a gray [1,1,224,3] input)."""
    from lepton_edge import frame_input

    assert frame_input.frame_dims(["N", 28, 28]) == ["N", 1, 28, 28]
    assert frame_input.frame_dims([1, 28, 28]) == [1, 1, 28, 28]
    assert frame_input.frame_dims([3, 32, 32]) == [1, 3, 32, 32]
    assert frame_input.frame_dims(["H", "W", 3]) == [1, "H", "W", 3]
    g = helper.make_graph([helper.make_node("Shape", ["x"], ["s"]),
                           helper.make_node("Cast", ["s"], ["y"], to=TensorProto.FLOAT)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["H", "W", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "hw3.onnx"))
    frame = cv2.imread(str(_photos(tmp_path, 1) / "00.png"))
    np.testing.assert_array_equal(Runtime.load(tmp_path / "hw3.onnx", task="raw").predict(frame)[0], [224, 224, 3])
    r = run_cli("export", str(tmp_path / "hw3.onnx"), "--target", "x86-cpu", "--precision", "fp32", "--out",
                str(tmp_path / "o"), "--input-shape", "64,48,3", "--json")
    assert r.returncode == 0, r.stderr[-1500:]
    rt = Runtime.load(json.loads(r.stdout)["bundle"], task="raw")
    assert rt.spec.shape == [1, 64, 48, 3] and rt.spec.layout == "NHWC"
    np.testing.assert_array_equal(rt.predict(frame)[0], [64, 48, 3])


def _with_names_taken(path) -> None:
    """[N,28,28] -> mean, plus an initializer named as the Squeeze's axes would be and an If branch that
    reads the input and makes a tensor named as the Squeeze's output would be; `x` is also an output."""
    then_g = helper.make_graph([helper.make_node("ReduceMean", ["x"], ["x__lepton_frame"], keepdims=0),
                                helper.make_node("Identity", ["x__lepton_frame"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("ReduceMax", ["x"], ["e"], keepdims=0)], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2], keepdims=0),
             helper.make_node("If", ["cond"], ["r"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Add", ["m", "r"], ["a"]), helper.make_node("Add", ["a", "x__lepton_frame_axes"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 28, None])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"]),
                           helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 28, None])],
                          [numpy_helper.from_array(np.array(True), "cond"),
                           numpy_helper.from_array(np.zeros(1, np.float32), "x__lepton_frame_axes")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, str(path))


def test_names_the_model_already_uses_an_unnamed_dim_and_an_input_that_is_also_an_output(tmp_path):
    """The Squeeze's names are free in every graph, subgraphs too (an initializer of its axes' name made the
    bundle unloadable, a branch's tensor of its output's name a cycle); an unnamed dim stays unnamed (it was
    named '?', telling other tools it equals every other '?'); an output that is the input keeps its name (it
    was renamed to the internal one)."""
    _with_names_taken(tmp_path / "m.onnx")
    r = run_cli("export", str(tmp_path / "m.onnx"), "--target", "x86-cpu", "--precision", "fp32", "--out",
                str(tmp_path / "o"), "--input-shape", "1,28,28", "--json")
    assert r.returncode == 0, r.stderr[-1500:]
    bundle = json.loads(r.stdout)["bundle"]
    m = onnx.load(str(next((tmp_path / "o").glob("*/*.onnx"))))
    dims = m.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", 1, 28, 0] and not dims[3].HasField("dim_param")
    assert [o.name for o in m.graph.output] == ["y", "x"]
    frame = cv2.imread(str(_photos(tmp_path, 1) / "00.png"))
    y, x = Runtime.load(bundle, task="raw").predict(frame)
    assert x.shape == (1, 1, 28, 28)
    np.testing.assert_allclose(y, [2 * x.mean()], rtol=1e-5)


def test_input_shape_errors_name_the_models_own_shape(tmp_path):
    model = tmp_path / "m.onnx"
    _model(model, "N")
    r = run_cli("export", str(model), "--target", "x86-cpu", "--precision", "fp32", "--out", str(tmp_path / "o"),
                "--input-shape", "1,32,32")
    assert r.returncode == 2 and "--input-shape [1, 32, 32] does not fit the model's input x ['N', 28, 28]" in r.stderr
    r = run_cli("export", str(model), "--target", "x86-cpu", "--precision", "fp32", "--out", str(tmp_path / "o"),
                "--input-shape", "2,28,28")
    assert r.returncode == 2 and "asks for a batch of 2" in r.stderr, r.stderr  # (it said the model's batch is 2)
