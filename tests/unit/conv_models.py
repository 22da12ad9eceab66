"""A small Conv -> Relu -> Conv ONNX model, for the quantization tests."""
from __future__ import annotations

import numpy as np


def conv_relu_conv(path, cin: int, cout: int, hw: int, batch="N", heavy_tails: bool = False) -> None:
    """x [batch, cin, hw, hw] -> conv1 (cout) -> Relu -> conv2 (cout) -> y, weights seeded; tensors c1,
    r1, y. `heavy_tails`: Student-t weights, so a 99.99th percentile sits well inside the range."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def weights(shape):
        return (rng.standard_t(3, shape) * 0.3 if heavy_tails else rng.standard_normal(shape)).astype(np.float32)

    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
         helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
         helper.make_node("Conv", ["r1", "w2"], ["y"], pads=[1, 1, 1, 1], name="conv2")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, cin, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, cout, hw, hw])],
        [numpy_helper.from_array(weights((cout, cin, 3, 3)), "w1"),
         numpy_helper.from_array(weights((cout, cout, 3, 3)), "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(onnx.shape_inference.infer_shapes(model), str(path))
