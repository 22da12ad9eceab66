"""exporters/validation.py in the fast tier: the Validator runs real ONNX artifacts through the ONNX
exporter's own predictor (the device runtime's backend) on labelled inputs, and every figure it
reports is checked against the same figure computed here with onnxruntime directly, never against
the validator's own verdict. The models are one layer made with onnx.helper: milliseconds, no torch.
"""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lepton_edge.bundle import InputSpec

SPEC = InputSpec(name="input", shape=[1, 1, 28, 28], color="GRAY", mean=[0.5], std=[0.25])


def _model(path: Path, w: np.ndarray) -> Path:
    """input [N,1,28,28] -> Flatten -> MatMul(w) -> y [N,10], the batch dimension dynamic."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 1, 28, 28])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])],
        initializer=[numpy_helper.from_array(w.astype(np.float32), "w")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, path)
    return path


def _two_outputs(path: Path, w: np.ndarray, w2: np.ndarray) -> Path:
    """A classifier (y [N,10]) with a second head (z [N,4]): every output is judged, not output 0."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["y"]),
         helper.make_node("MatMul", ["flat", "w2"], ["z"])], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 1, 28, 28])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 4])],
        initializer=[numpy_helper.from_array(w.astype(np.float32), "w"),
                     numpy_helper.from_array(w2.astype(np.float32), "w2")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, path)
    return path


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {"input": x})[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """fp32 (the reference), `close` (its weights with small noise: a good int8 stand-in) and `broken`
    (its weights' columns rolled: a different classifier), with 600 inputs labelled by fp32 for
    90 % of them (so fp32's accuracy is known) and the rest labelled at random."""
    root = tmp_path_factory.mktemp("val")
    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (784, 10))
    paths = {"fp32": _model(root / "fp32.onnx", w),
             "close": _model(root / "close.onnx", w + rng.normal(0, 0.002, w.shape)),
             "broken": _model(root / "broken.onnx", np.roll(w, 1, axis=1))}
    x = rng.normal(0, 1, (600, 1, 28, 28)).astype(np.float32)
    y = _ort(paths["fp32"], x).argmax(1)
    flip = rng.random(600) < 0.1
    y[flip] = rng.integers(0, 10, int(flip.sum()))
    return paths, x, y


def _validator(models, **thresholds):
    from lepton_edge.exporters.onnx import OnnxExporter
    from lepton_edge.exporters.validation import Thresholds, Validator

    paths, x, y = models
    ex = OnnxExporter()
    ref = ex.predictor(paths["fp32"], 1)
    data = SimpleNamespace(check_x=x[:400], eval_x=x[400:], eval_y=y[400:])
    return Validator(ex, 1, ref, paths["fp32"], data, task=None, thresholds=Thresholds(**thresholds),
                     input_spec=SPEC, labels=[f"c{i}" for i in range(10)], batch=64)


def test_validator_reports_the_artifacts_own_figures(models):
    paths, x, y = models
    v, predict, ram = _validator(models, max_accuracy_drop=2.0)(paths["close"])  # one flip of 200 is 0.5 pp
    ref_check, art_check = _ort(paths["fp32"], x[:400]).argmax(1), _ort(paths["close"], x[:400]).argmax(1)
    ref_eval, art_eval = _ort(paths["fp32"], x[400:]).argmax(1), _ort(paths["close"], x[400:]).argmax(1)
    assert v.task == "classify" and v.metrics["samples"] == 400 and v.metrics["eval_samples"] == 200
    assert v.top1_agreement == pytest.approx(float((ref_check == art_check).mean()))
    assert v.metrics["accuracy_reference"] == pytest.approx(float((ref_eval == y[400:]).mean()))
    assert v.accuracy_artifact == pytest.approx(float((art_eval == y[400:]).mean()))
    assert v.accuracy_drop_pp == pytest.approx(100 * float((ref_eval == y[400:]).mean() - (art_eval == y[400:]).mean()))
    assert 0.9 <= v.metrics["ceiling"] <= 1.0  # fp32 under sd 0.01 noise: its own agreement
    assert v.passed and v.why is None
    assert np.allclose(predict(x[:3])[0], _ort(paths["close"], x[:3]), atol=1e-5)  # the artifact's predictor
    assert ram is not None and ram >= 0  # Linux: /proc/self/statm
    assert v.per_output[0]["name"] == "y" and v.per_output[0]["artifact_name"] == "y"


def test_a_broken_second_output_fails_a_classifier(tmp_path, models):
    """The first output agrees exactly; the second head is another function: the gate says which."""
    from lepton_edge.exporters.onnx import OnnxExporter
    from lepton_edge.exporters.validation import Thresholds, Validator

    x = models[1]
    rng = np.random.default_rng(1)
    w, w2 = rng.normal(0, 1, (784, 10)), rng.normal(0, 1, (784, 4))
    ref_path = _two_outputs(tmp_path / "ref.onnx", w, w2)
    ex = OnnxExporter()
    data = SimpleNamespace(check_x=x[:200], eval_x=None, eval_y=None)
    val = Validator(ex, 1, ex.predictor(ref_path, 1), ref_path, data, task="classify", thresholds=Thresholds(),
                    input_spec=SPEC)
    assert val(_two_outputs(tmp_path / "same.onnx", w, w2))[0].passed
    v = val(_two_outputs(tmp_path / "bad.onnx", w, -w2))[0]
    assert not v.passed and "output z: cosine" in v.why and v.top1_agreement == 1.0


def test_validator_fails_a_different_model_and_names_why(models):
    paths = models[0]
    v, _, _ = _validator(models)(paths["broken"])
    assert not v.passed and "top-1 agreement" in v.why and "accuracy drop" in v.why
    assert v.accuracy_drop_pp > 50 and v.top1_agreement < 0.5
    d = v.as_dict()
    assert d["passed"] is False and d["why"] == v.why and d["task"] == "classify"
    assert d["samples"] == 400 and isinstance(d["samples"], int) and d["metrics"]["eval_samples"] == 200
    assert d["thresholds"]["max_accuracy_drop"] == 0.5 and d["score"][0] == 0
    v2, _, _ = _validator(models, max_accuracy_drop=100.0, min_agreement=0.0, min_confident_kept=0.0,
                          min_top5=0.0)(paths["broken"])
    assert v2.passed  # every threshold loosened to nothing: the same figures pass


def test_verdict_as_dict_has_no_nan_and_gate_returns_why():
    from lepton_edge.exporters.validation import Verdict, gate

    v = Verdict(False, "bad", "raw", {"samples": 3.0, "sqnr_db": float("nan"), "cosine": np.float32(0.5),
                                      "boxes_reference": np.int64(4)}, score=(0, float("inf")),
                per_output=[{"sqnr_db": float("-inf"), "name": "y"}])
    d = v.as_dict()
    assert d["sqnr_db"] is None and d["cosine"] == 0.5 and type(d["cosine"]) is float
    assert d["samples"] == 3 and type(d["samples"]) is int and d["boxes_reference"] == 4
    assert d["score"] == [0, None] and d["per_output"] == [{"sqnr_db": None, "name": "y"}]
    assert gate(v) == "bad" and gate(Verdict(True, None, "raw")) is None
    assert math.isnan(Verdict(True, None, "raw").top1_agreement)
    assert Verdict(True, None, "raw").accuracy_artifact is None and Verdict(True, None, "raw").accuracy_drop_pp is None


def test_batched_outputs_and_perturbation_scale():
    from lepton_edge.exporters.validation import as_outputs, batched, perturb

    x = np.arange(10 * 4, dtype=np.float32).reshape(10, 4)
    calls = []

    def two_outputs(b):
        calls.append(len(b))
        return b * 2, b.sum(1)

    outs = batched(two_outputs, x, 3)
    assert calls == [3, 3, 3, 1] and len(outs) == 2
    assert np.array_equal(outs[0], x * 2) and np.array_equal(outs[1], x.sum(1))
    assert len(as_outputs(np.zeros(3))) == 1 and len(as_outputs([np.zeros(1), np.zeros(2)])) == 2
    z = np.zeros((20000, 1), np.float32)
    noisy = perturb(z, SPEC, sd=0.01)
    # sd 0.01 of the 0..1 pixel range, in the model's units: 0.01 * 255 * (1/255) / std 0.25 = 0.04
    assert noisy.dtype == np.float32 and np.std(noisy) == pytest.approx(0.04, rel=0.05)
    assert np.array_equal(perturb(z, SPEC, seed=1), perturb(z, SPEC, seed=1))
    assert not np.array_equal(perturb(z, SPEC, seed=1), perturb(z, SPEC, seed=2))
    # batch by batch with one generator (how the export perturbs, so no noisy copy of every input exists at
    # once): the same noise as one call on the whole array
    rng = np.random.default_rng(0)
    parts = [perturb(z[i:i + 7000], SPEC, rng=rng) for i in range(0, len(z), 7000)]
    assert np.array_equal(np.concatenate(parts), perturb(z, SPEC, seed=0))
    # raw uint8 pixels (a uint8-input model, scale 1): black and white stay in range, noise is rounded
    raw = SPEC.model_copy(update={"dtype": "uint8", "scale": 1.0, "mean": [0.0] * 3, "std": [1.0] * 3})
    px = np.array([[0] * 500, [255] * 500, [128] * 500], np.uint8)
    out = perturb(px, raw)
    assert out.dtype == np.uint8 and out[0].max() < 20 and out[1].min() > 235, (out[0].max(), out[1].min())
    assert abs(float(out[2].astype(float).mean()) - 128) < 0.5  # rounded, not truncated (-0.5 bias)


def test_latency_and_memory_figures():
    from lepton_edge.exporters.validation import latency_ms, rss_bytes

    calls = []
    r = latency_ms(lambda x: calls.append(1), np.zeros(1), runs=7, warmup=2, budget_s=5.0)
    assert r["runs"] == 7 and len(calls) == 9 and 0 <= r["p50_ms"] <= r["p90_ms"]
    r = latency_ms(lambda x: None, np.zeros(1), runs=10_000, warmup=0, budget_s=0.0)
    assert r["runs"] == 5  # past the budget it stops at the minimum of five
    rss = rss_bytes()
    assert isinstance(rss, int) and rss > 10 << 20


def test_a_reference_that_is_infinite_everywhere_is_refused_one_minus_infinity_is_not():
    """An fp32 output of +Inf on every input ran all 8 int8 recipes and then blamed int8; one -inf among
    finite values (a log of 0) is a real model's and stays."""
    from lepton_edge.errors import BadInput
    from lepton_edge.exporters.validation import _finite_reference

    specs = [{"name": "y"}]
    with pytest.raises(BadInput, match="output 'y' is infinite everywhere on every validation input"):
        _finite_reference([np.full((4, 3), np.inf, np.float32)], specs)
    some = np.zeros((4, 3), np.float32)
    some[0, 0] = -np.inf
    _finite_reference([some], specs)
    _finite_reference([np.zeros((4, 3), np.int64)], specs)  # (integer outputs: nothing to check)


def test_perturbation_without_a_scale_takes_the_0_to_1_pixel_range_as_255_units():
    """A spec without `scale` (a plain object) is pixels / 255: noise of sd 0.01 of the range is 0.01."""
    from lepton_edge.exporters.validation import perturb

    z = np.zeros((50, 4), np.float32)
    got = perturb(z, SimpleNamespace(std=[1.0]), sd=0.01, seed=3)
    want = np.random.default_rng(3).normal(0.0, 0.01, size=z.shape)
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-6)


def test_a_detector_whose_outputs_no_head_reads_is_judged_on_its_raw_outputs():
    """detect_layout_known 0: the gate says it compared the raw outputs (the report shows why no F1)."""
    from lepton_edge.exporters.validation import Reference, Thresholds, judge

    ref = [np.random.default_rng(0).random((4, 7, 5)).astype(np.float32)]
    v = judge("detect", Reference(ref, [{"name": "o", "shape": [4, 7, 5]}]), [ref[0].copy()],
              [{"name": "o", "shape": [4, 7, 5]}], Thresholds(), input_spec=SPEC)
    assert v.metrics["detect_layout_known"] == 0.0 and v.passed, v.as_dict()
