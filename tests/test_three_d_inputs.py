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
