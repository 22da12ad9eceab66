"""quantize._indexed_lookups: onnxruntime's find_by_name answered from an index of each list's names, with the
same answers as onnxruntime's scan whatever is done to the list between two calls."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization import onnx_quantizer, quant_utils

from lepton_edge.compress import quantize as q


def _t(name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(np.zeros(1, np.float32), name)


def test_the_index_answers_as_the_scan_does_through_every_kind_of_change():
    g = helper.make_graph([], "g", [], [], [_t(f"w{i}") for i in range(6)])
    inits = g.initializer
    scan = quant_utils.find_by_name
    asked = ["x", "new", "late", "y"] + [f"w{i}" for i in range(12)]  # (names added first: a stale index says no)

    def same() -> None:
        for name in asked:
            a, b = quant_utils.find_by_name(name, inits), scan(name, inits)
            assert (a is None) == (b is None), name
            assert a is None or (a.name == b.name and a.SerializeToString() == b.SerializeToString()), name

    model = onnx.ModelProto(graph=g)
    with q._indexed_lookups():
        from onnxruntime.quantization.onnx_model import ONNXModel

        om = ONNXModel(model)
        inits = om.model.graph.initializer
        assert quant_utils.find_by_name is not scan and onnx_quantizer.find_by_name is quant_utils.find_by_name
        same()
        inits.extend([_t("w6"), _t("w7")])  # grown: only the new items indexed
        same()
        om.remove_initializer(inits[2])  # a middle one removed (onnxruntime removes through ONNXModel)
        same()
        om.remove_initializer(inits[1])
        om.add_initializer(_t("new"))  # removed and added: the same length
        same()
        last = onnx.TensorProto()
        last.CopyFrom(inits[len(inits) - 1])
        om.remove_initializers([inits[0], inits[len(inits) - 1]])
        om.initializer_extend([_t("x"), last])  # two removed, two added with no lookup between (add_initializer
        # looks first): the list has its old length and last name
        same()
        om.remove_initializer(inits[3])
        inits.extend([_t("late"), _t("w3")])  # a name that was gone comes back at the end
        same()
        del inits[:]
        same()
        nodes = [helper.make_node("Relu", ["a"], ["b"], name="n1")]  # (a list made for the call: scanned)
        assert quant_utils.find_by_name("n1", nodes) is nodes[0] and quant_utils.find_by_name("n2", nodes) is None
        assert quant_utils.find_by_name("n1", iter(nodes)) is nodes[0]
    assert quant_utils.find_by_name is scan and onnx_quantizer.find_by_name is scan
