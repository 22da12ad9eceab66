"""A graph whose nodes have no names (ONNX allows it) quantizes as a named one does: the recipes name the
layers they keep in float, and onnxruntime excludes nodes by name, so "keep the first and last convolution
in float" once meant every unnamed node, and that candidate was the fp32 model."""
from __future__ import annotations

import numpy as np
import pytest


def _three_convs(path, named: bool = False) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, x = [], "x"
    inits = []
    for i in range(3):
        inits.append(numpy_helper.from_array(rng.standard_normal((8, 8 if i else 3, 3, 3)).astype(np.float32) * 0.2,
                                             f"w{i}"))
        nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1],
                                   name=f"conv{i}" if named else ""),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}" if named else "")]
        x = f"r{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 8, 16, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_unnamed_nodes_get_names_of_their_own(tmp_path):
    import onnx

    from lepton_edge.compress import quantize as q

    _three_convs(tmp_path / "m.onnx")
    model = onnx.load(str(tmp_path / "m.onnx"))
    model.graph.node[1].name = "Conv_0"  # a name the renaming would pick: it must not be taken twice
    assert q.name_nodes(model)
    names = [n.name for n in model.graph.node]
    assert all(names) and len(set(names)) == len(names), names
    assert names[1] == "Conv_0"
    assert not q.name_nodes(model)  # named already: nothing changes
    _three_convs(tmp_path / "named.onnx", named=True)
    named = onnx.load(str(tmp_path / "named.onnx"))
    assert not q.name_nodes(named) and [n.name for n in named.graph.node][0] == "conv0"


def test_keep_ends_keeps_two_layers_in_float_in_an_unnamed_graph(tmp_path):
    import onnx

    from lepton_edge.compress import quantize as q

    _three_convs(tmp_path / "m.onnx")
    prepared = q.prepare(tmp_path / "m.onnx", tmp_path / "prepared.onnx")
    x = np.random.default_rng(1).standard_normal((8, 3, 16, 16)).astype(np.float32)
    res = q.quantize_int8(prepared, tmp_path / "int8.onnx", x, q.Recipe.parse("s8-minmax-ends"))
    convs = q.quantizable_nodes(onnx.load(str(prepared)))
    assert len(convs) == 3 and all(convs)
    assert res.float_nodes == [convs[0], convs[-1]]
    graph = onnx.load(str(res.path)).graph
    produced_by_dq = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    middle = next(n for n in graph.node if n.name == convs[1])
    assert middle.input[0] in produced_by_dq and middle.input[1] in produced_by_dq  # the middle conv is int8
    first = next(n for n in graph.node if n.name == convs[0])
    assert first.input[1] not in produced_by_dq  # and the first stays float


def test_keep_ends_on_a_single_layer_is_no_int8_candidate(tmp_path):
    """keep-ends on a model with one quantizable layer: it is both ends (counted once), and keeping it in
    float leaves no int8: the candidate is refused (it was the fp32 model, chosen as an int8 one)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from lepton_edge.compress import quantize as q

    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], name="only")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "one.onnx"))
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    with pytest.raises(q.BrokenGraph, match=r"keeps all 1 quantizable layer\(s\) in float"):
        q.quantize_int8(tmp_path / "one.onnx", tmp_path / "int8.onnx", x, q.Recipe.parse("s8-minmax-ends"))
    assert not (tmp_path / "int8.onnx").exists()
