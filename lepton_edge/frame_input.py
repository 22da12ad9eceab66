"""A 3-D image input ([N,H,W] gray, [C,H,W] or [H,W,C] of one frame) as the 4-D frame tensor the device feeds.

Why: `run` on a plain model file with such an input feeds each frame's 4-D tensor without one of its
dims (runtime/spec.py, runtime.Runtime), but `export` refused images for it and wrote a bundle with the
3-D shape that `run` then refused: one model, three answers. An exported model now takes the 4-D frame
tensor itself (a Squeeze in front of the original graph), so calibration, validation, the manifest and
the device all see an ordinary NCHW or NHWC image input. One rule, here, decides which dim the frame adds,
for both paths: a dynamic first dim is a batch of gray frames ([N,H,W] -> [N,1,H,W], a Keras MNIST model's
input) unless the input is a picture of any size ([H,W,3] with H and W dynamic); otherwise the input is one
frame without its batch ([1,28,28] -> [1,1,28,28], [3,64,64] -> [1,3,64,64], [64,64,3] -> [1,64,64,3]).
"""
from __future__ import annotations

SUFFIX = "__lepton_frame"
CHANNELS = (1, 3, 4)  # a last dim of these, after two dynamic ones, is an [H,W,C] picture's channels


def _batch_first(dims: list) -> bool:
    """A dynamic first dim that is a batch: [N,H,W], not [H,W,C] of any size (['H','W',3])."""
    return not isinstance(dims[0], int) and not (isinstance(dims[-1], int) and dims[-1] in CHANNELS
                                                 and not isinstance(dims[1], int))


def frame_dims(dims: list) -> list:
    """The 4-D frame tensor's dims for a 3-D input's `dims` (ints, or names for dynamic ones)."""
    if _batch_first(dims):
        return [dims[0], 1, dims[1], dims[2]]
    return [1, *dims]


def added_axis(dims: list) -> int:
    """The axis of the frame tensor that the 3-D input does not have (see frame_dims)."""
    return 1 if _batch_first(dims) else 0


def as_frame_input(model, name: str, dims: list) -> None:
    """Make the 3-D input `name` (of `dims`) of `model` take the 4-D frame tensor, in place: the input
    keeps its name and its dims (each dim proto as it was, unnamed ones too) with the frame's added one,
    and a Squeeze of the added axis feeds every node (in subgraphs too) that read it. A graph output
    that is the input itself stays so, with the frame's shape."""
    import onnx
    from onnx import helper

    g = model.graph
    taken = _names(g)
    inner = _unique(name + SUFFIX, taken)
    axes = _unique(inner + "_axes", taken | {inner})
    _rename_uses(g, name, inner)
    inp = next(i for i in g.input if i.name == name)
    shape = inp.type.tensor_type.shape
    old = []
    for d in shape.dim:
        old.append(onnx.TensorShapeProto.Dimension())
        old[-1].CopyFrom(d)
    axis = added_axis(dims)
    added = onnx.TensorShapeProto.Dimension()
    added.dim_value = 1
    del shape.dim[:]
    shape.dim.extend([*old[:axis], added, *old[axis:]])
    for o in g.output:
        if o.name == name:
            o.type.CopyFrom(inp.type)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    if opset >= 13:  # axes became an input in opset 13
        g.initializer.append(helper.make_tensor(axes, onnx.TensorProto.INT64, [1], [axis]))
        node = helper.make_node("Squeeze", [name, axes], [inner], name=inner)
    else:
        node = helper.make_node("Squeeze", [name], [inner], name=inner, axes=[axis])
    g.node.insert(0, node)


def _unique(name: str, taken: set[str]) -> str:
    while name in taken:
        name += "_"
    return name


def _subgraphs(node) -> list:
    import onnx

    out = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def _names(graph) -> set[str]:
    """Every tensor and node name in `graph` and its subgraphs (If branches, Loop and Scan bodies)."""
    names = {t.name for t in (*graph.input, *graph.output, *graph.initializer, *graph.value_info)}
    for n in graph.node:
        names.update((*n.input, *n.output, n.name))
        for s in _subgraphs(n):
            names |= _names(s)
    return names


def _rename_uses(graph, old: str, new: str) -> None:
    """Every node input `old` in `graph` and its subgraphs (which may read the outer graph's tensors)
    becomes `new`; a subgraph that declares its own `old` keeps it there."""
    for n in graph.node:
        for i, t in enumerate(n.input):
            if t == old:
                n.input[i] = new
        for s in _subgraphs(n):
            own = {t.name for t in (*s.input, *s.initializer)} | {o for m in s.node for o in m.output}
            if old not in own:
                _rename_uses(s, old, new)
