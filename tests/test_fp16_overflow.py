"""fp16 conversion keeps in fp32 what fp16 cannot hold (issue 14: PP-OCRv4's text detector).

Its fp16 export failed validation at SQNR -60.7 dB: a BatchNormalization variance of 1e7..1e8 was
clipped to fp16's 65504. Each model here is built with onnx.helper and breaks the same way under
the plain converter (checked, so the test would see a regression): a weight fp16 clips, and an
activation that overflows between two nodes. The new conversion passes the export's own dense
validation on them and keeps the file mostly fp16.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lepton_edge.compress import fp16
from lepton_edge.exporters import validation as val

RNG = np.random.default_rng(0)


def _const(name: str, value: np.ndarray):
    """A weight as a Constant node, as paddle2onnx writes them (PP-OCR's models)."""
    return helper.make_node("Constant", [], [name], name=f"const_{name}",
                            value=numpy_helper.from_array(value.astype(np.float32), name))


def _save(nodes, inits, x_shape, y_shape, path, opset=12):
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                          [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path


def stale_batchnorm(path):
    """Conv -> BatchNormalization whose variance (1e7..1e8, a Constant) is far from what the data
    gives -> Conv: PP-OCRv4 det's first BN. Activations stay small; only the weight is out of range."""
    var = RNG.uniform(1e7, 1e8, 16)
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        _const("bn_scale", RNG.uniform(0.7, 1.1, 16)), _const("bn_bias", RNG.normal(0, 0.1, 16)),
        _const("bn_mean", RNG.normal(0, 10, 16)), _const("bn_var", var),
        helper.make_node("BatchNormalization", ["c0", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["b0"],
                         name="bn0", epsilon=1e-5),
        helper.make_node("Relu", ["b0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "w1"], ["y"], name="conv1", pads=[1, 1, 1, 1]),
    ]
    # conv0's outputs have a std of a few thousand (under fp16's range), as large as sqrt(var): bn0's is O(1)
    inits = {"w0": RNG.normal(0, 500, (16, 3, 3, 3)), "w1": RNG.normal(0, 0.1, (16, 16, 3, 3))}
    return _save(nodes, inits, ["N", 3, 12, 12], ["N", 16, 12, 12], path)


def overflow_between(path):
    """x * 3e4 -> Max(., 0) -> / 3e4 -> MatMul: the scaled tensor leaves fp16's range (inf) although
    neither the input, the weights nor the output do. (onnxruntime's x86 CPU runs most fp16 ops in
    fp32 behind casts it removes again; Max, Clip, Transpose have fp16 kernels, so the overflow is
    real here as it is on a device with fp16 arithmetic.)"""
    nodes = [
        helper.make_node("Mul", ["x", "up"], ["big"], name="scale_up"),
        helper.make_node("Max", ["big", "zero"], ["pos"], name="relu_max"),
        helper.make_node("Div", ["pos", "up"], ["back"], name="scale_down"),
        helper.make_node("MatMul", ["back", "w"], ["mm"], name="fc"),
        helper.make_node("Add", ["mm", "b"], ["y"], name="bias"),
    ]
    inits = {"up": np.array(3e4), "zero": np.array(0.0), "w": RNG.normal(0, 0.2, (64, 128)),
             "b": RNG.normal(0, 0.1, 128)}
    return _save(nodes, inits, ["N", 64], ["N", 128], path)


def _run(path, x):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})


def _run_fp16_arithmetic(path, x):
    """onnx's reference runtime: numpy computes each fp16 node in fp16, as a device with fp16
    arithmetic does (ARMv8.2+, GPUs). onnxruntime's x86 CPU runs most fp16 nodes in fp32 instead
    and drops the casts between them, so an overflowing activation does not show there."""
    from onnx.reference import ReferenceEvaluator

    with np.errstate(over="ignore", invalid="ignore"):
        return ReferenceEvaluator(str(path)).run(None, {"x": x})


def _verdict(fp32_path, art_path, x, run=_run, task="raw"):
    """The export's own judgement of a dense output (SQNR, cosine)."""
    ref_outs = _run(fp32_path, x)
    specs = [{"name": "y", "shape": list(o.shape), "dtype": "float32"} for o in ref_outs]
    return val.judge(task, val.Reference(ref_outs, specs), run(art_path, x), specs, val.Thresholds())


def _plain_fp16(src, dst, sort=True):
    """The conversion as it was: onnxruntime's converter alone (its nodes sorted so that onnx's
    reference runtime, which needs the order ONNX requires, can run it; the same computation)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    m = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    if sort:
        OnnxModel.graph_topological_sort(m.graph)
    onnx.save(m, str(dst))
    return dst


def _mostly_fp16(path, fp32_path, res) -> None:
    size = path.stat().st_size / fp32_path.stat().st_size
    assert res.fp16_weight_fraction > 0.95 and size < 0.6, (res.fp16_weight_fraction, size)
    m = onnx.load(str(path))
    kinds = {t.data_type for t in m.graph.initializer}
    assert TensorProto.FLOAT16 in kinds


@pytest.mark.parametrize("build, x, kept, ort_breaks", [
    (stale_batchnorm, RNG.normal(0, 1, (24, 3, 12, 12)), ["bn0"], True),
    (overflow_between, RNG.normal(0, 1, (48, 64)), ["scale_up", "relu_max", "scale_down"], False),
])
def test_out_of_range_nodes_stay_fp32(tmp_path, build, x, kept, ort_breaks):
    src = build(tmp_path / "fp32.onnx")
    x = x.astype(np.float32)
    calib, check = x[: len(x) // 2], x[len(x) // 2:]

    plain = _plain_fp16(src, tmp_path / "plain.onnx")  # the bug this guards: the plain converter breaks it
    assert not _verdict(src, plain, check, _run_fp16_arithmetic).passed
    assert _verdict(src, plain, check).passed is not ort_breaks  # a clipped weight breaks it everywhere

    res = fp16.convert(src, tmp_path / "fp16.onnx", calib)
    assert res.float_nodes == kept and set(res.reasons) == set(kept)
    assert res.samples == min(len(calib), fp16.MAX_SAMPLES)
    for run in (_run, _run_fp16_arithmetic):
        new = _verdict(src, tmp_path / "fp16.onnx", check, run)
        assert new.passed, new.why
        assert new.metrics["sqnr_db"] > 20  # the gate: 12 dB
    _mostly_fp16(tmp_path / "fp16.onnx", src, res)


def test_weight_rule_needs_no_data(tmp_path):
    """A weight out of range is found without any data (an export with no --calib)."""
    src = stale_batchnorm(tmp_path / "fp32.onnx")
    res = fp16.convert(src, tmp_path / "fp16.onnx")
    assert res.float_nodes == ["bn0"] and "bn_var" in res.reasons["bn0"] and res.samples == 0
    x = RNG.normal(0, 1, (8, 3, 12, 12)).astype(np.float32)
    assert _verdict(src, tmp_path / "fp16.onnx", x).passed and _verdict(src, tmp_path / "fp16.onnx", x,
                                                                         _run_fp16_arithmetic).passed


def test_in_range_model_converts_as_before(tmp_path):
    """Nothing out of range: the plain converter's graph, nodes in topological order (onnx.checker
    refuses the converter's own order)."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="fc"), helper.make_node("Relu", ["mm"], ["y"])]
    src = _save(nodes, {"w": RNG.normal(0, 0.2, (32, 16))}, ["N", 32], ["N", 16], tmp_path / "fp32.onnx")
    x = RNG.normal(0, 1, (16, 32)).astype(np.float32)
    res = fp16.convert(src, tmp_path / "fp16.onnx", x)
    assert res.float_nodes == [] and res.fp16_weight_fraction == 1.0
    plain = onnx.load(str(_plain_fp16(src, tmp_path / "plain.onnx", sort=False)))
    new = onnx.load(str(tmp_path / "fp16.onnx"))
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(plain)
    onnx.checker.check_model(new)
    nodes = [sorted(n.SerializeToString() for n in m.graph.node) for m in (new, plain)]
    assert nodes[0] == nodes[1]
    assert new.graph.initializer == plain.graph.initializer


def test_activation_ranges_stream_one_batch_at_a_time(tmp_path):
    """Ranges are running maxima over batches (the memory bound), the same as over all at once,
    and the data's check runs before every batch (an export over its memory budget stops there)."""
    src = overflow_between(tmp_path / "fp32.onnx")
    model = onnx.load(str(src))
    x = RNG.normal(0, 1, (40, 64)).astype(np.float32)
    calls = []
    peaks, n = fp16.activation_peaks(model, x, {}, lambda: calls.append(1), max_samples=40)
    assert n == 40 and len(calls) > 1
    assert peaks["big"] == pytest.approx(float(np.abs(x).max()) * 3e4, rel=1e-5)
    assert peaks["x"] == pytest.approx(float(np.abs(x).max()))
    _, n = fp16.activation_peaks(model, x, {}, lambda: None, max_samples=8)
    assert n == 8


def test_export_keeps_and_records_the_fp32_nodes(tmp_path):
    """Through `export`: --calib now feeds fp16's ranges (it was ignored), validation runs on inputs
    held out from them, and the manifest's compression section names the nodes kept in fp32."""
    import lepton_edge

    src = stale_batchnorm(tmp_path / "m.onnx")
    np.save(tmp_path / "calib.npy", RNG.normal(0, 1, (40, 3, 12, 12)).astype(np.float32))
    r = lepton_edge.export(str(src), "x86-cpu", out=tmp_path / "out", precision="fp16",
                           calib=str(tmp_path / "calib.npy"), measure_latency=False)
    c, v = r.manifest.compression, r.manifest.validation
    assert c["fp16"]["float_nodes"] == ["bn0"] and c["fp16"]["float_node_count"] == 1
    assert "bn_var" in c["fp16"]["reasons"]["bn0"] and c["fp16"]["ranges_from"].startswith("calibration data")
    assert c["fp16"]["range_samples"] == fp16.MAX_SAMPLES and c["fp16"]["fp16_weight_fraction"] > 0.95
    assert c["size_vs_fp32"] < 0.6
    assert v["passed"] and "held out" in v["inputs"]["validation_inputs"]
