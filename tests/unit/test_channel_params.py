"""Per-channel weight parameters computed at once (compress/channel_params.py) against onnxruntime's own
per-channel loop: the same bits, in every case the quantizer sends there, and onnxruntime's own code for
the cases it does not."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from lepton_edge.compress import channel_params


def _onnxruntime_loop(data, axis, quant_type, reduce_range):
    """What QDQQuantizer._calc_initializer_quant_params does for a per-channel weight, verbatim."""
    from onnxruntime.quantization.quant_utils import compute_data_quant_params

    zps, scales = [], []
    for i in range(data.shape[axis]):
        zp, s = compute_data_quant_params(data.take(i, axis).ravel(), quant_type, True, reduce_range=reduce_range)
        zps.append(zp)
        scales.append(s)
    return np.asarray(zps), np.asarray(scales)


def _weights(seed: int, shape, axis: int = 0) -> np.ndarray:
    """Channels (along `axis`) of scales 1e-3 to 4, one all zero, one subnormal only, one negative only."""
    rng = np.random.default_rng(seed)
    first = (shape[axis], *(d for i, d in enumerate(shape) if i != axis % len(shape)))
    w = (rng.standard_normal(first) * rng.choice([1e-3, 0.1, 4.0], size=first[:1] + (1,) * (len(first) - 1)))
    w = w.astype(np.float32)
    w[0] = 0.0  # an all-zero channel: scale 1, zero point 0
    if first[0] > 2:
        w[1] = np.float32(1e-42)  # subnormal only: a scale under float32's tiny, so also 1 and 0
        w[2] = -np.abs(w[2])  # negative only
    return np.ascontiguousarray(np.moveaxis(w, 0, axis))


@pytest.mark.parametrize("shape,axis", [((16, 8, 3, 3), 0), ((32, 24), 1), ((5, 7), 0), ((6, 4, 3), -1)])
@pytest.mark.parametrize("type_name,reduce_range", [("INT8", False), ("INT8", True), ("UINT8", False),
                                                     ("UINT8", True), ("INT16", False), ("UINT16", False)])
# (onnxruntime has no reduced range for 16-bit types)
def test_same_bits_as_onnxruntimes_loop(shape, axis, type_name, reduce_range):
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    quant_type = getattr(TensorProto, type_name)
    data = _weights(len(shape) + axis, shape, axis)
    want_zp, want_scale = _onnxruntime_loop(data, axis % data.ndim, quant_type, reduce_range)
    qmin, qmax = get_qmin_qmax_for_qType(quant_type, reduce_range, symmetric=True)
    zp, scale = channel_params.channel_params(data, axis % data.ndim, qmin, qmax)
    assert zp.dtype == want_zp.dtype and scale.dtype == want_scale.dtype
    assert zp.shape == want_zp.shape == scale.shape == (shape[axis],)
    assert zp.tobytes() == want_zp.tobytes() and scale.tobytes() == want_scale.tobytes()
    assert scale[0] == 1.0 and zp[0] == want_zp[0]  # (the zero channel)
    if shape[axis] > 3:
        assert scale[1] == 1.0 and len(set(scale[2:].tolist())) > 1  # (the subnormal one; the rest their own)


def _model(path, weights: dict[str, np.ndarray], opset: int = 13) -> None:
    """x -> Conv(w1) -> Relu -> Conv(w2) -> Flatten -> MatMul(w3) -> y."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c1"], ["r1"]),
         helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
         helper.make_node("Flatten", ["c2"], ["f"]),
         helper.make_node("MatMul", ["f", "w3"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 10])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save(onnx.shape_inference.infer_shapes(model), str(path))


class _Reader:
    def __init__(self):
        rng = np.random.default_rng(1)
        self.xs = [{"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)} for _ in range(3)]
        self.i = 0

    def get_next(self):
        self.i += 1
        return self.xs[self.i - 1] if self.i <= len(self.xs) else None


def _quantized(tmp_path, src, tag: str, at_once: bool, monkeypatch, **options) -> tuple[bytes, int]:
    """The QDQ file quantize_static writes, and how many times onnxruntime's per-tensor-or-channel function
    `compute_data_quant_params` ran for the weights (a call per channel in its own loop)."""
    from contextlib import nullcontext

    from onnxruntime.quantization import QuantFormat, QuantType, qdq_quantizer, quantize_static

    real, calls = qdq_quantizer.compute_data_quant_params, [0]

    def counted(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(qdq_quantizer, "compute_data_quant_params", counted)
    out = tmp_path / f"{tag}-{at_once}.onnx"
    with channel_params.channel_params_at_once() if at_once else nullcontext():
        quantize_static(str(src), str(out), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        extra_options={"WeightSymmetric": True, **options.pop("extra", {})}, **options)
    monkeypatch.setattr(qdq_quantizer, "compute_data_quant_params", real)
    return out.read_bytes(), calls[0]


@pytest.mark.parametrize("reduce_range", [False, True])
def test_quantize_static_writes_the_same_file(tmp_path, monkeypatch, reduce_range):
    rng = np.random.default_rng(2)
    w = {"w1": _weights(3, (16, 3, 3, 3)), "w2": _weights(4, (8, 16, 3, 3)),
         "w3": rng.standard_normal((512, 10)).astype(np.float32)}
    w["w3"][:, 0] = 0.0  # (MatMul's channels are its columns)
    src = tmp_path / "m.onnx"
    _model(src, w)
    ours, ours_calls = _quantized(tmp_path, src, "m", True, monkeypatch, reduce_range=reduce_range)
    theirs, their_calls = _quantized(tmp_path, src, "m", False, monkeypatch, reduce_range=reduce_range)
    assert hashlib.sha256(ours).hexdigest() == hashlib.sha256(theirs).hexdigest()
    assert their_calls >= 16 + 8 + 10 and ours_calls == 0  # (every channel computed here, none in its loop)


def test_a_weight_it_does_not_reproduce_goes_to_onnxruntime(tmp_path, monkeypatch):
    # a weight this module does not compute (w2, made so here) goes to onnxruntime's own loop, channel by
    # channel, beside the ones computed here: the same file
    rng = np.random.default_rng(3)
    w = {"w1": _weights(5, (16, 3, 3, 3)), "w2": _weights(6, (8, 16, 3, 3)),
         "w3": rng.standard_normal((512, 10)).astype(np.float32)}
    src = tmp_path / "m.onnx"
    _model(src, w)
    real_eligible = channel_params._eligible
    monkeypatch.setattr(channel_params, "_eligible",
                        lambda q, name, info, data: None if name == "w2" else real_eligible(q, name, info, data))
    ours, ours_calls = _quantized(tmp_path, src, "m", True, monkeypatch)
    theirs, _ = _quantized(tmp_path, src, "m", False, monkeypatch)
    assert ours == theirs and ours_calls == 8  # (w2's 8 channels, in onnxruntime's loop)


def test_overrides_and_other_types_are_left_to_onnxruntime():
    from onnxruntime.quantization.qdq_quantizer import QDQQuantTensorType, QDQTensorQuantInfo

    class Quantizer:
        def __init__(self, overrides=None, block_size=0, min_real_range=None):
            from onnx import TensorProto

            self.tensor_quant_overrides = overrides or {}
            self.block_size, self.min_real_range, self.weight_qType = block_size, min_real_range, TensorProto.INT8

    info = QDQTensorQuantInfo(tensor_type=QDQQuantTensorType.WEIGHT, axis=0, data_type=1)
    data = _weights(7, (4, 3))
    assert channel_params._eligible(Quantizer(), "w", info, data) is not None
    assert channel_params._eligible(Quantizer({"w": [{"scale": 1.0}]}), "w", info, data) is None
    assert channel_params._eligible(Quantizer(block_size=32), "w", info, data) is None
    assert channel_params._eligible(Quantizer(min_real_range=1e-4), "w", info, data) is None
    assert channel_params._eligible(Quantizer(), "w", info, data.astype(np.float16)) is None
    per_tensor = QDQTensorQuantInfo(tensor_type=QDQQuantTensorType.WEIGHT, axis=None, data_type=1)
    assert channel_params._eligible(Quantizer(), "w", per_tensor, data) is None
    activation = QDQTensorQuantInfo(tensor_type=QDQQuantTensorType.ACTIVATION, axis=0, data_type=1)
    assert channel_params._eligible(Quantizer(), "w", activation, data) is None
    for bad in (np.inf, -np.inf, np.nan):  # (onnxruntime's loop: an infinite scale, or its NaN assertion)
        odd = data.copy()
        odd[1, 1] = bad
        assert channel_params._eligible(Quantizer(), "w", info, odd) is None
    assert channel_params._eligible(Quantizer({"w": []}), "w", info, data) is None  # (any override at all)


def test_swapped_in_only_for_the_block():
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    before = QDQQuantizer._calc_initializer_quant_params
    with channel_params.channel_params_at_once():
        assert QDQQuantizer._calc_initializer_quant_params is not before
    assert QDQQuantizer._calc_initializer_quant_params is before
