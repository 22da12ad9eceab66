"""A quantized ONNX graph's twin with int8 (s8) activations where it has uint8 ones: the same quantizers in
the same places, each uint8 zero point and uint8 constant moved down by 128 (the same real values), so
onnxruntime picks the kernels it would for an s8 candidate of that layout; with `float_layers`, those
layers also run in float as an `-ends` candidate's first and last layers do. Used only to time it.

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


def int8_activation_twin(src: Path, dst: Path, float_layers: Sequence[str] = ()) -> bool:
    """Write `src`'s twin with int8 activations to `dst`, the nodes named in `float_layers` run in float;
    False (nothing written) when there is no such twin: `src` has no uint8 activations (already int8, or
    no QDQ graph), a uint8 zero point or constant has a reader other than a Q/DQ slot, or a layer in
    `float_layers` is not in the graph or cannot be made float here."""
    import onnx

    model = onnx.load(str(src))
    g = model.graph
    if float_layers and not _in_float(g, set(float_layers)):
        return False
    if not _to_int8(g):
        return False
    onnx.save(model, str(dst))
    return True


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


def _in_float(g, names: set[str]) -> bool:
    """Make the nodes named in `names` run in float, in place, as quantize_static leaves the layers it is
    told to exclude: their DequantizeLinear inputs replaced by what those dequantize (a constant's float
    values; an activation's tensor before its QuantizeLinear), and a Q/DQ pair between such a node and a
    graph output removed. False when a name is not a node of the graph or an input cannot be made float."""
    from onnx import numpy_helper

    nodes = {n.name: n for n in g.node if n.name}
    if not names <= nodes.keys():
        return False
    produced_by = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    for name in names:
        node = nodes[name]
        for k, inp in enumerate(node.input):
            dq = produced_by.get(inp)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            if dq.input[0] in inits:
                values = _dequantized(dq, inits)
                if values is None:
                    return False
                fresh = _unused(g, f"{dq.input[0]}_float")
                g.initializer.append(numpy_helper.from_array(values, fresh))
                node.input[k] = fresh
                continue
            q = produced_by.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                return False
            if _quantized_here(q.input[0], produced_by, names):
                node.input[k] = q.input[0]
        _float_output(g, node, produced_by)
    _prune(g)
    return True


def _quantized_here(tensor: str, produced_by: dict, floated: set[str]) -> bool:
    """Whether `tensor`'s quantizer is there only for the layer being made float, so an excluded layer would
    read it unquantized: a graph input, or the output of a layer made float or of a float op (no input of
    it dequantized). A quantized op's output keeps its quantizer: onnxruntime quantizes what a quantized
    op writes whoever reads it (an `-ends` graph's last layer reads its input through a Q/DQ pair)."""
    producer = produced_by.get(tensor)
    if producer is None or producer.name in floated:
        return True
    return not any(getattr(produced_by.get(i), "op_type", None) == "DequantizeLinear" for i in producer.input)


def _float_output(g, node, produced_by: dict) -> None:
    """Where `node`'s output reaches a graph output only through one QuantizeLinear -> DequantizeLinear
    pair, the node writes the graph output itself (an excluded last layer's output has no quantizer)."""
    readers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    for k, out in enumerate(node.output):
        q = readers.get(out, [])
        if len(q) != 1 or q[0].op_type != "QuantizeLinear" or out in outputs:
            continue
        dq = readers.get(q[0].output[0], [])
        if len(dq) != 1 or dq[0].op_type != "DequantizeLinear" or dq[0].output[0] not in outputs:
            continue
        if readers.get(dq[0].output[0]):
            continue  # (the graph output is also read inside the graph, as the quantized value)
        node.output[k] = dq[0].output[0]
        for dead in (q[0], dq[0]):
            g.node.remove(dead)


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
