"""The agent against hostile commands, bad bundles and a failing disk: every thread keeps serving.

Each test here failed on the agent as it was before issue #10: a payload of `[` ended the command
thread, a manifest shape that disagrees with its model left a dead pipeline, commands were queued
whole before their size was checked, retained commands ran at every start, `true` was accepted as
1 thread, a corrupt deployed bundle made every start exit 2, and a disk error ended the main loop.
"""
from __future__ import annotations

import http.server
import json
import shutil
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from conftest import run_cli
from lepton_edge.agent import commands
from lepton_edge.agent.config import AgentConfig
from lepton_edge.agent.service import MAX_QUEUED_COMMAND_BYTES, Agent
from lepton_edge.bundle import Bundle, write_manifest
from lepton_edge.runtime import Runtime
from lepton_edge.telemetry.outbox import Outbox
from lepton_edge.telemetry.publisher import Publisher
from lepton_edge.telemetry.schema import MAX_COMMAND_BYTES
from mjpeg_server import free_port
from mqtt_helpers import Recorder, command, running_agent, start_agent
from waiting import wait_until as _wait

BASE = "lepton/v1/f1/dev1"


@pytest.fixture(scope="module")
def x86(tmp_path_factory, int8_bundle):
    """A copy of the int8 ONNX bundle: tests make variants next to it."""
    out = tmp_path_factory.mktemp("x86") / "fashion-cnn"
    shutil.copytree(int8_bundle.bundle.path, out)
    return out


def _cfg(broker: str, state: Path, bundle: Path, video: Path, **kw) -> AgentConfig:
    return AgentConfig(broker=broker, fleet="f1", device_id="dev1", bundle=bundle, source=str(video), loop=True,
                       window_s=0.2, state_dir=state, health_frames=10, health_timeout_s=15,
                       **{"deploy_paths": [state.parent], **kw})


running = running_agent  # tests/mqtt_helpers.py


def _outbox_events(agent: Agent) -> list[dict]:
    return [json.loads(m.payload) for m in agent.outbox.pending(limit=100_000, after=0)
            if m.topic.endswith("/events")]




def _bad_shape_bundle(src: Path, out: Path) -> Path:
    """A bundle whose manifest declares [1,1,32,32] for a 28x28 model, re-checksummed so it verifies."""
    shutil.copytree(src, out)
    m = Bundle.load(out).manifest
    m.inputs[0].shape = [1, 1, 32, 32]
    write_manifest(out, m)
    return out


def _publish(port: int, topic: str, payload, retain: bool = False) -> None:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{time.monotonic_ns()}")
    c.connect("127.0.0.1", port)
    c.loop_start()
    body = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
    c.publish(topic, body, qos=1, retain=retain).wait_for_publish(10)
    c.loop_stop()
    c.disconnect()


# ---- parsing: nothing but CommandError leaves commands.parse ------------------------------------
@pytest.mark.parametrize("payload", [b"[" * 60000, b'{"a":' * 13000, b"[" * 17 + b"]" * 17, b"\xff\xfe",
                                     b'{"id": "x", "pad": "' + b"[" * 1000 + b'"}', b"1e999999", b"[]"])
def test_parse_turns_every_decoding_failure_into_a_command_error(payload):
    with pytest.raises(commands.CommandError):
        commands.parse("ping", payload)


def test_parse_accepts_brackets_inside_strings_and_modest_nesting():
    assert commands.nesting('{"a": "[[[[", "b": [[1]]}') == 3
    assert commands.parse("ping", b'{"id": "[[[[[[[[[[[[[[[[[[[[[[[["}').id == "[" * 24


@pytest.mark.parametrize("data, field", [({"threads": True}, "threads"), ({"telemetry": "no"}, "telemetry"),
                                         ({"telemetry": 0}, "telemetry"), ({"window_s": True}, "window_s"),
                                         ({"sample_every": "2"}, "sample_every"), ({"threads": 1.0}, "threads"),
                                         ({"threads": 65}, "threads"), ({"threads": 0}, "threads")])
def test_set_fields_are_strict(data, field):
    with pytest.raises(commands.CommandError, match=f"field '{field}'"):
        commands.parse("set", json.dumps({"id": "s"} | data).encode())
    assert commands.parse("set", b'{"window_s": 1, "threads": 2, "telemetry": false}').window_s == 1.0


# ---- a real agent process against hostile commands ----------------------------------------------
def test_hostile_commands_leave_the_agent_serving(tmp_path, mosquitto, x86, fashion_video):
    """Retained commands published before start are ignored; 60 KB of `[` gets an error reply and
    the next ping is answered; no trusted keys: a warning event at start."""
    video, _ = fashion_video
    rec = Recorder(mosquitto.port)
    _publish(mosquitto.port, f"{BASE}/cmd/ping", {"id": "retained-ping"}, retain=True)
    _publish(mosquitto.port, f"{BASE}/cmd/deploy", {"id": "retained-deploy", "path": str(x86)},
             retain=True)
    agent = start_agent("--broker", mosquitto.url, "--fleet", "f1", "--device-id", "dev1", "--bundle",
                        str(x86), "--source", str(video), "--loop", "--window", "0.2",
                        "--state-dir", str(tmp_path / "state"))
    try:
        ignored = rec.wait_for(lambda r: len([e for e in r.of("/events") if e["kind"] == "command_ignored"]) >= 1)
        assert ignored, agent.stderr.read() if agent.poll() is not None else rec.of("/events")
        r = command(mosquitto.port, f"{BASE}/cmd/ping", b"[" * 60000, f"{BASE}/cmd/ping/reply", timeout=20)
        assert not r["ok"] and "nests deeper" in r["error"]
        r = command(mosquitto.port, f"{BASE}/cmd/ping", {"id": "after"}, f"{BASE}/cmd/ping/reply", timeout=20)
        assert r["ok"] and r["data"]["bundle"]["name"] == "fashion-cnn"
        r = command(mosquitto.port, f"{BASE}/cmd/set", {"id": "strict", "threads": True}, f"{BASE}/cmd/set/reply")
        assert not r["ok"] and "threads" in r["error"]
        replies = [b for t, b, _ in rec.messages if t.endswith("/reply")]
        assert not [b for b in replies if isinstance(b, dict) and str(b.get("id", "")).startswith("retained")]
        assert not [e for e in rec.of("/events") if e["kind"] in ("deploy", "rollback", "deploy_failed")]
        warn = [e for e in rec.of("/events") if e["kind"] == "insecure"]
        assert warn and warn[0]["level"] == "warning" and "can deploy any bundle" in warn[0]["message"]
        assert agent.poll() is None
    finally:
        agent.terminate()
        assert agent.wait(timeout=30) == 0
        rec.close()


# ---- size and byte bounds before queueing -------------------------------------------------------
def test_oversized_commands_are_refused_before_queueing(tmp_path, x86, fashion_video):
    video, _ = fashion_video
    agent = Agent(_cfg(f"mqtt://127.0.0.1:{free_port()}", tmp_path / "s", x86, video),
                  log=lambda m: None)
    try:
        big = b"x" * (10 * 1024 * 1024)
        for _ in range(150):  # the command thread is not running: whatever is accepted stays queued
            agent._on_message(f"{BASE}/cmd/ping", big)
        assert agent._commands.qsize() == 0
        for _ in range(300):  # junk: refused as it arrives, never queued (a flood of it kept pings out)
            agent._on_message(f"{BASE}/cmd/ping", b'{"id": "junk", "pad": 1}')
            agent._on_message(f"{BASE}/cmd/set", b"[[[")
        assert agent._commands.qsize() == 0
        near = b'{"id": "n"' + b" " * (MAX_COMMAND_BYTES - 20) + b"}"  # valid, near the size limit
        for _ in range(100):
            agent._on_message(f"{BASE}/cmd/ping", near)
        assert 0 < agent._commands.qsize() * len(near) <= MAX_QUEUED_COMMAND_BYTES
        agent._on_message(f"{BASE}/cmd/deploy", b'{"path": "/"}', True)  # retained: not queued
        assert agent._commands.qsize() * len(near) == agent._queued_bytes
        kinds = [e["kind"] for e in _outbox_events(agent)]
        assert kinds.count("command_error") <= 3 and "command_ignored" in kinds  # rate-limited, not one per drop
        replies = [m for m in agent.outbox.pending(limit=100_000, after=0) if m.topic.endswith("/reply")]
        assert 1 <= len(replies) <= 25  # error replies to oversized payloads: a burst, then rate-limited
    finally:
        agent.pipeline.close()
        agent.outbox.close()


def test_with_mqtt5_the_broker_discards_huge_commands_before_the_agent_reads_them(tmp_path, mosquitto, x86,
                                                                                   fashion_video):
    """mqtt_max_packet_bytes (MQTT 5): the agent tells the broker its largest packet, so a 4 MB command
    is never sent to it (no reply, no event, no memory), a 100 KB one is still read and refused with a
    reply, and a ping after them is answered. The default stays MQTT 3.1.1 (see AgentConfig)."""
    video, _ = fashion_video
    rec = Recorder(mosquitto.port)
    agent = Agent(_cfg(mosquitto.url, tmp_path / "state", x86, video, mqtt_max_packet_bytes=256 * 1024),
                  log=lambda m: None)
    with running(agent):
        assert rec.wait_for(lambda r: r.of("/meta"))
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="flood")
        pub.connect("127.0.0.1", mosquitto.port)
        pub.loop_start()
        try:
            for _ in range(20):
                pub.publish(f"{BASE}/cmd/ping", b'{"id": "huge", "pad": "' + b"x" * (4 << 20) + b'"}', qos=1)
            pub.publish(f"{BASE}/cmd/ping", b'{"id": "big", "pad": "' + b"x" * (100 << 10) + b'"}', qos=1)
            r = command(mosquitto.port, f"{BASE}/cmd/ping", {"id": "after"}, f"{BASE}/cmd/ping/reply")
        finally:
            pub.loop_stop()
            pub.disconnect()
        assert r["ok"] and r["id"] == "after"
        assert rec.wait_for(lambda r: any("exceeds" in (m.get("error") or "") for m in r.of("/cmd/ping/reply")))
    assert agent.publisher.client.protocol == mqtt.MQTTv5
    assert not [m for m in rec.of("/cmd/ping/reply") if m.get("id") == "huge"]
    big = [m for m in rec.of("/cmd/ping/reply") if "exceeds" in (m.get("error") or "")]
    assert len(big) == 1  # the 100 KB one: read, refused with a reply; the 4 MB ones never arrived
    legacy = Agent(_cfg(mosquitto.url, tmp_path / "legacy", x86, video), log=lambda m: None)
    try:
        assert legacy.publisher.client.protocol == mqtt.MQTTv311
    finally:
        legacy.pipeline.close()
        legacy.outbox.close()
    with pytest.raises(ValueError, match="at least 131072"):
        _cfg(mosquitto.url, tmp_path / "x", x86, video, mqtt_max_packet_bytes=1000)


# ---- deploys: a bad one rolls back to a serving pipeline, and they do not block commands ------------
def test_bad_shape_deploy_rolls_back_and_the_old_model_keeps_serving(tmp_path, mosquitto, x86,
                                                                      fashion_video):
    video, _ = fashion_video
    bad = _bad_shape_bundle(x86, tmp_path / "bad")
    good = tmp_path / "good"
    shutil.copytree(x86, good)
    rec = Recorder(mosquitto.port)
    agent = Agent(_cfg(mosquitto.url, tmp_path / "state", x86, video), log=lambda m: None)

    def deploy(p):
        return command(mosquitto.port, f"{BASE}/cmd/deploy", p, f"{BASE}/cmd/deploy/reply", timeout=60)

    with running(agent):
        assert rec.wait_for(lambda r: r.of("/meta"))
        r = deploy({"id": "bad", "path": str(bad)})
        assert not r["ok"] and "rolled back" in r["error"], r
        n = len(rec.of("/telemetry"))
        assert rec.wait_for(lambda r: len([w for w in r.of("/telemetry")[n:] if w["frames"] > 0]) >= 3)
        r = command(mosquitto.port, f"{BASE}/cmd/ping", {"id": "p"}, f"{BASE}/cmd/ping/reply")
        assert r["data"]["bundle"]["path"] == str(x86) and r["data"].get("pipeline_error") is None
        r = deploy({"id": "good", "path": str(good)})
        assert r["ok"], r
        assert (tmp_path / "state" / "current").resolve().joinpath("model.onnx").is_file()
    rec.close()


def test_a_pipeline_failure_in_the_health_check_rolls_back_and_the_pipeline_restarts(
        tmp_path, mosquitto, x86, fashion_video, monkeypatch):
    """A model that passes its probe and fails on real frames (injected: its engine raises after the
    probe): its error ends a pipeline run, the deploy rolls back, the pipeline restarts on the old
    model, and a later good deploy is not refused with the stale error."""
    video, _ = fashion_video
    bad, good = tmp_path / "bad", tmp_path / "good"
    shutil.copytree(x86, bad)
    shutil.copytree(x86, good)
    m = Bundle.load(bad).manifest
    m.version = "fails-on-frames"
    write_manifest(bad, m)
    rec = Recorder(mosquitto.port)
    agent = Agent(_cfg(mosquitto.url, tmp_path / "state", x86, video), log=lambda m: None)
    real_load = Runtime.load.__func__

    def load(cls, *args, **kw):  # the engine of a "fails-on-frames" bundle runs once (the probe), then raises
        rt = real_load(cls, *args, **kw)
        if rt.bundle and rt.bundle.manifest.version == "fails-on-frames":
            calls, infer = [], rt.infer

            def failing(x):
                calls.append(1)
                if len(calls) > 1:
                    raise RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions")
                return infer(x)
            rt.infer = failing
        return rt

    monkeypatch.setattr(Runtime, "load", classmethod(load))

    def deploy(p):
        return command(mosquitto.port, f"{BASE}/cmd/deploy", p, f"{BASE}/cmd/deploy/reply", timeout=60)

    with running(agent):
        assert rec.wait_for(lambda r: r.of("/meta"))
        r = deploy({"id": "bad", "path": str(bad)})
        assert not r["ok"] and "the pipeline failed" in r["error"], r
        n = len(rec.of("/telemetry"))
        assert rec.wait_for(lambda r: len([w for w in r.of("/telemetry")[n:] if w["frames"] > 0]) >= 3)
        assert agent.pipeline_error is None and agent.runtime.path == x86
        r = deploy({"id": "good", "path": str(good)})
        assert r["ok"], r
        n = len(rec.of("/telemetry"))
        assert rec.wait_for(lambda r: [w for w in r.of("/telemetry")[n:] if w["frames"] > 0])


class _HeldServer(http.server.ThreadingHTTPServer):
    """Answers every request only when `release` is set (then 404): a download that takes as long as
    the test wants."""

    def __init__(self):
        self.release = threading.Event()
        held = self.release

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                held.wait(30)
                self.send_error(404)

            def log_message(self, *a):
                pass

        super().__init__(("127.0.0.1", 0), H)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_a_deploy_does_not_block_pings_and_a_second_deploy_is_refused(tmp_path, mosquitto, x86,
                                                                       fashion_video):
    video, _ = fashion_video
    srv = _HeldServer()
    url = f"http://127.0.0.1:{srv.server_address[1]}/b.tar.gz"
    rec = Recorder(mosquitto.port)
    agent = Agent(_cfg(mosquitto.url, tmp_path / "state", x86, video), log=lambda m: None)
    try:
        with running(agent):
            assert rec.wait_for(lambda r: r.of("/meta"))
            _publish(mosquitto.port, f"{BASE}/cmd/deploy", {"id": "slow", "url": url})
            assert _wait(lambda: agent._deploying.locked(), 10)
            t0 = time.monotonic()
            r = command(mosquitto.port, f"{BASE}/cmd/ping", {"id": "during"}, f"{BASE}/cmd/ping/reply", timeout=20)
            assert r["ok"] and r["data"]["deploying"] and time.monotonic() - t0 < 10
            r = command(mosquitto.port, f"{BASE}/cmd/deploy", {"id": "second", "url": url},
                        f"{BASE}/cmd/deploy/reply", timeout=20)
            assert not r["ok"] and "in progress" in r["error"]
            assert not [b for b in rec.of("/cmd/deploy/reply") if b.get("id") == "slow"]  # still downloading
            srv.release.set()
            slow = rec.wait_for(lambda r: [b for b in r.of("/cmd/deploy/reply") if b.get("id") == "slow"])
            assert slow and not slow[0]["ok"] and "cannot download" in slow[0]["error"]
    finally:
        srv.release.set()
        srv.shutdown()
        rec.close()


# ---- threads survive their work failing -----------------------------------------------------------
def test_main_loop_and_threads_survive_a_broken_outbox(tmp_path, mosquitto, x86, fashion_video,
                                                      monkeypatch):
    """Every outbox call fails as a full or broken disk makes it fail (whatever the outbox itself
    does about it): windows and replies are lost and counted, the agent and its threads go on."""
    video, _ = fashion_video
    logs: list[str] = []
    agent = Agent(_cfg(mosquitto.url, tmp_path / "s", x86, video), log=logs.append)

    def disk_full(*a, **k):
        raise sqlite3.OperationalError("database or disk is full")

    with running(agent) as t:
        assert _wait(lambda: agent.seq >= 2 and agent.publisher.connected.is_set())
        for name in ("put", "pending", "delete", "take_dropped"):
            monkeypatch.setattr(agent.outbox, name, disk_full)
        seq = agent.seq
        assert _wait(lambda: agent.seq >= seq + 5), logs[-5:]  # windows go on being made
        agent._on_message(f"{BASE}/cmd/ping", b'{"id": "x"}', False)  # the reply cannot be stored either
        assert _wait(lambda: agent._commands.qsize() == 0)
        time.sleep(0.3)
        names = {th.name for th in threading.enumerate()}
        assert t.is_alive() and {"agent:pipeline", "agent:commands", "telemetry:sender"} <= names, names
        assert agent._send_failures > 0 and any("cannot store a message" in m for m in logs)
        agent.publisher.wake()  # the sender meets the failing outbox too
        assert _wait(lambda: "disk is full" in (agent.publisher.last_error or ""))
        monkeypatch.undo()  # the disk has room again: messages flow
        n = agent.seq
        assert _wait(lambda: agent.seq > n + 2 and "telemetry:sender" in {th.name for th in threading.enumerate()})


def test_publisher_survives_a_raising_message_callback(tmp_path, mosquitto):
    got: list[bytes] = []

    def on_message(topic, payload, retain):
        got.append(bytes(payload))
        raise RuntimeError("callback bug")

    ob = Outbox(tmp_path / "o.sqlite", 100)
    pub = Publisher(mosquitto.url, "pub-cb", ob, on_message=on_message, subscriptions=["t/#"])
    pub.start()
    try:
        assert pub.subscribed.wait(10)  # (not `connected`: messages sent before the SUBACK are not for it)
        for i in range(3):
            _publish(mosquitto.port, "t/x", f"m{i}")
        assert _wait(lambda: len(got) == 3, 10), got
        assert "callback bug" in (pub.last_error or "")
        ob.put("t/out", b"still sending")
        assert pub.flush(10)
    finally:
        pub.stop()
        ob.close()



def test_publisher_subscribed_means_the_broker_took_its_subscriptions(tmp_path, mosquitto):
    """`subscribed` is set on the broker's SUBACK, not with `connected` on its CONNACK: on a slow link a
    command sent right after `connected` was lost (a fresh session holds nothing for the client yet)."""
    from mqtt_helpers import SlowLink

    got: list[bytes] = []
    link = SlowLink(mosquitto.port, 0.8)
    ob = Outbox(tmp_path / "o.sqlite", 100)
    pub = Publisher(f"mqtt://127.0.0.1:{link.port}", "pub-slow", ob, subscriptions=["t/#"],
                    on_message=lambda topic, payload, retain: got.append(bytes(payload)))
    pub.start()
    try:
        assert pub.subscribed.wait(15) and pub.connected.is_set()
        _publish(mosquitto.port, "t/x", "first")
        assert _wait(lambda: got == [b"first"], 10), got
    finally:
        pub.stop()
        ob.close()
        link.close()


# ---- start: fall back to a good bundle; an unwritable state directory is one line ----------------
def test_start_falls_back_from_a_corrupt_deployed_bundle(tmp_path, x86, fashion_video):
    video, _ = fashion_video
    state = tmp_path / "state"
    deployed = state / "bundles" / "20250101-000000-x"
    shutil.copytree(x86, deployed)
    model = deployed / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    model.write_bytes(bytes(data))
    (state / "current").symlink_to(deployed)
    agent = Agent(_cfg(f"mqtt://127.0.0.1:{free_port()}", state, x86, video), log=lambda m: None)
    try:
        assert agent.runtime.path == x86
        (ev,) = [e for e in _outbox_events(agent) if e["kind"] == "bundle_refused"]
        assert ev["data"]["refused"] == str(deployed.resolve()) and "checksum" in ev["data"]["reason"]
        assert ev["data"]["using"] == str(x86)
    finally:
        agent.pipeline.close()
        agent.outbox.close()


def test_unwritable_state_dir_is_one_line(tmp_path, x86, fashion_video):
    video, _ = fashion_video
    afile = tmp_path / "afile"
    afile.write_text("x")
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)],
                             capture_output=True).returncode == 0
    try:
        for state in [afile / "state", *([ro] if mounted else [])]:
            r = run_cli("agent", "--broker", "mqtt://127.0.0.1:1", "--bundle", str(x86),
                        "--source", str(video), "--state-dir", str(state), timeout=60)
            assert r.returncode == 2 and "not writable" in r.stderr, (state, r.stderr)
            assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)])
