"""Validation that stops once a candidate has certainly failed (exporters/certain_fail.py).

The stop must be sound: whenever it calls a candidate failed on the inputs seen so far, the gate on every
input fails it too, and a candidate that passes on every input is never stopped. Checked against the
gate itself (task_metrics.dense) on artifacts that pass, fail by far, fail narrowly, fail only on the
last inputs, and fail by cosine alone; and `batched` must stop calling the model where it is told."""
from __future__ import annotations

import numpy as np
import pytest

from lepton_edge.exporters import certain_fail, task_metrics as tm
from lepton_edge.exporters.validation import Thresholds, batched

N = 40
TH = Thresholds()


def _ref(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 1.0, (N, 3, 16)).astype(np.float32)


def _gate_fails(ref: np.ndarray, out: np.ndarray) -> bool:
    rows = [{"index": 0, "name": "y", "dtype": "float32"}]
    return bool(tm.dense([ref], [out], rows, TH, {}))


def _first_stop(ref: np.ndarray, out: np.ndarray, batch: int = 1) -> int | None:
    specs = [{"name": "y", "dtype": "float32"}]
    gated = certain_fail.closeness_gated("raw", [ref], specs, N)
    watch = certain_fail.Watch([ref], specs, gated, certain_fail.powers([ref], gated), TH.min_sqnr, TH.min_cosine, N)
    for start in range(0, N, batch):
        end = min(N, start + batch)
        if watch.seen([out], start, end):
            return end
    return None


def _noisy(ref: np.ndarray, sd: float, seed: int = 1) -> np.ndarray:
    return (ref + np.random.default_rng(seed).normal(0.0, sd, ref.shape)).astype(np.float32)


@pytest.mark.parametrize("sd", [0.05, 0.2, 0.24, 0.26, 0.3, 1.0])
@pytest.mark.parametrize("batch", [1, 7])
def test_a_stop_only_where_the_gate_on_every_input_fails(sd, batch):
    """Noise of sd 0.25 sits on the 12 dB line (SQNR = 20 log10(1 / sd)): the ones either side of it must be
    told apart, the ones far below it stopped early."""
    ref = _ref()
    out = _noisy(ref, sd)
    stop = _first_stop(ref, out, batch)
    fails = _gate_fails(ref, out)
    if stop is not None:
        assert fails, (sd, stop)
    if not fails:
        assert stop is None
    if sd >= 1.0:
        assert stop is not None and stop <= N // 4, stop  # (far below the line: known within a few inputs)


def test_a_candidate_that_fails_on_its_last_inputs_only_is_stopped_late_or_not_at_all():
    ref = _ref()
    out = ref.copy()
    out[-4:] = _noisy(ref[-4:], 3.0)  # the damage is in the last four inputs: nothing before them shows it
    assert _gate_fails(ref, out)
    stop = _first_stop(ref, out)
    assert stop is None or stop > N - 4


def test_a_candidate_that_passes_is_not_stopped_by_bad_first_inputs():
    """The first three inputs far off (SQNR 2 dB and cosine 0.78 on them), the rest exact: over all inputs
    SQNR 13 dB and cosine 0.98, a pass. Judged on the inputs seen, the first ones would stop it; the bounds
    (fp32's power over every input, a cosine of 1 for each input not seen) must not."""
    ref = _ref()
    out = ref.copy()
    out[:3] = _noisy(ref[:3], 0.8)
    assert not _gate_fails(ref, out)
    assert _first_stop(ref, out) is None
    assert _first_stop(ref, out, batch=7) is None


def test_cosine_alone_can_stop_it():
    """Outputs scaled by -1 on some inputs: SQNR over all inputs still says little until their error is
    seen, but each such input's cosine is -1, and once enough are seen the mean cannot reach 0.97."""
    ref = _ref()
    out = ref.copy()
    out[::2] *= -1.0
    assert _gate_fails(ref, out)
    stop = _first_stop(ref, out)
    assert stop is not None and stop < N


def test_outputs_the_gate_holds_to_other_metrics_are_not_watched():
    """Labels (judged by their IoU), an output without one row an input (anchors), and every output of a
    task other than raw: a segment model's outputs are judged by mask IoU or SQNR as their values make them
    maps or not, so judged on the inputs seen they could be judged otherwise; no early stop there."""
    probs = np.random.default_rng(0).uniform(0, 1, (N, 1, 8, 8)).astype(np.float32)
    labels = np.random.default_rng(0).integers(0, 5, (N, 8, 8)).astype(np.float32)
    logits = _ref()
    anchors = np.ones((7, 4), np.float32)
    specs = [{"name": "p", "dtype": "float32"}, {"name": "l", "dtype": "int64", "labels": True},
             {"name": "y", "dtype": "float32"}, {"name": "a", "dtype": "float32"}]
    assert certain_fail.closeness_gated("raw", [probs, labels, logits, anchors], specs, N) == [0, 2]
    for task in ("segment", "classify", "detect", "embed"):
        assert certain_fail.closeness_gated(task, [probs, labels, logits, anchors], specs, N) == []


def test_a_candidate_with_infinite_outputs_is_stopped_not_crashed():
    """An artifact that overflows to inf (fp16 past its range): the error sum is infinite, and a bound computed
    from it raised math's domain error inside the validation; the gate's structure check fails such outputs
    on any input, so the watch stops there and says why."""
    ref = _ref()
    out = ref.copy()
    out[2, 0, 0] = np.inf
    specs = [{"name": "y", "dtype": "float32"}]
    watch = certain_fail.Watch([ref], specs, [0], certain_fail.powers([ref], [0]), TH.min_sqnr, TH.min_cosine, N)
    assert watch.seen([out], 0, 2) is None
    assert "NaN or infinite" in (watch.seen([out], 2, 3) or "")


def test_batched_stops_calling_the_model_where_it_is_told():
    calls = []

    def fn(x):
        calls.append(len(x))
        return [x * 2.0]

    x = np.arange(20, dtype=np.float32).reshape(20, 1)
    out = batched(fn, x, 3, stop=lambda outputs, start, end: "enough" if end >= 9 else None)
    assert len(calls) == 3 and out[0].shape == (9, 1)
    assert np.array_equal(out[0], x[:9] * 2.0)
    whole = batched(fn, x, 3, stop=lambda outputs, start, end: None)
    assert whole[0].shape == (20, 1)
