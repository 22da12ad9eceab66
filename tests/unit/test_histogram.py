"""The linear-time percentile histograms (compress/histogram.py) against onnxruntime's own collector:
same bins, counts and percentile thresholds, on batches whose range grows, shrinks and holds
outliers, as real activations do."""
from __future__ import annotations

import numpy as np
import pytest

from lepton_edge.compress import histogram


def _collectors():
    from onnxruntime.quantization.calibrate import HistogramCollector

    def make():
        return HistogramCollector(method="percentile", symmetric=True, num_bins=2048, num_quantized_bins=128,
                                  percentile=99.0, scenario="same")
    return make(), make()


def _batches(seed: int):
    rng = np.random.default_rng(seed)
    out = []
    for scale in (1.0, 0.5, 3.0, 1.0, 40.0, 2.0):  # the range grows twice and shrinks in between
        b = {"conv": (rng.standard_normal((2, 8, 16, 16)) * scale).astype(np.float32),
             "relu": np.maximum(rng.standard_normal((2, 8, 16, 16)) * scale, 0).astype(np.float32)}
        b["conv"].flat[rng.integers(0, b["conv"].size)] = 200.0 * scale  # an outlier
        out.append(b)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_histograms_and_thresholds_as_onnxruntime(seed):
    ours, theirs = _collectors()
    for batch in _batches(seed):
        theirs.collect_absolute_value({k: [v] for k, v in batch.items()})
        histogram.collect_absolute_value(ours, {k: [v] for k, v in batch.items()})
    for name in ("conv", "relu"):
        h1, e1, lo1, hi1 = ours.histogram_dict[name]
        h2, e2, lo2, hi2 = theirs.histogram_dict[name]
        assert len(h1) == len(h2) and len(h1) > 2048  # the bins grew with the range
        np.testing.assert_allclose(e1, e2, rtol=1e-3, atol=1e-6)  # theirs drift: float32 arange
        # theirs can drop a batch's maximum past its drifted last edge; ours keeps every value from the
        # first batch's smallest |x| up (what both bin)
        assert 0 <= h1.sum() - h2.sum() <= len(_batches(seed))
        every = np.abs(np.concatenate([b[name].ravel() for b in _batches(seed)]))
        assert h1.sum() == np.count_nonzero(every >= e1[0])
        # theirs' edges drift by up to a bin's width at the top, so values near an edge fall either side of
        # it: the distributions agree, bin by bin they need not
        assert np.abs(np.cumsum(h1) / h1.sum() - np.cumsum(h2) / h2.sum()).max() < 0.005
        assert (lo1, hi1) == (lo2, hi2)
    r1, r2 = ours.compute_collection_result(), theirs.compute_collection_result()
    for name in r2:
        np.testing.assert_allclose(np.asarray(r1[name][:2], np.float64), np.asarray(r2[name][:2], np.float64),
                                   rtol=1e-3)


def test_swapped_in_only_for_the_block():
    from onnxruntime.quantization.calibrate import HistogramCollector

    original = HistogramCollector.collect_absolute_value
    with histogram.linear_time_histograms():
        assert HistogramCollector.collect_absolute_value is histogram.collect_absolute_value
    assert HistogramCollector.collect_absolute_value is original


def test_edges_extend_by_the_same_width():
    edges = np.linspace(0.0, 1.0, 5, dtype=np.float32)  # width 0.25
    out = histogram.extended_edges(edges, 1.6)
    np.testing.assert_allclose(out, [0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75])
    assert len(histogram.extended_edges(edges, 0.9)) == 5  # nothing above: unchanged
