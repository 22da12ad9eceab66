"""onnxruntime's uint8-activation QDQ graph of a model rebuilt as its int8 (s8) one, only to time it (its
twin): each uint8 zero point and uint8 constant moved down by 128 (the same real values), the Relu and
Clip nodes a uint8 quantizer folds put back (`fp32`), and with `float_layers` those layers in float as an
`-ends` candidate's first and last layers are, the Q/DQ pairs placed by onnxruntime's own rules. On six
third-party models the twin has every op of the real s8-minmax and s8-minmax-ends graphs, as many of each.

Why: on x86 here onnxruntime's quantize_static graphs with int8 activations ran 1.4-4.5x fp32's time on
five third-party models (MobileNetV2: 0.9-1.8x in two runs) where the same graphs with uint8 activations
ran 0.4-1.3x (its x86 int8 kernels take uint8 activations). A plain probe of convolutions alone did not
show it (int8 activations ran there as fast as uint8), so the twin of the model's own best graph is what
is timed: about a second, where an s8 candidate costs its quantization and validation (s8-minmax-ends: 5 s
of a PP-OCR det export) and, the search ranking speed before the metric, could not outrank a best no
slower than fp32 once its twin was clearly slower (exporters/recipes.py: S8_TWIN). The s8 candidates on
x86 keep their end layers in float (`-ends`), and a first convolution on a full-size image can be much of
a model's time, so the twin floats the same layers rather than standing for a graph they are not.

Only a graph whose every uint8 zero point and constant is read by Q/DQ nodes alone is rewritten: another
reader (an op taking that uint8 tensor as data) would compute something else with it moved by 128.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

_QDQ = ("QuantizeLinear", "DequantizeLinear")


def int8_activation_twin(src: Path, dst: Path, float_layers: Sequence[str] = (), fp32: Path | None = None) -> bool:
    """Write `src`'s twin with int8 activations to `dst`, the nodes named in `float_layers` run in float;
    with `fp32` (the float model `src` was quantized from), the Relu and Clip nodes onnxruntime folded
    into uint8 quantizers are put back as its int8 graphs keep them (_unfold_activations). False (nothing
    written) when there is no such twin: `src` has no uint8 activations (already int8, or no QDQ graph),
    a uint8 zero point or constant has a reader other than a Q/DQ slot, or a layer in `float_layers` is
    not in the graph or cannot be made float here."""
    import onnx

    model = onnx.load(str(src))
    g = model.graph
    if fp32 is not None:
        _unfold_activations(g, onnx.load(str(fp32), load_external_data=False).graph)
    if float_layers and not _in_float(g, set(float_layers)):
        return False
    if not _to_int8(g):
        return False
    onnx.save(model, str(dst))
    return True


def _unfold_activations(g, fp32) -> None:
    """Put back, in place, the Relu and Clip nodes of `fp32` that onnxruntime's quantizer folded into the
    uint8 quantizer of the layer before them (it renames that layer's output to theirs and drops them; with
    int8 activations it cannot: symmetric int8 has no zero point at the range's end), each between a Q/DQ
    pair of its input (quantized by the layer that writes it) and its own output's quantizer.
    Why: PP-OCR's detector (MobileNetV3, a Relu or HardSwish after most convolutions) ran its real
    s8-minmax-ends graph at 1.42-1.59x fp32's time where the twin without them read 1.10-1.13x."""
    from onnx import helper

    names = {n.name for n in g.node}
    produced_by = {o: n for n in g.node for o in n.output}
    used = {i for n in g.node for i in n.input} | set(produced_by) | {t.name for t in g.initializer}
    inits = {t.name for t in g.initializer}
    fp32_inits = {t.name: t for t in fp32.initializer}
    quantizer_of = {n.input[0]: n for n in g.node if n.op_type == "QuantizeLinear"}
    for act in reversed(fp32.node):  # (last first: of two folded in a row, the second's output is the layer's)
        if act.op_type not in ("Relu", "Clip") or not act.name or act.name in names:
            continue
        out, src = act.output[0], act.input[0]
        layer = produced_by.get(out)
        if layer is not None and layer.op_type == "DequantizeLinear":  # a graph output: layer -> Q -> DQ -> out
            q = produced_by.get(layer.input[0])
            out = q.input[0] if q is not None and q.op_type == "QuantizeLinear" else out
            layer = produced_by.get(out) if q is not None and q.op_type == "QuantizeLinear" else None
        bounds = [i for i in act.input[1:] if i]
        if layer is None or layer.op_type in _QDQ or src in used or not all(i in inits or i in fp32_inits
                                                                           for i in bounds):
            continue  # (not folded by the quantizer, or its bounds are no constants this graph can hold)
        for i in bounds:
            if i not in inits:
                g.initializer.append(fp32_inits[i])
                inits.add(i)
        layer.output[list(layer.output).index(out)] = src
        new, read = [], src
        q = quantizer_of.get(out)
        if q is not None:  # (the same scale and zero point as its output's: only timed)
            qname, read = _unused(g, f"{src}_twin_q"), _unused(g, f"{src}_twin_dq")
            new += [helper.make_node("QuantizeLinear", [src, *q.input[1:]], [qname], name=qname),
                    helper.make_node("DequantizeLinear", [qname, *q.input[1:]], [read], name=read)]
            quantizer_of[src] = new[0]
        copy = helper.make_node(act.op_type, [read, *act.input[1:]], [out], name=act.name)
        copy.attribute.extend(act.attribute)
        at = list(g.node).index(layer) + 1
        for k, n in enumerate([*new, copy]):
            g.node.insert(at + k, n)
        produced_by[src] = layer
        produced_by[out] = copy
        used |= {src, read}


def _to_int8(g) -> bool:
    """Move the graph's uint8 zero points and Q/DQ constants down by 128, in place; False (the graph left
    as it was) when it has none, or one is read other than as a Q/DQ zero point or a DequantizeLinear's
    data, or the quantizers would disagree on their type (a uint8 tensor between two of them)."""
    import onnx
    from onnx import numpy_helper

    uint8 = {t.name for t in g.initializer if t.data_type == onnx.TensorProto.UINT8}
    shifted: set[str] = set()
    for n in g.node:
        for k, name in enumerate(n.input):
            if name not in uint8:
                continue
            if n.op_type in _QDQ and k == 2 or n.op_type == "DequantizeLinear" and k == 0:
                shifted.add(name)
            else:
                return False  # read as data by another op: moved by 128 it would compute something else
    if not shifted or shifted & _subgraph_names(g):
        return False
    produced_by = {o: n for n in g.node for o in n.output}
    for n in g.node:
        if n.op_type != "DequantizeLinear":
            continue
        zp = n.input[2] if len(n.input) > 2 and n.input[2] else None
        src = produced_by.get(n.input[0])
        x_int8 = n.input[0] in shifted or (src is not None and src.op_type == "QuantizeLinear"
                                           and len(src.input) > 2 and src.input[2] in shifted)
        if zp is not None and (zp in shifted) != x_int8:
            return False  # (one side int8, the other uint8: no such graph loads)
    for i, t in enumerate(g.initializer):
        if t.name in shifted:
            moved = numpy_helper.to_array(t).astype(np.int16) - 128
            g.initializer[i].CopyFrom(numpy_helper.from_array(moved.astype(np.int8), t.name))
    return True


def _subgraph_names(g) -> set[str]:
    """Every name a node's subgraph (If, Loop, Scan bodies) reads: an outer initializer read there is read
    by ops this module does not look into."""
    import onnx

    names: set[str] = set()
    for n in g.node:
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                        list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []):
                names |= {i for m in sub.node for i in m.input} | _subgraph_names(sub)
    return names


# How onnxruntime's QDQ quantizer (quantize_static, QDQ format) decides which activations get a Q/DQ pair
# (onnxruntime.quantization.registry, operators/): these ops pass int8 through, quantized only where their
# data input is quantized already (a Reshape after an excluded last layer runs in float; Where: both data
# inputs); every other op quantize_static quantizes (its QDQ and QLinear registries) quantizes its inputs
# and output whatever feeds it (_quantizing); an op in neither quantizes nothing.
_PASSING = {"Relu", "Clip", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "AveragePool", "Slice",
            "TopK", "MaxPool", "Resize", "Gather", "GatherElements", "Where"}


def _quantizing() -> set[str]:
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return (set(QDQRegistry) | set(QLinearOpsRegistry)) - _PASSING


def _in_float(g, names: set[str]) -> bool:
    """Make the nodes named in `names` run in float, in place, as quantize_static leaves the layers it is
    told to exclude: their weights float constants, and the activation Q/DQ pairs that only they or what
    follows them put there removed (an excluded layer quantizes neither its input nor its output, and an op
    that passes int8 through then reads float). Which pairs stay is decided by onnxruntime's rules
    (_quantizing, _PASSING); a graph those rules do not describe (a pair they would not have put there) has
    no twin. False then, or when a name is not a node of the graph or a weight cannot be made float."""
    from onnx import numpy_helper

    nodes = {n.name: n for n in g.node if n.name}
    if not names <= nodes.keys():
        return False
    produced_by = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    quantizers = [n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    if not all(_Quantized(g, produced_by, set())(q.input[0]) for q in quantizers):
        return False  # (the rules below do not describe this graph: its twin would be a guess)
    for name in names:
        node = nodes[name]
        for k, inp in enumerate(node.input):
            dq = produced_by.get(inp)
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
                continue
            values = _dequantized(dq, inits)
            if values is None:
                return False
            fresh = _unused(g, f"{dq.input[0]}_float")
            g.initializer.append(numpy_helper.from_array(values, fresh))
            node.input[k] = fresh
    quantized = _Quantized(g, produced_by, names)
    for q in quantizers:
        if not quantized(q.input[0]):
            _bypass(g, q)
    _prune(g)
    return True


class _Quantized:
    """Whether a float tensor has a Q/DQ pair in quantize_static's graph with the layers `floated` excluded:
    its producer quantizes its output (a _quantizing op, or a _PASSING one whose data input is quantized by
    the time onnxruntime reaches it: it visits the nodes in graph order), or a reader quantizes its inputs
    (a _quantizing op); an excluded layer does neither."""

    def __init__(self, g, produced_by: dict, floated: set[str]) -> None:
        self.produced_by, self.floated = produced_by, floated
        self.quantizing = _quantizing()
        self.readers: dict[str, list] = {}
        self.place: dict[str, int] = {}  # a node's place in the graph, by its first output
        for k, n in enumerate(g.node):
            self.place[n.output[0] if n.output else ""] = k
            for i in n.input:
                self.readers.setdefault(i, []).append(n)
        self.memo: dict[tuple, bool] = {}

    def behind(self, tensor: str) -> str:
        """The float tensor a DequantizeLinear(QuantizeLinear(t)) output stands for (itself elsewhere)."""
        dq = self.produced_by.get(tensor)
        q = self.produced_by.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        return q.input[0] if q is not None and q.op_type == "QuantizeLinear" else tensor

    def __call__(self, t: str, before: int | None = None) -> bool:
        """Whether `t` is quantized in the end (`before` None), or already when onnxruntime reaches the node
        at that place: by its producer, or by a quantizing reader placed before it."""
        key = (t, before)
        if key not in self.memo:
            self.memo[key] = False  # (a cycle guard; a valid graph has none)
            p = self.produced_by.get(t)
            own = p is not None and p.name not in self.floated and (
                p.op_type in self.quantizing or p.op_type in _PASSING and all(
                    self(self.behind(i), self.place.get(p.output[0]))
                    for i in (p.input[1:3] if p.op_type == "Where" else p.input[:1])))
            self.memo[key] = own or any(
                r.op_type in self.quantizing and r.name not in self.floated
                and (before is None or self.place.get(r.output[0] if r.output else "", before) < before)
                for r in self._read_through(t))
        return self.memo[key]

    def _read_through(self, t: str) -> list:
        """The nodes that read `t`, directly or through its Q/DQ pairs."""
        out = []
        for r in self.readers.get(t, []):
            if r.op_type != "QuantizeLinear":
                out.append(r)
                continue
            for dq in self.readers.get(r.output[0], []):
                out.extend(self.readers.get(dq.output[0], []) if dq.op_type == "DequantizeLinear" else [dq])
        return out


def _bypass(g, q) -> None:
    """Readers of `q`'s DequantizeLinear outputs read `q`'s float input instead; where such an output is a
    graph output, the float tensor takes its name (its producer writes the graph output)."""
    t = q.input[0]
    outputs = {o.name for o in g.output}
    dqs = [n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0]]
    for dq in dqs:
        out = dq.output[0]
        if out in outputs:
            producer = next((n for n in g.node if t in n.output), None)
            if producer is None or t in outputs:
                continue  # (a graph input or output itself: the pair stays, a little more work timed)
            for n in g.node:
                for k, i in enumerate(n.input):
                    if i == t:
                        n.input[k] = out
            producer.output[list(producer.output).index(t)] = out
            g.node.remove(dq)  # (the graph output is the producer's now; `q`, if nothing else reads it, goes)
            t = out
            continue
        for n in g.node:
            for k, i in enumerate(n.input):
                if i == out:
                    n.input[k] = t


def _dequantized(dq, inits: dict) -> np.ndarray | None:
    """A constant DequantizeLinear's float values (per tensor or per axis); None for a blocked one."""
    from onnx import numpy_helper

    if any(a.name == "block_size" and a.i for a in dq.attribute):
        return None
    x = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64) if dq.input[1] in inits else None
    if scale is None:
        return None
    zp = dq.input[2] if len(dq.input) > 2 and dq.input[2] else None
    if zp is not None and zp not in inits:
        return None
    zero = numpy_helper.to_array(inits[zp]).astype(np.float64) if zp is not None else np.zeros_like(scale)
    if scale.ndim == 1 and x.ndim > 1:
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) % x.ndim
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return ((x - zero) * scale).astype(np.float32)


def _unused(g, base: str) -> str:
    taken = {t.name for t in g.initializer} | {o for n in g.node for o in n.output} | {i.name for i in g.input}
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


def _prune(g) -> None:
    """Drop the nodes and initializers nothing reads any more (the bypassed quantizers and int8 weights)."""
    outputs = {o.name for o in g.output}
    while True:
        read = _read(g.node) | outputs | _subgraph_names(g)
        dead = [n for n in g.node if not any(o in read for o in n.output if o)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    read = _read(g.node) | outputs | _subgraph_names(g)
    for t in [t for t in g.initializer if t.name not in read]:
        g.initializer.remove(t)


def _read(nodes: Iterable) -> set[str]:
    return {i for n in nodes for i in n.input if i}
