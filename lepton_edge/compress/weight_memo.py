"""onnxruntime's weight quantization done once per export, not once per candidate.

Why: every onnxruntime candidate of an export (u8-minmax, u8-percentile, the s8 ones) quantizes the same
weights the same way (int8, symmetric, per channel: `quantize._ort_int8`'s WeightSymmetric), and
quantize_static redoes it each time: a scale and zero point per output channel (`compute_data_quant_params`,
called per channel: 16,800 calls on PP-OCR's recogniser) and then the int8 array (`quantize_onnx_initializer`).
That was 0.7-0.9 s of each candidate's 1.5 s in onnxruntime's quantizer there. (The per-channel scales of
float32 weights are now computed for all channels at once by compress/channel_params.py, so on such models
what is kept here is mostly the int8 arrays.)

Both are pure functions of their arguments, so within `remembered_weights()` each answer is kept, keyed by
every argument with the data's bytes hashed (BLAKE2b, 128 bits), and a later call with the same arguments
gets a copy of it: the same arrays and tensor, so a byte-identical file (tests/test_export_footprint.py).
What the activations or the calibration decide (their ranges, the bias's int32 scale) is not kept here.
The answers live as long as the export's recipe search (`kept_for_the_search`, exporters/base.py), else
as long as the block, and are bounded (MAX_BYTES, then they are dropped and computed again): a process
that goes on after its export (a test session, a notebook) keeps none of it. onnxruntime's own functions
are put back after the block, as `quantize._linear_rewiring` does.
"""
from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

MAX_BYTES = 128 << 20  # the kept int8 weights and channel parameters: past this, all are dropped

_kept: dict[tuple, object] = {}
_kept_bytes = [0]
_lock = threading.Lock()


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _array_key(a) -> tuple:
    a = np.asarray(a)
    return a.dtype.str, a.shape, _digest(np.ascontiguousarray(a).tobytes())


def _keep(key: tuple, value, nbytes: int) -> None:
    with _lock:
        if _kept_bytes[0] + nbytes > MAX_BYTES:
            _kept.clear()
            _kept_bytes[0] = 0
        if nbytes <= MAX_BYTES:
            _kept[key] = value
            _kept_bytes[0] += nbytes


_searches = [0]  # recipe searches under way in this process (kept_for_the_search)


def forget() -> None:
    """Drop every kept answer."""
    with _lock:
        _kept.clear()
        _kept_bytes[0] = 0


@contextmanager
def kept_for_the_search() -> Iterator[None]:
    """Keep the answers between the blocks inside this one (an export's candidates), drop them after it."""
    with _lock:
        _searches[0] += 1
    try:
        yield
    finally:
        with _lock:
            _searches[0] -= 1
            last = not _searches[0]
        if last:
            forget()


@contextmanager
def remembered_weights() -> Iterator[None]:
    """onnxruntime's QDQ quantizer with its two weight functions remembered, for the block."""
    import onnx
    from onnxruntime.quantization import qdq_quantizer

    params, initializer = qdq_quantizer.compute_data_quant_params, qdq_quantizer.quantize_onnx_initializer

    def compute_data_quant_params(data, quant_type, symmetric, reduce_range=False, min_real_range=None,
                                  rmin_override=None, rmax_override=None):
        if not isinstance(data, np.ndarray):  # (onnxruntime's own TypeError)
            return params(data, quant_type, symmetric, reduce_range, min_real_range, rmin_override, rmax_override)
        key = ("params", _array_key(data), quant_type, symmetric, reduce_range, min_real_range,
               rmin_override, rmax_override)
        hit = _kept.get(key)
        if hit is None:
            hit = params(data, quant_type, symmetric, reduce_range, min_real_range, rmin_override, rmax_override)
            _keep(key, hit, 64)
        zero_point, scale = hit  # type: ignore[misc]
        return zero_point.copy(), scale.copy()

    def quantize_onnx_initializer(weight, quant_type, zero_point, scale, axis=None, quant_weight_name=None,
                                  block_size=0):
        key = ("initializer", _digest(weight.SerializeToString()), quant_type, _array_key(zero_point),
               _array_key(scale), axis, quant_weight_name, block_size)
        hit = _kept.get(key)
        if hit is None:
            hit = initializer(weight, quant_type, zero_point, scale, axis, quant_weight_name, block_size=block_size)
            _keep(key, hit, hit.ByteSize())
        out = onnx.TensorProto()
        out.CopyFrom(hit)
        return out

    qdq_quantizer.compute_data_quant_params = compute_data_quant_params
    qdq_quantizer.quantize_onnx_initializer = quantize_onnx_initializer
    try:
        yield
    finally:
        qdq_quantizer.compute_data_quant_params = params
        qdq_quantizer.quantize_onnx_initializer = initializer
        if not _searches[0]:  # (no search to keep them for)
            forget()
