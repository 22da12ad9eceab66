"""onnxruntime's per-channel weight scales and zero points, computed for all of a weight's channels at once.

Why: onnxruntime's QDQ quantizer (`QDQQuantizer._calc_initializer_quant_params`) computes a per-channel
weight's scale and zero point one channel at a time: `compute_data_quant_params` on each channel's slice,
a dozen numpy calls on 0-d arrays each. On PP-OCR's recogniser that is 16,800 calls, 0.7-0.9 s of the
first onnxruntime candidate's 2.3 s in the quantizer (the later candidates reuse them: weight_memo).
The same arithmetic on arrays of the channels' minima and maxima takes milliseconds.

What is computed here is only the case every onnxruntime candidate of an export asks for (quantize._ort_int8:
per channel, symmetric, integer weights, float32, finite, no per-tensor override, no block size, no minimum
range), and it is onnxruntime's own formula (quant_utils.compute_scale_zp) step for step, elementwise: the
same float32 and float64 operations in the same order, so the same bits (tests/unit/test_channel_params.py
compares it with onnxruntime's loop, byte for byte, edge cases included). Every other tensor, and any
weight outside that case, goes through onnxruntime's own code, and its answers keep onnxruntime's order.
The method is swapped for the block only (`channel_params_at_once`), as quantize._linear_rewiring does.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np


def channel_params(data: np.ndarray, axis: int, qmin: np.ndarray, qmax: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(zero points, scales) of each slice of `data` along `axis`, as onnxruntime's symmetric
    `compute_data_quant_params(slice, ..., symmetric=True)` gives them one at a time (then np.asarray of
    the list): `qmin`/`qmax` from its `get_qmin_qmax_for_qType`. `data`: float32, finite, no empty slice."""
    flat = np.moveaxis(data, axis, 0).reshape(data.shape[axis], -1)
    zero = np.array(0, dtype=data.dtype)
    rmin = np.minimum(flat.min(axis=1), zero)  # (0 inside the range: quant_utils.compute_scale_zp)
    rmax = np.maximum(flat.max(axis=1), zero)
    absmax = np.maximum(np.abs(rmin), np.abs(rmax))  # (symmetric: [-absmax, +absmax])
    dr = np.asarray(absmax, dtype=np.float64) - np.asarray(-absmax, dtype=np.float64)
    dq = np.array(qmax, dtype=np.float64) - np.array(qmin, dtype=np.float64)
    scale = dr / dq
    tiny = scale < np.finfo(data.dtype).tiny  # (an all-zero channel: scale 1, zero point 0)
    zp = np.array(np.round((qmin + qmax) / np.array(2.0, dtype=np.float64)), dtype=qmin.dtype)
    scales = np.where(tiny, np.array(1.0, dtype=data.dtype), scale.astype(data.dtype)).astype(data.dtype)
    zps = np.where(tiny, np.array(0, dtype=qmin.dtype), zp).astype(qmin.dtype)
    return zps, scales


def _eligible(quantizer, name: str, info, data: np.ndarray) -> tuple[int, object] | None:
    """(normalised axis, quant type) where onnxruntime would compute `name`'s parameters per channel,
    symmetric, with nothing this module does not reproduce; else None (onnxruntime's own code then)."""
    from onnxruntime.quantization.qdq_quantizer import QDQQuantTensorType
    from onnxruntime.quantization.quant_utils import normalize_axis

    if info.tensor_type is not QDQQuantTensorType.WEIGHT or info.axis is None:
        return None
    if name in quantizer.tensor_quant_overrides or getattr(quantizer, "block_size", 0) > 0:
        return None
    if quantizer.min_real_range is not None or data.dtype != np.float32 or data.ndim == 0:
        return None
    valid, axis = normalize_axis(info.axis, data.ndim)
    if not valid or data.shape[axis] == 0 or data.size == 0 or not np.isfinite(data).all():
        return None  # (out of range: onnxruntime's ValueError; NaN: its assertion; empty: its own branch)
    quant_type = quantizer.weight_qType
    from onnx import TensorProto

    if quant_type not in (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16):
        return None
    return axis, quant_type


@contextmanager
def channel_params_at_once() -> Iterator[None]:
    """onnxruntime's QDQQuantizer with its per-channel weight parameters computed by `channel_params`,
    for the block (put back after)."""
    from onnxruntime.quantization import qdq_quantizer
    from onnxruntime.quantization.base_quantizer import QuantizationParams
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    original = getattr(qdq_quantizer.QDQQuantizer, "_calc_initializer_quant_params", None)
    if original is None:  # (an onnxruntime without this method: its own code, untouched)
        yield
        return

    def calc(self):
        done: dict[str, QuantizationParams] = {}
        for name, info in self.tensors_to_quantize.items():
            init = qdq_quantizer.find_by_name(name, self.model.initializer())
            if not init:
                continue
            data = qdq_quantizer.tensor_proto_to_array(init)
            got = _eligible(self, name, info, data)
            if got is None:
                continue
            axis, quant_type = got
            qmin, qmax = get_qmin_qmax_for_qType(quant_type, self.reduce_range, symmetric=True)
            zps, scales = channel_params(data, axis, qmin, qmax)
            done[name] = QuantizationParams(zero_point=zps, scale=scales, quant_type=quant_type, axis=axis)
        if not done:
            return original(self)
        every = self.tensors_to_quantize
        self.tensors_to_quantize = {k: v for k, v in every.items() if k not in done}
        try:
            rest = original(self)
        finally:
            self.tensors_to_quantize = every
        return {k: done[k] if k in done else rest[k] for k in every if k in done or k in rest}

    qdq_quantizer.QDQQuantizer._calc_initializer_quant_params = calc  # type: ignore[method-assign]
    try:
        yield
    finally:
        qdq_quantizer.QDQQuantizer._calc_initializer_quant_params = original  # type: ignore[method-assign]
