"""onnxruntime's percentile histograms, binned in linear time.

Why: onnxruntime's `HistogramCollector.collect_absolute_value` (percentile calibration) bins every
batch after the first with `np.histogram(data, bins=<array of edges>)`, and numpy sorts the data for
explicit edges. On PP-OCR's recogniser that sort was 43 s of a 56 s calibration (40 inputs; cProfile).
The edges are always evenly spaced (the first batch's `bins=num_bins`, then the same width extended
to the new maximum), so `np.histogram(data, bins=n, range=(first, last))` bins them through numpy's
uniform-bin path, with no sort: the same distribution and thresholds (onnxruntime's own float32 edges
drift by up to a bin's width, so bin by bin the counts may differ slightly; tests/unit/test_histogram.py).
Everything else (the first batch, the ranges kept, the percentile computed from the counts) is
onnxruntime's own code; only this method is swapped, for the calibration's duration
(`linear_time_histograms`, beside `quantize._lean_calibration`).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np


def collect_absolute_value(self, name_to_arr: dict) -> None:
    """Drop-in for `HistogramCollector.collect_absolute_value` (same histogram_dict entries:
    counts, edges, min, max), merging each batch into the tensor's histogram without sorting."""
    for tensor, data in name_to_arr.items():
        arr = np.asarray(data).ravel()
        if arr.size:
            lo, hi = np.nanmin(arr), np.nanmax(arr)
        else:
            lo = hi = np.array(0, dtype=arr.dtype)
        arr = np.absolute(arr)
        if tensor not in self.histogram_dict:
            hist, edges = np.histogram(arr, bins=self.num_bins)
            self.histogram_dict[tensor] = (hist, edges.astype(arr.dtype), lo, hi)
            continue
        old_hist, old_edges, old_lo, old_hi = self.histogram_dict[tensor]
        edges = extended_edges(old_edges, max(abs(lo), abs(hi)))  # max |x|, from the range already taken
        hist, _ = np.histogram(arr, bins=len(edges) - 1, range=(float(edges[0]), float(edges[-1])))
        hist[: len(old_hist)] += old_hist
        self.histogram_dict[tensor] = (hist, edges.astype(arr.dtype), min(old_lo, lo), max(old_hi, hi))


def extended_edges(edges: np.ndarray, top) -> np.ndarray:
    """`edges` with bins of the same width appended until they reach `top` (onnxruntime extends
    them so: `np.arange(last + width, top + width, width)`), computed from the first edge so the
    spacing stays exact."""
    width = float(edges[1]) - float(edges[0])
    n = len(edges) - 1
    if top > edges[-1] and width > 0:
        n += len(np.arange(float(edges[-1]) + width, float(top) + width, width))
    out = float(edges[0]) + width * np.arange(n + 1, dtype=np.float64)
    out[: len(edges)] = edges  # the old edges exactly: the merged counts line up with them
    return out


@contextmanager
def linear_time_histograms() -> Iterator[None]:
    """onnxruntime's HistogramCollector with `collect_absolute_value` above, for the block (then put
    back: the swap is process-wide while it lasts, as quantize_static gives no hook for it)."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    original = HistogramCollector.collect_absolute_value
    HistogramCollector.collect_absolute_value = collect_absolute_value  # type: ignore[method-assign]
    try:
        yield
    finally:
        HistogramCollector.collect_absolute_value = original  # type: ignore[method-assign]
