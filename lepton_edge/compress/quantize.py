"""ONNX precision conversion: int8 static QDQ (NNCF or onnxruntime.quantization) and fp16.

Why recipes: plain MinMax `quantize_static` breaks real depthwise convolutions (measured here:
12 % of confident MobileNetV2 predictions changed with uint8 activations). A recipe names the
quantizer (NNCF's post-training quantization, or onnxruntime's), the activation type, the
calibration method, and which layers stay in float; the exporter tries the target's recipes and
keeps the best that passes validation.

Why calibration streams: onnxruntime's histogram calibrators (percentile, entropy) add every
intermediate tensor to the graph's outputs and keep them for every sample before building
histograms (24 GB for a 800x608 detector with 72 photos). Here the data goes through in strides of
a few batches (`CalibStridedMinMax`, which every calibrator honours: ranges and histograms merge
across strides), so memory is one stride's tensors, whatever the number of samples. (onnxruntime's
`CalibMaxIntermediateOutputs` is not used: in 1.32 it drops the MinMax data it flushes.)

Why constant inputs come off and go back: a multi-input model's non-image inputs (PaddleDetection's
`im_shape`, `scale_factor`) travel as defaults baked into the graph (`with_defaults`), so the device
feeds the frame alone. The quantizers and the fp16 converter would fold such a default as a weight;
they get the model with those inputs plain again (`without_defaults`), calibration feeds them their
constant with every batch, and the result gets its defaults back.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

QUANTIZABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul")
PER_CHANNEL_MIN_OPSET = 13  # DequantizeLinear's `axis` (per-channel weights) appeared in opset 13
STRIDE_BYTES = 8 << 20  # calibration inputs per stride; the stride's intermediate tensors scale with it
# A histogram calibrator (percentile, entropy) keeps every calibrated tensor of a stride's samples until
# the stride ends: this bounds those tensors (estimated by shape inference), whatever the input size.
HISTOGRAM_STRIDE_BYTES = 32 << 20
# a batch run whole (validation, NNCF's statistics): at most this many bytes of activations (estimated by
# shape inference)
ACTIVATION_BATCH_BYTES = 64 << 20
# onnxruntime's calibration batch: the same bound, higher. Why: its calibration session runs each tensor's
# reductions and sample as soon as the tensor exists (_lean_calibration), so a batch's activations are never
# all alive at once (PP-OCR's recogniser, 196 MB estimated an input: 213 MB peak in batches of 1, 20-30 MB more
# in batches of 2). That graph adds about 4,000 small nodes to the recogniser's 860, and their per-run cost is
# paid once a batch: 58 inputs in batches of 2 calibrated in 5.5 instead of 6.6 s.
CALIBRATION_BATCH_BYTES = 512 << 20


@dataclass(frozen=True)
class Recipe:
    """One int8 candidate, parsed from its name.

    `<u8|s8>-<minmax|percentile|entropy>[-ends][-sensitive][-litert|-w7]`: onnxruntime's quantize_static
    (or, with `litert`, TFLite's LiteRT quantizer). `nncf-<default|mixed>[-sq][-ends][-sensitive][-w7]`:
    NNCF's post-training quantization (fast bias correction on; `default` = NNCF's performance
    preset, symmetric activations; `mixed` = asymmetric activations; `sq` = SmoothQuant on MatMul
    and convolutions, which helps models with outlier channels).

    `w7`: weights in 7 bits (|w| <= 64; onnxruntime's `reduce_range`, NNCF's `OverflowFix.ENABLE`). Why:
    x86 CPUs without AVX-512 VNNI multiply uint8 activations by int8 weights with `vpmaddubsw`, which
    adds two products into int16 and saturates past 32,767 (255 x 127 x 2 = 64,770). onnxruntime's
    fused int8 kernels then give wrong sums, so a graph validated on a VNNI workstation can be wrong on
    the AVX2 device it was exported for: measured on an AVX2-only EPYC, ddddocr's detector in u8-minmax
    matched 0.727 of fp32's boxes (F1) with 8-bit weights and 0.907 with 7-bit ones. 255 x 64 x 2 fits.
    """

    name: str
    activation: str  # "u8" | "s8" (for NNCF: s8 for the symmetric preset, u8 for mixed)
    calibration: str  # "minmax" | "percentile" | "entropy" | NNCF's "default" | "mixed"
    keep_ends: bool = False
    sensitive: bool = False
    litert: bool = False  # TFLite: the LiteRT quantizer (ai-edge-quantizer) instead of PT2E
    engine: str = "ort"  # "ort" | "nncf" | "litert"
    smooth_quant: bool = False
    weights_7bit: bool = False

    @classmethod
    def parse(cls, name: str) -> Recipe:
        parts = name.split("-")
        opts = parts[2:]
        if len(parts) < 2:
            raise ValueError(f"unknown recipe {name!r}")
        if len(set(opts)) != len(opts):  # (`-ends-ends` is no recipe of its own: it would be tried twice)
            raise ValueError(f"unknown recipe {name!r}: an option is named twice")
        if parts[0] == "nncf":
            if parts[1] not in ("default", "mixed") or any(o not in ("ends", "sensitive", "sq", "w7") for o in opts):
                raise ValueError(f"unknown recipe {name!r}: expected nncf-<default|mixed>[-sq][-ends][-sensitive][-w7]")
            return cls(name, "s8" if parts[1] == "default" else "u8", parts[1], "ends" in opts, "sensitive" in opts,
                       engine="nncf", smooth_quant="sq" in opts, weights_7bit="w7" in opts)
        if parts[0] not in ("u8", "s8") or parts[1] not in ("minmax", "percentile", "entropy") \
                or any(o not in ("ends", "sensitive", "litert", "w7") for o in opts):
            raise ValueError(f"unknown recipe {name!r}: expected <u8|s8>-<minmax|percentile|entropy>"
                             "[-ends][-sensitive][-litert|-w7]")
        litert = "litert" in opts
        if litert and "w7" in opts:  # (the LiteRT quantizer has no such option, and ARM's kernels need none)
            raise ValueError(f"unknown recipe {name!r}: -w7 is for onnxruntime and NNCF graphs, not -litert")
        return cls(name, parts[0], parts[1], "ends" in opts, "sensitive" in opts, litert,
                   engine="litert" if litert else "ort", weights_7bit="w7" in opts)

    @property
    def layout(self) -> tuple:
        """What decides where the quantizers go and which kernels run, so the quantized graph's speed: two
        recipes with the same layout differ only in their scales, and the search predicts one's speed
        from the other's (exporters/recipes.SIBLING_MARGIN). NNCF places its quantizers the same way in
        both presets (nncf-default and nncf-mixed timed within 4 % of each other on three models).
        onnxruntime's u8-minmax and u8-percentile also build the same graph (PP-OCR det: the same ops,
        14.5 and 14.6 ms), but each is kept its own layout here: u8-percentile is often the best, and
        one export's quick timings of those two graphs once read 1.16x and 0.80x fp32's time, so a noisy
        timing must not skip it. nncf-mixed was chosen for none of the corpus's 15 int8 bundles (BENCHMARKS.md)."""
        if self.engine == "nncf":
            return (self.engine, self.keep_ends, self.sensitive, self.smooth_quant)  # (w7: other scales, same kernels)
        return (self.engine, self.name)

    @property
    def base(self) -> str:
        """The recipe without `-sensitive`: what the sensitivity pass starts from."""
        return "-".join(p for p in self.name.split("-") if p != "sensitive")

    def method(self) -> str:
        """What quantized the model, in words, for the manifest."""
        weights = "weights int8 per-channel" + (" in 7 bits" if self.weights_7bit else "")
        if self.engine == "nncf":
            return (f"NNCF {_version('nncf')} post-training quantization (ONNX backend, {self.calibration} preset, "
                    f"fast bias correction{', SmoothQuant' if self.smooth_quant else ''}), QDQ, {weights}")
        return (f"onnxruntime {_version('onnxruntime')} quantize_static ({self.calibration} calibration, "
                f"{self.activation} activations), QDQ, {weights}")


def _version(pkg: str) -> str:
    import importlib.metadata as md

    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "?"


@dataclass
class QuantResult:
    path: Path
    recipe: Recipe
    float_nodes: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)  # tensor renames by compact_names()


def _no_check() -> None:
    return None


def _inputs(x):
    """An array, or PixelInputs kept as pixels: every reader here takes a batch at a time (a slice of
    PixelInputs is that batch as floats), so the whole float array never exists at once."""
    from lepton_edge.compress.calibration import PixelInputs

    return x if isinstance(x, PixelInputs) else np.asarray(x)


def _feeds(model, calib, fixed: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Calibration inputs by graph input name: an array feeds the one input not in `fixed` (the
    constant inputs, fed whole with every batch), a dict names them."""
    fixed = fixed or {}
    names = [n for n in _input_names(model) if n not in fixed]
    if isinstance(calib, dict):
        missing = [n for n in names if n not in calib]
        if missing:
            raise ValueError(f"calibration data has no values for input(s) {', '.join(missing)}")
        feeds = {n: _inputs(calib[n]) for n in names}
    else:
        if len(names) != 1:
            raise ValueError(f"the model has {len(names)} inputs; give calibration data for each by name")
        feeds = {names[0]: _inputs(calib)}
    counts = {len(v) for v in feeds.values()}
    if len(counts) != 1 or 0 in counts:
        raise ValueError("calibration inputs must all have the same, non-zero number of samples")
    return feeds


# --- constant inputs: the non-image inputs of a multi-input model --------------------------------
DEFAULTS_KEY = "lepton.input_defaults"  # metadata naming the inputs whose default the exporter baked in


def input_defaults(model) -> dict[str, np.ndarray]:
    """{input name: value} of the inputs that carry a baked-in default (with_defaults).

    Why a metadata key and not "every input with an initializer": models of IR version < 4 list
    every weight as a graph input too; only the inputs the exporter gave a value are constants."""
    from onnx import numpy_helper

    names = next((p.value.split(",") for p in model.metadata_props if p.key == DEFAULTS_KEY), [])
    inits = {i.name: i for i in model.graph.initializer}
    return {n: numpy_helper.to_array(inits[n]) for n in names if n in inits}


def with_defaults(model, values: dict[str, np.ndarray]):
    """`model` with each input named in `values` given that value as its default: an initializer of
    the input's name (ONNX's overridable initializer). A runtime that feeds only the image input
    (the device's, onnxruntime's) runs the model; one that knows better may still feed the input."""
    from onnx import numpy_helper

    if not values:
        return model
    have = {i.name for i in model.graph.initializer}
    for name, v in values.items():
        if name not in have:
            model.graph.initializer.append(numpy_helper.from_array(np.asarray(v), name))
    keep = [p for p in model.metadata_props if p.key != DEFAULTS_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    entry = model.metadata_props.add()
    entry.key, entry.value = DEFAULTS_KEY, ",".join(values)
    if model.ir_version < 4:  # an input with an initializer is a default only from IR version 4 on
        model.ir_version = 4
    return model


def without_defaults(model) -> tuple[object, dict[str, np.ndarray]]:
    """(model with its constant inputs plain inputs again, their values): what the quantizers and the
    fp16 converter get, so they calibrate through the inputs instead of folding them as weights."""
    inputs = {i.name for i in model.graph.input}
    # only graph inputs: a third-party file could carry our metadata key naming a weight, which then went missing
    values = {k: v for k, v in input_defaults(model).items() if k in inputs}
    if not values:
        return model, {}
    keep = [i for i in model.graph.initializer if i.name not in values]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    props = [p for p in model.metadata_props if p.key != DEFAULTS_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(props)
    return model, values


def _rebake(path: Path, values: dict[str, np.ndarray]) -> None:
    """Give the inputs of `values` their defaults again in the file at `path`."""
    import onnx

    if values:
        onnx.save(with_defaults(onnx.load(str(path)), values), str(path))


def _dtypes(model) -> dict[str, type]:
    import onnx

    out = {}
    for i in model.graph.input:
        elem = i.type.tensor_type.elem_type
        out[i.name] = onnx.helper.tensor_dtype_to_np_dtype(elem) if elem else np.float32
    return out


class _Reader:
    """CalibrationDataReader over in-memory inputs, one batch at a time, restartable over a range.

    `set_range` and `__len__` let quantize_static calibrate stride by stride (CalibStridedMinMax),
    so the calibrator keeps one stride's intermediate tensors, not every sample's. Their unit is
    `per_stride` batches (quantize_static is then given a stride of 1): a stride of any size, the
    last one shorter, where quantize_static's own strides must divide the batch count (58 photos
    in batches of 2 made 29 batches: one stride of all, or 29 of one). `check` runs before every
    batch: it raises when the export is over its memory budget, which stops the calibration
    between two batches.
    """

    def __init__(self, feeds: dict[str, np.ndarray], dtypes: dict[str, type], batch: int, advance=lambda n: None,
                 check: Callable[[], None] = _no_check, fixed: dict[str, np.ndarray] | None = None,
                 per_stride: int = 1):
        self.feeds, self.dtypes, self.batch, self.advance, self.check = feeds, dtypes, batch, advance, check
        self.fixed = fixed or {}  # constant inputs, the same whole value with every batch
        self.n = len(next(iter(feeds.values())))
        self.batches, self.per_stride = -(-self.n // self.batch), max(1, per_stride)
        self.i, self.end = 0, self.batches

    def __len__(self) -> int:
        return -(-self.batches // self.per_stride)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.i, self.end = start_index * self.per_stride, min(end_index * self.per_stride, self.batches)

    def get_next(self):
        if self.i >= self.end:
            return None
        self.check()
        s = slice(self.i * self.batch, (self.i + 1) * self.batch)
        self.i += 1
        out = {k: np.ascontiguousarray(v[s], dtype=self.dtypes.get(k, np.float32)) for k, v in self.feeds.items()}
        self.advance(len(next(iter(out.values()))))
        return {**out, **{k: np.require(v, requirements="C") for k, v in self.fixed.items()}}

    def rewind(self):
        self.i, self.end = 0, self.batches


def _batch_size(model, feeds: dict[str, np.ndarray], activation_bytes: int = 0,
                limit: int = ACTIVATION_BATCH_BYTES) -> int:
    """A fixed batch as the graph wants; else batches of equal size (the histogram calibrators
    cannot stack ragged batches), small enough that a batch of large inputs stays small, and that
    a batch's activations (`activation_bytes` per sample, when known) stay under `limit`.

    Why the activations: onnxruntime's calibration session holds a batch's intermediate tensors
    until the tensors' ranges or histograms are taken. PP-OCR's recogniser (196 MB of activations
    per 48x320 input) peaked at 2.3 GB in batches of 5 and 0.7 GB in batches of 1, in the same 6.8 s,
    with MinMax's reductions run last (_lean_calibration now runs each one early: 0.2 GB)."""
    n = len(next(iter(feeds.values())))
    fed = next(i for i in model.graph.input if i.name == next(iter(feeds)))  # not a constant input
    d0 = fed.type.tensor_type.shape.dim
    if d0 and d0[0].dim_value:
        return int(d0[0].dim_value)
    sample = sum(v[0].nbytes for v in feeds.values())
    cap = max(1, min(16, (1 << 20) // max(1, sample)))
    if activation_bytes:
        cap = max(1, min(cap, limit // activation_bytes))
    return max(b for b in range(1, cap + 1) if n % b == 0)


def _stride(batches: int, batch_bytes: int, limit: int = STRIDE_BYTES) -> int:
    """Batches per calibration stride (at least one) whose `batch_bytes` per batch stay under `limit`."""
    return max(1, min(batches, limit // max(1, batch_bytes)))


def _activation_bytes(model, sample: dict[str, np.ndarray]) -> int:
    """Bytes of the float tensors one input sample makes in `model` (shape inference with the
    inputs fixed to `sample`'s shapes; tensors whose shape stays unknown are not counted, so this
    is a lower bound, 0 when nothing is known)."""
    return sum(_float_tensor_bytes(model, sample).values())


def _float_tensor_bytes(model, sample: dict[str, np.ndarray]) -> dict[str, int]:
    """{tensor: bytes} of the float tensors (not the graph inputs) whose shape inference knows the size
    with the inputs fixed to `sample`'s shapes; {} when inference fails (an estimate only)."""
    import onnx

    m = _shapes_only(model)
    for i in m.graph.input:
        if i.name in sample:
            dims = i.type.tensor_type.shape.dim
            for d, v in zip(dims, np.shape(sample[i.name])):
                d.Clear()
                d.dim_value = int(v)
    try:
        m = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception:  # an estimate only: no bound from it rather than a failed candidate
        return {}
    out = {}
    for v in (*m.graph.value_info, *m.graph.output):
        t = v.type.tensor_type
        dims = [d.dim_value for d in t.shape.dim]
        if t.elem_type == onnx.TensorProto.FLOAT and dims and all(dims):
            out[v.name] = math.prod(dims) * 4
    return out


_WEIGHT_TYPES = (1, 10, 11, 16)  # onnx.TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


def _shapes_only(model):
    """A copy of `model` for shape inference, whose float weights (more than 16 values) are graph inputs
    of their type and shape, without their values: no shape depends on a weight's values, and copying
    them (then shape inference's own copies) cost ~4x the weights: +830 MB for a model of 201 MB."""
    import onnx
    from onnx import helper

    g, m = model.graph, onnx.ModelProto()
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    mg = m.graph
    mg.name = g.name
    mg.node.extend(g.node)
    mg.input.extend(g.input)
    mg.output.extend(g.output)
    mg.value_info.extend(g.value_info)
    mg.sparse_initializer.extend(g.sparse_initializer)
    inputs = {i.name for i in g.input}
    for t in g.initializer:
        if t.data_type in _WEIGHT_TYPES and math.prod(t.dims) > 16:
            if t.name not in inputs:  # (below IR 4 every initializer is listed as an input already)
                mg.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            mg.initializer.append(t)
    return m


def _live_activation_bytes(model, sample: dict[str, np.ndarray]) -> int:
    """Bytes of the float tensors alive at once at the worst point of one run on `sample`, nodes taken in
    graph order: a tensor lives from the node making it until its last reader has run (a graph output to
    the end). Why: onnxruntime's memory planner reuses a tensor's buffer once its last reader ran, so a
    batch holds about this much, not every tensor's bytes (`_activation_bytes`). On PP-OCR's recogniser:
    13 MB live against 197 MB made per input, and validating in batches of 4 rather than 1 raised the
    export's peak RSS by 30-50 MB (3 more inputs' worth) and took 1.6 s less. A lower bound, as the
    sizes are (tensors of unknown shape are not counted; a subgraph's reads of outer tensors are not seen)."""
    sizes = _float_tensor_bytes(model, sample)
    if not sizes:
        return 0
    kept = {o.name for o in model.graph.output}
    last: dict[str, int] = {}
    for i, node in enumerate(model.graph.node):
        for t in node.input:
            last[t] = i
    alive: set[str] = set()
    live = peak = 0
    for i, node in enumerate(model.graph.node):
        for t in node.output:
            if t in sizes and t not in alive:
                alive.add(t)
                live += sizes[t]
        peak = max(peak, live)
        for t in {*node.input, *node.output}:
            if t in alive and t not in kept and last.get(t, -1) <= i:
                alive.discard(t)
                live -= sizes[t]
    return peak


def estimate_activation_bytes(path, x1: np.ndarray, live: bool = False) -> int:
    """Bytes of the float tensors one input `x1` ([1, ...]) makes in the ONNX model at `path` (`live`: of
    those alive at once, `_live_activation_bytes`); 0 when it is not an ONNX file or nothing is known (see
    _activation_bytes)."""
    import onnx

    if not str(path).endswith(".onnx"):
        return 0
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # an estimate only
        return 0
    sample = {_input_name(model): x1[:1]}
    return _live_activation_bytes(model, sample) if live else _activation_bytes(model, sample)


def quantizable_nodes(model) -> list[str]:
    """Names of the nodes int8 applies to, in graph order (first = input side)."""
    return [n.name for n in model.graph.node if n.op_type in QUANTIZABLE]


def end_layers(model) -> list[str]:
    """The layers an `-ends` recipe keeps in float: the first and last quantizable nodes (one node can be both)."""
    nodes = quantizable_nodes(model)
    return list(dict.fromkeys([nodes[0], nodes[-1]])) if nodes else []


def quantize_int8(
    fp32_path: Path, out_path: Path, calib, recipe: Recipe, per_channel: bool = True,
    exclude: list[str] | None = None, check: Callable[[], None] = _no_check, ranges: Path | None = None,
    share: bool = False, limit: int | None = None,
) -> QuantResult:
    """Static QDQ quantization, weights int8 per channel, activations per recipe.

    `calib` is an array (a one-input model) or {input name: array}. `check` is called between
    calibration batches (the memory watchdog raises from it). `ranges`: a folder where onnxruntime's
    MinMax ranges of this model with this `calib` are kept for the next candidate (`_ort_int8`): one
    export's work folder, never shared between data sets; `share`: the export plans both MinMax and
    Percentile candidates, so the first calibrates once for both (shared_ranges). The result is a
    checked graph: onnx.checker passes and onnxruntime loads it and runs one batch (check_graph)."""
    import onnx

    model, fixed = without_defaults(onnx.load(str(fp32_path)))  # constant inputs calibrate as inputs
    nodes = quantizable_nodes(model)
    exclude = [n for n in (exclude or []) if n in nodes]
    if recipe.keep_ends:
        exclude = list(dict.fromkeys([*exclude, *end_layers(model)]))
    if nodes and len(exclude) >= len(nodes):
        # a model of one or two layers under a `-ends` recipe: its "int8" file was the fp32 model, and as
        # fast as fp32 it outranked every real int8 candidate (an int8 bundle with no int8 in it)
        raise BrokenGraph(f"it keeps all {len(nodes)} quantizable layer(s) in float: no int8 left")
    feeds = _feeds(model, calib, fixed)
    dtypes, batch = _dtypes(model), _batch_size(model, feeds)
    if recipe.engine == "nncf":
        from lepton_edge.compress.torchless import torch_hidden

        with torch_hidden():  # an ONNX model needs no torch: NNCF would load it (~200 MB) if it could
            _nncf_int8(model, out_path, feeds, dtypes, recipe, exclude, check, fixed, limit)
    else:
        _ort_int8(model, out_path, feeds, recipe, per_channel, exclude, check, fixed,
                  ranges / Path(fp32_path).stem if ranges is not None else None, share)
    _rebake(out_path, fixed)
    check_graph(out_path, {k: v[:batch] for k, v in feeds.items()}, dtypes)
    return QuantResult(out_path, recipe, exclude)


def _ort_int8(model, out_path: Path, feeds, recipe: Recipe, per_channel: bool, exclude, check, fixed=None,
              ranges: Path | None = None, share: bool = False):
    """onnxruntime's quantize_static. MinMax and Percentile ranges depend on the model and the data
    alone (not on the activation type or the layers left in float: onnxruntime calibrates every tensor
    of the quantized op types either way), so with `ranges` (work folder / model stem) each method's
    ranges are kept in onnxruntime's calibration cache for the export's later candidates, and with
    `share` the first such candidate calibrates once for both (shared_ranges.one_pass). A shared pass
    that fails where the method's own calibrator would not (the histogram of a tensor that is empty or
    NaN) falls back to that calibrator, and the export shares no more."""
    import inspect

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from lepton_edge import ui
    from lepton_edge.compress import calibration as cal, shared_ranges
    from lepton_edge.compress.channel_params import channel_params_at_once
    from lepton_edge.compress.histogram import linear_time_histograms, per_input_sample, sampled_histograms
    from lepton_edge.compress.weight_memo import remembered_weights

    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[recipe.calibration]
    per_sample = _activation_bytes(model, {**{k: v[:1] for k, v in feeds.items()}, **(fixed or {})})
    batch = _batch_size(model, feeds, per_sample, CALIBRATION_BATCH_BYTES)
    n = len(next(iter(feeds.values())))
    if n % batch:  # a fixed batch that does not divide the data: drop the ragged tail
        feeds = {k: v[: n - n % batch] for k, v in feeds.items()} if n >= batch else feeds
    batches = -(-len(next(iter(feeds.values()))) // batch)
    files = shared_ranges.range_files(ranges) if ranges is not None \
        and "calibration_cache_path" in inspect.signature(quantize_static).parameters else {}  # onnxruntime >= 1.24
    cache = files.get(recipe.calibration)
    cached = cache is not None and cache.is_file()
    shared = share and cache is not None and not cached and not files["failed"].exists()  # (for both methods)
    extra = {"ActivationSymmetric": recipe.activation == "s8", "WeightSymmetric": True,
             "CalibStridedMinMax": 1}  # strides of `stride` batches: the reader's unit (_Reader)
    if recipe.calibration == "percentile":
        extra["CalibPercentile"] = shared_ranges.PERCENTILE
    # (the values of each tensor an input gives the histograms: enough beyond the percentile over all the data)
    sample = per_input_sample(n, shared_ranges.PERCENTILE)
    for one_pass in ([True, False] if shared else [False]):
        stride = _stride(batches, batch * sum(v[0].nbytes for v in feeds.values()))
        if method != CalibrationMethod.MinMax or one_pass:  # (MinMax keeps only each tensor's reduced range)
            stride = min(stride, _stride(batches, batch * per_sample, HISTOGRAM_STRIDE_BYTES))
        try:
            with ui.progress("calibrating" if not cached else "quantizing (ranges of an earlier candidate's "
                             "calibration)", n) as advance, ui.libraries_silenced("", stderr=False), \
                    _lean_calibration(), _linear_rewiring(), _indexed_lookups(), linear_time_histograms(), \
                    sampled_histograms(batch, sample), remembered_weights(), channel_params_at_once(), \
                    engine_logs_muted(), \
                    shared_ranges.one_pass(files, recipe.calibration) if one_pass else nullcontext():
                # (the histogram calibrators print their own progress to stdout, which --json keeps clean, and
                # onnxruntime warns on the root logger that we skipped pre-processing: we do it when it helps)
                reader = _Reader(feeds, _dtypes(model), batch, advance, check, fixed, per_stride=stride)
                quantize_static(
                    # (a copy for the shared pass: quantize_static leaves a model it failed on pointing at
                    # external data in its deleted temporary folder, and the fallback below needs it whole)
                    _copied(model) if one_pass and not isinstance(model, (str, Path)) else model,
                    str(out_path), reader, quant_format=QuantFormat.QDQ,
                    per_channel=per_channel and _opset(model) >= PER_CHANNEL_MIN_OPSET,
                    activation_type=QuantType.QUInt8 if recipe.activation == "u8" else QuantType.QInt8,
                    weight_type=QuantType.QInt8, calibrate_method=method, reduce_range=recipe.weights_7bit,
                    nodes_to_exclude=exclude or None, extra_options=extra,
                    **({"calibration_cache_path": str(cache)} if cache is not None else {}),
                )
            return
        except (ValueError, ArithmeticError, IndexError, cal.MemoryExceeded) as e:
            # numpy on the histograms (an empty or NaN tensor), or the histogram pass over --max-memory where
            # MinMax's own pass (ReduceMin/ReduceMax, no samples) may still fit: before the shared pass the
            # u8-minmax candidate calibrated in its own budget, and a tight one must not lose it now
            if not one_pass:
                raise
            files["failed"].touch()  # this candidate calibrates alone, and so do the export's next ones
            if isinstance(e, cal.MemoryExceeded) and e.watch is not None:
                e.watch.rearm()


ORT_DEFAULT_LOG_SEVERITY = 2  # onnxruntime's own default (warnings), put back after engine_logs_muted


@contextmanager
def engine_logs_muted() -> Iterator[None]:
    """onnxruntime's sessions that quantize_static makes itself (the calibration's) log with the default
    logger: a candidate whose calibration graph fails wrote red "[E:onnxruntime ... Non-zero status code
    returned while running Shape node" lines and size warnings in the middle of the export's progress
    (ddddocr's CRNN, 3 candidates), though the search reports that failure in its own line. Fatal only
    for the block; onnxruntime has no getter, so its default is put back after."""
    import onnxruntime as ort

    ort.set_default_logger_severity(4)
    try:
        yield
    finally:
        ort.set_default_logger_severity(ORT_DEFAULT_LOG_SEVERITY)


@contextmanager
def _lean_calibration() -> Iterator[None]:
    """onnxruntime's calibration session without a memory pattern or arena, for the block.

    Why: the calibrators run the model with every calibrated tensor as an extra output (or a
    ReduceMin/ReduceMax of it), unoptimised. With the default memory pattern that session planned
    one block for all of them: +1.7 GB for one 800x608 input of a PicoDet detector (MinMax),
    +0.87 GB without the pattern, +0.84 GB without arena either. The options change where tensors
    are allocated, not what is computed. The default execution order also ran the ReduceMin/ReduceMax
    that MinMax appends at the end of the graph only after the whole model, so every intermediate
    tensor of a batch lived until then; the priority-based order runs each as soon as its tensor
    exists: PP-OCR's recogniser went from 693 to 213 MB peak (base 179 MB) and 7.6 to 5.4 s, with a
    byte-identical quantized file. quantize_static builds that session itself
    (CalibraterBase.create_inference_session, no options argument), so the method is swapped for
    the block and put back after."""
    import onnxruntime
    from onnxruntime.quantization.calibrate import CalibraterBase

    original = CalibraterBase.create_inference_session

    def create_inference_session(self) -> None:
        so = onnxruntime.SessionOptions()
        so.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL  # as onnxruntime's
        so.enable_mem_pattern = False
        so.enable_cpu_mem_arena = False
        so.execution_order = onnxruntime.ExecutionOrder.PRIORITY_BASED  # each Reduce right after its tensor
        self.infer_session = onnxruntime.InferenceSession(self.augmented_model_path, sess_options=so,
                                                         providers=self.execution_providers)

    CalibraterBase.create_inference_session = create_inference_session  # type: ignore[method-assign]
    try:
        yield
    finally:
        CalibraterBase.create_inference_session = original  # type: ignore[method-assign]


@contextmanager
def _linear_rewiring() -> Iterator[None]:
    """onnxruntime's QDQ quantizer rewires each quantized tensor's readers with
    ONNXModel.replace_input_of_all_nodes, which calls a Python function on every node of the graph for
    every tensor: quadratic in the graph's size (PP-OCR's recogniser: 898,000 calls, 1.7 s of its two
    candidates; its detector 1.2 s). For the block, a node's inputs are rewritten only where the name is
    among them (a membership test in C): the same nodes change the same way (a byte-identical file)."""
    from onnxruntime.quantization.onnx_model import ONNXModel

    original = ONNXModel.replace_input_of_all_nodes

    def replace_input_of_all_nodes(self, old_input_name: str, new_input_name: str) -> None:
        for node in self.model.graph.node:
            if old_input_name in node.input:
                ONNXModel.replace_node_input(node, old_input_name, new_input_name)

    ONNXModel.replace_input_of_all_nodes = replace_input_of_all_nodes  # type: ignore[method-assign]
    try:
        yield
    finally:
        ONNXModel.replace_input_of_all_nodes = original  # type: ignore[method-assign]


# onnxruntime.quantization's modules that import quant_utils.find_by_name by name (each is patched for the block)
_FIND_BY_NAME_USERS = ("quant_utils", "base_quantizer", "onnx_model", "onnx_quantizer", "qdq_quantizer",
                       "operators.conv", "operators.gemm", "operators.matmul")


@contextmanager
def _indexed_lookups() -> Iterator[None]:
    """onnxruntime's quantizer finds initializers (and nodes) by name with quant_utils.find_by_name, a scan of
    the whole list: PP-OCR's recogniser made 3,900 calls a candidate over up to 1,500 initializers, 2.2 million
    names compared, three in four calls for a name that is not there. For the block, each of a graph's own
    lists gets an index of its names (a list made for one call is scanned), kept while the list only grows
    (its old last item still in its place: what was added is indexed) and built again when it changed
    otherwise (its length or last name), and dropped whenever onnxruntime removes initializers (ONNXModel's
    remove_initializer(s) and clean_initializers, its only removals: removing two and adding two can leave a
    list its length and last name); a name found is checked against the item at its place, and a mismatch
    scans as onnxruntime does. What the index cannot see is an item renamed in place: onnxruntime (1.32)
    names a new initializer before it adds it, never after. The lists are kept referenced for the
    block, so their ids name them alone. The same items come back: a byte-identical file (PP-OCR rec, PP-OCR
    det, PicoDet; 0.2-0.3 s less a candidate)."""
    import importlib

    import onnx
    from onnxruntime.quantization import quant_utils

    original = quant_utils.find_by_name
    kept: dict[int, tuple] = {}  # id(list) -> (list, length, last name, {name: first place})
    repeated = type(onnx.GraphProto().initializer)  # a graph's own lists (protobuf's repeated field)

    def index_of(items) -> dict[str, int]:
        n = len(items)
        last = items[n - 1].name if n else None
        entry = kept.get(id(items))
        if entry is not None and entry[0] is items and entry[1] == n and entry[2] == last:
            return entry[3]
        if entry is not None and entry[0] is items and 0 < entry[1] < n and items[entry[1] - 1].name == entry[2]:
            names, start = entry[3], entry[1]  # grown only: index what was added
        else:
            names, start = {}, 0
        for i in range(start, n):
            names.setdefault(items[i].name, i)
        kept[id(items)] = (items, n, last, names)
        return names

    def find_by_name(item_name, item_list):
        if type(item_list) is not repeated:  # (a list made for the call, an iterator: onnxruntime's own scan)
            return original(item_name, item_list)
        i = index_of(item_list).get(item_name)
        if i is None:
            return None
        item = item_list[i]
        if item.name == item_name:
            return item
        kept.pop(id(item_list), None)  # (changed in place: scanned, and indexed again next time)
        return original(item_name, item_list)

    def forgetting(method):  # (a removal can leave a list its old length and last name: indexed again)
        def removing(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            finally:
                kept.clear()
        return removing

    from onnxruntime.quantization.onnx_model import ONNXModel

    removals = {name: getattr(ONNXModel, name) for name in ("remove_initializer", "remove_initializers",
                                                            "clean_initializers") if hasattr(ONNXModel, name)}
    modules = [importlib.import_module(f"onnxruntime.quantization.{m}") for m in _FIND_BY_NAME_USERS]
    patched = [m for m in modules if getattr(m, "find_by_name", None) is original]
    for m in patched:
        m.find_by_name = find_by_name
    for name, method in removals.items():
        setattr(ONNXModel, name, forgetting(method))
    try:
        yield
    finally:
        for m in patched:
            m.find_by_name = original
        for name, method in removals.items():
            setattr(ONNXModel, name, method)
        kept.clear()


def no_nncf_telemetry() -> None:
    """NNCF reports each use to Google Analytics (openvino-telemetry, on unless a consent file says no):
    per event it forks a child process to send it, waits up to 3 s and terminates it. Forked from an
    export's threads (onnxruntime's, the watchdogs'), such a child can hang on a lock it inherited, never
    see the SIGTERM (our CLI's Python handler runs between bytecodes), and multiprocessing then joins it
    at exit for ever: a CI run's export printed its result and never exited. An export sends nothing
    anywhere: with no sender (`_impl`), NNCF's own guard (skip_if_raised) skips every event."""
    try:
        from nncf.telemetry import wrapper
    except ImportError:  # (an NNCF without telemetry)
        return
    wrapper.telemetry._impl = None


def _copied(model):
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _nncf_int8(model, out_path: Path, feeds, dtypes, recipe: Recipe, exclude, check, fixed=None,
               limit: int | None = None) -> None:
    """NNCF's post-training quantization on the ONNX backend (imported here only: the workstation's
    [export] extra has it, a device never imports it)."""
    import logging

    import onnx

    try:
        import nncf
    except ImportError:
        raise ValueError("NNCF is not installed (pip install 'lepton-edge[export]')") from None
    from lepton_edge.compress import nncf_matching

    no_nncf_telemetry()
    nncf_matching.install()  # (the same fused patterns found, sooner)
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
        OverflowFix,
    )

    from lepton_edge import ui

    fixed = fixed or {}
    batch = _batch_size(model, feeds)
    n = len(next(iter(feeds.values())))
    items = list(range(0, n - batch + 1, batch)) or [0]

    with ui.progress("calibrating (NNCF)", len(items) * batch) as advance:
        def transform(i: int) -> dict[str, np.ndarray]:
            check()
            advance(batch)
            out = {k: np.ascontiguousarray(v[i:i + batch], dtype=dtypes.get(k, np.float32)) for k, v in feeds.items()}
            return {**out, **{k: np.require(v, dtypes.get(k, v.dtype), "C") for k, v in fixed.items()}}

        sq = AdvancedSmoothQuantParameters(matmul=0.95, convolution=0.05) if recipe.smooth_quant else \
            AdvancedSmoothQuantParameters(matmul=-1, convolution=-1)
        # (NNCF's own default fixes the overflow in each input's first convolution only)
        advanced = AdvancedQuantizationParameters(smooth_quant_alphas=sq, overflow_fix=OverflowFix.ENABLE
                                                  if recipe.weights_7bit else None)
        nncf.set_log_level(logging.ERROR)
        first = {**{k: v[:batch] for k, v in feeds.items()}, **fixed}
        with ui.libraries_silenced("nncf", "", stderr=False), \
                _statistics_fit(_float_tensor_bytes(model, first) if limit else {}, limit):
            quantized = nncf.quantize(
                model, nncf.Dataset(items, transform), subset_size=len(items),
                preset=nncf.QuantizationPreset.PERFORMANCE if recipe.calibration == "default"
                else nncf.QuantizationPreset.MIXED,
                fast_bias_correction=True, ignored_scope=nncf.IgnoredScope(names=exclude, validate=False)
                if exclude else None, advanced_parameters=advanced)
    onnx.save(quantized, str(out_path))


# What NNCF's statistics session holds beyond its outputs' own bytes: onnxruntime's arena, which grows in
# regions, and its working tensors. Measured rise over the outputs (a batch's, by shape inference): 1.16x
# on PP-OCR's recogniser, 1.16-1.45x on an 800x608 PicoDet detector, 2.0x on a chain of 20 wide convolutions.
STATISTICS_OVERHEAD = 1.5
# onnxruntime's working tensors on top: a node's input and output, so two of the model's largest tensors
WORKING_TENSORS = 2

_fit = threading.local()  # this thread's check of NNCF's sessions (_statistics_fit), if any
_fit_installed = threading.Lock()


@contextmanager
def _statistics_fit(tensor_bytes: dict[str, int], limit: int | None) -> Iterator[None]:
    """For the block, in this thread, NNCF's onnxruntime sessions are checked before they are made: one
    whose outputs (every statistic tensor of a batch, kept until its run ends, `tensor_bytes` by name),
    times STATISTICS_OVERHEAD, and working tensors would take this process past `limit` raises
    MemoryExceeded instead.

    Why: NNCF collects its statistics by running the model with every tensor it will quantize as an
    output, in native code between two of the export's memory checks. On an 800x608 PicoDet detector
    that run took the export from 548 MB to 917-963 MB: under `--max-memory 800MB` the candidate was
    stopped only after it had gone 20 % over (its 285 outputs: 302 MB by shape inference). Tensors whose
    size shape inference does not know count 0, and the overhead is an average, not a bound: the memory
    watch still stops whatever goes over later. NNCF gives no hook for this, so its engine's constructor
    is wrapped once (a pass-through in any thread outside such a block: two exports in two threads each
    keep their own check, and none outlives its block)."""
    if not tensor_bytes or not limit:
        yield
        return
    from lepton_edge.compress import calibration as cal
    from lepton_edge.ui import human

    working = WORKING_TENSORS * max(tensor_bytes.values())

    def check(model) -> None:
        inits = {i.name for i in model.graph.initializer}
        outputs = [o.name for o in model.graph.output if o.name not in inits]
        need = int(STATISTICS_OVERHEAD * sum(tensor_bytes.get(o, 0) for o in outputs)) + working
        held = cal.rss_bytes()
        left = limit - held
        if need > left:
            raise cal.MemoryExceeded(
                f"NNCF's statistics would keep {len(outputs)} tensors, about {human(need)} in memory with "
                f"onnxruntime's own, for each batch, and the export already holds {human(held)} of its "
                f"{human(limit)} budget (--max-memory)")

    _install_statistics_check()
    previous = getattr(_fit, "check", None)
    _fit.check = check
    try:
        yield
    finally:
        _fit.check = previous


def _install_statistics_check() -> None:
    """Wrap NNCF's ONNXEngine constructor, once per process, to run this thread's `_fit.check` first."""
    from nncf.onnx.engine import ONNXEngine

    with _fit_installed:
        if getattr(ONNXEngine.__init__, "lepton_checked", False):
            return
        original = ONNXEngine.__init__

        def checked_init(self, model, **options):
            check = getattr(_fit, "check", None)
            if check is not None:
                check(model)
            original(self, model, **options)

        checked_init.lepton_checked = True  # type: ignore[attr-defined]
        ONNXEngine.__init__ = checked_init  # type: ignore[method-assign]


class BrokenGraph(Exception):
    """A candidate graph that onnx.checker rejects or onnxruntime cannot load or run, or a recipe that
    would leave no layer quantized (the candidate is the fp32 model: not an int8 one)."""


def check_graph(path: Path, sample: dict[str, np.ndarray], dtypes: dict[str, type] | None = None) -> None:
    """The candidate must pass onnx.checker, load in onnxruntime and run one batch, else BrokenGraph
    with the first line of the reason: a quantizer's mistake skips that candidate, never the export."""
    import onnx
    import onnxruntime as ort

    dtypes = dtypes or {}
    try:
        onnx.checker.check_model(str(path))
    except Exception as e:
        raise BrokenGraph(f"onnx.checker rejects the graph: {_first_line(e)}") from None
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        sess.run(None, {k: np.ascontiguousarray(v, dtype=dtypes.get(k, np.float32)) for k, v in sample.items()})
    except Exception as e:
        raise BrokenGraph(f"onnxruntime cannot run the graph: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def _opset(model) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def upgrade_opset(model, target: int = PER_CHANNEL_MIN_OPSET):
    """The model at opset `target` when it is older: per-channel QDQ needs DequantizeLinear's
    `axis` (opset 13), which is what onnxruntime's own tools do too. onnx's version converter
    first; when it cannot convert an op, the opset import is raised in place if every op of the
    graph has the same definition at both versions. Returns the model unchanged when neither works."""
    import onnx
    from onnx import defs, version_converter

    have = _opset(model)
    if have >= target:
        return model
    try:
        conv = version_converter.convert_version(model, target)
        onnx.checker.check_model(conv)
        return conv
    except Exception:
        pass

    def since(op: str, v: int) -> int | None:
        try:
            return defs.get_schema(op, v, "").since_version
        except Exception:
            return None

    ops = {n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")}
    if all(since(op, have) == since(op, target) for op in ops):
        out = onnx.ModelProto()
        out.CopyFrom(model)
        for o in out.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = target
        return out
    return model


def prepare(fp32_path: Path, out_path: Path) -> Path:
    """Opset repair, shape inference and graph optimisation (BN folding) before calibration.

    Done once per export so every recipe and the sensitivity pass see the same node names. A graph
    older than opset 13 is raised to 13 first (per-channel QDQ needs it; without it onnxruntime
    refuses the quantized graph: `DequantizeLinear ... tensor(int32)`). Optimisation is skipped when
    the graph has nothing to fold (the torch.export-based exporter already folds BatchNormalization):
    it costs seconds on a large model. Returns the path to quantize from.
    """
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model, fixed = without_defaults(onnx.load(str(fp32_path)))  # constant inputs stay inputs, not folded
    upgraded = upgrade_opset(model)
    renamed = name_nodes(upgraded)
    renamed |= weights_not_inputs(upgraded) | dense_weights(upgraded)
    if upgraded is not model or fixed or renamed:
        fp32_path = out_path.with_name(out_path.stem + "-opset13.onnx")
        onnx.save(upgraded, str(fp32_path))
    ops = {n.op_type for n in upgraded.graph.node}
    del model, upgraded
    if ops & {"BatchNormalization", "Identity", "Dropout", "Constant"}:
        try:
            quant_pre_process(str(fp32_path), str(out_path), skip_symbolic_shape=True)
            fp32_path = out_path
            optimised = onnx.load(str(out_path))
            if name_nodes(optimised):
                onnx.save(optimised, str(out_path))
        except Exception:  # an optimisation only; quantize the plain graph rather than fail
            pass
    _rebake(fp32_path, fixed)
    return fp32_path


def weights_not_inputs(model) -> bool:
    """Before IR version 4 every initializer had to be a graph input too (the ONNX model zoo's Caffe2-era
    models, the onnx package's own test models list all their weights so): the quantizers then took each
    weight for an input wanting calibration data ("the model has 18 inputs"), and the initializers they add,
    not inputs, made onnx.checker refuse every candidate. Such a model's weights stop being inputs and its
    IR version is raised to what its opsets need, in place; True when anything changed. A model of IR 4
    or later keeps an initializer it lists as an input: there it is an input with a default value."""
    import onnx

    if model.ir_version >= 4:
        return False
    inits = {i.name for i in model.graph.initializer}
    kept = [i for i in model.graph.input if i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    try:
        need = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    except Exception:  # an opset onnx does not know: the IR version of the newest it does
        need = onnx.IR_VERSION
    model.ir_version = max(4, need)
    return True


def dense_weights(model) -> bool:
    """Sparse initializers made ordinary ones, in place; True when there were any. Why: the quantizers
    read `graph.initializer` only, and took a sparse weight's readers for nodes fed by nothing (every
    candidate failed with onnxruntime's "Graph is not a DAG"). The values are the same."""
    from onnx import numpy_helper

    g = model.graph
    if not g.sparse_initializer:
        return False
    for sp in g.sparse_initializer:
        dims = tuple(sp.dims)
        values, idx = numpy_helper.to_array(sp.values), numpy_helper.to_array(sp.indices).astype(np.int64)
        dense = np.zeros(int(np.prod(dims)), dtype=values.dtype)
        flat = idx if idx.ndim == 1 else np.ravel_multi_index(tuple(idx.T), dims)  # linear, or [NNZ, rank]
        dense[flat] = values
        g.initializer.append(numpy_helper.from_array(dense.reshape(dims), sp.values.name))
    del g.sparse_initializer[:]
    return True


def name_nodes(model) -> bool:
    """Give every unnamed (or twice-named) node of `model` a name of its own, in place; True when any
    changed. Why: recipes name the layers they keep in float (keep_ends, sensitivity) and onnxruntime's
    `nodes_to_exclude` matches names, so in a graph whose nodes have no names (ONNX allows it: hand-built
    graphs, some converters) excluding the first convolution, "", excluded every unnamed one: that
    "int8" candidate was the fp32 model (1.05x its size), and it won on speed."""
    taken = {n.name for n in model.graph.node if n.name}
    seen: set[str] = set()
    changed = False
    for i, n in enumerate(model.graph.node):
        if n.name and n.name not in seen:
            seen.add(n.name)
            continue
        k, name = i, f"{n.op_type}_{i}"
        while name in taken:
            k += len(model.graph.node)
            name = f"{n.op_type}_{k}"
        n.name = name
        taken.add(name)
        seen.add(name)
        changed = True
    return changed


def onnx_input_name(path: Path) -> str:
    import onnx

    return _input_name(onnx.load(str(path), load_external_data=False))


def _input_name(model) -> str:
    return _input_names(model)[0]


def _input_names(model) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def convert_fp16(fp32_path: Path, out_path: Path, calib=None, check: Callable[[], None] = _no_check):
    """fp16 weights and compute, fp32 inputs/outputs so callers feed the same tensors; the nodes
    whose weights, or activations measured on `calib`, leave fp16's range stay fp32 (compress/fp16.py).
    Returns its fp16.Fp16Result (the nodes kept in fp32 and why)."""
    from lepton_edge.compress import fp16

    return fp16.convert(fp32_path, out_path, calib, check)


def compact_names(path: Path) -> dict[str, str]:
    """Shorten tensor and Q/DQ node names in place; keep graph inputs/outputs and layer names.

    Why: QDQ graphs repeat long exporter names ("features.1.conv.0.0.weight_DequantizeLinear_Output")
    in every node; on a small model that is ~20 % of the file. Layer (Conv/Gemm/MatMul) names
    stay, so the manifest's list of layers kept in float still names nodes in the file.
    Graphs with subgraphs (If/Loop) are left alone. Returns the tensor renames.
    """
    import onnx

    m = onnx.load(str(path))
    g = m.graph
    if g.sparse_initializer or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                   for n in g.node for a in n.attribute):
        return {}
    keep = {v.name for v in g.input} | {v.name for v in g.output} | {""}
    names: dict[str, str] = {}
    taken = set(keep)  # a new name never is a kept one: a model whose input is `t0` lost it to a weight

    def fresh(prefix: str, counter: list[int]) -> str:
        while True:
            name = f"{prefix}{counter[0]:x}"
            counter[0] += 1
            if name not in taken:
                taken.add(name)
                return name

    tensors = [0]

    def short(name: str) -> str:
        if name in keep:
            return name
        if name not in names:
            names[name] = fresh("t", tensors)
        return names[name]

    for init in g.initializer:
        init.name = short(init.name)
    taken |= {n.name for n in g.node if n.op_type in QUANTIZABLE}  # layer names stay: `n0` may be one of them
    nodes = [0]
    for n in g.node:
        n.input[:] = [short(x) for x in n.input]
        n.output[:] = [short(x) for x in n.output]
        if n.op_type not in QUANTIZABLE:
            n.name = fresh("n", nodes)
        n.doc_string = ""
    del g.value_info[:]
    onnx.save(m, str(path))
    return names
