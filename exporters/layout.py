"""Input layout for the exported model: NCHW (PyTorch's) or NHWC (what ARM runtimes run fastest).

Why a wrapper module: a permute at the model's entrance is the same for every format; the
converters fold it into the first convolution's layout, and the reference model, the data and
the artifact all see the same NHWC tensors, so validation compares like with like.
"""
from __future__ import annotations

from lepton_edge.errors import BadInput


def channels_last(module):
    import torch

    class ChannelsLastInput(torch.nn.Module):
        """Takes [N,H,W,C], runs the wrapped NCHW model."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x.permute(0, 3, 1, 2))

    wrapped = ChannelsLastInput(module)
    # Not .eval(): it recurses into the model, and a torch.export program's module() (a .pt2)
    # refuses train()/eval(); the model comes loaded for inference already.
    wrapped.training = False
    return wrapped


def apply(src, layout: str | None, explicit: bool) -> None:
    """Give `src` the requested input layout (in place). Only PyTorch models can change layout."""
    spec = src.input_spec
    if layout is None or layout == spec.layout:
        return
    if src.kind != "torch" or len(spec.shape) != 4:
        if explicit:
            raise BadInput(f"--layout {layout}: this model's input is {spec.layout} {spec.shape} and an ONNX "
                           "graph's layout cannot be changed here; export from the PyTorch model")
        return
    if layout == "NHWC" and spec.layout == "NCHW":
        n, c, h, w = spec.shape
        src.module = channels_last(src.module)
        spec.shape, spec.layout = [n, h, w, c], "NHWC"
    elif explicit:
        raise BadInput(f"--layout {layout}: cannot convert a {spec.layout} model to {layout}; give --layout "
                       f"{spec.layout}")
    else:  # (the profile's default layout, not asked for: a model whose input is NHWC already stays so)
        return
