"""An int8 ONNX export for another kind of device is judged in the graph's exact arithmetic (onnxruntime's QDQ
fusion off), not by this host's fused kernels, which on an x86 CPU without VNNI saturate where the device's do
not (exporters/base.exact_int8); for this host's own kind of target, it is judged as the device will run it."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lepton_edge


@pytest.fixture(scope="module")
def saturating(tmp_path_factory):
    """A convolution whose uint8 activations sit near 255 and whose weights are large and of one sign (the
    pairs x86's `vpmaddubsw` adds pass int16 with 8-bit weights), then a 3x3 one; and inputs for it."""
    d = tmp_path_factory.mktemp("sat")
    w = np.random.default_rng(0).uniform(0.5, 1.0, (8, 32, 1, 1)).astype(np.float32)
    w2 = np.random.default_rng(1).standard_normal((4, 8, 3, 3)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
                           helper.make_node("Relu", ["c"], ["r"], name="relu"),
                           helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w2, "w2")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(d / "sat.onnx"))
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.uniform(0.9, 1.0, (63, 32, 8, 8)), np.zeros((1, 32, 8, 8))]).astype(np.float32)
    np.save(d / "sat.npy", x)
    return d / "sat.onnx", d / "sat.npy", x


def _outputs(model, x, fused: bool = True) -> np.ndarray:
    so = ort.SessionOptions()
    if not fused:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    s = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])


def _db(r: np.ndarray, a: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(r.astype(np.float64) ** 2) / np.sum((r.astype(np.float64) - a) ** 2)))


def test_a_pi_bundle_is_judged_in_exact_int8_arithmetic(saturating, tmp_path):
    src, calib, x = saturating
    r = lepton_edge.export(src, target="rpi4", calib=str(calib), recipes=["u8-minmax"], task="raw", out=tmp_path)
    m = json.loads((r.bundle.path / "manifest.json").read_text())
    assert m["format"] == "onnx" and m["precision"] == "int8"
    assert m["validation"]["arithmetic"].startswith("exact")
    assert m["target"].get("qdq_fusion") is None  # (the device runs it fused: exact there)
    ref = _outputs(src, x)
    exact, fused = _db(ref, _outputs(r.bundle.path / m["model_file"], x, fused=False)), \
        _db(ref, _outputs(r.bundle.path / m["model_file"], x))
    recorded = m["validation"]["metrics"]["sqnr_db"]
    assert abs(recorded - exact) < 3.0, (recorded, exact, fused)  # (held-out rows: not every row of x)
    if fused < exact - 6:  # this host's kernels saturate (AVX2 without VNNI: 10 dB against 44 measured here)
        assert recorded > fused + 6, (recorded, exact, fused)


def test_a_bundle_for_this_hosts_kind_is_judged_as_it_will_run(saturating, tmp_path):
    src, calib, x = saturating
    r = lepton_edge.export(src, target="x86-cpu", calib=str(calib), recipes=["u8-minmax-w7"], task="raw",
                           out=tmp_path)
    m = json.loads((r.bundle.path / "manifest.json").read_text())
    assert m["validation"].get("arithmetic") is None
    fused = _db(_outputs(src, x), _outputs(r.bundle.path / m["model_file"], x))
    assert abs(m["validation"]["metrics"]["sqnr_db"] - fused) < 3.0 and fused > 30, (m["validation"], fused)
