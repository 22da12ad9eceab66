"""The output comparisons work over chunks of samples (exporters/task_metrics._chunks), so a large
output (a recogniser's [N, 40, 6625]) is never copied whole to float64. Chunked or not, the figures
are the same: checked here against the plain whole-array formulas with chunks of one sample."""
from __future__ import annotations

import math

import numpy as np
import pytest

from lepton_edge.exporters import task_metrics as tm


@pytest.fixture
def pair():
    rng = np.random.default_rng(3)
    r = rng.normal(0, 1, (9, 4, 33)).astype(np.float32)
    a = (r + rng.normal(0, 0.1, r.shape)).astype(np.float32)
    a[2] = 0.0  # a sample that went dead
    return r, a


def _whole(r, a):
    r64, a64 = r.astype(np.float64), a.astype(np.float64)
    sqnr = 10 * math.log10(np.sum(r64 ** 2) / np.sum((r64 - a64) ** 2))
    rf, af = r64.reshape(len(r), -1), a64.reshape(len(a), -1)
    cos = (rf * af).sum(1) / np.maximum(np.linalg.norm(rf, axis=1) * np.linalg.norm(af, axis=1), 1e-30)
    d = np.abs(r64 - a64)
    return sqnr, cos, d.max(), d.mean()


@pytest.mark.parametrize("chunk_bytes", [1, 4 * 33 * 8 * 3, 16 << 20])  # one sample, three, all
def test_chunked_metrics_equal_the_whole_array_formulas(pair, monkeypatch, chunk_bytes):
    r, a = pair
    monkeypatch.setattr(tm, "CHUNK_BYTES", chunk_bytes)
    sqnr, cos, dmax, dmean = _whole(r, a)
    assert tm.sqnr_db(r, a) == pytest.approx(sqnr, rel=1e-12)
    assert np.allclose(tm.cosine(r, a), cos, rtol=1e-12) and tm.cosine(r, a)[2] == 0.0
    c = tm.closeness([r], [a])
    assert c["max_abs_diff"] == pytest.approx(dmax) and c["mean_abs_diff"] == pytest.approx(dmean, rel=1e-12)


def test_chunks_cover_every_sample_once():
    r = np.zeros((10, 1000), np.float32)  # 8000 bytes a sample as float64
    tm_chunks = list(tm._chunks(r)) if tm.CHUNK_BYTES >= 8000 else []
    assert sum(len(range(*s.indices(10))) for s in tm_chunks) == 10
    old = tm.CHUNK_BYTES
    try:
        tm.CHUNK_BYTES = 8000 * 3
        assert [s.indices(10)[:2] for s in tm._chunks(r)] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    finally:
        tm.CHUNK_BYTES = old


def test_a_shape_mismatch_is_never_within_fp32s_map():
    """closeness() has nothing to say about outputs of different shapes; the mask gate must then not
    read that silence as 'no difference'."""
    r = np.zeros((6, 1, 8, 8), np.float32)
    a = np.zeros((6, 1, 4, 4), np.float32)
    th = type("T", (), {"min_mask_iou": 0.5})()
    row = {"name": "map"}
    assert tm._mask_gate(r, a, row, th) and row["max_abs_diff"] == float("inf")
