"""One export calibrates MinMax once: later MinMax candidates (another activation type, layers in float)
read the ranges the first one measured, from onnxruntime's calibration cache in the export's folder."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from lepton_edge.compress import quantize as q

from .conv_models import conv_relu_conv


def _scales(path) -> dict[str, float]:
    m = onnx.load(str(path))
    init = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    return {n.input[0]: float(init[n.input[1]].ravel()[0]) for n in m.graph.node
            if n.op_type == "QuantizeLinear" and n.input[1] in init}


def test_later_minmax_candidates_reuse_the_ranges(tmp_path):
    import inspect

    from onnxruntime.quantization import quantize_static

    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        pytest.skip("onnxruntime < 1.24 has no calibration cache: every candidate calibrates")
    fp32 = tmp_path / "m.onnx"
    conv_relu_conv(fp32, 3, 4, 8)
    x = np.random.default_rng(1).standard_normal((8, 3, 8, 8)).astype(np.float32)
    ranges = tmp_path / "work"
    ranges.mkdir()
    q.quantize_int8(fp32, tmp_path / "a.onnx", x, q.Recipe.parse("s8-minmax"), ranges=ranges)
    assert (ranges / "m.minmax-ranges.json").is_file()
    # data 10x larger: calibrated afresh its ranges would be 10x; from the cache they are the first data's
    fresh = q.quantize_int8(fp32, tmp_path / "fresh.onnx", x * 10, q.Recipe.parse("u8-minmax"))
    again = q.quantize_int8(fp32, tmp_path / "again.onnx", x * 10, q.Recipe.parse("u8-minmax"), ranges=ranges)
    same = q.quantize_int8(fp32, tmp_path / "same.onnx", x, q.Recipe.parse("u8-minmax"))
    assert _scales(again.path) == _scales(same.path) != _scales(fresh.path)
    assert _scales(fresh.path)["r1"] > 5 * _scales(again.path)["r1"]
    # a histogram method calibrates on its own data, never from the MinMax cache
    p1 = q.quantize_int8(fp32, tmp_path / "p1.onnx", x * 10, q.Recipe.parse("u8-percentile"), ranges=ranges)
    p2 = q.quantize_int8(fp32, tmp_path / "p2.onnx", x * 10, q.Recipe.parse("u8-percentile"))
    assert _scales(p1.path) == _scales(p2.path)
