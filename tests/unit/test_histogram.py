"""The linear-time percentile histograms (compress/histogram.py) against onnxruntime's own collector:
same bins, counts and percentile thresholds, on batches whose range grows, shrinks and holds
outliers, as real activations do."""
from __future__ import annotations

import numpy as np
import pytest

from lepton_edge.compress import histogram

from .conv_models import conv_relu_conv


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


def _conv_model(path, batch="N"):
    """input [batch, 4, 96, 96] -> Conv 8 ch -> Relu -> Conv 8 ch: 73,728 values per conv output, more than
    SAMPLE_LIMIT, with heavy-tailed weights so the 99.99th percentile sits well inside the range."""
    conv_relu_conv(path, 4, 8, 96, batch, heavy_tails=True)


class _Reader:
    def __init__(self, n=6):
        rng = np.random.default_rng(1)
        self.xs = [rng.standard_normal((1, 4, 96, 96)).astype(np.float32) for _ in range(n)]

    def get_next(self):
        return {"x": self.xs.pop()} if self.xs else None


def _ranges(path, tmp, sampled: bool, per_input: int = histogram.SAMPLE_LIMIT):
    from contextlib import nullcontext

    from onnxruntime.quantization.calibrate import PercentileCalibrater

    with histogram.sampled_histograms(per_input=per_input) if sampled else nullcontext(), \
            histogram.linear_time_histograms():
        cal = PercentileCalibrater(path, augmented_model_path=str(tmp / f"aug{sampled}.onnx"), symmetric=True,
                                   num_bins=2048, percentile=99.99)
        cal.augment_graph()
        cal.create_inference_session()
        outputs = {o.name: o for o in cal.infer_session.get_outputs()}
        cal.collect_data(_Reader())
        return cal.compute_data(), outputs, cal


@pytest.mark.parametrize("batch", ["N", 1])  # dynamic batch: the step comes from the shape in the graph
def test_sampled_histograms_keep_the_thresholds(tmp_path, batch):
    path = tmp_path / "m.onnx"
    _conv_model(path, batch)
    full, _, _ = _ranges(path, tmp_path, sampled=False)
    sampled, outputs, cal = _ranges(path, tmp_path, sampled=True)
    assert set(sampled.data) == set(full.data) == {"x", "c1", "r1", "y"}  # the tensors' own names
    for name in full.data:
        f, s = full.data[name], sampled.data[name]
        hi_f, hi_s = float(np.asarray(f.highest).ravel()[0]), float(np.asarray(s.highest).ravel()[0])
        assert abs(hi_s - hi_f) <= 0.05 * hi_f, (name, hi_f, hi_s)  # the 99.99th percentile of |x|, within 5 %
        assert s.hist.sum() < f.hist.sum() or f.hist.sum() <= 6 * (histogram.SAMPLE_LIMIT + 2)
    # what reaches Python is a sample: at most SAMPLE_LIMIT values and the min and max, per tensor and batch
    x = _Reader(1).xs[0]
    got = dict(zip(outputs, cal.infer_session.run(list(outputs), {"x": x})))
    c1 = got["c1" + histogram.SAMPLED_SUFFIX]
    assert c1.size <= histogram.SAMPLE_LIMIT + 2 < 8 * 96 * 96
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as the calibration session
    y = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    sample_y = got["y" + histogram.SAMPLED_SUFFIX]
    np.testing.assert_allclose(sample_y[-2:], [y.min(), y.max()], rtol=1e-6)  # exact extremes: they clip the range
    np.testing.assert_allclose(sample_y[:-2], y.ravel()[:: (y.size - 1) // histogram.SAMPLE_LIMIT + 1], rtol=1e-6)


def test_the_sample_is_sized_by_the_values_beyond_the_percentile():
    # each tensor's sample over the whole data set holds about TAIL_VALUES values past the threshold
    n = 58
    per = histogram.per_input_sample(n, 99.99)
    assert histogram.SAMPLE_FLOOR < per < histogram.SAMPLE_LIMIT
    assert per * n * 1e-4 >= histogram.TAIL_VALUES > (per - 1) * n * 1e-4 - 1
    assert histogram.per_input_sample(4, 99.99) == histogram.SAMPLE_LIMIT  # few inputs: the most each
    assert histogram.per_input_sample(100_000, 99.99) == histogram.SAMPLE_FLOOR  # many: the floor
    assert histogram.per_input_sample(n, 99.999) == histogram.SAMPLE_LIMIT  # a thinner tail needs more
    assert histogram.per_input_sample(0, 99.99) == histogram.SAMPLE_LIMIT


def test_a_smaller_sample_keeps_the_thresholds(tmp_path):
    # 6 inputs of 73,728 values a tensor, sampled 8,192 an input: every 10th value, thresholds within 5 %
    path = tmp_path / "m.onnx"
    _conv_model(path)
    full, _, _ = _ranges(path, tmp_path, sampled=False)
    small, outputs, cal = _ranges(path, tmp_path, sampled=True, per_input=histogram.SAMPLE_FLOOR)
    for name in ("c1", "r1", "y"):
        f, s = full.data[name], small.data[name]
        hi_f, hi_s = float(np.asarray(f.highest).ravel()[0]), float(np.asarray(s.highest).ravel()[0])
        assert abs(hi_s - hi_f) <= 0.05 * hi_f, (name, hi_f, hi_s)
    x = _Reader(1).xs[0]
    got = dict(zip(outputs, cal.infer_session.run(list(outputs), {"x": x})))
    assert got["y" + histogram.SAMPLED_SUFFIX].size - 2 == len(range(0, 8 * 96 * 96, (8 * 96 * 96 - 1) // 8192 + 1))


@pytest.mark.parametrize("batch", ["N", 1])  # the step computed in the graph, and known from the shape
def test_a_tensor_of_exactly_the_sample_size_is_taken_whole(tmp_path, batch):
    # 8 x 96 x 96 = 73,728 values a conv output: a sample of that many is every value, not every 2nd
    path = tmp_path / "m.onnx"
    _conv_model(path, batch)
    _, outputs, cal = _ranges(path, tmp_path, sampled=True, per_input=8 * 96 * 96)
    x = _Reader(1).xs[0]
    got = dict(zip(outputs, cal.infer_session.run(list(outputs), {"x": x})))
    assert got["c1" + histogram.SAMPLED_SUFFIX].size - 2 == 8 * 96 * 96


def test_a_batch_is_sampled_as_densely_as_one_input(tmp_path):
    # calibration runs inputs in batches (quantize._batch_size): each input of a batch of 2 must give the
    # histograms as many values as one input run alone, or the thresholds move with the batch size
    import onnxruntime as ort
    from onnxruntime.quantization.calibrate import PercentileCalibrater

    path = tmp_path / "m.onnx"
    _conv_model(path)
    with histogram.sampled_histograms(batch=2), histogram.linear_time_histograms():
        cal = PercentileCalibrater(path, augmented_model_path=str(tmp_path / "aug.onnx"), symmetric=True,
                                   num_bins=2048, percentile=99.99)
        cal.augment_graph()
        cal.create_inference_session()
    assert histogram._per_batch[0] == histogram.SAMPLE_LIMIT  # put back after the block
    x = np.concatenate(_Reader(2).xs)  # [2, 4, 96, 96]
    names = [o.name for o in cal.infer_session.get_outputs()]
    got = dict(zip(names, cal.infer_session.run(names, {"x": x})))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as the calibration session
    y = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    per_input = y.size // 2
    step = (per_input - 1) // histogram.SAMPLE_LIMIT + 1  # one input's step, over both inputs
    sample = got["y" + histogram.SAMPLED_SUFFIX]
    assert step > 1 and sample.size - 2 == len(range(0, y.size, step)) > histogram.SAMPLE_LIMIT
    np.testing.assert_allclose(sample[:-2], y.ravel()[::step], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sample[-2:], [y.min(), y.max()], rtol=1e-5, atol=1e-6)


def test_sampled_branches_follow_their_tensor(tmp_path):
    # each branch right after the node making its tensor: onnxruntime runs ties in node order, and a branch
    # at the end of the graph would keep every calibrated tensor alive until the model has finished
    import onnx

    path = tmp_path / "m.onnx"
    _conv_model(path)
    _, _, cal = _ranges(path, tmp_path, sampled=True)
    nodes = list(onnx.load(cal.augmented_model_path).graph.node)
    made_at = {o: i for i, n in enumerate(nodes) for o in n.output}
    for name in ("c1", "r1"):
        out = made_at[name + histogram.SAMPLED_SUFFIX]
        assert made_at[name] < out < made_at["y"], name


def test_sampled_histograms_swapped_in_only_for_the_block():
    from onnxruntime.quantization.calibrate import HistogramCalibrater

    original = HistogramCalibrater.augment_graph
    with histogram.sampled_histograms():
        assert HistogramCalibrater.augment_graph is histogram.sampled_augment_graph
    assert HistogramCalibrater.augment_graph is original


def test_bin_counts_match_numpy_but_for_values_on_an_edge():
    rng = np.random.default_rng(3)
    a = np.abs(rng.standard_normal(70_000)).astype(np.float32)
    a[:3] = [np.nan, -1.0, 0.01]  # NaN and a value under the range are left out; 0.01 is under lo too
    lo, hi = 0.05, float(a[3:].max())
    ours = histogram.bin_counts(a, 2300, lo, hi)
    theirs, _ = np.histogram(a[3:], bins=2300, range=(lo, hi))
    assert len(ours) == 2300 and ours.sum() == theirs.sum() == np.count_nonzero(a[3:] >= lo)
    assert np.abs(ours - theirs).sum() <= 10  # a value on an edge, by float rounding, in the next bin
    assert histogram.bin_counts(np.full(5, 2.0, np.float32), 8, 2.0, 2.0).tolist() == [5] + [0] * 7


def test_a_one_run_sample_bins_as_its_values_would():
    """A stride of one run hands the collector its sample followed by that sample's exact min and max; binned,
    it must give what the same values give as a plain tensor (whose min and max come from the values),
    batch after batch as the range grows and shrinks, NaN and float16 included."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    rng = np.random.default_rng(3)
    for dtype in (np.float32, np.float16):
        a, b = (HistogramCollector(method="percentile", symmetric=True, num_bins=256, num_quantized_bins=128,
                                   percentile=99.0, scenario="same") for _ in range(2))
        for k, scale in enumerate((1.0, 0.5, 3.0, 1.0, 40.0, 2.0)):
            x = (rng.standard_normal(500) * scale).astype(dtype)
            if k:  # (a NaN in the first batch: numpy's histogram refuses it, theirs and ours alike)
                x[7] = np.nan
            sample = np.concatenate([x, np.array([np.nanmin(x), np.nanmax(x)], dtype)])
            histogram.collect_absolute_value(a, {"t" + histogram.SAMPLED_SUFFIX: [sample]})
            histogram.collect_absolute_value(b, {"t": [x]})
        (h, e, lo, hi), (h2, e2, lo2, hi2) = a.histogram_dict["t" + histogram.SAMPLED_SUFFIX], b.histogram_dict["t"]
        assert np.array_equal(h, h2) and np.array_equal(e, e2) and e.dtype == e2.dtype == dtype
        assert (lo, hi) == (lo2, hi2) and len(h) > 256


def test_a_near_constant_tensor_gets_a_histogram_where_onnxruntimes_raised():
    """A float32 tensor whose values span 1e-5 around 1.0 (84 float32 values: fewer than 2,048 edges;
    a caffe2 SqueezeNet's uniform softmax) made numpy's first histogram raise, and the percentile
    candidate failed with "Too many bins for data range"; it is binned from 0 to its largest value, and
    a later batch of a much wider range extends the edges by a few thousand bins, not billions."""
    ours, theirs = _collectors()
    first = {"t": (1.0 + np.linspace(0, 1e-5, 4096)).astype(np.float32)}
    with pytest.raises(ValueError, match="Too many bins"):
        theirs.collect(first)
    with histogram.linear_time_histograms():
        ours.collect(first)
        hist, edges, lo, hi = ours.histogram_dict["t"]
        assert hist.sum() == 4096 and len(edges) == 2049 and lo == first["t"].min() and hi == first["t"].max()
        ours.collect({"t": np.full(1000, 3.0, np.float32)})
        hist, edges, lo, hi = ours.histogram_dict["t"]
        assert hist.sum() == 5096 and edges[-1] >= 3.0 and hi == 3.0 and len(edges) < 4 * 2049
        low, high = ours.compute_collection_result()["t"][:2]
        assert 0.0 < float(high) <= 3.0 + 1e-3
