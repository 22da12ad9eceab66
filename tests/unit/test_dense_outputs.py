"""The dense/raw gate on outputs that SQNR and cosine misjudge: integer labels, an output whose offset
hides what it varies by, and outputs that are empty on every input (exporters/task_metrics.dense).

Each case was a bundle validated wrong: a per-pixel argmax whose near-tied classes 6 and 7 all became 6
(17 dB SQNR, 3 % of the pixels right), a depth map of 1000 +- 0.1 that int8 made one constant (77.7 dB),
and a NonZero output with no rows on any photo (SQNR 100 dB: nothing was compared)."""
from __future__ import annotations

import numpy as np
import pytest

from lepton_edge.exporters import task_metrics as tm
from lepton_edge.exporters.validation import Thresholds


def _rows(*dtypes):
    return [{"index": k, "name": f"o{k}", "dtype": d} for k, d in enumerate(dtypes)]


def _gate(ref, out, dtypes, masks=False):
    rows, metrics = _rows(*dtypes), {}
    why = tm.dense(ref, out, rows, Thresholds(), metrics, masks=masks)
    return why, metrics, rows


def test_labels_are_judged_by_their_iou_not_their_sqnr():
    rng = np.random.default_rng(0)
    ref = rng.choice([6, 7], size=(8, 16, 16)).astype(np.float32)  # the predictor hands integers over as float32
    flipped = np.full_like(ref, 6.0)  # every 7 became a 6: SQNR still reads ~17 dB
    assert tm.sqnr_db(ref, flipped) > 12
    why, metrics, rows = _gate([ref], [flipped], ["int64"], masks=True)
    assert rows[0]["gated_by"] == ["label_iou"] and metrics["label_iou"] < 0.5
    assert why and why[0].startswith("output o0: integer values (labels, ids) equal to fp32's where it holds them")
    few = ref.copy()
    few[0, 0, :4] = 13 - few[0, 0, :4]  # 4 of 2,048 pixels change class: a good int8 map
    why, metrics, _ = _gate([ref], [few], ["int64"], masks=True)
    assert not why and metrics["label_iou"] > 0.99 and "sqnr_db" not in metrics


def test_label_iou_is_the_mean_iou_over_the_values_either_holds():
    r = np.array([0, 0, 0, 1, 1, 2])
    a = np.array([0, 0, 1, 1, 1, 1])
    # value 0: 2 of 3; value 1: 2 of 4; value 2: 0 of 1
    assert tm.label_iou(r, a) == pytest.approx((2 / 3 + 2 / 4 + 0) / 3)
    assert tm.label_iou(r, r) == 1.0
    assert tm.label_iou(np.array([True, False]), np.array([True, True])) == pytest.approx((1 / 2 + 0) / 2)
    many = np.arange(1000)  # indices: more values than labels have, so the share of equal values
    assert tm.label_iou(many, np.where(many < 900, many, 0)) == pytest.approx(0.9)


def test_which_integer_outputs_are_labels():
    levels = np.arange(256, dtype=np.float32).reshape(16, 16)  # a probability scaled to 0..255: levels
    assert not tm.is_labels(levels, "uint8")
    assert tm.is_labels(np.where(levels > 100, 255.0, 0.0), "uint8")  # a 0/255 mask
    assert tm.is_labels(levels, "int64") and tm.is_labels(levels, "bool") and tm.is_labels(levels, "int32")
    assert not tm.is_labels(levels, "float32") and not tm.is_labels(levels, "float16")
    assert tm.is_labels(np.zeros(3, np.int64)) and not tm.is_labels(np.zeros(3, np.float32))
    assert not tm.is_labels(levels, "bfloat16-or-other")  # a type numpy has no name for


def test_an_output_flattened_under_its_offset_fails_and_a_faithful_one_passes():
    rng = np.random.default_rng(1)
    ref = (1000 + 0.05 * rng.standard_normal((8, 1, 16, 16))).astype(np.float32)
    flat = np.full_like(ref, 1000.2)
    assert tm.sqnr_db(ref, flat) > 70  # the offset counts as signal
    why, _, rows = _gate([ref], [flat], ["float32"])
    assert rows[0]["variation_sqnr_db"] < 0 and "variation_sqnr_db" in rows[0]["gated_by"]
    assert len(why) == 1 and "its error is larger than fp32's own variation" in why[0] and "offset" in why[0]
    close = ref + (0.005 * rng.standard_normal(ref.shape)).astype(np.float32)
    why, _, rows = _gate([ref], [close], ["float32"])
    assert not why and 15 < rows[0]["variation_sqnr_db"] < 25 and rows[0]["gated_by"] == ["sqnr_db", "cosine"]


def test_variation_is_not_measured_on_an_output_that_does_not_vary():
    ones = np.ones((4, 10), np.float64) + 1e-9 * np.arange(10)  # a softmax's sum: rounding, not variation
    assert tm.variation_sqnr_db(ones, np.ones_like(ones)) is None
    assert tm.variation_sqnr_db(np.ones((4, 3)), np.zeros((4, 3))) is None
    r = np.array([1.0, -1.0, 1.0, -1.0])
    assert tm.variation_sqnr_db(r, r * 0.9) == pytest.approx(20.0)  # no offset: the same as SQNR
    assert tm.sqnr_db(r, r * 0.9) == pytest.approx(20.0)


def test_outputs_empty_on_every_input_compare_nothing():
    empty = np.zeros((0, 1), np.float32)
    why, metrics, rows = _gate([empty], [empty], ["int64"])
    assert why == ["every output is empty on every validation input: nothing to compare with fp32's; validate on "
                   "inputs the model gives outputs for (--calib, --eval images)"]
    assert metrics["no_evidence"] == 1.0 and rows[0]["empty"] and rows[0]["gated_by"] == []
    assert tm.infer_task([empty], [{"name": "idx"}], None) == "raw"  # (was a numpy error: reshape of size 0)
    scores = np.array([[0.2, 0.8], [0.6, 0.4]], np.float32)
    why, metrics, rows = _gate([scores, empty], [scores, empty], ["float32", "int64"])
    assert not why and "no_evidence" not in metrics and rows[1]["empty"]  # another output was compared


def test_embed_nearest_neighbour_agreement_follows_min_agreement():
    """`--min-agreement` sets the nearest-neighbour agreement an embedding needs, as it sets a classifier's
    top-1 agreement: the failure line said to relax --min-cosine, which never moved that gate."""
    from types import SimpleNamespace

    rng = np.random.default_rng(2)
    vecs = rng.standard_normal((12, 8)).astype(np.float32)
    ref = SimpleNamespace(outputs=[vecs], noisy=[vecs])  # fp32's ceiling: 1.0
    shuffled = [vecs + rng.standard_normal((12, 8)).astype(np.float32)]  # neighbours moved
    metrics: dict = {}
    why = tm.embed(ref, shuffled, Thresholds(min_cosine=0.0), metrics)
    nn = metrics["nn_agreement"]
    assert nn < 0.95 and why == [f"nearest-neighbour agreement {nn:.4f} < 0.9500 (fp32 ceiling 1.0000 - 0.05)"]
    assert metrics["nn_agreement_required"] == pytest.approx(0.95)  # (the summary prints it beside the figure)
    assert tm.embed(ref, shuffled, Thresholds(min_cosine=0.0, min_agreement=nn), {}) == []
    assert tm.embed(ref, shuffled, Thresholds(min_cosine=0.0, min_agreement=nn + 0.01), {}) == [
        f"nearest-neighbour agreement {nn:.4f} < {nn + 0.01:.4f} (--min-agreement)"]
