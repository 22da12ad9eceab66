"""onnxruntime's percentile histograms, binned in linear time, from a sample of each tensor.

Why: onnxruntime's `HistogramCollector.collect_absolute_value` (percentile calibration) bins every
batch after the first with `np.histogram(data, bins=<array of edges>)`, and numpy sorts the data for
explicit edges. On PP-OCR's recogniser that sort was 43 s of a 56 s calibration (40 inputs; cProfile).
The edges are always evenly spaced (the first batch's `bins=num_bins`, then the same width extended
to the new maximum), so each value's bin is arithmetic on it (`bin_counts`), with no sort: the same
distribution and thresholds (onnxruntime's own float32 edges drift by up to a bin's width, so bin by bin
the counts may differ slightly; tests/unit/test_histogram.py).
Everything else (the first batch, the ranges kept, the percentile computed from the counts) is
onnxruntime's own code; only this method is swapped, for the calibration's duration
(`linear_time_histograms`, beside `quantize._lean_calibration`).

The histogram calibrators also get every calibrated tensor whole; `sampled_histograms` has the graph
hand them a strided sample of each with its exact extremes instead (`sampled_augment_graph`).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np


def collect_absolute_value(self, name_to_arr: dict) -> None:
    """Drop-in for `HistogramCollector.collect_absolute_value` (same histogram_dict entries:
    counts, edges, min, max), merging each batch into the tensor's histogram without sorting.
    A sampled tensor (`sampled_augment_graph`) bins its sample only: its exact min and max set the
    range, and binned too they would be ~30 % of a 99.99th percentile's tail (2 of 65,538 values)."""
    for tensor, data in name_to_arr.items():
        if tensor.endswith(SAMPLED_SUFFIX):  # each run's sample, then that run's exact min and max
            runs = [np.asarray(d).ravel() for d in data]
            if len(runs) == 1:  # (a stride of one run: its own sample, min and max, as the lines below give them)
                arr, lo, hi = runs[0][:-2], runs[0][-2], runs[0][-1]
            else:
                arr = np.concatenate([r[:-2] for r in runs])
                lo, hi = np.nanmin([r[-2] for r in runs]), np.nanmax([r[-1] for r in runs])  # (as MinMax's)
        else:
            arr = np.asarray(data).ravel()
            if arr.size:
                lo, hi = np.nanmin(arr), np.nanmax(arr)
            else:
                lo = hi = np.array(0, dtype=arr.dtype)
        arr = np.absolute(arr)
        if tensor not in self.histogram_dict:
            try:
                hist, edges = np.histogram(arr, bins=self.num_bins)
            except ValueError as e:
                if "Too many bins" not in str(e):
                    raise
                hist, edges = np.histogram(arr, bins=self.num_bins, range=narrow_range(arr, self.num_bins))
            self.histogram_dict[tensor] = (hist, edges.astype(arr.dtype), lo, hi)
            continue
        old_hist, old_edges, old_lo, old_hi = self.histogram_dict[tensor]
        top = max(abs(lo), abs(hi))  # max |x|, from the range already taken
        if top > old_edges[-1]:
            edges = extended_edges(old_edges, top)  # (binned on these float64 edges, kept in the tensor's type)
            kept = edges.astype(arr.dtype)
        else:  # (no new bins: extended_edges would give the same values again, and their copy)
            edges = kept = old_edges
        hist = bin_counts(arr, len(edges) - 1, float(edges[0]), float(edges[-1]), owned=True)
        hist[: len(old_hist)] += old_hist
        self.histogram_dict[tensor] = (hist, kept, min(old_lo, lo), max(old_hi, hi))


def narrow_range(arr: np.ndarray, bins: int) -> tuple[float, float]:
    """The range a near-constant tensor's first percentile histogram is binned over: 0 to its largest
    absolute value (the values binned are absolute), so a bin is a useful width. Why: numpy cannot
    make 2,048 distinct float32 edges over 1.0 to 1.00001 and raised "Too many bins for data range",
    which failed the candidate (a caffe2 SqueezeNet's uniform softmax); bins a few float32 steps wide
    would have had a later batch's wider range extend them by billions. The calibrators clip a
    threshold to the tensor's own minimum and maximum, so the wider range moves no threshold."""
    hi = float(np.nanmax(arr)) if arr.size else 0.0
    tiny = float(np.finfo(arr.dtype).tiny) if np.issubdtype(arr.dtype, np.floating) else 1.0
    return 0.0, max(hi, tiny * bins * 4)


def bin_counts(arr: np.ndarray, bins: int, lo: float, hi: float, owned: bool = False) -> np.ndarray:
    """Counts of `arr` in `bins` equal bins from `lo` to `hi`: a value's bin is its offset times the bins
    per unit, floored (numpy's uniform path then corrects the few values that float rounding puts one
    bin off, in five more passes over the data). Values below `lo` (and NaN, and infinities) are left out,
    those at or above `hi` go in the last bin (the edges were just extended to the batch's maximum, so only
    rounding puts one there). Why not np.histogram: on 65,538 values and 2,300 bins this takes 0.17 ms,
    numpy 0.87 ms, and the percentile calibration of PP-OCR's recogniser makes 21,603 such calls; the
    counts differ from numpy's by a value at a bin edge now and then (1 in 65,538 there).
    How: one float array, worked in place. Shifted up one bin, whatever is left out lands in bin 0 (the
    values below `lo` by clipping, NaN and infinities set there first), and that bin is dropped, so no
    mask and no filtered copy are made (0.26 ms a call with them). `owned`: `arr` is the caller's scratch
    copy (a float32 one is then worked in place: the same arithmetic, one array less)."""
    scale = np.float32(bins / (hi - lo)) if hi > lo else np.float32(0.0)
    if owned and arr.dtype == np.float32:
        f = arr
        f -= np.float32(lo)
    else:
        f = arr.astype(np.float32, copy=False) - np.float32(lo)
    f *= scale
    f += np.float32(1.0)
    f[~np.isfinite(f)] = 0.0
    np.clip(f, 0.0, bins, out=f)
    return np.bincount(f.astype(np.intp), minlength=bins + 1)[1:]


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


# --- sampled histogram outputs ----------------------------------------------------------------------

SAMPLE_LIMIT = 1 << 16  # values per tensor and input that reach the histograms at most, plus its exact min and max
# How many values of each tensor's calibration sample, over all inputs, should lie beyond its percentile
# threshold: the sample of each input is sized so the data set gives this many (`per_input_sample`). Why: the
# threshold is where the top (100 - p) % of the sample begins, and its estimate rests on those values alone;
# a fixed 65,536 per input gave 380 of them at 99.99 on 58 inputs, and binning them was most of PP-OCR's
# recogniser's calibration (8.1 s; 34,483 an input: 5.1 s, u8-percentile's SQNR 9.2 -> 9.5 dB, its
# decision the same). 100 tail values put the threshold's own sampling error near 10 % of the tail's mass
# (99.990 +- 0.001 %); measured against the thresholds of the whole sample cap (65,536 an input) on the
# recogniser's 722 range ends, their error was no larger than with 200 (90th percentile 2.7 % vs 3.4 %, 99th
# 18 % vs 23 %: the heavy tails of a few tensors, either way), and the shared calibration pass took 0.7 s less
# (6.1 vs 6.8 s). ppocr-cls's and ppocr-det's exports chose the same candidates with it.
TAIL_VALUES = 100
SAMPLE_FLOOR = 1 << 13  # per input at least (a large calibration set): the histogram's 2,048 bins still fill
SAMPLED_SUFFIX = "__lepton_histogram_sample"
_per_batch = [SAMPLE_LIMIT]  # values per tensor and batch, while sampled_histograms() is active (its `batch`)


def per_input_sample(inputs: int, percentile: float) -> int:
    """Values of each calibrated tensor sampled per input so that `inputs` inputs give about TAIL_VALUES
    beyond the `percentile` threshold: between SAMPLE_FLOOR and SAMPLE_LIMIT (few inputs: the most)."""
    tail = max(1e-9, 1.0 - percentile / 100.0)
    return int(min(SAMPLE_LIMIT, max(SAMPLE_FLOOR, math.ceil(TAIL_VALUES / tail / max(1, inputs)))))


def sampled_augment_graph(self) -> None:
    """Drop-in for `HistogramCalibrater.augment_graph`: each calibrated tensor reaches Python as at
    most `per_input` of its values an input (`sampled_histograms`; every k-th of the flattened tensor,
    k = ceil(size / (per_input x the batch)), computed in the graph so dynamic shapes work) followed by its
    exact minimum and maximum.

    Why: onnxruntime's histogram calibrators (percentile, entropy) make every calibrated tensor a graph
    output and bin all of it. On an 800x608 PicoDet detector that is ~0.8 GB of outputs per image: the
    rpi4 export's peak (2.1 GB against 1.3 GB between candidates), and its s8-percentile candidate took
    109 s of the 165 s export. Sampled: 1.4 GB peak, 37 s. A percentile or entropy threshold is a
    property of the distribution, which a strided sample of every batch keeps (PicoDet, 526 tensors:
    sampled/full threshold median 1.000, 5th-95th percentile 0.968-1.023); the min and max (which clip
    the percentile range) stay exact. Models below opset 10 (no Slice steps) keep the full outputs."""
    import onnx
    from onnx import TensorProto, helper

    self.tensors_to_calibrate, value_infos = self.select_tensors_to_calibrate(self.model)
    graph = self.model.graph
    opset = next((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), 0)
    self.lepton_sampled = {}
    if opset < 10:
        for tensor in self.tensors_to_calibrate:
            if tensor not in self.model_original_outputs:
                graph.output.append(value_infos[tensor])
    else:
        p = "lepton_hs"
        graph.initializer.extend([
            helper.make_tensor(f"{p}_flat", TensorProto.INT64, [1], [-1]),
            helper.make_tensor(f"{p}_one", TensorProto.INT64, [1], [1]),
            helper.make_tensor(f"{p}_zero", TensorProto.INT64, [1], [0]),
            helper.make_tensor(f"{p}_end", TensorProto.INT64, [1], [2**62]),
        ])
        branches: dict[str, list] = {}
        limit = _per_batch[0]
        for i, tensor in enumerate(sorted(self.tensors_to_calibrate)):
            branches[tensor] = _sample_branch(tensor, f"{p}{i}", p, value_infos[tensor], graph, limit)
            out = tensor + SAMPLED_SUFFIX
            graph.output.append(helper.make_tensor_value_info(out, value_infos[tensor].type.tensor_type.elem_type,
                                                              None))
            self.lepton_sampled[out] = tensor
        # Each branch goes right after the node making its tensor: onnxruntime's calibration session
        # (priority-based order, _lean_calibration) breaks ties by node index, so branches appended at
        # the end ran after the whole model and every sampled tensor lived until then (+0.96 GB on PicoDet).
        nodes = [n for i in graph.input for n in branches.pop(i.name, [])]
        for node in list(graph.node):
            nodes.append(node)
            for o in node.output:
                nodes.extend(branches.pop(o, []))
        nodes.extend(n for rest in branches.values() for n in rest)
        del graph.node[:]
        graph.node.extend(nodes)
        self.tensors_to_calibrate = set(self.lepton_sampled)
    onnx.save(self.model, self.augmented_model_path, save_as_external_data=self.use_external_data_format)


def _sample_branch(tensor: str, t: str, p: str, value_info, graph, limit: int = SAMPLE_LIMIT) -> list:
    """Nodes computing `tensor + SAMPLED_SUFFIX`: every k-th value of the flattened tensor (at most `limit`
    values), then its min and max (k a constant where shape inference knows the size, else computed from
    the shape)."""
    from onnx import TensorProto, helper

    nodes = []
    dims = [d.dim_value for d in value_info.type.tensor_type.shape.dim]
    if dims and all(dims):
        graph.initializer.append(helper.make_tensor(f"{t}_step", TensorProto.INT64, [1],
                                                    [max(0, math.prod(dims) - 1) // limit + 1]))
    else:
        graph.initializer.append(helper.make_tensor(f"{t}_limit", TensorProto.INT64, [1], [limit]))
        nodes += [  # (Size, not Shape and ReduceProd: a shape's length is the tensor's rank, which a
            # model's own value_info can state wrongly; onnxruntime then planned the Shape node's output for
            # that rank and failed on it: ddddocr's CRNN says [1, seqlen] and returns [32, 1, 8210])
            helper.make_node("Size", [tensor], [f"{t}_n0"]),
            helper.make_node("Reshape", [f"{t}_n0", f"{p}_one"], [f"{t}_n"]),
            # ((size - 1) // limit + 1: a tensor of exactly `limit` values is taken whole, not every 2nd;
            # an empty one's -1 // limit truncates to 0, a step of 1)
            helper.make_node("Sub", [f"{t}_n", f"{p}_one"], [f"{t}_n1"]),
            helper.make_node("Div", [f"{t}_n1", f"{t}_limit"], [f"{t}_q"]),
            helper.make_node("Add", [f"{t}_q", f"{p}_one"], [f"{t}_step"]),
        ]
    return nodes + [
        helper.make_node("Reshape", [tensor, f"{p}_flat"], [f"{t}_flat"]),
        helper.make_node("Slice", [f"{t}_flat", f"{p}_zero", f"{p}_end", f"{p}_zero", f"{t}_step"], [f"{t}_sample"]),
        helper.make_node("ReduceMin", [tensor], [f"{t}_min0"], keepdims=0),
        helper.make_node("ReduceMax", [tensor], [f"{t}_max0"], keepdims=0),
        helper.make_node("Reshape", [f"{t}_min0", f"{p}_one"], [f"{t}_min"]),
        helper.make_node("Reshape", [f"{t}_max0", f"{p}_one"], [f"{t}_max"]),
        helper.make_node("Concat", [f"{t}_sample", f"{t}_min", f"{t}_max"], [tensor + SAMPLED_SUFFIX], axis=0),
    ]


def _renamed(compute_data):
    """`compute_data` whose ranges are keyed by the calibrated tensors' own names again."""
    def wrapped(self):
        from onnxruntime.quantization.calibrate import TensorsData

        result = compute_data(self)
        names = getattr(self, "lepton_sampled", None)
        if not names:
            return result
        return TensorsData(result.calibration_method, {names.get(k, k): v for k, v in result.data.items()})
    return wrapped


@contextmanager
def sampled_histograms(batch: int = 1, per_input: int = SAMPLE_LIMIT) -> Iterator[None]:
    """onnxruntime's HistogramCalibrater with `sampled_augment_graph` (and its ranges renamed back),
    for the block; put back after, as `linear_time_histograms` does. `batch`: the inputs of each
    calibration run, so every input gives the histograms as many values whatever the batch (a batch of
    2 sampled like one input gave each half as many: u8-percentile's SQNR on PP-OCR's recogniser moved);
    `per_input`: the values of each tensor an input gives at most (`per_input_sample`)."""
    from onnxruntime.quantization.calibrate import HistogramCalibrater

    augment, compute = HistogramCalibrater.augment_graph, HistogramCalibrater.compute_data
    HistogramCalibrater.augment_graph = sampled_augment_graph  # type: ignore[method-assign]
    HistogramCalibrater.compute_data = _renamed(compute)  # type: ignore[method-assign]
    before, _per_batch[0] = _per_batch[0], max(1, per_input) * max(1, batch)
    try:
        yield
    finally:
        HistogramCalibrater.augment_graph = augment  # type: ignore[method-assign]
        HistogramCalibrater.compute_data = compute  # type: ignore[method-assign]
        _per_batch[0] = before
