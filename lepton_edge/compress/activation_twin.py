"""A quantized ONNX graph's twin with int8 (s8) activations where it has uint8 ones: the same quantizers in
the same places, each uint8 zero point and uint8 constant moved down by 128 (the same real values), so
onnxruntime picks the kernels it would for an s8 candidate of that layout. Used only to time it.

Why: on x86 here onnxruntime's quantize_static graphs with int8 activations ran 1.4-4.5x fp32's time on
five third-party models (MobileNetV2: 0.9-1.8x in two runs) where the same graphs with uint8 activations
ran 0.4-1.3x (its x86 int8 kernels take uint8 activations). A plain probe of convolutions alone did not
show it (int8 activations ran there as fast as uint8), so the twin of the model's own best graph is what
is timed: about a second, where an s8 candidate costs its quantization and validation (s8-minmax-ends: 5 s
of a PP-OCR det export) and, the search ranking speed before the metric, could not outrank a best no
slower than fp32 once its twin was clearly slower (exporters/recipes.py: S8_TWIN).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def int8_activation_twin(src: Path, dst: Path) -> bool:
    """Write `src`'s twin with int8 activations to `dst`; False (nothing written) when `src` has no
    uint8 activations (already int8, or no QDQ graph)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    g = model.graph
    qdq = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    names = {n.input[2] for n in qdq if len(n.input) > 2 and n.input[2]}  # zero points
    names |= {n.input[0] for n in qdq if n.op_type == "DequantizeLinear"}  # quantized constants
    changed = False
    for i, t in enumerate(g.initializer):
        if t.name in names and t.data_type == onnx.TensorProto.UINT8:
            shifted = numpy_helper.to_array(t).astype(np.int16) - 128
            g.initializer[i].CopyFrom(numpy_helper.from_array(shifted.astype(np.int8), t.name))
            changed = True
    if changed:
        onnx.save(model, str(dst))
    return changed
