"""A 3-D image input ([N,H,W] gray, [C,H,W] or [H,W,C] of one frame) as the 4-D frame tensor the device feeds.

Why: `run` on a plain model file with such an input feeds each frame's 4-D tensor without one of its
dims (runtime/spec.py, runtime.Runtime), but `export` refused images for it and wrote a bundle with the
3-D shape that `run` then refused: one model, three answers. An exported model now takes the 4-D frame
tensor itself (a Squeeze in front of the original graph), so calibration, validation, the manifest and
the device all see an ordinary NCHW or NHWC image input. One rule, here, decides which dim the frame adds,
for both paths: a dynamic first dim is a batch of gray frames ([N,H,W] -> [N,1,H,W], a Keras MNIST model's
input); otherwise the input is one frame without its batch ([1,28,28] -> [1,1,28,28], [3,64,64] ->
[1,3,64,64], [64,64,3] -> [1,64,64,3]).
"""
from __future__ import annotations

SUFFIX = "__lepton_frame"


def frame_dims(dims: list) -> list:
    """The 4-D frame tensor's dims for a 3-D input's `dims` (ints, or names for dynamic ones)."""
    if not isinstance(dims[0], int):
        return [dims[0], 1, dims[1], dims[2]]
    return [1, *dims]


def added_axis(dims: list) -> int:
    """The axis of the frame tensor that the 3-D input does not have (see frame_dims)."""
    return 1 if not isinstance(dims[0], int) else 0


def as_frame_input(model, name: str, dims: list) -> None:
    """Make the 3-D input `name` (of `dims`) of `model` take the 4-D frame tensor, in place: the input
    keeps its name and gets frame_dims(dims), and a Squeeze of the added axis feeds every node (in
    subgraphs too) and graph output that read it."""
    import onnx
    from onnx import helper

    g = model.graph
    inner = name + SUFFIX
    taken = {t for n in g.node for t in (*n.input, *n.output)} | {i.name for i in g.initializer}
    while inner in taken:
        inner += "_"
    _rename_uses(g, name, inner)
    for o in g.output:
        if o.name == name:  # (an output that is the input itself: the Squeeze's output under its name)
            o.name = inner
    inp = next(i for i in g.input if i.name == name)
    shape = inp.type.tensor_type.shape
    del shape.dim[:]
    for d in frame_dims(dims):
        dim = shape.dim.add()
        if isinstance(d, int):
            dim.dim_value = d
        else:
            dim.dim_param = str(d)
    axis = added_axis(dims)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    if opset >= 13:  # axes became an input in opset 13
        axes = inner + "_axes"
        g.initializer.append(helper.make_tensor(axes, onnx.TensorProto.INT64, [1], [axis]))
        node = helper.make_node("Squeeze", [name, axes], [inner], name=inner)
    else:
        node = helper.make_node("Squeeze", [name], [inner], name=inner, axes=[axis])
    g.node.insert(0, node)


def _rename_uses(graph, old: str, new: str) -> None:
    """Every node input `old` in `graph` and its subgraphs (which may read the outer graph's tensors)
    becomes `new`; a subgraph that declares its own `old` keeps it there."""
    import onnx

    for n in graph.node:
        for i, t in enumerate(n.input):
            if t == old:
                n.input[i] = new
        for a in n.attribute:
            subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else \
                list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []
            for s in subs:
                own = {t.name for t in (*s.input, *s.initializer)} | {o for m in s.node for o in m.output}
                if old not in own:
                    _rename_uses(s, old, new)
