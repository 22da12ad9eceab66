import json

import torch

from conftest import run_cli


def test_inspect_bundle(int8_bundle):
    r = run_cli("inspect", str(int8_bundle.bundle.path), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["precision"] == "int8" and info["opset"] >= 17
    assert info["ops"]["QuantizeLinear"] > 0 and info["ops"]["Conv"] == 3
    assert info["inputs"][0]["shape"] == [1, 1, 28, 28] and info["inputs"][0]["layout"] == "NCHW"
    assert info["bundle"]["checksums"] == "ok" and info["bundle"]["target"] == "x86-cpu"
    r = run_cli("inspect", str(int8_bundle.bundle.path))
    assert r.returncode == 0 and "QuantizeLinear" in r.stdout and "GRAY NCHW" in r.stdout


def test_inspect_foreign_onnx_nhwc_multi_output(tmp_path):
    """An ONNX file we did not make: NHWC input with dynamic batch and size, two outputs."""

    class Net(torch.nn.Module):
        def forward(self, x):  # x: N,H,W,3
            y = x.permute(0, 3, 1, 2).mean(dim=(2, 3))
            return y, y.sum(1)

    f = tmp_path / "foreign.onnx"
    torch.onnx.export(Net(), (torch.zeros(1, 64, 64, 3),), str(f), dynamo=False, input_names=["pixels"],
                      output_names=["feat", "total"], dynamic_axes={"pixels": {0: "n", 1: "h", 2: "w"}})
    info = json.loads(run_cli("inspect", str(f), "--json").stdout)
    inp = info["inputs"][0]
    assert inp["name"] == "pixels" and inp["shape"][3] == 3 and inp["dynamic"] == [0, 1, 2]
    assert [o["name"] for o in info["outputs"]] == ["feat", "total"]
    assert info["precision"] == "fp32" and info["custom_ops"] == []


def test_a_vector_in_a_4d_output_has_no_image_layout(tmp_path):
    """A face mesh's landmarks come out as [1, 1, 1, 1404]: a vector in a 4-D tensor, which inspect
    labelled NCHW (a 1 x 1404 picture); the image input beside it keeps its layout."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    shape = numpy_helper.from_array(np.array([1, 1, 1, 12], np.int64), "shape")
    g = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["landmarks"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])],
                          [helper.make_tensor_value_info("landmarks", TensorProto.FLOAT, [1, 1, 1, 12])], [shape])
    f = tmp_path / "mesh.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(f))
    info = json.loads(run_cli("inspect", str(f), "--json").stdout)
    assert info["inputs"][0]["layout"] == "NCHW" and info["outputs"][0]["layout"] is None, info
