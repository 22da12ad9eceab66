"""What an int8 export costs in memory (issue #14, must-hold 1 and the "peak RSS <= NNCF's" goal).

Real parts: ONNX graphs built with onnx.helper (no torch, so nothing here loads it by accident),
quantized by NNCF and onnxruntime, run by the device runtime's onnxruntime backend; the export runs
in its own process where what it imports is the point.
"""
from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from lepton_edge.compress import calibration as cal, quantize as q  # noqa: E402

RNG = np.random.default_rng(0)


def _pointwise_net(path: Path, hw=(32, 32), width: int = 16, layers: int = 3) -> Path:
    """x [N,3,H,W] -> `layers` x (1x1 Conv to `width` channels + Relu) -> GlobalAveragePool -> [N,width,1,1].
    Small inputs, intermediate tensors `width`/3 times larger each: the shape of a text-line classifier
    (ppocr-cls: 110 KB inputs, 14 MB of intermediate tensors per sample)."""
    nodes, inits, prev, c = [], [], "x", 3
    for i in range(layers):
        w = (RNG.standard_normal((width, c, 1, 1)) / np.sqrt(c)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(width, np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}"),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        prev, c = f"r{i}", width
    nodes.append(helper.make_node("GlobalAveragePool", [prev], ["features"], name="pool"))
    graph = helper.make_graph(nodes, "pointwise", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                 ["n", 3, *hw])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["n", width, 1, 1])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_onnx_int8_export_never_imports_torch(tmp_path):
    """NNCF imports torch whenever it is installed; an ONNX model needs none of it (~200 MB of RSS).
    The export of an ONNX file, NNCF candidate included, must leave torch unloaded."""
    model = _pointwise_net(tmp_path / "m.onnx")
    np.save(tmp_path / "calib.npy", RNG.random((40, 3, 32, 32), dtype=np.float32))
    code = (
        "import sys, lepton_edge\n"
        f"r = lepton_edge.export({str(model)!r}, target='x86-cpu', calib={str(tmp_path / 'calib.npy')!r}, "
        f"out={str(tmp_path / 'out')!r}, recipes=['nncf-default'], task='raw', measure_latency=False)\n"
        "print(r.manifest.compression['quantization']['recipe'], 'nncf' in sys.modules, 'torch' in sys.modules)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split()[-3:] == ["nncf-default", "True", "False"], p.stdout


def _live_sessions() -> int:
    gc.collect()
    return sum(isinstance(o, ort.InferenceSession) for o in gc.get_objects())


def test_search_keeps_no_session_and_only_the_best_file(tmp_path):
    """Every passing candidate used to keep its onnxruntime session (and arena) until the search
    ended, and every candidate its file: now none is held while the next one is quantized and
    validated, and only the best file is left."""
    from types import SimpleNamespace

    from lepton_edge import targets
    from lepton_edge.exporters import recipes
    from lepton_edge.exporters.context import ExportContext
    from lepton_edge.exporters.datasets import ExportData
    from lepton_edge.exporters.onnx import OnnxExporter
    from lepton_edge.exporters.options import ExportOptions

    ex = OnnxExporter()
    prepared = q.prepare(_pointwise_net(tmp_path / "m.onnx"), tmp_path / "p.onnx")
    calib, check = RNG.random((16, 3, 32, 32), dtype=np.float32), RNG.random((8, 3, 32, 32), dtype=np.float32)
    held_before: list[int] = []
    scores = iter([1.0, 3.0, 2.0])  # the second candidate is the best

    def validate(path: Path):
        held_before.append(_live_sessions())  # sessions alive while this candidate is judged
        pred = ex.predictor(path, 1)
        pred(check)
        v = SimpleNamespace(passed=True, why=None, score=(next(scores),), as_dict=lambda: {})
        return v, pred, None

    ctx = ExportContext(ExportOptions(), targets.load("x86-cpu"), tmp_path, data=ExportData(check, "test",
                                                                                            calib_x=calib))
    r = recipes.search(ctx, ex, prepared, validate, ["u8-minmax", "u8-percentile", "s8-minmax-ends"], patience=9)
    assert r.recipe == "u8-percentile" and r.predict is not None
    assert held_before == [0, 0, 0]
    assert sorted(p.name for p in tmp_path.glob("int8-*")) == [r.path.name]
    assert [o.shape for o in r.predict(check)] == [(8, 16, 1, 1)]  # the best's session, opened again


def test_histogram_strides_are_bounded_by_intermediate_tensors(tmp_path):
    """A histogram calibrator keeps every calibrated tensor of a stride. Strides sized by the inputs'
    bytes put all 29 samples of 12 KB in one stride: 29 x 2.4 MB of tensors (ppocr-cls: 58 x 14 MB,
    1.16 GB peak). Sized by the tensors shape inference predicts, and of any length (29 batches is
    prime: quantize_static's own strides must divide it), a stride holds about 32 MB."""
    fp32 = _pointwise_net(tmp_path / "big.onnx", hw=(32, 32), width=96, layers=6)
    calib = RNG.random((29, 3, 32, 32), dtype=np.float32)
    base = cal.rss_bytes()
    with cal.MemoryWatch(None, interval=0.005) as watch:
        q.quantize_int8(fp32, tmp_path / "int8.onnx", calib, q.Recipe.parse("u8-percentile"))
    grew = watch.peak - base
    assert grew < 60e6, f"calibration grew RSS by {grew / 1e6:.0f} MB"
    assert (tmp_path / "int8.onnx").stat().st_size > 0


def test_reader_strides_of_any_length():
    """quantize_static calls set_range(i, i + 1) for i < len(reader): each unit is `per_stride` batches,
    the last one shorter, and together they are every batch once."""
    x = np.arange(29, dtype=np.float32).reshape(29, 1)
    r = q._Reader({"x": x}, {"x": np.float32}, batch=1, per_stride=4)
    assert len(r) == 8
    seen = []
    for i in range(len(r)):
        r.set_range(i, i + 1)
        while (b := r.get_next()) is not None:
            seen.append(float(b["x"][0, 0]))
    assert seen == list(range(29))



def test_calibration_session_is_lean_and_changes_nothing(tmp_path, monkeypatch):
    """onnxruntime's calibration session (every calibrated tensor as an extra output or reduced by
    an added ReduceMin/Max, unoptimised) planned one block for all of them with its default memory
    pattern: +1.7 GB for one input of an 800x608 detector (PicoDet, MinMax), +0.85 GB without the
    pattern and arena. quantize_int8 builds it without them; the quantized file is the same bytes."""
    import contextlib

    from onnxruntime.quantization.calibrate import CalibraterBase, MinMaxCalibrater

    fp32 = _pointwise_net(tmp_path / "m.onnx")
    original = CalibraterBase.create_inference_session
    with q._lean_calibration():
        c = MinMaxCalibrater(str(fp32), augmented_model_path=str(tmp_path / "aug.onnx"))
        c.augment_graph()
        c.create_inference_session()
        opts = c.infer_session.get_session_options()
        assert not opts.enable_mem_pattern and not opts.enable_cpu_mem_arena
        # MinMax's ReduceMin/Max nodes come last in the graph: the default order ran them after the whole
        # model, keeping every intermediate tensor alive (PP-OCR's recogniser: 693 vs 213 MB peak)
        assert opts.execution_order == ort.ExecutionOrder.PRIORITY_BASED
    assert CalibraterBase.create_inference_session is original  # put back after the block

    calib = RNG.random((8, 3, 32, 32), dtype=np.float32)
    for recipe in ("u8-percentile", "u8-minmax"):
        q.quantize_int8(fp32, tmp_path / "lean.onnx", calib, q.Recipe.parse(recipe))
        with monkeypatch.context() as m:
            m.setattr(q, "_lean_calibration", contextlib.nullcontext)
            q.quantize_int8(fp32, tmp_path / "default.onnx", calib, q.Recipe.parse(recipe))
        assert (tmp_path / "lean.onnx").read_bytes() == (tmp_path / "default.onnx").read_bytes(), recipe


def test_quantizer_rewiring_is_linear_and_changes_nothing(tmp_path, monkeypatch):
    """onnxruntime's QDQ quantizer called a Python function on every node for every quantized tensor
    (898,000 calls, 1.7 s of PP-OCR's recogniser's two candidates): for quantize_int8 it visits only the
    nodes that read the tensor, rewires the same inputs (the same file's bytes), and is put back after."""
    import contextlib

    from onnxruntime.quantization.onnx_model import ONNXModel

    fp32 = _pointwise_net(tmp_path / "m.onnx")
    original = ONNXModel.replace_input_of_all_nodes
    visits = {"n": 0}
    real = ONNXModel.replace_node_input

    def counted(node, old, new):
        visits["n"] += 1
        real(node, old, new)

    calib = RNG.random((8, 3, 32, 32), dtype=np.float32)
    counts = []
    for rewiring in (q._linear_rewiring, contextlib.nullcontext):
        with monkeypatch.context() as m:
            m.setattr(q, "_linear_rewiring", rewiring)
            m.setattr(ONNXModel, "replace_node_input", staticmethod(counted))
            visits["n"] = 0
            q.quantize_int8(fp32, tmp_path / f"{rewiring.__name__}.onnx", calib, q.Recipe.parse("s8-minmax"))
            counts.append(visits["n"])
    assert ONNXModel.replace_input_of_all_nodes is original
    nodes = len(onnx.load(str(fp32)).graph.node)
    assert counts[0] < counts[1] and counts[1] >= 3 * nodes, counts  # (every node, for each tensor, before)
    assert (tmp_path / "_linear_rewiring.onnx").read_bytes() == (tmp_path / "nullcontext.onnx").read_bytes()


def test_weights_are_quantized_once_for_every_candidate_and_the_files_are_the_same(tmp_path, monkeypatch):
    """Each onnxruntime candidate quantized the same weights the same way again (0.7-0.9 s of each of PP-OCR
    rec's candidates). Within quantize_int8 a second candidate reuses the first's channel parameters and int8
    weights (weight_memo), its file is byte-identical to one quantized without the memo, and onnxruntime's
    own functions are back after the block."""
    import contextlib

    from onnxruntime.quantization import qdq_quantizer

    from lepton_edge.compress import weight_memo

    fp32 = _pointwise_net(tmp_path / "m.onnx", width=24, layers=4)
    calib = RNG.random((8, 3, 32, 32), dtype=np.float32)
    real_params, real_init = qdq_quantizer.compute_data_quant_params, qdq_quantizer.quantize_onnx_initializer
    calls = {"params": 0, "init": 0}

    def params(*a, **k):
        calls["params"] += 1
        return real_params(*a, **k)

    def init(*a, **k):
        calls["init"] += 1
        return real_init(*a, **k)

    monkeypatch.setattr(qdq_quantizer, "compute_data_quant_params", params)
    monkeypatch.setattr(qdq_quantizer, "quantize_onnx_initializer", init)
    weight_memo.forget()
    seen = []
    with weight_memo.kept_for_the_search():  # (as exporters/base.py holds it around the recipe search)
        for name in ("u8-minmax", "u8-percentile", "s8-minmax"):
            before = dict(calls)
            q.quantize_int8(fp32, tmp_path / f"{name}.onnx", calib, q.Recipe.parse(name))
            seen.append({k: calls[k] - before[k] for k in calls})
        assert weight_memo._kept  # kept between the candidates
    assert not weight_memo._kept  # and gone after the search
    # one int8 array per weight; no per-channel call: compress/channel_params computes every channel at once
    assert seen[0]["params"] == 0 and seen[0]["init"] == 4, seen
    assert seen[1] == seen[2] == {"params": 0, "init": 0}, seen  # the same weights: nothing computed again
    assert qdq_quantizer.compute_data_quant_params is params and qdq_quantizer.quantize_onnx_initializer is init
    before = dict(calls)
    q.quantize_int8(fp32, tmp_path / "alone.onnx", calib, q.Recipe.parse("u8-minmax"))  # no search: none kept
    assert calls["init"] - before["init"] == 4 and not weight_memo._kept

    monkeypatch.setattr(weight_memo, "remembered_weights", contextlib.nullcontext)
    for name in ("u8-percentile", "s8-minmax"):
        q.quantize_int8(fp32, tmp_path / f"{name}-plain.onnx", calib, q.Recipe.parse(name))
        assert (tmp_path / f"{name}-plain.onnx").read_bytes() == (tmp_path / f"{name}.onnx").read_bytes(), name
    weight_memo.forget()


def test_search_time_stops_a_calibration_once_a_candidate_passed():
    """--search-time used to stop only new candidates: one histogram calibration of an 800x608
    detector ran 6 minutes past a 3-minute budget. Past the budget, with a passing candidate in
    hand, the calibration's check stops it; with none, the candidate completes."""
    import time

    from lepton_edge.exporters import recipes

    d = recipes._Deadline(time.perf_counter() - 10.0, 5.0)
    d.check()  # over time, but nothing passed yet: go on
    d.best = "nncf-default"
    with pytest.raises(recipes.SearchTimeSpent, match="--search-time 5 s spent.*nncf-default passed"):
        d.check()
    recipes._Deadline(time.perf_counter(), 60.0).check()  # within the budget: go on


def test_minmax_batches_are_bounded_by_activation_bytes(tmp_path, monkeypatch):
    """onnxruntime's MinMax session keeps a batch's intermediate tensors until their ReduceMin/Max
    run: PP-OCR's recogniser peaked at 2.3 GB in batches of 5, 0.7 GB in batches of 1. The
    calibration batch is now bounded by the activations shape inference estimates, not the input
    bytes alone (CALIBRATION_BATCH_BYTES: that session runs each reduction early, so the bound is
    looser than a whole run's); the reader that quantize_static gets says which batch it used."""
    model = _pointwise_net(tmp_path / "m.onnx", hw=(32, 32), width=64, layers=3)  # 64x32x32x4 x 6 = 1.5 MB/sample
    seen = []
    original = q._Reader.__init__

    def spy(self, feeds, dtypes, batch, *a, **kw):
        seen.append(batch)
        original(self, feeds, dtypes, batch, *a, **kw)

    monkeypatch.setattr(q._Reader, "__init__", spy)
    calib = RNG.random((32, 3, 32, 32), dtype=np.float32)
    q.quantize_int8(model, tmp_path / "a.onnx", calib, q.Recipe.parse("u8-minmax"))
    assert seen == [16]  # 12 KB inputs, 1.5 MB of activations each: the old bound (16) holds
    monkeypatch.setattr(q, "CALIBRATION_BATCH_BYTES", 4 << 20)
    q.quantize_int8(model, tmp_path / "b.onnx", calib, q.Recipe.parse("u8-minmax"))
    assert seen[1] == 2, seen  # 4 MB of activations per batch: 2 inputs of 1.5 MB
    per_sample = q._activation_bytes(onnx.load(str(model)), {"x": calib[:1]})
    assert 1 << 20 < per_sample < 4 << 20


def test_batch_size_by_activation_bytes():
    """Unit: the cap is the tighter of the input-bytes bound and the activation bound, a divisor of
    the sample count, at least 1; a graph's fixed batch always wins."""
    feeds = {"x": np.zeros((30, 3, 8, 8), np.float32)}
    model = onnx.load_from_string(helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                      ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, 8, 8])])).SerializeToString())
    assert q._batch_size(model, feeds) == 15  # divisors of 30 up to 16
    assert q._batch_size(model, feeds, q.ACTIVATION_BATCH_BYTES // 7) == 6
    assert q._batch_size(model, feeds, q.ACTIVATION_BATCH_BYTES * 3) == 1
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    assert q._batch_size(model, feeds, q.ACTIVATION_BATCH_BYTES * 3) == 4


def _wide_output_net(path: Path, per_input_floats: int) -> Path:
    """x [N,3,16,16] -> its mean, expanded to [N, per_input_floats]: a tiny graph whose outputs are large
    (a dense map of a large input, a stack of feature maps), the reference outputs' worst case."""
    nodes = [helper.make_node("Flatten", ["x"], ["f"], axis=1),
             helper.make_node("ReduceMean", ["f"], ["m"], axes=[1], keepdims=1),
             helper.make_node("Expand", ["m", "shape"], ["y"])]
    shape = numpy_helper.from_array(np.array([1, per_input_floats], np.int64), "shape")
    graph = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", per_input_floats])], [shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_outputs_the_memory_budget_cannot_hold_are_refused_before_the_reference(tmp_path):
    """The fp32 reference's outputs on every validation input were held, past --max-memory: a model of 64 MB
    of outputs an input took 23 GB until the kernel's OOM killer ended it. Now one line, before any is held."""
    model = _wide_output_net(tmp_path / "wide.onnx", 4 << 20)  # 16 MiB of outputs an input
    np.save(tmp_path / "calib.npy", RNG.random((80, 3, 16, 16), dtype=np.float32))
    measured = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
                "print('maxrss', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, file=sys.stderr); "
                "sys.exit(r.returncode)")
    p = subprocess.run([sys.executable, "-c", measured, sys.executable, "-m", "lepton_edge.cli", "export",
                        str(model), "--precision", "fp32", "--calib", str(tmp_path / "calib.npy"), "--max-memory",
                        "1GB", "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    lines = p.stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert p.returncode == 1 and len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert errors[0].startswith("error: the model's outputs take 16.78 MB an input: validating on 8 inputs needs")
    assert "(1.00 GB, --max-memory): give it more, or export a model with smaller outputs" in errors[0]
    assert int(lines[-1].split()[1]) < 1e9 and not (tmp_path / "out").exists()


def test_validation_inputs_are_cut_to_what_the_memory_budget_holds(tmp_path):
    """Between refusing and holding everything: the first inputs whose outputs fit are validated on, and the
    manifest says so (its samples, and why)."""
    import lepton_edge
    from lepton_edge.exporters import validation as val

    model = _wide_output_net(tmp_path / "wide.onnx", 1 << 18)  # 1 MiB of outputs an input
    np.save(tmp_path / "calib.npy", RNG.random((80, 3, 16, 16), dtype=np.float32))
    budget = cal.rss_bytes() + val.SEARCH_MARGIN + val.OUTPUT_COPIES * (1 << 20) * 20 + (8 << 20)
    r = lepton_edge.export(str(model), target="x86-cpu", precision="fp32", calib=str(tmp_path / "calib.npy"),
                           out=str(tmp_path / "out"), max_memory=budget, task="raw", measure_latency=False)
    inputs = r.manifest.validation["inputs"]
    assert val.MIN_CHECK_INPUTS <= inputs["validation"]["samples"] < 64, inputs
    assert inputs["validation_inputs"].endswith(f"(the first {inputs['validation']['samples']}: the outputs of "
                                                "more would not fit the memory budget)"), inputs
