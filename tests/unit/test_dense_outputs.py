"""The dense/raw gate on outputs that SQNR and cosine misjudge: labels, an output whose offset hides what
it varies by, and outputs that are empty on every input (exporters/task_metrics.dense).

Each case was a bundle validated wrong: a per-pixel argmax whose near-tied classes 6 and 7 all became 6
(17 dB SQNR, 3 % of the pixels right), a depth map of 1000 +- 0.1 that int8 made one constant (77.7 dB),
and a NonZero output with no rows on any photo (SQNR 100 dB: nothing was compared)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T, helper as h

from lepton_edge.exporters import task_metrics as tm
from lepton_edge.exporters.onnx import label_outputs
from lepton_edge.exporters.validation import Thresholds


def _gate(ref, out, rows, masks=False):
    rows, metrics = [{"index": k, "name": f"o{k}", **r} for k, r in enumerate(rows)], {}
    why = tm.dense(ref, out, rows, Thresholds(), metrics, masks=masks)
    return why, metrics, rows


ARGMAX = {"dtype": "int64", "labels": True}  # (a row as structure() makes it for an ArgMax output)


def test_labels_are_judged_by_their_iou_not_their_sqnr():
    rng = np.random.default_rng(0)
    ref = rng.choice([6, 7], size=(8, 16, 16)).astype(np.float32)  # the predictor hands integers over as float32
    flipped = np.full_like(ref, 6.0)  # every 7 became a 6: SQNR still reads ~17 dB
    assert tm.sqnr_db(ref, flipped) > 12
    why, metrics, rows = _gate([ref], [flipped], [ARGMAX])
    assert rows[0]["gated_by"] == ["label_iou"] and metrics["label_iou"] < 0.5
    assert why and why[0].startswith("output o0: integer values (labels, ids) equal to fp32's where it holds them")
    few = ref.copy()
    few[0, 0, :4] = 13 - few[0, 0, :4]  # 4 of 2,048 pixels change class: a good int8 map
    why, metrics, _ = _gate([ref], [few], [ARGMAX])
    assert not why and metrics["label_iou"] > 0.99 and "sqnr_db" not in metrics


def test_label_iou_is_the_mean_iou_over_the_values_fp32_holds():
    r = np.repeat([0, 1, 2], [400, 400, 200])
    a = r.copy()
    a[:100] = 1  # 100 of fp32's 0s became 1s: IoU(0) = 300/400, IoU(1) = 400/500, IoU(2) = 1
    assert tm.label_iou(r, a) == pytest.approx((300 / 400 + 400 / 500 + 1) / 3)
    assert tm.label_iou(r, r) == 1.0
    stray = r.copy()
    stray[:3] = 9  # a value fp32 never gives: it lowers the IoU of the value it replaced, no more
    assert tm.label_iou(r, stray) == pytest.approx((397 / 400 + 1 + 1) / 3)
    background = np.zeros(100_000, np.int64)
    one = background.copy()
    one[5] = 3  # one stray pixel on an all-background map: not a failure (it was 0.50 when averaged over both)
    assert tm.label_iou(background, one) > 0.9999
    rare = r.copy()
    rare[:2] = 5  # a value fp32 holds twice: too rare to judge by itself (LABEL_MIN_COUNT)
    assert tm.label_iou(rare, np.where(rare == 5, 0, rare)) == pytest.approx(1.0, abs=0.01)
    assert tm.label_iou(np.array([True] * 10 + [False] * 10), np.array([True] * 20)) == pytest.approx((10 / 20 + 0) / 2)
    scattered = np.concatenate([np.full(150, 985), np.arange(150)])  # one common id, 150 ids seen once each
    wrong = np.concatenate([np.full(150, 985), np.arange(150) + 1])  # every scattered one changed
    assert tm.label_iou(scattered, wrong) == pytest.approx(0.5) and tm.label_iou(scattered, scattered) == 1.0
    ids = np.arange(1000)  # indices: more values than labels have, so the share of equal values
    assert tm.label_iou(np.repeat(ids, 4), np.repeat(np.where(ids < 900, ids, 0), 4)) == pytest.approx(0.9)


def test_which_outputs_are_labels():
    levels = np.arange(256, dtype=np.float32).reshape(16, 16)
    assert tm.is_labels(levels, ARGMAX) and tm.is_labels(levels, {"dtype": "bool"})
    assert tm.is_labels(np.zeros(3, np.bool_))
    # an integer that the graph shows is a measure (a Cast of a pixel value, a coordinate): judged as a float
    assert not tm.is_labels(levels, {"dtype": "int32", "labels": False})
    assert not tm.is_labels(levels, {"dtype": "uint8", "labels": False}) and not tm.is_labels(levels, None)
    # a graph not read (a TFLite file): an integer output is taken for labels, the stricter judgement
    assert tm.is_labels(levels, {"dtype": "int32"}) and tm.is_labels(np.zeros(3, np.int64))
    assert not tm.is_labels(levels, {"dtype": "float32"})


def test_label_outputs_are_read_from_the_graph():
    nodes = [h.make_node("ArgMax", ["x"], ["am"], axis=1, keepdims=0), h.make_node("Cast", ["am"], ["cls"], to=T.INT32),
             h.make_node("TopK", ["x", "k"], ["vals", "idx"], axis=1),
             h.make_node("Mul", ["x", "x"], ["sq"]), h.make_node("Cast", ["sq"], ["level"], to=T.INT32),
             h.make_node("Greater", ["x", "x"], ["mask"])]
    outs = [h.make_tensor_value_info(n, t, None) for n, t in
            (("cls", T.INT32), ("idx", T.INT64), ("vals", T.FLOAT), ("level", T.INT32), ("mask", T.BOOL))]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 5])], outs,
                     [onnx.numpy_helper.from_array(np.array([2], np.int64), "k")])
    assert label_outputs(h.make_model(g)) == {"cls", "idx", "mask"}
    # ids + 1 (1-based), and a table looked up by the ids: labels still; a measure plus a constant is not
    nodes = [h.make_node("ArgMax", ["x"], ["am"], axis=1, keepdims=0), h.make_node("Add", ["one", "am"], ["id1"]),
             h.make_node("Gather", ["table", "am"], ["named"]), h.make_node("Cast", ["x"], ["xi"], to=T.INT64),
             h.make_node("Add", ["xi", "one"], ["level1"])]
    outs = [h.make_tensor_value_info(n, T.INT64, None) for n in ("id1", "named", "level1")]
    inits = [onnx.numpy_helper.from_array(np.array(1, np.int64), "one"),
             onnx.numpy_helper.from_array(np.arange(10, 15, dtype=np.int64), "table")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 5])], outs, inits)
    assert label_outputs(h.make_model(g)) == {"id1", "named"}


def test_an_integer_measure_off_by_one_is_close_not_wrong():
    rng = np.random.default_rng(3)
    ref = np.rint(rng.uniform(0, 200, (8, 32, 32))).astype(np.float32)  # a Cast(int32) of a pixel value x 100
    off = ref + rng.choice([-1.0, 0.0, 1.0], ref.shape).astype(np.float32)
    why, _, rows = _gate([ref], [off], [{"dtype": "int32", "labels": False}])
    assert not why and "label_iou" not in rows[0] and rows[0]["sqnr_db"] > 40


def test_an_output_flattened_under_its_offset_fails_and_a_faithful_one_passes():
    rng = np.random.default_rng(1)
    ref = (1000 + 0.05 * rng.standard_normal((8, 1, 16, 16))).astype(np.float32)
    flat = np.full_like(ref, 1000.2)
    assert tm.sqnr_db(ref, flat) > 70  # the offset counts as signal
    why, metrics, rows = _gate([ref], [flat], [{"dtype": "float32"}])
    assert rows[0]["correlation"] == 0.0 and "correlation" in rows[0]["gated_by"] and metrics["correlation"] == 0.0
    assert len(why) == 1 and "its values follow fp32's at correlation 0.0000 < 0.5" in why[0] and "offset" in why[0]
    close = ref + (0.01 * rng.standard_normal(ref.shape)).astype(np.float32)
    why, metrics, rows = _gate([ref], [close], [{"dtype": "float32"}])
    assert not why and 0.95 < rows[0]["correlation"] < 0.99, rows[0]
    noisy = ref + (0.1 * rng.standard_normal(ref.shape)).astype(np.float32)  # noise twice its spread
    why, _, rows = _gate([ref], [noisy], [{"dtype": "float32"}])
    assert rows[0]["correlation"] < 0.5 and why


def test_moments_keep_their_precision_under_a_large_offset(monkeypatch):
    monkeypatch.setattr(tm, "CHUNK_BYTES", 1 << 16)  # 37 chunks of 8,192 values, merged
    rng = np.random.default_rng(4)
    r = 1e4 + rng.standard_normal(300_000)
    a = r + 0.1 * rng.standard_normal(r.size)
    kept = a.copy()
    m = tm.moments(r, a)
    assert np.array_equal(a, kept)  # (float64 outputs: centred in a copy, never in place)
    assert m.n == r.size and m.mean_r == pytest.approx(r.mean(), rel=1e-12)
    assert m.spread_r == pytest.approx(((r - r.mean()) ** 2).sum(), rel=1e-9)
    assert m.correlation() == pytest.approx(np.corrcoef(r, a)[0, 1], abs=1e-9)
    assert tm.sqnr_db(r, a) == pytest.approx(10 * np.log10((r ** 2).sum() / ((r - a) ** 2).sum()))


def test_correlation_is_not_measured_on_an_output_that_does_not_vary():
    ones = np.ones((4, 10), np.float32)  # a softmax's sum, a constant: nothing to follow
    assert tm.moments(ones, ones * 0.999).correlation() is None
    assert tm.moments(np.zeros((4, 3)), np.ones((4, 3))).correlation() is None


def test_outputs_empty_on_every_input_compare_nothing():
    empty = np.zeros((0, 1), np.float32)
    why, metrics, rows = _gate([empty], [empty], [{"dtype": "int64"}])
    assert why == ["every output is empty on every validation input: nothing to compare with fp32's; validate on "
                   "inputs the model gives outputs for (--calib, --eval images)"]
    assert metrics["no_evidence"] == metrics["empty_outputs"] == 1.0 and rows[0]["empty"] and rows[0]["gated_by"] == []
    assert tm.infer_task([empty], [{"name": "idx"}], None) == "raw"  # (was a numpy error: reshape of size 0)
    scores = np.array([[0.2, 0.8], [0.6, 0.4]], np.float32)
    why, metrics, rows = _gate([scores, empty], [scores, empty], [{"dtype": "float32"}, {"dtype": "int64"}])
    assert not why and "no_evidence" not in metrics and rows[1]["empty"]  # another output was compared


def test_the_advice_names_the_flag_of_the_gate_that_failed():
    from lepton_edge.exporters.recipes import what_to_try

    rows = [{"gated_by": ["label_iou"]}, {"gated_by": ["sqnr_db", "cosine", "correlation"]}]
    both = ("output m: integer values (labels, ids) equal to fp32's where it holds them at IoU 0.4 < 0.8; output d: "
            "its values follow fp32's at correlation 0.1 < 0.5 about their means")
    said = what_to_try({"metrics": {"per_output": rows}, "why": both}, "--min-sqnr/--min-cosine")
    assert said == "try --precision fp16, more or better --calib data, or relax " \
                   "--min-sqnr/--min-cosine, --min-mask-iou, --min-correlation"
    # held to a gate it passed: not named (a raw export failing on SQNR alone was told --min-correlation)
    sqnr_only = what_to_try({"metrics": {"per_output": rows}, "why": "output d: SQNR 8.1 dB < 12.0 dB"},
                            "--min-sqnr/--min-cosine")
    assert sqnr_only.endswith("or relax --min-sqnr/--min-cosine")
    mask = what_to_try({"why": "output m: mask IoU 0.6 < 0.8"}, "--min-sqnr/--min-cosine")
    assert mask.endswith("or relax --min-sqnr/--min-cosine, --min-mask-iou")
    assert what_to_try({"metrics": {"empty_outputs": 1.0, "no_evidence": 1.0}}, "x") == \
        "give --calib (or --eval) images the model gives outputs for"


def test_embed_nearest_neighbour_agreement_follows_min_agreement():
    """`--min-agreement` sets the nearest-neighbour agreement an embedding needs, as it sets a classifier's
    top-1 agreement: the failure line said to relax --min-cosine, which never moved that gate."""
    from types import SimpleNamespace

    rng = np.random.default_rng(2)
    vecs = rng.standard_normal((12, 8)).astype(np.float32)
    ref = SimpleNamespace(outputs=[vecs], noisy=[vecs])  # fp32's ceiling: 1.0
    moved = [vecs + rng.standard_normal((12, 8)).astype(np.float32)]  # neighbours moved
    metrics: dict = {}
    why = tm.embed(ref, moved, Thresholds(min_cosine=0.0), metrics)
    nn = metrics["nn_agreement"]
    assert nn < 0.95 and why == [f"nearest-neighbour agreement {nn:.4f} < 0.9500 (fp32 ceiling 1.0000 - 0.05)"]
    assert metrics["nn_agreement_required"] == pytest.approx(0.95)  # (the summary prints it beside the figure)
    assert tm.embed(ref, moved, Thresholds(min_cosine=0.0, min_agreement=nn), {}) == []
    assert tm.embed(ref, moved, Thresholds(min_cosine=0.0, min_agreement=nn + 0.01), {}) == [
        f"nearest-neighbour agreement {nn:.4f} < {nn + 0.01:.4f} (--min-agreement)"]
