"""The `-w7` recipes: int8 weights kept in 7 bits, so that x86 CPUs without AVX-512 VNNI compute what the
graph says (lepton_edge/compress/quantize.Recipe). A graph validated on one x86 CPU runs on another whose
onnxruntime kernels differ: what must hold is that the fused kernels and the graph's own arithmetic agree,
on any host."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lepton_edge.compress import quantize as q


def _model(path) -> None:
    """A 1x1 convolution whose uint8 activations sit near 255 and whose weights are all large and of one
    sign: the products `vpmaddubsw` adds in pairs reach 255 x 127 x 2 with 8-bit weights, past int16."""
    w = np.random.default_rng(0).uniform(0.5, 1.0, (8, 32, 1, 1)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])],
                          [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def _run(path, x, fused: bool) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if fused \
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # (the Q/DQ graph's own arithmetic)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _weight_ints(path) -> np.ndarray:
    g = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    return np.concatenate([inits[n.input[0]].ravel() for n in g.node if n.op_type == "DequantizeLinear"
                           and n.input[0] in inits and inits[n.input[0]].dtype == np.int8])


@pytest.mark.parametrize("recipe", ["u8-minmax-w7", "s8-minmax-w7", "nncf-default-w7", "nncf-mixed-w7"])
def test_seven_bit_weights_compute_what_the_graph_says_on_this_cpu(tmp_path, recipe):
    _model(tmp_path / "m.onnx")
    rng = np.random.default_rng(1)
    calib = np.concatenate([rng.uniform(0.9, 1.0, (15, 32, 8, 8)), np.zeros((1, 32, 8, 8))]).astype(np.float32)
    out = q.quantize_int8(tmp_path / "m.onnx", tmp_path / "q.onnx", calib, q.Recipe.parse(recipe)).path
    ints = _weight_ints(out)
    assert ints.size == 8 * 32 and np.abs(ints.astype(int)).max() <= 64, (ints.min(), ints.max())
    assert np.abs(ints.astype(int)).max() >= 60  # (the range used: 7 bits, not fewer)
    x = calib[:1]
    fp32, graph, fused = (_run(tmp_path / "m.onnx", x, True), _run(out, x, False), _run(out, x, True))
    scale = np.abs(fp32).max()
    assert np.abs(graph - fp32).max() < 0.05 * scale  # (a quantized graph, not a broken one)
    # (8-bit weights here, on an AVX2-only AMD EPYC: the fused graph read about half of fp32's values)
    assert np.abs(fused - graph).max() < 0.01 * scale, (np.abs(fused - graph).max(), scale)


def test_eight_bit_weights_use_the_whole_range_and_the_recipe_says_which():
    assert not q.Recipe.parse("u8-minmax").weights_7bit
    r = q.Recipe.parse("u8-percentile-ends-w7")
    assert r.weights_7bit and r.keep_ends and r.base == "u8-percentile-ends-w7"
    assert "7 bits" in r.method() and "7 bits" not in q.Recipe.parse("u8-percentile").method()
    assert q.Recipe.parse("nncf-default-w7").layout == q.Recipe.parse("nncf-default").layout  # (same kernels)
    for bad in ("u8-minmax-w7-w7", "s8-minmax-litert-w7", "u8-minmax-w6"):
        with pytest.raises(ValueError):
            q.Recipe.parse(bad)
