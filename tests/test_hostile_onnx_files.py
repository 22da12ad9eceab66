"""ONNX files built to break `export`, `inspect` and the runtime, each one line (exit 2), never a
traceback, a hang or the whole file in memory: a Loop that never ends, models onnxruntime loads but
cannot run on the export's inputs, inputs that are not images, a sparse file named .onnx, and names
that carry terminal escapes."""
from __future__ import annotations

import os
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T, helper as h, numpy_helper as nh

from conftest import run_cli
from lepton_edge.errors import BadInput
from lepton_edge.runtime.onnx import OnnxBackend

X = h.make_tensor_value_info("x", T.FLOAT, [1, 3, 32, 32])


def _v(name, shape, elem=T.FLOAT):
    return h.make_tensor_value_info(name, elem, shape)


def _save(path, nodes, ins, outs, inits=(), opset=13, **model_fields):
    m = h.make_model(h.make_graph(nodes, "g", ins, outs, list(inits)), opset_imports=[h.make_opsetid("", opset)],
                     ir_version=8)
    for k, v in model_fields.items():
        setattr(m, k, v)
    onnx.save(m, str(path))
    return path


def _conv(x="x"):
    w = nh.from_array(np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32), "W")
    return h.make_node("Conv", [x, "W"], ["y"], pads=[1, 1, 1, 1]), w


def _endless_loop(path):
    conv, w = _conv()
    body = h.make_graph([h.make_node("Identity", ["c_in"], ["c_out"]), h.make_node("Identity", ["v_in"], ["v_out"])],
                        "body", [_v("i", [], T.INT64), _v("c_in", [], T.BOOL), _v("v_in", [1, 8, 32, 32])],
                        [_v("c_out", [], T.BOOL), _v("v_out", [1, 8, 32, 32])])
    inits = [w, nh.from_array(np.array(True), "cond"), nh.from_array(np.array(2 ** 62, np.int64), "M")]
    return _save(path, [conv, h.make_node("Loop", ["M", "cond", "y"], ["z"], body=body)], [X],
                 [_v("z", [1, 8, 32, 32])], inits)


def test_a_run_that_never_ends_is_stopped_at_its_time_limit(tmp_path):
    """A Loop of 2^62 iterations ran forever (deaf to Ctrl-C, its memory growing with a scan output);
    onnxruntime stops it at the backend's per-run limit, and the next run still works."""
    b = OnnxBackend.open(_endless_loop(tmp_path / "loop.onnx"), max_run_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(BadInput, match="took over 1 s and was stopped"):
        b.run(np.zeros((1, 3, 32, 32), np.float32))
    assert time.monotonic() - t0 < 30
    conv, w = _conv()
    ok = OnnxBackend.open(_save(tmp_path / "conv.onnx", [conv], [X], [_v("y", [1, 8, 32, 32])], [w]), max_run_s=1.0)
    assert ok.run(np.zeros((1, 3, 32, 32), np.float32))[0].shape == (1, 8, 32, 32)



def test_run_stops_an_endless_model_at_max_run_s_in_one_line(tmp_path):
    """`lepton-edge run --max-run-s`: the limit a user sets for one inference (120 s by default), one line
    past it, and a limit that is not a positive number of seconds refused before anything loads."""
    import cv2

    loop = _endless_loop(tmp_path / "loop.onnx")
    frames = tmp_path / "frames"
    frames.mkdir()
    cv2.imwrite(str(frames / "a.png"), np.full((32, 32, 3), 128, np.uint8))
    t0 = time.monotonic()
    r = run_cli("run", str(loop), "--source", str(frames), "--no-show", "--max-run-s", "1", timeout=60)
    _one_line(r, "took over 1 s and was stopped")
    assert time.monotonic() - t0 < 45
    for bad in ("0", "-3", "nan", "inf"):
        _one_line(run_cli("run", str(loop), "--source", str(frames), "--no-show", "--max-run-s", bad, timeout=30),
                  "max_run_s")


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_stops_a_run_stuck_in_one_inference_at_once(tmp_path, sig):
    """Ctrl-C (or SIGTERM) while the model is inside one long inference: `run` stops within seconds with
    its summary marked interrupted (exit 0, as a run stopped between frames), not that the model took too
    long, nor that no frame could be read. It used to wait for the run's limit
    (--max-run-s, 120 s by default): Python runs a signal's handler only between bytecodes, and the main
    thread was inside onnxruntime's run."""
    import signal
    import subprocess
    import sys

    import cv2

    loop = _endless_loop(tmp_path / "loop.onnx")
    frames = tmp_path / "frames"
    frames.mkdir()
    cv2.imwrite(str(frames / "a.png"), np.full((32, 32, 3), 128, np.uint8))
    exe = os.path.join(os.path.dirname(sys.executable), "lepton-edge")
    # started as from a terminal, SIGINT at its default: a shell's background job (CI's `nohup ... &`)
    # hands its children SIGINT ignored, and a process that ignores Ctrl-C cannot show how it stops
    p = subprocess.Popen([sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                          "os.execv(sys.argv[1], sys.argv[1:])", exe, "run", str(loop), "--source", str(frames),
                          "--no-show"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "COLUMNS": "160"})
    try:
        time.sleep(6)  # loaded, and inside the endless run (the default limit is 120 s)
        assert p.poll() is None
        t0 = time.monotonic()
        p.send_signal(getattr(signal, sig))
        out, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert time.monotonic() - t0 < 15, err[-1500:]
    said = out + err
    assert p.returncode == 0 and "(interrupted)" in said and "took over" not in said and "Traceback" not in said \
        and "no frame could be read" not in said, (p.returncode, said[-1500:])


def test_sigterm_stops_an_export_whose_model_never_ends_at_once(tmp_path):
    """A service stop or a `timeout` while the export runs the model on its data: the export stops within
    seconds, says 'interrupted' (exit 130) and leaves no work folder and no bundle. It used to wait for the
    run's 600 s limit: the export never had the signal stop its onnxruntime runs, as `run` does."""
    import signal
    import subprocess
    import sys

    loop = _endless_loop(tmp_path / "loop.onnx")
    work = tmp_path / "tmp"
    work.mkdir()
    exe = os.path.join(os.path.dirname(sys.executable), "lepton-edge")
    p = subprocess.Popen([exe, "export", str(loop), "--precision", "fp32", "--out", str(tmp_path / "out")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "COLUMNS": "160", "TMPDIR": str(work)})
    try:
        deadline = time.monotonic() + 60  # loaded, and inside the endless run on its first input
        while time.monotonic() < deadline and not any(work.glob("lepton-export-*/fp32.onnx")):
            time.sleep(0.2)
        time.sleep(4)
        assert p.poll() is None, p.communicate()
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert time.monotonic() - t0 < 15, err[-1500:]
    assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err, (p.returncode, err[-1500:])
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("manifest.json"))
    assert not list(work.glob("lepton-export-*"))


def test_an_interrupt_mark_never_outlives_its_run(tmp_path):
    """A run that finished before the interrupt reached it must not leave its mark behind: the id of its
    RunOptions may come back on a later one, whose unrelated failure would then read as Ctrl-C."""
    conv, w = _conv()
    b = OnnxBackend.open(_save(tmp_path / "conv.onnx", [conv], [X], [_v("y", [1, 8, 32, 32])], [w]))
    watch = b._watch
    ro = watch.begin()
    watch.interrupt()  # the run in progress is marked...
    watch.end(ro)  # ...and ends on its own
    assert not watch.interrupted(ro) and not watch._interrupted
    assert b.run(np.zeros((1, 3, 32, 32), np.float32))[0].shape == (1, 8, 32, 32)


def _one_line(r, *words):
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-1500:]
    assert all(w in r.stderr for w in words), r.stderr[-1500:]


def test_models_the_engine_cannot_run_on_the_exports_inputs_are_one_line(tmp_path):
    """onnxruntime loads each, then fails at the first fp32 run: that was a Rich traceback. (A uint8 input was
    one, fed float32 random inputs: those are now uint8 pixels, and it exports: test_reference_sanity.py.)"""
    cases = {
        "zero-dim": ([h.make_node("Neg", ["x"], ["y"])], [_v("x", [1, 3, 0, 32])], [_v("y", [1, 3, 0, 32])], [],
                     ""),
        "no-outputs": ([_conv()[0]], [X], [], [_conv()[1]], ""),
        "infinite": ([h.make_node("Add", ["x", "inf"], ["y"])], [X], [_v("y", [1, 3, 32, 32])],
                     [nh.from_array(np.array(np.inf, np.float32), "inf")], "infinite everywhere"),
    }
    for name, (nodes, ins, outs, inits, words) in cases.items():
        m = _save(tmp_path / f"{name}.onnx", nodes, ins, outs, inits)
        r = run_cli("export", str(m), "--precision", "fp32", "--target", "x86-cpu", "--out", str(tmp_path / name))
        _one_line(r, words)


def test_inputs_that_are_not_images_and_files_that_are_not_models_are_one_line(tmp_path):
    scalar = _save(tmp_path / "scalar.onnx", [h.make_node("Neg", ["x"], ["y"])], [_v("x", [])], [_v("y", [])])
    vector = _save(tmp_path / "vector.onnx", [h.make_node("Neg", ["x"], ["y"])], [_v("x", [5])], [_v("y", [5])])
    for m in (scalar, vector):
        _one_line(run_cli("export", str(m), "--precision", "fp32", "--out", str(tmp_path / "o")), "not an image")
    sparse = tmp_path / "sparse.onnx"
    with open(sparse, "wb") as f:
        f.truncate(3 << 30)  # a hole of 3 GB: read whole by onnx.load before
    for verb in (("inspect", str(sparse)), ("export", str(sparse), "--precision", "fp32", "--out", str(tmp_path))):
        _one_line(run_cli(*verb, timeout=60), "over the 2,147,483,648 an ONNX file can be")
    fifo = tmp_path / "fifo.onnx"
    os.mkfifo(fifo)
    _one_line(run_cli("run", str(fifo), "--source", str(tmp_path), "--no-show", timeout=30), "not a regular file")
    zeros = tmp_path / "zeros.onnx"
    zeros.write_bytes(bytes(4096))
    _one_line(run_cli("inspect", str(zeros)), "starts with a zero byte")


def test_inspect_shows_escapes_in_a_models_names_as_text(tmp_path):
    """A producer name of ESC[2J cleared the operator's terminal, and a newline printed a line of the
    file's choosing ('error: fake')."""
    evil = "[/bold]\x1b[31mx\nerror: fake"
    conv, w = _conv(evil)
    m = _save(tmp_path / "names.onnx", [conv], [_v(evil, [1, 3, 32, 32])], [_v("y", [1, 8, 32, 32])], [w],
              producer_name="evil\nerror: fake\x1b[2J")
    r = run_cli("inspect", str(m))
    assert r.returncode == 0, r.stderr[-1500:]
    assert "\x1b[2J" not in r.stdout and "\x1b[31m" not in r.stdout
    assert not any(line.startswith("error: fake") for line in r.stdout.splitlines())
    assert "[/bold]?[31mx?error: fake" in r.stdout.replace("\n", "")


def test_external_weights_are_added_up_before_they_are_read(tmp_path):
    """A 200-byte .onnx naming a sparse weights file beside it: `inspect` read it whole, `export` too.
    Now inspect reads none of it, and export refuses more than the machine has before reading."""
    w = nh.from_array(np.zeros((8, 3, 3, 3), np.float32), "W")
    w.ClearField("raw_data")
    w.data_location = T.EXTERNAL
    for k, v in (("location", "weights.bin"), ("offset", "0"), ("length", str(1 << 40))):
        e = w.external_data.add()
        e.key, e.value = k, v
    m = _save(tmp_path / "m.onnx", [h.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1])], [X],
              [_v("y", [1, 8, 32, 32])], [w])
    with open(tmp_path / "weights.bin", "wb") as f:
        f.truncate(1 << 40)  # a terabyte of hole: no disk used
    r = run_cli("inspect", str(m), timeout=60)
    assert r.returncode == 0, r.stderr[-1500:]
    _one_line(run_cli("export", str(m), "--precision", "fp32", "--out", str(tmp_path / "o"), timeout=60),
              "more than this machine has available")
    w.external_data[2].value = "-1"  # (onnx's own reader raised ValueError for it: a traceback)
    m = _save(tmp_path / "m.onnx", [h.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1])], [X],
              [_v("y", [1, 8, 32, 32])], [w])
    _one_line(run_cli("export", str(m), "--precision", "fp32", "--out", str(tmp_path / "o"), timeout=60),
              "bad external data entry")


def _folding_for_ever(path):
    """An 11 KB graph whose constant folding, which onnxruntime does while the session loads, multiplies
    2048x2048 matrices 400 times (and keeps every product): minutes of work and gigabytes, before any run."""
    nodes = [h.make_node("ConstantOfShape", ["shape"], ["m0"], value=h.make_tensor("v", T.FLOAT, [1], [0.5]))]
    for i in range(400):
        nodes.append(h.make_node("MatMul", [f"m{i}", f"m{i}"], [f"m{i + 1}"]))
    nodes += [h.make_node("ReduceMean", ["m400"], ["s"], keepdims=0), h.make_node("Add", ["x", "s"], ["y"])]
    return _save(path, nodes, [X], [_v("y", [1, 3, 32, 32])], [nh.from_array(np.array([2048, 2048], np.int64),
                                                                             "shape")])


def test_a_model_whose_load_never_ends_is_ended_by_sigterm_and_a_timed_out_run_ends_at_once(tmp_path):
    """onnxruntime builds the session (constant folding included) before any run's limit exists, and
    Python's SIGTERM handler cannot run while the main thread is inside it: `run` on such a model grew by
    60 MB/s and ignored SIGTERM and Ctrl-C until the kernel's OOM killer came. Now a signal the main
    thread cannot act on ends the process 5 s later with one line (runtime/hard_stop.py). And a run stopped
    at its limit ends `run` at once: it was retried on two more frames (3 x 120 s by default)."""
    import signal
    import subprocess
    import sys

    import cv2

    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(5):
        cv2.imwrite(str(frames / f"{i}.png"), np.full((32, 32, 3), 128, np.uint8))
    exe = os.path.join(os.path.dirname(sys.executable), "lepton-edge")
    p = subprocess.Popen([exe, "run", str(_folding_for_ever(tmp_path / "fold.onnx")), "--source", str(frames),
                          "--no-show"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "COLUMNS": "160"})
    try:
        time.sleep(4)  # inside the session's load
        assert p.poll() is None
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        _out, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert time.monotonic() - t0 < 12 and p.returncode == 128 + signal.SIGTERM, (p.returncode, err[-1500:])
    assert "Traceback" not in err and [ln for ln in err.splitlines() if ln.startswith("error:")] == \
        ["error: stopped by SIGTERM: the model's engine did not return within 5 s"], err[-1500:]
    t0 = time.monotonic()
    r = run_cli("run", str(_endless_loop(tmp_path / "loop.onnx")), "--source", str(frames), "--no-show",
                "--max-run-s", "1", timeout=60)
    _one_line(r, "on 1 frame(s) in a row, every frame so far: one run of the model took over 1 s")
    assert time.monotonic() - t0 < 20


@pytest.mark.parametrize("limit", ["time", "memory"])
def test_work_an_engine_cannot_stop_ends_the_process_at_its_limit(limit):
    """hard_stop's limits: past its time, or past its memory growth, the process ends with exit 2 and one
    error line naming the work (the engines release the GIL while they work, as time.sleep does here)."""
    import subprocess
    import sys

    body = {"time": "t = hard_stop.begin('a LiteRT run of \\'m.tflite\\'', 0.5)\ntime.sleep(30)",
            "memory": "t = hard_stop.begin('onnxruntime loading \\'m.onnx\\'', 60, 200 << 20)\n"
                      "hold = []\nfor _ in range(100):\n    hold.append(np.ones(50 << 20, np.uint8))\n"
                      "    time.sleep(0.05)"}[limit]
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", "import time\nimport numpy as np\nfrom lepton_edge import logs\n"
                        "from lepton_edge.runtime import hard_stop\nlogs.configure()\n" + body + "\nprint('returned')"],
                       capture_output=True, text=True, timeout=60)
    said = {"time": "error: a LiteRT run of 'm.tflite' did not finish in 0.5 s, and the engine cannot be stopped",
            "memory": "error: onnxruntime loading 'm.onnx' grew this process to"}[limit]
    assert r.returncode == 2 and "returned" not in r.stdout and r.stderr.startswith(said), r.stderr[-1500:]
    assert len(r.stderr.strip().splitlines()) == 1 and time.monotonic() - t0 < 20


def test_a_signal_ends_the_process_only_while_an_engine_is_stuck_and_weights_beside_a_model_count(tmp_path):
    """The grace after Ctrl-C or SIGTERM ends the process only if unstoppable work is still in progress: a
    `run` closing down slowly (a stalled camera's reader giving up) was ended, blaming the model, with its
    summary unprinted. And a model's load budget counts the weights kept in files beside it: a 150-byte
    graph with 2.5 GB of weights in w.bin was ended as a memory bomb."""
    import subprocess
    import sys

    code = ("from lepton_edge.runtime import hard_stop\nhard_stop._finish_if_stuck('stuck', 143)\nprint('idle: on')\n"
            "hard_stop.begin('a LiteRT run', 60)\nhard_stop._finish_if_stuck('stuck', 143)\nprint('not reached')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 143 and r.stdout == "idle: on\n" and "stuck" in r.stderr, (r.returncode, r.stdout, r.stderr)
    from lepton_edge.runtime import hard_stop

    (tmp_path / "m.onnx").write_bytes(b"x" * 150)
    with open(tmp_path / "w.bin", "wb") as f:  # sparse: 3 GB on paper, nothing on the disk
        f.truncate(3 << 30)
    token = hard_stop.begin_load(tmp_path / "m.onnx", "onnxruntime")
    try:
        ceiling = hard_stop._limits[token][1]
        assert ceiling - hard_stop.rss_bytes() > 12 * (3 << 30) - (1 << 30)
    finally:
        hard_stop.end(token)


def test_dimensions_named_by_their_formula_export_and_run(tmp_path):
    """torch's exporter names a dynamic output dimension by its formula (NudeNet's YOLOv8: 300
    characters of floor(...)); the manifest, which holds names of up to 64, refused it with a pydantic
    traceback after the whole export. Such a dimension is recorded as "?" and the bundle runs."""
    import json

    formula = "(floor(floor(floor(height/2 - 1/2)/2)/2) + 1)*(floor(floor(floor(width/2 - 1/2)/2)/2) + 1) + " * 3
    conv, w = _conv()
    pool = h.make_node("GlobalAveragePool", ["y"], ["z"])
    m = _save(tmp_path / "m.onnx", [conv, pool], [_v("x", ["batch", 3, "height", "width"])],
              [_v("z", ["batch", 8, formula.strip(" +"), 1])], [w])
    r = run_cli("export", str(m), "--precision", "fp32", "--target", "x86-cpu", "--input-shape", "1,3,32,32",
                "--task", "raw", "--out", str(tmp_path / "o"), timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-1500:]
    manifest = json.loads(next((tmp_path / "o").rglob("manifest.json")).read_text())
    assert manifest["outputs"][0]["shape"] == ["batch", 8, "?", 1]
    frames = tmp_path / "frames"
    frames.mkdir()
    import cv2

    cv2.imwrite(str(frames / "a.png"), np.full((32, 32, 3), 128, np.uint8))
    ran = run_cli("run", str(next((tmp_path / "o").rglob("manifest.json")).parent), "--source", str(frames),
                  "--no-show", "--json", timeout=120)
    assert ran.returncode == 0, ran.stderr[-800:]
