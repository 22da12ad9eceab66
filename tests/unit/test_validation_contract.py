"""exporters/validation.py's contract beyond the gate's decision (tests/test_validation_gate.py):
the documented default thresholds a manifest records, a verdict that serialises with no per-output
rows, the task list the CLI's options repeat, the resident-memory figure, and that an ONNX artifact
must keep the reference's output names (a renamed output breaks every consumer that reads it by name).
Tiny ONNX models built with onnx.helper; no export."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lepton_edge.bundle import InputSpec
from lepton_edge.exporters import options, validation
from lepton_edge.exporters.validation import Thresholds, Validator, Verdict, rss_bytes


def _raw_validator(ex, ref_path, path, x, **options) -> Validator:
    """A raw-task Validator of `path` against the ONNX reference at `ref_path`, validating on `x` (1x4x4 gray)."""
    return Validator(ex, 1, ex.predictor(ref_path, 1), path, SimpleNamespace(check_x=x, eval_x=None, eval_y=None),
                     task="raw", thresholds=Thresholds(), input_spec=InputSpec(name="input", shape=[1, 1, 4, 4],
                                                                              color="GRAY"), labels=None, **options)


def test_default_thresholds_are_the_documented_ones():
    assert Thresholds().as_dict() == {
        "min_agreement": None, "agreement_margin": 0.05, "min_confident_kept": 0.99, "min_top5": 0.98,
        "max_accuracy_drop": 0.5, "min_sqnr": 12.0, "min_cosine": 0.97, "min_mask_iou": 0.8, "min_f1": 0.9,
        "min_correlation": 0.5}


def test_a_verdict_without_per_output_rows_serialises():
    d = Verdict(passed=False, why="no model", task="raw").as_dict()
    assert d["per_output"] == [] and d["metrics"] == {} and d["why"] == "no model"


def test_the_cli_offers_exactly_the_tasks_validation_knows():
    assert options.TASKS == validation.TASKS
    assert set(validation.RELAX_FLAGS) == set(validation.TASKS)


def test_rss_is_the_resident_set_of_this_process():
    psutil = pytest.importorskip("psutil")
    got, rss = rss_bytes(), psutil.Process().memory_info().rss
    assert got is not None and abs(got - rss) < 0.1 * rss


def _model(path: Path, w: np.ndarray, out_name: str) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], [out_name])],
        "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 1, 4, 4])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["n", 3])],
        initializer=[numpy_helper.from_array(w.astype(np.float32), "w")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, path)
    return path


def test_an_onnx_artifact_that_renames_an_output_fails(tmp_path):
    from lepton_edge.exporters.onnx import OnnxExporter

    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (16, 3))
    ref_path, same, renamed = (_model(tmp_path / "ref.onnx", w, "y"), _model(tmp_path / "same.onnx", w, "y"),
                               _model(tmp_path / "renamed.onnx", w, "logits"))
    ex = OnnxExporter()
    x = rng.normal(0, 1, (64, 1, 4, 4)).astype(np.float32)
    val = _raw_validator(ex, ref_path, ref_path, x, batch=16)
    assert val(same)[0].passed
    verdict = val(renamed)[0]
    assert not verdict.passed and verdict.why == "output 0: named 'logits', fp32 names it 'y'"


def test_validation_batches_are_bounded_by_the_reference_activations(tmp_path, monkeypatch):
    """A model whose activations dwarf its input (PP-OCR's recogniser: 184 KB in, 196 MB of
    intermediate tensors) was validated 22 inputs per call; onnxruntime's arena kept that batch's
    tensors for the session's life. The batch is now bounded by the activations shape inference
    estimates on the ONNX reference, as calibration is; a non-ONNX reference keeps the input bound."""
    from lepton_edge.compress import quantize as q
    from lepton_edge.exporters.onnx import OnnxExporter

    rng = np.random.default_rng(0)
    ref_path = _model(tmp_path / "ref.onnx", rng.normal(0, 1, (16, 3)), "y")
    ex = OnnxExporter()
    x = rng.normal(0, 1, (64, 1, 4, 4)).astype(np.float32)
    per_input = q.estimate_activation_bytes(ref_path, x[:1], live=True)
    assert per_input == q.estimate_activation_bytes(ref_path, x[:1]) == (16 + 3) * 4  # flat [1,16], y [1,3]

    def validator(path):
        return _raw_validator(ex, ref_path, path, x, batch=16)
    assert validator(ref_path).batch == 16
    monkeypatch.setattr(q, "ACTIVATION_BATCH_BYTES", per_input * 5)
    assert validator(ref_path).batch == 5
    assert q.estimate_activation_bytes(tmp_path / "model.tflite", x[:1]) == 0
    assert q.estimate_activation_bytes(tmp_path / "model.tflite", x[:1], live=True) == 0


def test_the_batch_bound_counts_the_activations_alive_at_once():
    """onnxruntime reuses a tensor's buffer once its last reader ran, so a batch holds the tensors alive at
    the worst point of the run, not every tensor made (PP-OCR's recogniser: 13 vs 197 MB an input): a
    chain holds two at a time, a skip connection keeps its tensor alive until the Add reads it."""
    import onnx
    from onnx import TensorProto, helper

    from lepton_edge.compress import quantize as q

    def model(skip: bool):
        nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
                 helper.make_node("Relu", ["b"], ["c"]), helper.make_node("Add", ["c", "a" if skip else "c"], ["y"])]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1, 8, 8])])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])

    sample, one = {"x": np.zeros((1, 1, 8, 8), np.float32)}, 64 * 4
    for skip, held in ((False, 2), (True, 3)):
        m = model(skip)
        onnx.checker.check_model(m)
        assert q._activation_bytes(m, sample) == 4 * one  # a, b, c, y: every tensor made
        assert q._live_activation_bytes(m, sample) == held * one, skip


def test_the_memory_a_candidate_took_is_the_growth_not_the_total(tmp_path):
    """`ram` (the budget check's "running the model took") is what running the candidate added to this
    process, not its resident set: a tiny model adds far less than the process already holds."""
    from lepton_edge.exporters.onnx import OnnxExporter

    rng = np.random.default_rng(0)
    ref_path = _model(tmp_path / "ref.onnx", rng.normal(0, 1, (16, 3)), "y")
    ex = OnnxExporter()
    x = rng.normal(0, 1, (8, 1, 4, 4)).astype(np.float32)
    val = _raw_validator(ex, ref_path, ref_path, x)
    ram = val(ref_path)[2]
    assert ram is not None and 0 <= ram < rss_bytes() // 2


def test_the_memory_a_candidate_took_is_read_after_one_input(tmp_path, monkeypatch):
    """`ram` stands for the device's run of one input, so it is read after runs of one input, before the
    validation's batches (4 inputs a call on PP-OCR rec since the batch counts live activations: 30-50 MB
    more that the device never holds)."""
    from lepton_edge.exporters import validation
    from lepton_edge.exporters.onnx import OnnxExporter

    rng = np.random.default_rng(0)
    ref_path = _model(tmp_path / "ref.onnx", rng.normal(0, 1, (16, 3)), "y")
    ex = OnnxExporter()
    x = rng.normal(0, 1, (12, 1, 4, 4)).astype(np.float32)
    val = _raw_validator(ex, ref_path, ref_path, x, batch=4)
    events = []
    real = ex.predictor

    def recording(*a, **k):
        fn = real(*a, **k)

        def run(xs):
            events.append(len(xs))
            return fn(xs)
        return run

    monkeypatch.setattr(ex, "predictor", recording)
    monkeypatch.setattr(validation, "rss_bytes", lambda: events.append("rss") or rss_bytes())
    verdict, _, ram = val(ref_path)
    assert verdict.passed and ram is not None
    # one input twice (onnxruntime allocates its memory plan from the second run), then the batches
    assert events == ["rss", 1, 1, "rss", 4, 4, 4], events
    events.clear()
    _, ram = val.ram(ref_path)  # (the exact-int8 path's fused run: its RAM, no second validation)
    assert ram is not None and events == ["rss", 1, 1, "rss"], events


def test_confident_kept_shows_the_losses_allowed():
    # 23 of 24 confident kept passes under 0.99 (one miss allowed when few): the summary says so, where
    # "0.9583 (>= 0.9900)" alone read as a failure that passed
    from lepton_edge.cli import _gate_rows
    from lepton_edge.exporters.task_metrics import confident_losses_allowed

    assert [confident_losses_allowed(n, 0.99) for n in (24, 100, 250)] == [1, 1, 2]
    assert confident_losses_allowed(24, 1.0) == 0
    rows = dict(_gate_rows({"confident_top1_kept": 23 / 24, "confident_samples": 24.0,
                            "thresholds": {"min_confident_kept": 0.99}}))
    assert rows["confident_top1_kept"] == "0.9583 (>= 0.9900: at most 1 of 24 lost)"


def test_eval_labels_past_the_models_classes_are_one_line_naming_both(tmp_path):
    """A labelled --eval set whose labels run past the model's classes (a 1-based labels file, another
    model's data) would judge accuracy on classes the model does not have: refused before any candidate."""
    from lepton_edge.errors import BadInput
    from lepton_edge.exporters.onnx import OnnxExporter

    rng = np.random.default_rng(0)
    ref_path = _model(tmp_path / "ref.onnx", rng.normal(0, 1, (16, 3)), "y")
    ex = OnnxExporter()
    x = rng.normal(0, 1, (16, 1, 4, 4)).astype(np.float32)
    with pytest.raises(BadInput) as e:
        Validator(ex, 1, ex.predictor(ref_path, 1), ref_path,
                  SimpleNamespace(check_x=x, eval_x=x, eval_y=np.arange(16) % 4 + 1), task="classify",
                  thresholds=Thresholds(), input_spec=InputSpec(name="input", shape=[1, 1, 4, 4], color="GRAY"),
                  labels=None, batch=16)
    assert str(e.value) == "--eval labels run 1..4, and the model has 3 classes (0..2)"


def test_a_candidate_certain_to_fail_is_judged_on_the_inputs_that_showed_it(tmp_path):
    """exporters/certain_fail.py through the validator: a `raw` artifact far off fp32 (other weights) stops
    after a few batches, fails by the same metric on those inputs, and says on how many; one close to fp32
    (weights rounded) runs to the last input and passes; a classifier's gate is never stopped early."""
    from lepton_edge.exporters.onnx import OnnxExporter

    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (16, 3))
    ref_path = _model(tmp_path / "ref.onnx", w, "y")
    close = _model(tmp_path / "close.onnx", np.round(w * 64) / 64, "y")
    far = _model(tmp_path / "far.onnx", rng.normal(0, 1, (16, 3)), "y")
    ex = OnnxExporter()
    x = rng.normal(0, 1, (64, 1, 4, 4)).astype(np.float32)
    spec = InputSpec(name="input", shape=[1, 1, 4, 4], color="GRAY")

    def validator(task: str) -> Validator:
        data = SimpleNamespace(check_x=x, eval_x=None, eval_y=None)
        return Validator(ex, 1, ex.predictor(ref_path, 1), ref_path, data, task=task, thresholds=Thresholds(),
                         input_spec=spec, labels=None, batch=4)
    raw = validator("raw")
    good = raw(close)[0]
    assert good.passed and good.metrics["samples"] == 64 and "stopped_after" not in good.metrics
    bad = raw(far)[0]
    assert not bad.passed and bad.metrics["samples"] == bad.metrics["stopped_after"] < 64
    assert bad.metrics["validation_samples"] == 64 and bad.metrics["sqnr_db"] < 12.0
    assert f"on the first {int(bad.metrics['samples'])} of 64 inputs" in (bad.why or ""), bad.why
    classify = validator("classify")(far)[0]
    assert classify.metrics["samples"] == 64 and "stopped_after" not in classify.metrics
