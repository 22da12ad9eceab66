"""Logging, not printing: library code reports through `logging` loggers, the CLI decides how records
look (--quiet, --verbose, --log-json), and silencing LiteRT's native output never swallows another
thread's log lines."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli

SPEC = "layout=NCHW;color=GRAY;size=28x28;scale=1/255"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A plain ONNX classifier (Flatten -> MatMul, made with onnx.helper) and six PNG frames."""
    import cv2
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    root = tmp_path_factory.mktemp("tiny")
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(784, 10)).astype(np.float32), "W")
    g = helper.make_graph([helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "W"], ["y"])],
                          "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 28, 28])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(root / "tiny.onnx"))
    (root / "frames").mkdir()
    for i in range(6):
        cv2.imwrite(str(root / "frames" / f"{i}.png"), np.full((28, 28), i * 40, np.uint8))
    return root / "tiny.onnx", str(root / "frames" / "*.png")


def _run(tiny, *before: str):
    model, frames = tiny
    return run_cli(*before, "run", str(model), "--source", frames, "--input-spec", SPEC, "--task", "classify",
                   "--no-show", timeout=120)


def test_log_json_is_one_json_object_per_line(tiny):
    r = _run(tiny, "--log-json")
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stderr.splitlines()]  # every line parses, or this raises
    assert records, "no log record at all"
    for rec in records:
        assert {"time", "level", "logger", "message"} <= set(rec), rec
    header = [x for x in records if x["logger"] == "lepton_edge.cli" and "onnxruntime" in x["message"]]
    assert header and header[0]["level"] == "INFO", records
    summary = [x["summary"] for x in records if "summary" in x]  # an extra field, kept as JSON
    assert summary and summary[0]["frames"] == 6, records
    assert "[bold]" not in r.stderr  # markup is for terminals, never in a record


def test_log_json_error_is_a_record_with_the_exit_code(tmp_path):
    r = run_cli("--log-json", "inspect", str(tmp_path / "missing.onnx"))
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    rec = json.loads(lines[0])
    assert rec["level"] == "ERROR" and "not found" in rec["message"] and rec["exit_code"] == 2, rec


def test_quiet_suppresses_info_but_not_errors(tiny, tmp_path):
    """The header line is an info record (the JSON test sees it); --quiet drops it, not the error."""
    r = _run(tiny, "--quiet")
    assert r.returncode == 0, r.stderr
    assert "onnxruntime" not in r.stderr, r.stderr
    assert "dropped 0" in r.stderr  # the run's own summary is its output, not a log line
    err = run_cli("--quiet", "inspect", str(tmp_path / "missing.onnx"))
    assert err.returncode == 2 and err.stderr.startswith("error: not found"), err.stderr


def test_verbose_names_the_logger(tiny):
    r = _run(tiny, "--verbose")
    assert r.returncode == 0, r.stderr
    assert any(" INFO " in ln and "lepton_edge.cli:" in ln and "onnxruntime" in ln for ln in r.stderr.splitlines()), \
        r.stderr
    both = run_cli("--quiet", "--verbose", "targets")
    assert both.returncode == 2 and both.stderr.startswith("error:") and "Traceback" not in both.stderr, both.stderr


def _python(script: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=timeout)


def test_silenced_native_stderr_keeps_other_threads_log_lines():
    """While LiteRT loads (fd 2 -> /dev/null) another thread's log record still reaches stderr;
    native writes during the window do not, and stderr works again after it."""
    r = _python("""
        import logging, os, threading
        from lepton_edge import logs, ui

        logs.configure()
        log = logging.getLogger("lepton_edge.agent.service")
        inside, said = threading.Event(), threading.Event()

        def other():
            assert inside.wait(20)
            log.warning("from another thread")
            said.set()

        t = threading.Thread(target=other)
        t.start()
        with ui.native_stderr_silenced():
            os.write(2, b"native noise\\n")
            inside.set()
            assert said.wait(20)
        t.join()
        os.write(2, b"native after\\n")
        log.warning("main after")
    """)
    assert r.returncode == 0, r.stderr
    assert "warning: from another thread" in r.stderr, r.stderr
    assert "native noise" not in r.stderr
    assert "native after" in r.stderr and "warning: main after" in r.stderr, r.stderr


def test_overlapping_silenced_windows_restore_stderr():
    """Two threads loading models at once (A enters, B enters, A leaves, B leaves): stderr comes
    back afterwards instead of staying on /dev/null."""
    r = _python("""
        import os, threading
        from lepton_edge import ui

        a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

        def b():
            assert a_in.wait(20)
            with ui.native_stderr_silenced():
                b_in.set()
                assert a_out.wait(20)
                os.write(2, b"native inside b\\n")

        t = threading.Thread(target=b)
        t.start()
        with ui.native_stderr_silenced():
            a_in.set()
            assert b_in.wait(20)
        a_out.set()
        t.join()
        os.write(2, b"after both\\n")
    """)
    assert r.returncode == 0, r.stderr
    assert "native inside b" not in r.stderr
    assert "after both" in r.stderr, r.stderr


@pytest.mark.slow  # imports torch
def test_library_warning_is_a_record_of_its_module(caplog, tmp_path):
    """A warning from the export path is a WARNING record named after its module (so a log
    configuration can filter it), and a stage is an INFO record carrying `stage`."""
    from lepton_edge import export
    from lepton_edge.errors import BadInput

    caplog.set_level(logging.INFO, logger="lepton_edge")
    with pytest.raises(BadInput):  # the missing --eval set stops the export right after loading the model
        export("zoo:mobilenetv2", "x86-cpu", out=tmp_path, eval=str(tmp_path / "none"))  # no --weights: random
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "random weights" in r.getMessage()]
    assert warned and warned[0].name.startswith("lepton_edge.exporters"), [(r.name, r.getMessage())
                                                                           for r in caplog.records]
    stages = [r for r in caplog.records if getattr(r, "stage", None) == "load model"]
    assert stages and stages[0].name.startswith("lepton_edge.exporters") and stages[0].seconds >= 0


@pytest.mark.slow
def test_agent_logs_through_the_same_setup(int8_bundle, fashion_video, mosquitto, tmp_path):
    """`lepton-edge --log-json agent`: the agent's own lines (here its goodbye) are JSON records
    on stderr like every other verb's."""
    import signal

    from mqtt_helpers import Recorder

    rec = Recorder(mosquitto.port, client_id="log-test")
    exe = Path(sys.executable).parent / "lepton-edge"
    p = subprocess.Popen([str(exe), "--log-json", "agent", "--broker", mosquitto.url, "--fleet", "f1",
                          "--device-id", "dev1", "--bundle", str(int8_bundle.bundle.path), "--source",
                          str(fashion_video[0]), "--loop", "--window", "0.2", "--state-dir", str(tmp_path / "s")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert rec.wait_for(lambda r: r.of("/telemetry")), p.stderr.read() if p.poll() is not None else ""
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        rec.close()
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    records = [json.loads(line) for line in err.splitlines()]  # every line parses, or this raises
    assert any(r["logger"] == "lepton_edge.cli" and r["message"].startswith("agent f1/dev1") for r in records), err
    bye = [r for r in records if "message(s) left in the outbox" in r["message"]]
    assert bye and bye[0]["logger"] == "lepton_edge.agent.service", err


def test_agent_lines_keep_their_event_level(caplog):
    """The agent's lines carry the event's level (an error event is an ERROR record), so `--quiet` and the
    journal's priorities keep what matters; before, every agent line was INFO and `--quiet` hid errors."""
    from types import SimpleNamespace

    from lepton_edge.agent.service import Agent

    caplog.set_level(logging.DEBUG, logger="lepton_edge.agent.service")
    for level in ("info", "warning", "error"):
        Agent.log(SimpleNamespace(_line=None), f"a {level} line", level)
    got = {r.getMessage(): r.levelno for r in caplog.records if r.name == "lepton_edge.agent.service"}
    assert got == {"a info line": logging.INFO, "a warning line": logging.WARNING, "a error line": logging.ERROR}
    lines: list[str] = []
    Agent.log(SimpleNamespace(_line=lines.append), "to the sink", "error")
    assert lines == ["to the sink"]


def test_control_characters_in_a_record_never_reach_the_terminal_or_the_journal():
    """A message quotes what devices and files say: a device's clock string `\\x1b]52;c;...\\x1b[2J` in the
    monitor's warning wrote the operator's clipboard and cleared the screen. Every human rendering shows
    control characters as '?' (the JSON one escapes them)."""
    evil = "\x1b]52;c;cHduZWQ=\x1b\\\x1b[2J\x07"
    r = _python(f"""
        import logging
        from lepton_edge import logs

        logs.configure()
        logging.getLogger("lepton_edge.fleet.monitor").warning("clock says %s", {evil!r})
    """)
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stderr and "\x07" not in r.stderr and "clock says ?]52;c;cHduZWQ=?" in r.stderr, r.stderr
    from lepton_edge import logs

    record = logging.LogRecord("lepton_edge.fleet.monitor", logging.WARNING, __file__, 1, "clock says %s\nnext",
                               (evil,), None)
    shown = logs._rich_handler(False, False).render_message(record, record.getMessage()).plain
    assert "\x1b" not in shown and "\x07" not in shown and shown.endswith("?\nnext"), repr(shown)
