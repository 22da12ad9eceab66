"""The twin of a uint8-activation QDQ graph with int8 activations (compress/activation_twin.py): the same
quantizers in the same places and the same real values, so onnxruntime runs the kernels an s8 candidate
gets. It is only timed, but a twin that computed something else would time something else."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static  # noqa: E402

from lepton_edge.compress.activation_twin import int8_activation_twin  # noqa: E402


class _Reader(CalibrationDataReader):
    def __init__(self, xs):
        self.it = iter({"x": x} for x in xs)

    def get_next(self):
        return next(self.it, None)


def _fp32(path):
    """Conv -> Relu -> Add(constant) -> Conv: weights, an activation and a constant onnxruntime quantizes."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.uniform(0.1, 0.5, (1, 8, 1, 1)).astype(np.float32), "k")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["r"]),
             helper.make_node("Add", ["r", "k"], ["a"]), helper.make_node("Conv", ["a", "w2"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def _quantized(tmp_path, activation):
    _fp32(tmp_path / "m.onnx")
    xs = [np.random.default_rng(i).standard_normal((1, 3, 16, 16)).astype(np.float32) for i in range(4)]
    out = tmp_path / f"{activation}.onnx"
    quantize_static(str(tmp_path / "m.onnx"), str(out), _Reader(xs), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8 if activation == "u8" else QuantType.QInt8,
                    weight_type=QuantType.QInt8, extra_options={"QuantizeBias": False})
    return out


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_the_twin_has_int8_activations_and_computes_the_same(tmp_path):
    u8 = _quantized(tmp_path, "u8")
    assert int8_activation_twin(u8, tmp_path / "twin.onnx")
    g = onnx.load(str(tmp_path / "twin.onnx")).graph
    inits = {t.name: t for t in g.initializer}
    zps = [inits[n.input[2]] for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert zps and all(t.data_type == TensorProto.INT8 for t in zps)
    assert len(g.node) == len(onnx.load(str(u8)).graph.node)  # the same quantizers in the same places
    x = np.random.default_rng(9).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(_run(tmp_path / "twin.onnx", x), _run(u8, x), rtol=1e-5, atol=1e-5)


def test_a_graph_with_int8_activations_has_no_twin(tmp_path):
    assert not int8_activation_twin(_quantized(tmp_path, "s8"), tmp_path / "twin.onnx")
    assert not (tmp_path / "twin.onnx").exists()
