"""How the agent reacts to what reaches it from outside, one call at a time on an agent that is built
but not run: the source's status callbacks, commands arriving on paho's thread (retained, oversized,
rate-limited), a disk that fails under send(), and the bundle facts `meta` publishes.

Why here and not end to end: tests/test_agent_tiny.py runs the whole agent against a broker (half a
minute); these are the decisions inside it, read back from the outbox the agent really writes, so they
run in a second and under every mutant of agent/service.py. No broker: the publisher is made, never
connected; a one-layer ONNX model built with onnx.helper, a 4-frame video."""
from __future__ import annotations

import json
import logging
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from lepton_edge.agent import service
from lepton_edge.agent.config import AgentConfig
from lepton_edge.agent.service import Agent
from lepton_edge.bundle import InputSpec, Manifest, OutputSpec, write_manifest
from lepton_edge.capture.base import SourceState, StatusUpdate
from lepton_edge.errors import BadInput


def _tiny_bundle(d: Path, **target) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.full((784, 10), 0.01, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["y"])], "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 28, 28])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    d.mkdir(parents=True)
    onnx.save(model, d / "model.onnx")
    write_manifest(d, Manifest(
        name="tiny", version="7", created="2026-01-01", target={"id": "x86-cpu", "threads": 1, **target},
        format="onnx",
        precision="fp32", model_file="model.onnx", task="classify",
        inputs=[InputSpec(name="input", shape=[1, 1, 28, 28], color="GRAY")],
        outputs=[OutputSpec(name="y", shape=[1, 10])]))
    return d


def _video(path: Path) -> Path:
    import cv2

    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), 30, (28, 28), False)
    for i in range(4):
        w.write(np.full((28, 28), i * 40, np.uint8))
    w.release()
    return path


def _agent(tmp_path: Path, log=lambda m: None, **target) -> Agent:
    cfg = AgentConfig(broker="mqtt://127.0.0.1:1", fleet="f1", device_id="dev1",
                      bundle=_tiny_bundle(tmp_path / "b", **target), source=str(_video(tmp_path / "v.avi")),
                      state_dir=tmp_path / "state", threads=1)
    return Agent(cfg, log=log)


@pytest.fixture
def agent(tmp_path):
    a = _agent(tmp_path)
    yield a
    a.outbox.close()
    a.source.close()


def _sent(a: Agent, suffix: str) -> list[dict]:
    db = sqlite3.connect(a.cfg.state_dir / "outbox.sqlite")
    try:
        rows = db.execute("SELECT topic, payload FROM outbox ORDER BY id").fetchall()
    finally:
        db.close()
    return [json.loads(p) for t, p in rows if t.endswith(suffix)]


def _events(a: Agent, kind: str) -> list[dict]:
    return [e for e in _sent(a, "/events") if e["kind"] == kind]


def _update(kind: str, state: SourceState, **kw) -> StatusUpdate:
    return StatusUpdate(kind=kind, source="rtsp://cam/1", source_kind="rtsp", state=state, **kw)


def test_losing_the_stream_is_a_warning_event_and_streaming_is_none(agent):
    agent._on_source_status(_update("state", SourceState.STREAMING, previous=SourceState.CONNECTING))
    assert _events(agent, "source_state") == []
    agent._on_source_status(_update("state", SourceState.RECONNECTING, previous=SourceState.STREAMING,
                                    reason="read failed"))
    (e,) = _events(agent, "source_state")
    assert e["level"] == "warning"
    assert e["message"] == "source rtsp://cam/1: streaming -> reconnecting (read failed)"
    assert e["data"]["source_kind"] == "rtsp" and e["data"]["previous"] == "streaming"


def test_no_source_state_event_once_the_agent_stops(agent):
    agent._stop.set()
    agent._on_source_status(_update("state", SourceState.FAILED, previous=SourceState.RECONNECTING))
    assert _events(agent, "source_state") == []


def test_reconnects_and_drops_are_events_with_their_counts(agent):
    agent._on_source_status(_update("reconnect", SourceState.STREAMING, reason="after 3 tries", count=3, down_s=1.5))
    agent._on_source_status(_update("dropped", SourceState.STREAMING, reason="12 frames dropped", count=12, total=40))
    (r,) = _events(agent, "source_reconnected")
    assert r["message"] == "source rtsp://cam/1 is back: after 3 tries"
    assert {k: r["data"][k] for k in ("reconnects", "down_s", "source_kind", "state")} == \
        {"reconnects": 3, "down_s": 1.5, "source_kind": "rtsp", "state": "streaming"}
    (d,) = _events(agent, "frames_dropped")
    assert d["message"] == "source rtsp://cam/1: 12 frames dropped"
    assert d["data"]["count"] == 12 and d["data"]["total"] == 40 and d["data"]["source_kind"] == "rtsp"


def test_a_retained_command_keeps_a_64_character_verb_and_renames_a_longer_one(agent):
    v64 = "v" * 64
    agent._on_message(agent.topics.cmd(v64), b"{}", retain=True)
    assert [e["data"]["verb"] for e in _events(agent, "command_ignored")] == [v64]
    agent._rate.clear()
    agent._on_message(agent.topics.cmd("v" * 65), b"{}", retain=True)
    assert [e["data"]["verb"] for e in _events(agent, "command_ignored")] == [v64, "unknown"]
    assert agent._commands.empty()


def test_error_replies_to_oversized_commands_refill_at_ten_a_second(agent):
    big = b"x" * (service.MAX_COMMAND_BYTES + 1)
    for _ in range(service.REJECT_BURST + 5):
        agent._on_message(agent.topics.cmd("deploy"), big)
    assert len(_sent(agent, "/cmd/deploy/reply")) == service.REJECT_BURST  # the burst, then nothing
    agent._reject_tokens, agent._reject_at = 0.0, time.monotonic() - 1.0  # one second later
    allowed = 0
    while agent._take_reject_token():
        allowed += 1
    assert allowed == 10


def test_a_disk_that_fails_under_send_is_counted_never_raised(agent, monkeypatch):
    def full(*_a, **_k):
        raise OSError(28, "No space left on device")

    lines: list[str] = []
    monkeypatch.setattr(agent, "_line", lines.append)
    monkeypatch.setattr(agent.outbox, "put", full)
    assert agent.send(agent.topics.telemetry, b"{}") is False
    assert agent.send(agent.topics.telemetry, b"{}") is False
    assert agent._send_failures == 2
    assert lines == ["outbox: cannot store a message (OSError: [Errno 28] No space left on device); "
                     "1 lost since start"]  # the second within the same minute: rate-limited


def test_meta_names_the_bundle_backend_and_threads(agent):
    info = agent._bundle_info()
    assert (info["name"], info["version"], info["format"], info["threads"]) == ("tiny", "7", "onnx", 1)
    assert info["backend"] and info["sha256"] and info["path"].endswith("b")


def test_a_delegate_the_device_does_not_allow_is_logged_as_a_warning(tmp_path, caplog):
    """The operator must see that the bundle asked for an accelerator and got the CPU."""
    with caplog.at_level(logging.INFO, logger="lepton_edge.agent.service"):
        a = _agent(tmp_path, log=None, delegates=["hexagon"])
    try:
        (rec,) = [r for r in caplog.records if "hexagon" in r.getMessage()]
        assert rec.levelno == logging.WARNING and "running on the CPU" in rec.getMessage()
    finally:
        a.outbox.close()
        a.source.close()


def test_a_file_that_ends_is_reported_once_and_marks_the_agent_idle_on_purpose(agent):
    agent._pipeline_loop()  # a 4-frame file, no loop: returns when it ends
    assert agent.source_ended and agent.pipeline.stats.frames == 4
    (e,) = _events(agent, "source_ended")
    assert e["level"] == "warning"


def test_systemd_hears_ready_with_a_status_line_even_before_any_fps(agent, tmp_path):
    import socket

    from lepton_edge.agent.systemd import Notifier

    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        agent.notifier = Notifier({"NOTIFY_SOCKET": str(path)})
        agent._notify_tick()  # nothing yet: not ready
        agent.source_ended = True  # a file that ended before a result: idle on purpose, ready all the same
        agent._notify_tick()
        msg = sock.recv(4096).decode()
    assert agent.ready and "READY=1" in msg.splitlines()
    assert f"STATUS=no fps yet, 0 results, tiny on {agent.source.kind}" in msg.splitlines()


def test_windows_count_corrupt_frames_per_window_and_name_the_bundle(agent):
    agent.pipeline.bad_frames = 3
    first = agent.window()
    agent.pipeline.bad_frames = 5
    second = agent.window()
    assert (first.corrupt, second.corrupt) == (3, 2)
    assert first.bundle == {"name": "tiny", "sha256": agent._bundle_info()["sha256"]} and first.bundle["sha256"]
    assert [w["seq"] for w in _sent(agent, "/telemetry")] == [0, 1]


def test_windows_count_the_sources_dropped_frames_per_window(agent, monkeypatch):
    status = agent.source.status
    for total in (4, 10, 10):
        monkeypatch.setattr(agent.source, "status", lambda t=total: {**status(), "dropped": t})
        agent.window()
    assert [w["dropped"] for w in _sent(agent, "/telemetry")] == [4, 6, 0]


def test_the_health_check_reports_the_figures_it_judged(agent):
    agent.pipeline.probe = [1.0] * 19 + [9.0]
    ok, why, figures = agent._health_check(agent.runtime, 20, agent.pipeline_failures)
    assert ok and why == ""
    assert figures == {"health_frames": 20, "inference_p50_ms": 1.0, "inference_p95_ms": 1.4,
                       "latency_budget_ms": None}


def test_the_health_check_fails_on_frames_the_new_model_failed(agent):
    """A model that fails on some frames only (its pipeline keeps going, counting them) is not healthy:
    the check names how many failed since the swap and the last error."""
    agent.pipeline.probe = [1.0] * 20
    agent.pipeline.failed_since_swap = 2
    agent.pipeline.last_failure = "tiny: postprocessing failed on a frame: boom"
    ok, why, _ = agent._health_check(agent.runtime, 20, agent.pipeline_failures)
    assert not ok and "2 frame(s) failed since the swap" in why and "boom" in why


def test_every_runtime_the_agent_opens_has_the_configured_run_limit(tmp_path):
    """agent.toml's max_run_s (and max_run_bytes) reaches the runtime the agent starts with and the one `set
    threads` loads; without it, the backend's own 120 s (and 2 GiB)."""
    a = _agent(tmp_path)
    try:
        assert a.runtime.backend._watch.limit == 120.0
        a.cfg.max_run_s = 7.5
        assert a._open(a.runtime.path, 1).backend._watch.limit == 7.5
        assert a.runtime.backend._clock.max_growth == 2 << 30  # max_run_bytes: max(2 GiB, 12x the model's files)
        a.cfg.max_run_bytes = 300 << 20
        assert a._open(a.runtime.path, 1).backend._clock.max_growth == 300 << 20
        from lepton_edge.telemetry.schema import SetCommand

        before = a.runtime
        a.handle("set", SetCommand(id="t", threads=1))
        assert a.runtime is not before
        assert a.runtime.backend._watch.limit == 7.5
    finally:
        a.outbox.close()
        a.source.close()
    with pytest.raises(ValueError, match="max_run_s"):
        AgentConfig(broker="mqtt://127.0.0.1:1", max_run_s=float("inf"))


def test_a_refused_set_changes_nothing(agent):
    """`set` with threads during a deploy is refused (ok false); its window_s, telemetry and sample_every
    had already been applied, silently (no event, no meta). Now all or nothing; once the deploy is over
    the same command applies every field, with its event."""
    from lepton_edge.telemetry.schema import SetCommand

    before = (agent.window_s, agent.telemetry, agent.pipeline.sample_every)
    cmd = SetCommand(id="s1", threads=1, window_s=0.5, telemetry=False, sample_every=3)
    assert agent._deploying.acquire(blocking=False)  # a deploy in progress
    try:
        agent.handle("set", cmd)
    finally:
        agent._deploying.release()
    (reply,) = _sent(agent, "/cmd/set/reply")
    assert reply["ok"] is False and "deploy is in progress" in reply["error"]
    assert (agent.window_s, agent.telemetry, agent.pipeline.sample_every) == before and not _events(agent, "set")
    agent.handle("set", cmd)
    assert (agent.window_s, agent.telemetry, agent.pipeline.sample_every) == (0.5, False, 3)
    assert _sent(agent, "/cmd/set/reply")[-1]["ok"] is True and len(_events(agent, "set")) == 1


_SIGTERM_WHILE_LOADING = """
import os, signal, sys
from lepton_edge.agent import service
from lepton_edge.cli import main

class StoppedWhileLoading(service.Agent):  # the real agent, told to stop before its model is loaded
    def __init__(self, *a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        super().__init__(*a, **k)

service.Agent = StoppedWhileLoading
sys.argv = ["lepton-edge", "agent", *sys.argv[1:]]
main()
"""


@pytest.mark.slow  # (an agent process from start to stop: ~7 s)
def test_a_stop_while_the_model_loads_ends_the_agent_cleanly(tmp_path):
    """SIGTERM before the agent ran (`systemctl stop` while a model loads) killed it outright: exit -15,
    no stopped event. It is kept until the agent runs, which then stops at once: exit 0."""
    import subprocess
    import sys

    bundle, video = _tiny_bundle(tmp_path / "b"), _video(tmp_path / "v.avi")
    r = subprocess.run([sys.executable, "-c", _SIGTERM_WHILE_LOADING, "--broker", "mqtt://127.0.0.1:1",
                        "--fleet", "f1", "--device-id", "dev1", "--bundle", str(bundle), "--source", str(video),
                        "--state-dir", str(tmp_path / "state")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-2000:])
    db = sqlite3.connect(tmp_path / "state" / "outbox.sqlite")
    try:
        kinds = [json.loads(p)["kind"] for t, p in db.execute("SELECT topic, payload FROM outbox ORDER BY id")
                 if t.endswith("/events")]
    finally:
        db.close()
    assert kinds[0] == "started" and "stopped" in kinds, kinds


def test_an_agent_that_fails_to_start_lets_go_of_its_state_directory(tmp_path):
    """A bad trusted key (or any failure after the outbox opened) left the outbox's lock held by the half-made
    agent: the next agent in the same process was refused as "in use by another agent", naming its own pid."""
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key\n")
    cfg = AgentConfig(broker="mqtt://127.0.0.1:1", fleet="f1", device_id="dev1", bundle=_tiny_bundle(tmp_path / "b"),
                      source=str(_video(tmp_path / "v.avi")), state_dir=tmp_path / "state", threads=1,
                      trusted_keys=[bad])
    for _ in range(2):
        with pytest.raises(BadInput, match="not a PEM public key"):
            Agent(cfg, log=lambda m: None)
    a = Agent(cfg.model_copy(update={"trusted_keys": []}), log=lambda m: None)
    a.outbox.close()
    a.source.close()


def test_a_command_that_does_not_parse_is_a_command_error_event_and_an_error_reply(agent):
    agent._on_message(agent.topics.cmd("ping"), b"{not json")
    (e,) = _events(agent, "command_error")
    assert e["level"] == "warning" and e["data"]["verb"] == "ping" and e["message"].startswith("ping: ")
    (r,) = _sent(agent, "/cmd/ping/reply")
    assert r["ok"] is False and r["error"]


def test_a_repeating_log_line_says_how_many_like_it_were_held_back(tmp_path):
    lines: list[str] = []
    a = _agent(tmp_path, log=lines.append)
    try:
        for _ in range(3):
            a._rate_log("publisher", "connection refused")
        a._rate["log:publisher"] = (time.monotonic() - service.RATE_LIMIT_S - 1, a._rate["log:publisher"][1])
        a._rate_log("publisher", "connection refused")
        assert [x for x in lines if x.startswith("publisher:")] == [
            "publisher: connection refused", "publisher: connection refused (2 more like it)"]
    finally:
        a.outbox.close()
        a.source.close()


def test_a_message_sent_on_its_own_carries_no_drop_count(agent):
    """Only a window hands on the outbox's drop count (carried=); an event or a reply that carried one would
    make a later window report drops that never happened once it is itself dropped."""
    assert agent.send(agent.topics.events, b'{"v": 1}')
    db = sqlite3.connect(agent.cfg.state_dir / "outbox.sqlite")
    try:
        assert db.execute("SELECT COUNT(*) FROM carried").fetchone()[0] == 0
    finally:
        db.close()


def test_a_command_past_the_queues_bytes_is_dropped_with_a_command_error_event(agent):
    """The command thread's queue is full (by bytes): the command is not queued, and the event says so."""
    agent._queued_bytes = service.MAX_QUEUED_COMMAND_BYTES
    agent._on_message(agent.topics.cmd("ping"), b'{"id": "p1"}')
    assert agent._commands.empty()
    (e,) = _events(agent, "command_error")
    assert e["message"] == "command queue full; command dropped" and e["data"]["verb"] == "ping", e
    assert e["level"] == "warning"


def test_a_threads_failure_is_an_error_event_naming_where_and_what(agent):
    agent._survive("source status", ValueError("boom " + "x" * 600))
    (e,) = _events(agent, "error")
    assert e["message"] == "source status: ValueError: boom " + "x" * 495 and e["data"]["where"] == "source status"
    assert e["level"] == "error"
