"""The sensitivity pass charges each layer with the noise it adds, not with the noise it receives.

Why this test: a layer whose input comes from an activation that is not itself a layer (Relu,
HardSwish written as Add/Clip/Mul/Div) used to be charged as if its input were clean, so on a
PicoDet detector every such convolution "lost" ~57 dB and the ranking named the wrong layers to
keep in float."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lepton_edge.compress import quantize as q


def _conv(name: str, x: str, w: np.ndarray, y: str) -> tuple[onnx.NodeProto, onnx.TensorProto]:
    return helper.make_node("Conv", [x, f"{name}.w"], [y], name=name), numpy_helper.from_array(w, f"{name}.w")


def _model(path) -> None:
    """conv1 makes a loud channel and a quiet one; an activation that is no layer (Abs: onnxruntime
    neither quantizes nor removes it, as it does a Relu after a Conv); `culprit` reads only the quiet
    channel, x1000, so per-tensor quantization of its input (scaled to the loud channel) ruins it;
    Abs; `benign` averages the culprit's output. Only the culprit adds noise of its own."""
    w1 = np.array([100.0, 0.01], np.float32).reshape(2, 1, 1, 1)
    w2 = np.array([[0.0, 1000.0], [0.0, -1000.0]], np.float32).reshape(2, 2, 1, 1)
    w3 = np.full((1, 2, 1, 1), 0.5, np.float32)
    nodes, inits = zip(_conv("conv1", "x", w1, "a"), _conv("culprit", "a_abs", w2, "b"),
                       _conv("benign", "b_abs", w3, "y"))
    g = helper.make_graph(
        [nodes[0], helper.make_node("Abs", ["a"], ["a_abs"], name="abs1"), nodes[1],
         helper.make_node("Abs", ["b"], ["b_abs"], name="abs2"), nodes[2]], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1, 8, 8])], list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, str(path))


def test_the_layer_that_adds_the_noise_ranks_first(tmp_path):
    fp32, qdq = tmp_path / "m.onnx", tmp_path / "q.onnx"
    _model(fp32)
    x = np.random.default_rng(0).uniform(0.1, 1.0, (16, 1, 8, 8)).astype(np.float32)
    res = q.quantize_int8(fp32, qdq, x, q.Recipe.parse("u8-minmax"))
    lost = dict(q.sensitivity(fp32, res.path, x, res.names))
    ranked = sorted(lost, key=lambda n: -lost[n])
    assert ranked[0] == "culprit", lost
    assert lost["culprit"] > 10  # its quiet input channel is a step or two of the loud one's scale
    assert abs(lost["benign"]) < 3, lost  # noisy in, as noisy out: nothing of its own (was charged 60 dB)
    assert lost["conv1"] < 10, lost  # its input's and output's 8-bit steps, no more
