"""Budgets a hostile (or merely slow) model cannot spend past, each one line and exit 2, on the real engines
with models built here: the memory one run may take (onnxruntime and LiteRT), `bench`'s whole time, a
manifest whose normalisation overflows float32, and the exit code of a run ended at its time limit (2 on
both engines: LiteRT's, ended by runtime/hard_stop.py, was 1)."""
from __future__ import annotations

import json
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T, helper as h, numpy_helper as nh

from conftest import run_cli
from test_hostile_model_files import _bundle
from test_hostile_onnx_files import _endless_loop, _one_line, _v

BUDGET_MIB = "200"  # what the memory tests let a run take: the process ends near it, well under 1 GB


def _frames(tmp_path, side=32):
    import cv2

    d = tmp_path / "frames"
    d.mkdir(exist_ok=True)
    for i in range(2):
        cv2.imwrite(str(d / f"{i}.png"), np.full((side, side, 3), 60 * i, np.uint8))
    return d


def _growing_onnx(path, iters=400, copies=85, side=512):
    """A 600-byte graph whose one run grows the process by ~0.8 GB over a second or two: a Loop whose body
    multiplies side x side matrices (time) and Expands x to `copies` copies (1 MB) into a scan output, which
    keeps every iteration's; then the mean of it all."""
    body = h.make_graph([h.make_node("Identity", ["c_in"], ["c_out"]), h.make_node("MatMul", ["v_in", "W"], ["v_out"]),
                         h.make_node("Expand", ["x", "big"], ["s"])], "body",
                        [_v("i", [], T.INT64), _v("c_in", [], T.BOOL), _v("v_in", [side, side])],
                        [_v("c_out", [], T.BOOL), _v("v_out", [side, side]), _v("s", [copies, 3, 32, 32])])

    def fill(name):
        return h.make_node("ConstantOfShape", ["sq"], [name], value=h.make_tensor("f", T.FLOAT, [1], [1e-3]))

    nodes = [fill("v0"), fill("W"), h.make_node("Loop", ["M", "cond", "v0"], ["vz", "scan"], body=body),
             h.make_node("ReduceMean", ["scan"], ["y"], keepdims=1)]
    inits = [nh.from_array(np.array([side, side], np.int64), "sq"), nh.from_array(np.array(True), "cond"),
             nh.from_array(np.array(iters, np.int64), "M"),
             nh.from_array(np.array([copies, 3, 32, 32], np.int64), "big")]
    m = h.make_model(h.make_graph(nodes, "g", [_v("x", [1, 3, 32, 32])], [_v("y", [1, 1, 1, 1, 1])], inits),
                     opset_imports=[h.make_opsetid("", 13)], ir_version=8)
    onnx.save(m, str(path))
    return path


def _while_tflite(path, chunks: int = 0):
    """x [1,8,8,3] -> MEAN -> y [1,3], beside a WHILE over i < limit. chunks=0: i never changes, a loop that
    never ends. chunks > 0: it ends after `chunks` iterations, each appending 21 MB (x tiled) to a loop
    variable: LiteRT allocates it during the run (its size changes), ~0.25 GB by the end."""
    from ai_edge_litert import schema_py_generated as s
    from ai_edge_litert.tools import flatbuffer_utils as fu

    B, F, I32, BOOL = s.BuiltinOperator, s.TensorType.FLOAT32, s.TensorType.INT32, s.TensorType.BOOL
    m = s.ModelT()
    m.version, m.buffers, m.operatorCodes = 3, [s.BufferT()], []
    codes: dict[int, int] = {}

    def graph(name, tensors, ops, ins, outs):
        g = s.SubGraphT()
        g.name, g.tensors, g.inputs, g.outputs, g.operators = name, [], ins, outs, []
        for tname, shape, ttype, data in tensors:  # a -1 dim: a size that changes from one iteration to the next
            t = s.TensorT()
            t.name, t.type, t.buffer = tname, ttype, 0
            t.shape, t.shapeSignature = [192 if d == -1 else d for d in shape], list(shape)
            if data is not None:
                b = s.BufferT()
                b.data = np.frombuffer(np.asarray(data).tobytes(), np.uint8)
                m.buffers.append(b)
                t.buffer = len(m.buffers) - 1
            g.tensors.append(t)
        for op, i, o, opt_type, opt in ops:
            if op not in codes:
                oc = s.OperatorCodeT()
                oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = op, min(op, 127), 1
                m.operatorCodes.append(oc)
                codes[op] = len(m.operatorCodes) - 1
            x = s.OperatorT()
            x.opcodeIndex, x.inputs, x.outputs = codes[op], i, o
            x.builtinOptionsType, x.builtinOptions = opt_type or 0, opt
            g.operators.append(x)
        return g

    red, loop, cat = s.ReducerOptionsT(), s.WhileOptionsT(), s.ConcatenationOptionsT()
    red.keepDims, loop.condSubgraphIndex, loop.bodySubgraphIndex, cat.axis = False, 1, 2, 0
    n = 192 * (5_242_880 // 192)  # one chunk's values
    main = [("x", [1, 8, 8, 3], F, None), ("axes", [2], I32, np.array([1, 2], np.int32)), ("y", [1, 3], F, None),
            ("i0", [], I32, np.array(0, np.int32)), ("i_end", [], I32, None)]
    ops = [(B.MEAN, [0, 1], [2], s.BuiltinOptions.ReducerOptions, red)]
    if not chunks:
        ops.append((B.WHILE, [3], [4], s.BuiltinOptions.WhileOptions, loop))
        cond = graph("cond", [("i", [], I32, None), ("lim", [], I32, np.array(1, np.int32)), ("go", [], BOOL, None)],
                     [(B.LESS, [0, 1], [2], None, None)], [0], [2])
        body = graph("body", [("i", [], I32, None), ("zero", [], I32, np.array(0, np.int32)), ("i2", [], I32, None)],
                     [(B.ADD, [0, 1], [2], None, None)], [0], [2])
    else:
        main += [("flat_shape", [1], I32, np.array([192], np.int32)), ("flat", [192], F, None),
                 ("mult", [1], I32, np.array([n // 192], np.int32)), ("chunk", [n], F, None), ("v_end", [-1], F, None),
                 ("c_end", [n], F, None)]
        ops += [(B.RESHAPE, [0, 5], [6], None, None), (B.TILE, [6, 7], [8], None, None),
                (B.WHILE, [3, 6, 8], [4, 9, 10], s.BuiltinOptions.WhileOptions, loop)]
        state = [("i", [], I32, None), ("v", [-1], F, None), ("c", [n], F, None)]
        cond = graph("cond", [*state, ("lim", [], I32, np.array(chunks, np.int32)), ("go", [], BOOL, None)],
                     [(B.LESS, [0, 3], [4], None, None)], [0, 1, 2], [4])
        body = graph("body", [*state, ("one", [], I32, np.array(1, np.int32)), ("i2", [], I32, None),
                              ("v2", [-1], F, None), ("c2", [n], F, None), ("zero", [1], F, np.zeros(1, np.float32))],
                     [(B.ADD, [0, 3], [4], None, None),
                      (B.CONCATENATION, [1, 2], [5], s.BuiltinOptions.ConcatenationOptions, cat),
                      (B.ADD, [2, 7], [6], None, None)], [0, 1, 2], [4, 5, 6])
    m.subgraphs = [graph("main", main, ops, [0], [2, 4]), cond, body]
    path.write_bytes(bytes(fu.convert_object_to_bytearray(m)))
    return path


def _error_lines(r) -> list[str]:
    return [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]


def test_a_run_that_grows_past_its_memory_budget_ends_in_one_line_on_both_engines(tmp_path):
    """A 600-byte ONNX graph whose one run grows the process by ~0.8 GB (3 GB in the wild: Expand and
    ConstantOfShape of a small input), and a .tflite whose WHILE loop does the same: both ran and finished,
    however little memory the device had. Now a run is held to max_run_bytes (`run --max-run-mib`; by
    default max(2 GiB, 12x the model's files), the load's budget): past it the process ends, one line, exit 2."""
    from lepton_edge.runtime import Runtime, hard_stop

    frames = _frames(tmp_path)
    onnx_model = _growing_onnx(tmp_path / "grow.onnx")
    rt = Runtime.load(onnx_model, task="raw")
    assert rt.backend._clock.max_growth == hard_stop.growth_budget(onnx_model) == 2 << 30  # the default
    for model in (onnx_model, _while_tflite(tmp_path / "grow.tflite", chunks=12)):
        t0 = time.monotonic()
        r = run_cli("run", str(model), "--source", str(frames), "--no-show", "--task", "raw",
                    "--max-run-mib", BUDGET_MIB, timeout=120)
        _one_line(r, f"run of {model.name!r} grew this process by", f"past its budget of {BUDGET_MIB} MiB for one run")
        assert len(_error_lines(r)) == 1 and time.monotonic() - t0 < 60, r.stderr[-1500:]


def test_a_run_past_its_time_limit_exits_2_on_either_engine(tmp_path):
    """`run --max-run-s` on a model whose one inference never ends: onnxruntime stops the run and `run`
    ends with a BadInput (exit 2, as every model that cannot be run); LiteRT cannot stop an invoke, so
    hard_stop ends the process, and it exited 1, as if a check had failed (cli.py: 1 a check failed, 2 bad
    input). Both say one line and exit 2 now."""
    frames = _frames(tmp_path, side=8)
    said = {"loop.onnx": "one run of the model took over 1 s and was stopped",
            "loop.tflite": "a LiteRT run of 'loop.tflite' did not finish in 1 s, and the engine cannot be stopped"}
    for model in (_endless_loop(tmp_path / "loop.onnx"), _while_tflite(tmp_path / "loop.tflite")):
        t0 = time.monotonic()
        r = run_cli("run", str(model), "--source", str(frames), "--no-show", "--task", "raw", "--max-run-s", "1",
                    timeout=60)
        _one_line(r, said[model.name])
        assert len(_error_lines(r)) == 1 and time.monotonic() - t0 < 30, r.stderr[-1500:]


def test_bench_ends_at_its_time_budget_in_one_line(tmp_path):
    """`bench` had no time budget: a model whose runs take minutes (here one that never ends, stopped at
    onnxruntime's 120 s a run) held it for hours. `--max-time` (900 s by default) ends it with one line."""
    model = _endless_loop(tmp_path / "loop.onnx")
    t0 = time.monotonic()
    r = run_cli("bench", str(model), "--runs", "2", "--warmup", "0", "--max-time", "8", timeout=100)
    _one_line(r, "bench's time budget of 8 s ran out", "--max-time")
    assert len(_error_lines(r)) == 1 and time.monotonic() - t0 < 40, r.stderr[-1500:]
    _one_line(run_cli("bench", str(model), "--max-time", "0", timeout=60), "--max-time must be a positive number")
    from lepton_edge import bench
    from lepton_edge.errors import BadInput

    slow = _growing_onnx(tmp_path / "slow.onnx", iters=20, copies=1)  # ~0.3 s a run: in process, between two runs
    t0 = time.monotonic()
    with pytest.raises(BadInput, match="bench's time budget of 2 s ran out"):
        bench.compare([str(slow)], [1], runs=100, warmup=0, isolate=False, max_s=2)
    assert time.monotonic() - t0 < 20


def test_a_normalisation_that_overflows_float32_is_refused_when_the_bundle_loads(tmp_path):
    """mean, std and scale each fit a float32, but (pixel * scale - mean) / std need not: std=1e-30 with
    mean=1e10, or mean=3e38 with std=0.5, fed the model inf for every pixel, and it ran. Refused at load
    now, one line naming the values (as a manifest, as --input-spec)."""
    from lepton_edge.bundle import Bundle
    from lepton_edge.errors import BadInput

    frames = _frames(tmp_path, side=8)
    for name, mean, std in [("tiny-std", [1e10], [1e-30]), ("huge-mean", [3e38], [0.5]),
                            ("one-channel", [0.5, 3e38, 0.5], [0.5, 0.5, 0.5])]:
        b = _bundle(tmp_path / name)
        man = json.loads((b / "manifest.json").read_text())
        man["inputs"][0].update(mean=mean, std=std)
        (b / "manifest.json").write_text(json.dumps(man))  # (manifest.json is not among its own checksummed files)
        try:
            Bundle.load(b)
            raise AssertionError(f"{name}: loaded")
        except BadInput as e:
            assert "past float32's range" in str(e) and "\n" not in str(e), str(e)
        _one_line(run_cli("run", str(b), "--source", str(frames), "--no-show"), "past float32's range")
    good = _bundle(tmp_path / "good")
    from lepton_edge.bundle import normalisation_overflow

    # a float16 input holds the normalised pixels, not scale / std times 255: 1/0.002*255 is past float16's range,
    # (255 - 128) / 0.002 is not
    assert normalisation_overflow(1.0, [128.0], [0.002], "float16") is None
    assert "past float16's range" in normalisation_overflow(1.0, [0.0], [0.002], "float16")
    _one_line(run_cli("run", str(good), "--source", str(frames), "--no-show", "--input-spec", "mean=1e10;std=1e-30"),
              "--input-spec", "past float32's range")
    r = run_cli("run", str(good), "--source", str(frames), "--no-show", "--input-spec", "mean=0.5;std=0.25")
    assert r.returncode == 0, r.stderr[-1500:]


def test_a_model_loaded_while_another_runs_is_not_charged_to_its_run(tmp_path):
    """The agent loads a deployed bundle in its deploy thread while the old model's pipeline runs: the old
    model's run budget was charged the new model's load (its baseline, taken between runs, was stale while
    it ran back to back), and the process ended on a legitimate deploy. A load is watched by its own limits."""
    import subprocess
    import sys

    side = 8960  # a 306 MiB weight in the new model, past the old model's run budget
    w = nh.from_array(np.full((side, side), 1e-3, np.float32), "W")
    (tmp_path / "new").mkdir()
    onnx.save(h.make_model(h.make_graph([h.make_node("MatMul", ["x", "W"], ["y"])], "new", [_v("x", [1, side])],
                                        [_v("y", [1, side])], [w]), opset_imports=[h.make_opsetid("", 13)],
                           ir_version=8), str(tmp_path / "new" / "new.onnx"))
    (tmp_path / "old").mkdir()
    old = _growing_onnx(tmp_path / "old" / "old.onnx", iters=4, copies=1)  # ~0.1 s a run, run back to back
    code = f"""
import threading, time, numpy as np
from lepton_edge.runtime.backend import backend_for
old = backend_for("onnx").open({str(old)!r}, threads=1, max_run_bytes=256 << 20)
x = np.ones((1, 3, 32, 32), np.float32)
threading.Thread(target=lambda: [old.run(x) for _ in iter(int, 1)], daemon=True).start()
time.sleep(1.0)
new = backend_for("onnx").open({str(tmp_path / "new" / "new.onnx")!r}, threads=1, max_run_bytes=256 << 20)
time.sleep(1.0)
print("deployed", flush=True)
import os; os._exit(0)  # (the old model's thread is inside onnxruntime: no interpreter shutdown under it)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "deployed", p.stderr[-1500:]


def test_bench_keeps_what_it_measured_and_any_time_budget_works(tmp_path):
    """Past --max-time, the rows measured before were lost with the table (a long comparison on a slow board
    printed one line); a budget past poll()'s 24.8 days was a traceback; a child ended at its run limit was
    blamed as a crash of the engine."""
    from lepton_edge import bench

    fast = _growing_onnx(tmp_path / "fast.onnx", iters=1, copies=1)
    model = _endless_loop(tmp_path / "loop.onnx")
    r = run_cli("bench", str(fast), str(model), "--runs", "2", "--warmup", "0", "--max-time", "20", timeout=120)
    _one_line(r, "bench's time budget of 20 s ran out")
    assert "(incomplete)" in r.stdout and "fast.onnx" in r.stdout, r.stdout[-1500:]
    r = run_cli("bench", str(fast), "--runs", "2", "--warmup", "0", "--max-time", "1e9", timeout=120)
    assert r.returncode == 0 and "fast.onnx" in r.stdout and "Traceback" not in r.stderr, r.stderr[-1500:]
    grows = _growing_onnx(tmp_path / "grows.onnx")
    rows = bench.compare([str(grows)], [1], runs=1, warmup=0, max_run_bytes=200 << 20)
    assert rows[0]["error"].startswith("a run went past its time or memory limit"), rows
