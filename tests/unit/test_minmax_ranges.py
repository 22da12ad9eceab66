"""One export calibrates once: later MinMax and Percentile candidates (another activation type, layers in
float, the other method) read the ranges the first one measured, from onnxruntime's calibration cache in
the export's folder, and those ranges are the ones each method's own calibrator computes."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from lepton_edge.compress import quantize as q

from .conv_models import conv_relu_conv


def _scales(path) -> dict[str, float]:
    m = onnx.load(str(path))
    init = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    return {n.input[0]: float(init[n.input[1]].ravel()[0]) for n in m.graph.node
            if n.op_type == "QuantizeLinear" and n.input[1] in init}


def _small_export(tmp_path):
    """A small conv model, its calibration inputs and an export's empty work folder (skipped where
    onnxruntime has no calibration cache)."""
    if _cache_skipped():
        pytest.skip("onnxruntime < 1.24 has no calibration cache: every candidate calibrates")
    fp32 = tmp_path / "m.onnx"
    conv_relu_conv(fp32, 3, 4, 8)
    x = np.random.default_rng(1).standard_normal((8, 3, 8, 8)).astype(np.float32)
    ranges = tmp_path / "work"
    ranges.mkdir()
    return fp32, x, ranges


def test_later_minmax_candidates_reuse_the_ranges(tmp_path):
    fp32, x, ranges = _small_export(tmp_path)
    q.quantize_int8(fp32, tmp_path / "a.onnx", x, q.Recipe.parse("s8-minmax"), ranges=ranges, share=True)
    assert (ranges / "m.minmax-ranges.json").is_file()
    # data 10x larger: calibrated afresh its ranges would be 10x; from the cache they are the first data's
    fresh = q.quantize_int8(fp32, tmp_path / "fresh.onnx", x * 10, q.Recipe.parse("u8-minmax"))
    again = q.quantize_int8(fp32, tmp_path / "again.onnx", x * 10, q.Recipe.parse("u8-minmax"), ranges=ranges,
                            share=True)
    same = q.quantize_int8(fp32, tmp_path / "same.onnx", x, q.Recipe.parse("u8-minmax"))
    assert _scales(again.path) == _scales(same.path) != _scales(fresh.path)
    assert _scales(fresh.path)["r1"] > 5 * _scales(again.path)["r1"]
    # the first candidate's pass measured the Percentile ranges too: the export's own data, not this call's
    assert (ranges / "m.percentile-99.99-ranges.json").is_file()
    p1 = q.quantize_int8(fp32, tmp_path / "p1.onnx", x * 10, q.Recipe.parse("u8-percentile"), ranges=ranges,
                         share=True)
    p2 = q.quantize_int8(fp32, tmp_path / "p2.onnx", x * 10, q.Recipe.parse("u8-percentile"))
    p3 = q.quantize_int8(fp32, tmp_path / "p3.onnx", x, q.Recipe.parse("u8-percentile"))
    assert _scales(p1.path) == _scales(p3.path) != _scales(p2.path)
    # entropy has no cache: it calibrates on the data it is given
    e1 = q.quantize_int8(fp32, tmp_path / "e1.onnx", x * 10, q.Recipe.parse("s8-entropy"), ranges=ranges,
                         share=True)
    e2 = q.quantize_int8(fp32, tmp_path / "e2.onnx", x * 10, q.Recipe.parse("s8-entropy"))
    assert _scales(e1.path) == _scales(e2.path)


def _cache_skipped() -> bool:
    import inspect

    from onnxruntime.quantization import quantize_static

    return "calibration_cache_path" not in inspect.signature(quantize_static).parameters


@pytest.mark.parametrize("first", ["u8-minmax", "s8-percentile"])
def test_one_pass_gives_each_method_the_ranges_its_own_calibrator_computes(tmp_path, monkeypatch, first):
    """Whichever method comes first, one calibration pass serves both, and each candidate's file is byte
    for byte the one its own calibrator (no cache) makes: MinMax's ranges from the histogram pass's exact
    minima and maxima, Percentile's from the same (sampled) histograms."""
    import importlib

    ort_quantize = importlib.import_module("onnxruntime.quantization.quantize")
    if _cache_skipped():
        pytest.skip("onnxruntime < 1.24 has no calibration cache: every candidate calibrates")
    fp32 = tmp_path / "m.onnx"
    conv_relu_conv(fp32, 4, 8, 96, "N", heavy_tails=True)  # 73,728 values per conv output: sampled
    x = np.random.default_rng(2).standard_normal((6, 4, 96, 96)).astype(np.float32)
    made: list[object] = []
    real = ort_quantize.create_calibrator

    def counting(*a, **k):
        made.append(a[3] if len(a) > 3 else k.get("calibrate_method"))
        return real(*a, **k)

    monkeypatch.setattr(ort_quantize, "create_calibrator", counting)
    ranges = tmp_path / "work"
    ranges.mkdir()
    second = "u8-percentile" if "minmax" in first else "s8-minmax"
    a = q.quantize_int8(fp32, tmp_path / "a.onnx", x, q.Recipe.parse(first), ranges=ranges, share=True)
    b = q.quantize_int8(fp32, tmp_path / "b.onnx", x, q.Recipe.parse(second), ranges=ranges, share=True)
    assert len(made) == 1  # one pass for both candidates
    shared_runs = len(made)
    own_a = q.quantize_int8(fp32, tmp_path / "own_a.onnx", x, q.Recipe.parse(first))
    own_b = q.quantize_int8(fp32, tmp_path / "own_b.onnx", x, q.Recipe.parse(second))
    assert len(made) == shared_runs + 2
    assert a.path.read_bytes() == own_a.path.read_bytes()
    assert b.path.read_bytes() == own_b.path.read_bytes()
    assert _scales(a.path) != _scales(b.path)  # (two methods: not one set of ranges read twice)


def test_without_share_each_method_calibrates_alone(tmp_path):
    """An export that plans no Percentile candidate (a target whose recipes have none) pays for no
    histogram pass: MinMax calibrates with its own, leaner calibrator and writes its file alone."""
    fp32, x, ranges = _small_export(tmp_path)
    q.quantize_int8(fp32, tmp_path / "a.onnx", x, q.Recipe.parse("s8-minmax"), ranges=ranges)
    assert sorted(p.name for p in ranges.iterdir()) == ["m.minmax-ranges.json"]


def test_a_shared_pass_that_fails_falls_back_to_the_methods_own_calibrator(tmp_path, monkeypatch):
    """The histograms can fail where MinMax's own calibrator does not (numpy cannot extend the bins of a
    tensor that is empty for a whole stride: its min and max are +-inf); here numpy's error is made to
    happen in the binning. The candidate then calibrates alone, as it did before the shared pass, and the
    export's later candidates do not try to share again."""
    from lepton_edge.compress import histogram

    if _cache_skipped():
        pytest.skip("onnxruntime < 1.24 has no calibration cache: every candidate calibrates")

    def unbinnable(self, name_to_arr):
        raise ValueError("Maximum allowed size exceeded")

    fp32 = tmp_path / "m.onnx"
    conv_relu_conv(fp32, 3, 4, 8)
    x = np.random.default_rng(1).standard_normal((8, 3, 8, 8)).astype(np.float32)
    ranges = tmp_path / "work"
    ranges.mkdir()
    own = q.quantize_int8(fp32, tmp_path / "own.onnx", x, q.Recipe.parse("u8-minmax"))
    monkeypatch.setattr(histogram, "collect_absolute_value", unbinnable)
    a = q.quantize_int8(fp32, tmp_path / "a.onnx", x, q.Recipe.parse("u8-minmax"), ranges=ranges, share=True)
    assert (ranges / "m.one-pass-failed").exists() and not (ranges / "m.percentile-99.99-ranges.json").exists()
    assert a.path.read_bytes() == own.path.read_bytes()
    with pytest.raises(ValueError, match="Maximum allowed size"):  # a Percentile candidate: its own pass fails
        q.quantize_int8(fp32, tmp_path / "p.onnx", x, q.Recipe.parse("u8-percentile"), ranges=ranges, share=True)


def test_a_shared_pass_over_the_memory_budget_falls_back_to_minmaxs_own_lighter_pass(tmp_path, monkeypatch):
    """The histogram pass keeps a sample of every tensor where MinMax's keeps two numbers, so a --max-memory
    between the two stopped the shared pass, and the u8-minmax candidate, which fitted in its own pass before
    the passes were shared, was skipped. Now the budget's stop falls back to MinMax's own calibrator (the
    watch re-armed, the same budget from there on) and the file is what that calibrator makes. Played by a
    real MemoryWatch whose budget is exceeded during the histograms' binning only."""
    from lepton_edge.compress import calibration as cal, histogram

    if _cache_skipped():
        pytest.skip("onnxruntime < 1.24 has no calibration cache: every candidate calibrates")
    watch = cal.MemoryWatch(None, what="int8 recipe u8-minmax")

    def over_budget(self, name_to_arr):
        watch.limit = 1  # (one byte: the check below sees this process over it)
        try:
            watch.check()
        finally:
            watch.limit = None

    fp32, x, ranges = _small_export(tmp_path)
    own = q.quantize_int8(fp32, tmp_path / "own.onnx", x, q.Recipe.parse("u8-minmax"))
    monkeypatch.setattr(histogram, "collect_absolute_value", over_budget)
    a = q.quantize_int8(fp32, tmp_path / "a.onnx", x, q.Recipe.parse("u8-minmax"), check=watch.check, ranges=ranges,
                        share=True)
    assert a.path.read_bytes() == own.path.read_bytes() and (ranges / "m.one-pass-failed").exists()
    assert watch.exceeded_at is None and watch.peak > 0
    with pytest.raises(cal.MemoryExceeded, match="over the .* budget"):  # Percentile's own pass: over it again
        q.quantize_int8(fp32, tmp_path / "p.onnx", x, q.Recipe.parse("u8-percentile"), check=watch.check,
                        ranges=ranges, share=True)


def test_minmax_ranges_keep_the_tensors_own_float_type():
    """A float16 tensor's range stays float16: onnxruntime gives its scale the range's type, and a float32
    scale on a float16 QuantizeLinear is an invalid graph."""
    from lepton_edge.compress.shared_ranges import minmax_from_histograms

    hist = {"t__lepton_histogram_sample": (None, None, np.float16(-1.5), np.float16(2.0)),
            "u": (None, None, np.float32(-3.0), np.float32(4.0))}
    data = minmax_from_histograms(hist, {"t__lepton_histogram_sample": "t"})
    assert data["t"].lowest.dtype == np.float16 and data["t"].highest.tolist() == [2.0]
    assert data["u"].lowest.dtype == np.float32 and data["u"].lowest.shape == (1,)


def test_an_nncf_candidate_sends_nothing_anywhere(tmp_path, monkeypatch):
    """NNCF's usage telemetry forked a sender process per event (3 for one quantize) from the export's
    threads; one such child hung a CI export at exit. The export turns it off: no process is started."""
    import multiprocessing

    pytest.importorskip("nncf")
    started: list[object] = []
    real = multiprocessing.Process.start
    monkeypatch.setattr(multiprocessing.Process, "start", lambda self: (started.append(self), real(self))[1])
    fp32 = tmp_path / "m.onnx"
    conv_relu_conv(fp32, 3, 4, 8)
    x = np.random.default_rng(1).standard_normal((8, 3, 8, 8)).astype(np.float32)
    res = q.quantize_int8(fp32, tmp_path / "n.onnx", x, q.Recipe.parse("nncf-default"))
    assert res.path.is_file() and started == []
