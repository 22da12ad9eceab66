"""Run NNCF on an ONNX model without it loading PyTorch.

Why: NNCF imports torch whenever it is installed (its tensor functions register a torch backend
at import, and `nncf.quantize` asks `torch.fx` whether the model is a torch one), though an ONNX
model needs none of it. On the workstation torch is installed (the `[export]` extra), so an
ONNX-only int8 export paid ~200 MB of resident memory and seconds of import for a library it
never used: ppocr-cls's export peaked at 460 MB before any histogram, NNCF's own script at 355 MB.

How: while NNCF is imported and run, `sys.modules["torch"]` is None, which makes `import torch`
raise ImportError, a case NNCF handles (torch is optional for it). It is done only when torch is
not loaded yet: a PyTorch source has it already and NNCF then sees it as usual. The entry is
removed afterwards, so a later `import torch` in the same process works. The quantized model is
byte-for-byte the same either way (checked on ppocr-cls).
"""
from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def torch_hidden() -> Iterator[None]:
    """`import torch` fails inside the block unless torch was already imported."""
    if "torch" in sys.modules:
        yield
        return
    sys.modules["torch"] = None  # type: ignore[assignment]  # Python's documented "import fails" marker
    try:
        yield
    finally:
        if "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]
