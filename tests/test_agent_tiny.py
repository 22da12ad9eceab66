"""The agent's deploy, rollback and outbox duties on bundles built in milliseconds (a one-layer ONNX
classifier made with onnx.helper), so they run in the fast tier and under every mutant of
agent/service.py (bench/mutation_bench.py) without a minute of export first.

What is checked is what the device does, never the reply text: which bundle the pipeline runs
frames through, where `current` points (and when it moves), and which windows reach the broker.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from lepton_edge.agent.config import AgentConfig
from lepton_edge.agent.service import Agent
from lepton_edge.bundle import Bundle, InputSpec, Manifest, OutputSpec, write_manifest
from lepton_edge.telemetry.schema import DeployCommand
from mjpeg_server import free_port
from mqtt_helpers import Recorder, running_agent
from tmpfs import free_bytes, tmpfs
from waiting import wait_until as _wait


def _tiny(d: Path, seed: int, version: str = "1", budget_ms: float = 1000.0) -> Path:
    """A 28x28 gray classifier of 10 classes: Flatten -> MatMul -> Add, random weights of `seed`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(0, 0.1, (784, 10)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.normal(0, 0.1, (10,)).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["mm"]),
         helper.make_node("Add", ["mm", "b"], ["y"])], "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 28, 28])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], initializer=[w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    d.mkdir(parents=True, exist_ok=True)
    onnx.save(model, d / "model.onnx")
    (d / "labels.txt").write_text("".join(f"c{i}\n" for i in range(10)))
    write_manifest(d, Manifest(
        name=f"tiny{seed}", version=version, created="2026-01-01",
        target={"id": "x86-cpu", "threads": 1, "latency_budget_ms": budget_ms}, format="onnx", precision="fp32",
        model_file="model.onnx", task="classify", labels_file="labels.txt",
        inputs=[InputSpec(name="input", shape=[1, 1, 28, 28], color="GRAY")],
        outputs=[OutputSpec(name="y", shape=[1, 10])]))
    return d


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two tiny bundles (different weights) and a 200-frame lossless video."""
    import cv2

    root = tmp_path_factory.mktemp("tiny")
    video = root / "frames.avi"
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"FFV1"), 30, (28, 28), False)
    rng = np.random.default_rng(0)
    for _ in range(200):
        w.write(rng.integers(0, 256, (28, 28), dtype=np.uint8))
    w.release()
    return {"start": _tiny(root / "start", 1), "new": _tiny(root / "new", 2), "video": video}


def _cfg(state: Path, bundle: Path, video: Path, broker: str | None = None, **kw) -> AgentConfig:
    return AgentConfig(broker=broker or f"mqtt://127.0.0.1:{free_port()}", fleet="f1", device_id="dev1",
                       bundle=bundle, source=str(video), loop=True, window_s=0.1, state_dir=state, threads=1,
                       health_frames=5, health_timeout_s=2.0, **{"deploy_paths": [bundle.parent, state.parent], **kw})


_running = running_agent  # tests/mqtt_helpers.py




def _stored(state: Path, suffix: str) -> list[dict]:
    """The payloads on topics ending in `suffix` left in the outbox file (after the agent stopped)."""
    db = sqlite3.connect(state / "outbox.sqlite")
    try:
        rows = db.execute("SELECT topic, payload FROM outbox ORDER BY id").fetchall()
    finally:
        db.close()
    return [json.loads(p) for t, p in rows if t.endswith(suffix)]


def _served(agent: Agent) -> Path:
    return Path(agent.pipeline.runtime.path).resolve()


def test_deploy_swaps_after_the_check_and_rollback_restores_the_served_model(tmp_path, tiny, mosquitto):
    """A good deploy: the pipeline serves it and `current` names it. A deploy that fails its health
    check: `current` does not move while the check runs, then the old model serves again, `current`
    is unchanged, the refused copy is gone; a restart starts from `current`."""
    bad = _tiny(tmp_path / "bad", 3, version="fails", budget_ms=1e-6)  # no model is that fast
    state = tmp_path / "state"
    cfg = _cfg(state, tiny["start"], tiny["video"], broker=mosquitto.url)  # a broker: stopping flushes at once
    rec = Recorder(mosquitto.port)
    agent = Agent(cfg, log=lambda m: None)
    with _running(agent):
        assert _served(agent) == tiny["start"].resolve() and agent.store.current() is None
        agent.deploy(DeployCommand(id="good", path=str(tiny["new"])))
        kept = _served(agent)
        assert kept.parent == (state / "bundles").resolve() and Bundle.load(kept).manifest.name == "tiny2"
        assert agent.store.current() == kept and agent.runtime.path.resolve() == kept
        assert json.loads((state / "good.json").read_text())[0] == kept.name

        done = threading.Event()
        worker = threading.Thread(target=lambda: (agent.deploy(DeployCommand(id="bad", path=str(bad),
                                                                               health_frames=10000)), done.set()))
        worker.start()
        try:  # the check runs (up to 2 s for 10000 frames), then fails on the budget or the timeout
            swapped = _wait(lambda: _served(agent) != kept and _served(agent), 20, step=0.002)
            assert swapped and Bundle.load(swapped).manifest.version == "fails"
            assert not done.is_set() and agent.store.current() == kept, "`current` moved before the health check"
        finally:
            worker.join(30)
        assert done.is_set()
        assert _served(agent) == kept and agent.runtime.path.resolve() == kept
        assert agent.store.current() == kept and sorted((state / "bundles").iterdir()) == [kept]
        frames = agent.pipeline.stats.frames
        assert _wait(lambda: agent.pipeline.stats.frames > frames + 10, 20)
        assert _served(agent) == kept
    assert rec.wait_for(lambda r: [e for e in r.of("/events") if e["kind"] == "stopped"])
    rec.close()
    kinds = [e["kind"] for e in rec.of("/events")]
    assert kinds.count("deploy") == 1 and kinds.count("rollback") == 1
    restarted = Agent(cfg, log=lambda m: None)
    try:
        assert Path(restarted.runtime.path).resolve() == kept
    finally:
        restarted.pipeline.close()
        restarted.outbox.close()


def test_a_bundle_that_fails_its_probe_is_refused_before_the_swap(tmp_path, tiny, mosquitto):
    """A manifest that disagrees with its model (32x32 declared for a 28x28 model): refused before it
    replaces the running model; `current` and the pipeline stay as they were; the copy is removed."""
    bad = tmp_path / "bad"
    shutil.copytree(tiny["new"], bad)
    m = Bundle.load(bad).manifest
    m.inputs[0].shape = [1, 1, 32, 32]
    write_manifest(bad, m)
    state = tmp_path / "state"
    rec = Recorder(mosquitto.port)
    agent = Agent(_cfg(state, tiny["start"], tiny["video"], broker=mosquitto.url), log=lambda m: None)
    with _running(agent):
        agent.deploy(DeployCommand(id="bad", path=str(bad)))
        assert _served(agent) == tiny["start"].resolve() and agent.store.current() is None
        assert list((state / "bundles").iterdir()) == []
    assert rec.wait_for(lambda r: [e for e in r.of("/events") if e["kind"] == "stopped"])
    rec.close()
    kinds = [e["kind"] for e in rec.of("/events")]
    assert "rollback" in kinds and "deploy" not in kinds


def _leavefree_bytes(state: Path, free: int, settled, quiet_s: float = 0.5, timeout_s: float = 20.0) -> None:
    """Fill `state` with a file until exactly `free` bytes are left, once the agent's own writes have
    settled (`settled()`: its outbox delivered and emptied) and stay settled for `quiet_s`. Why: the
    outbox's delete of a delivered event lands in its WAL a moment after the broker has the event; a
    page taken after the fill made the bundle's copy fail instead of the write the test is about (CI at
    f12356e)."""
    filler = state / "filler"
    deadline = time.monotonic() + timeout_s
    assert _wait(settled, timeout_s), "the agent's outbox never emptied"
    with open(filler, "ab") as f:
        while time.monotonic() < deadline:
            while (left := free_bytes(state)) > free:
                f.write(bytes(max(4096, min(1 << 16, left - free))))
                f.flush()
            if left < free:  # something else took pages: give them back
                f.truncate(max(0, f.tell() - (free - left)))
                f.seek(0, os.SEEK_END)
                continue
            time.sleep(quiet_s)
            if free_bytes(state) == free and settled():
                return
    raise AssertionError(f"{state}: free space never settled at {free} bytes")


@pytest.mark.root
def test_a_disk_that_fills_as_the_deploy_is_recorded_rolls_it_back(tmp_path, tiny, mosquitto):
    """The new bundle's copy takes the state disk's last bytes and passes its health check; good.json then
    cannot be written. The deploy is rolled back whole: the old model serves, `current` is unchanged, the
    copy is removed, and the reply and event say so. (It replied `OSError: No space left on device` while
    the new model served and `current` already named it.)"""
    pages = sum(-(-f.stat().st_size // 4096) * 4096 for f in tiny["new"].iterdir())  # what the copy takes
    with tmpfs(tmp_path / "state", "size=3m") as state:
        rec = Recorder(mosquitto.port)
        agent = Agent(_cfg(state, tiny["start"], tiny["video"], broker=mosquitto.url), log=lambda m: None)
        agent.window_s = 3600  # no window takes the outbox's share of the disk while the deploy runs
        with _running(agent):
            assert rec.wait_for(lambda r: [e for e in r.of("/events") if e["kind"] == "insecure"])
            _leavefree_bytes(state, pages, settled=lambda: len(agent.outbox) == 0)
            agent.deploy(DeployCommand(id="full", path=str(tiny["new"])))
            assert _served(agent) == tiny["start"].resolve() and agent.store.current() is None
            assert list((state / "bundles").iterdir()) == [] and not (state / "good.json").exists()
            got = rec.wait_for(lambda r: [m for m in r.of("/cmd/deploy/reply") if m["id"] == "full"])
            assert got and not got[0]["ok"] and "current bundle" in got[0]["error"], got
            (state / "filler").unlink()
            agent.deploy(DeployCommand(id="room", path=str(tiny["new"])))  # space again: the same deploy passes
            assert agent.store.current() == _served(agent) and Bundle.load(_served(agent)).manifest.name == "tiny2"
        rec.close()
        kinds = [e["kind"] for e in rec.of("/events")]
        assert "rollback" in kinds and "deploy" in kinds, kinds


@pytest.mark.root
def test_a_state_disk_out_of_inodes_at_start_runs_degraded_not_a_restart_loop(tmp_path, tiny, mosquitto):
    """A restart on a state disk whose inodes are all taken (blocks to spare): the agent starts with its
    outbox in memory, says so, answers and sends windows, as on a disk out of blocks. (Its write probe
    failed with ENOSPC and it exited 2 at every start: a restart loop, the device silent.)"""
    with tmpfs(tmp_path / "state", "size=3m,nr_inodes=16") as state:
        (state / "bundles").mkdir()
        (state / "incoming").mkdir()  # what the last start left
        n = 0
        with contextlib.suppress(OSError):
            while True:
                (state / f"f{n}").touch()
                n += 1
        rec = Recorder(mosquitto.port)
        agent = Agent(_cfg(state, tiny["start"], tiny["video"], broker=mosquitto.url), log=lambda m: None)
        with _running(agent):
            assert rec.wait_for(lambda r: len(r.of("/telemetry")) >= 3), "no windows from the degraded outbox"
            got = [e for e in rec.of("/events") if e["kind"] == "outbox"]
            assert got and "outbox in memory" in got[0]["message"], got
        rec.close()


@pytest.mark.slow  # the first agent, with no broker, waits its 5 s for a flush when it stops
def test_windows_left_in_the_outbox_are_delivered_by_the_next_start(tmp_path, tiny, mosquitto):
    """No broker for the first run: its windows wait in the outbox. The next start (same state
    directory) keeps them and delivers them, contiguous, once the broker is there."""
    state = tmp_path / "state"
    first = Agent(_cfg(state, tiny["start"], tiny["video"]), log=lambda m: None)
    with _running(first):
        assert _wait(lambda: first.seq >= 8, 20)
    boot1 = first.boot_id
    stored = {w["seq"] for w in _stored(state, "/telemetry")}
    assert len(stored) >= 8
    rec = Recorder(mosquitto.port)
    second = Agent(_cfg(state, tiny["start"], tiny["video"], broker=mosquitto.url), log=lambda m: None)
    assert len(second.outbox) >= len(stored)  # nothing emptied at start
    with _running(second):
        def boot1_delivered(r):
            seqs = {w["seq"] for w in r.of("/telemetry") if w["boot_id"] == boot1}
            return seqs if seqs >= stored else None

        got = rec.wait_for(boot1_delivered, timeout=30)
        assert got == set(range(max(got) + 1)), got
        assert rec.wait_for(lambda r: [w for w in r.of("/telemetry") if w["boot_id"] == second.boot_id])
        assert _wait(lambda: second.publisher.flush(0.1), 20)
    rec.close()


def test_commands_over_mqtt_and_oversized_ones_rate_limited(tmp_path, tiny, mosquitto, monkeypatch):
    """Commands arrive through the broker and are answered; an oversized one gets a one-line error
    reply and an event, repeats within the rate-limit period are counted in the next event rather than
    sent one by one (the period shortened here from 5 s so the test need not wait for it)."""
    from lepton_edge.agent import service
    from lepton_edge.telemetry.schema import MAX_COMMAND_BYTES
    from mqtt_helpers import command

    monkeypatch.setattr(service, "RATE_LIMIT_S", 2.0)
    base = "lepton/v1/f1/dev1"
    rec = Recorder(mosquitto.port)
    agent = Agent(_cfg(tmp_path / "state", tiny["start"], tiny["video"], broker=mosquitto.url), log=lambda m: None)

    def errors(r):
        return [e for e in r.of("/events") if e["kind"] == "command_error"]

    def refusals(n):
        return lambda r: len([x for x in r.of("/cmd/ping/reply") if x.get("id") is None]) >= n

    with _running(agent):
        assert rec.wait_for(lambda r: r.of("/meta") and r.of("/status"))
        status, meta = rec.of("/status")[-1], rec.of("/meta")[-1]
        assert status["online"] is True and status["boot_id"] == agent.boot_id  # retained, for the monitor
        b = meta["bundle"]
        assert (b["name"], b["version"], b["format"], b["precision"]) == ("tiny1", "1", "onnx", "fp32")
        assert b["path"] == str(tiny["start"]) and len(b["sha256"]) == 64 and meta["boot_id"] == agent.boot_id
        assert b["latency_budget_ms"] == 1000.0  # the manifest's target budget: the monitor's p95 alert uses it
        r = command(mosquitto.port, f"{base}/cmd/ping", {"id": "p1"}, f"{base}/cmd/ping/reply", timeout=15)
        assert r["ok"] and r["data"]["boot_id"] == agent.boot_id and r["data"]["bundle"]["sha256"] == b["sha256"]
        big = b'{"id": "big", "pad": "' + b"x" * MAX_COMMAND_BYTES + b'"}'
        for _ in range(3):  # within one period: one event, the others held back and counted
            rec.client.publish(f"{base}/cmd/ping", big, qos=1).wait_for_publish(5)
        assert rec.wait_for(refusals(3))  # each answered (a burst of error replies is allowed)
        replies = [x for x in rec.of("/cmd/ping/reply") if x.get("id") is None]
        assert all(x["error"].startswith("payload of ") and "exceeds" in x["error"] and not x["ok"] for x in replies)
        first = rec.wait_for(errors)
        assert first[0]["data"]["suppressed"] == 0 and first[0]["data"]["bytes"] > MAX_COMMAND_BYTES
        time.sleep(2.1)  # the period is over: the next event carries the count of those held back
        rec.client.publish(f"{base}/cmd/ping", big, qos=1).wait_for_publish(5)
        assert rec.wait_for(refusals(4))
        events = rec.wait_for(lambda r: (e := errors(r)) and sum(1 + x["data"]["suppressed"] for x in e) >= 4 and e)
        assert sum(1 + x["data"]["suppressed"] for x in events) == 4 and len(events) <= 3, events
        held = [x for x in events if x["data"]["suppressed"]]
        assert held and all(f"({x['data']['suppressed']} more like it not reported)" in x["message"] for x in held)
        r = command(mosquitto.port, f"{base}/cmd/ping", {"id": "p2"}, f"{base}/cmd/ping/reply", timeout=15)
        assert r["ok"]  # still answering
        # malformed commands (not oversized) are held to the same limits: junk at any rate costs at most
        # a burst of error replies and one event per period (they were one reply and one event each)
        n_events, n_replies = len(errors(rec)), len(rec.of("/cmd/set/reply"))
        for _ in range(200):
            rec.client.publish(f"{base}/cmd/set", b"notjson", qos=0)
        time.sleep(1.5)
        r = command(mosquitto.port, f"{base}/cmd/ping", {"id": "p3"}, f"{base}/cmd/ping/reply", timeout=15)
        assert r["ok"]
        junk_replies = len(rec.of("/cmd/set/reply")) - n_replies
        assert 1 <= junk_replies <= service.REJECT_BURST + 40, junk_replies  # the burst, then 10/s
        assert len(errors(rec)) - n_events <= 2
    rec.close()


def test_links_in_the_state_directory_are_never_written_through(tiny, tmp_path, mosquitto):
    """A symlink at outbox.sqlite.lock made the agent truncate the file it pointed at and write its pid
    there; a dangling one at outbox.sqlite made SQLite create the database where it pointed. Now the
    lock's link is one line at start (exit 2), and the database's is not opened: the outbox lives in
    memory, with a warning, and the agent serves on."""
    import signal
    import sys

    victim = tmp_path / "victim.txt"
    victim.write_text("IMPORTANT\n")
    exe = [str(Path(sys.executable).parent / "lepton-edge"), "agent", "--broker", mosquitto.url, "--bundle",
           str(tiny["start"]), "--source", str(tiny["video"]), "--loop", "--fleet", "f1", "--device-id", "dev1"]
    state = tmp_path / "s1"
    state.mkdir()
    (state / "outbox.sqlite.lock").symlink_to(victim)
    r = subprocess.run([*exe, "--state-dir", str(state)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "outbox.sqlite.lock" in r.stderr and "symlink" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert victim.read_text() == "IMPORTANT\n"

    state = tmp_path / "s2"
    state.mkdir()
    elsewhere = tmp_path / "elsewhere.sqlite"
    (state / "outbox.sqlite").symlink_to(elsewhere)
    p = subprocess.Popen([*exe, "--state-dir", str(state)], stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("outbox in memory" in x for x in lines):
            line = p.stderr.readline()
            if not line:
                break
            lines.append(line)
        assert any("outbox in memory" in x and "symlink" in x for x in lines), lines
        assert p.poll() is None  # still serving
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(timeout=30)
    assert not elsewhere.exists() and not list(tmp_path.glob("elsewhere.sqlite*"))
    assert (state / "outbox.sqlite").is_symlink()


def test_a_broker_port_of_zero_in_agent_toml_is_one_line(tiny, tmp_path, mosquitto):
    """`broker = "mqtt://127.0.0.1:0"` (a port left out of a template) was read as no port at all: the
    agent went to 1883, some other broker or none, and said nothing; now it is one line at start, exit 2."""
    import sys

    conf = tmp_path / "agent.toml"
    conf.write_text(f'broker = "{mosquitto.url.rsplit(":", 1)[0]}:0"\nfleet = "f1"\ndevice_id = "dev1"\n'
                    f'bundle = "{tiny["start"]}"\nsource = "{tiny["video"]}"\nstate_dir = "{tmp_path / "s"}"\n')
    exe = str(Path(sys.executable).parent / "lepton-edge")
    try:
        r = subprocess.run([exe, "agent", "--config", str(conf)], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("the agent ran with a broker URL of port 0")
    assert r.returncode == 2 and "bad port" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_bundles_link_in_the_state_directory_is_one_line_and_removes_nothing(tiny, tmp_path, mosquitto):
    """state_dir/bundles as a symlink to a folder (moved to a bigger disk, or pointed at the folder holding the
    configured bundle) passed mkdir, and the start's clean-up of leftovers removed everything in that folder."""
    import sys

    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "sub").mkdir(parents=True)
    (elsewhere / "precious.txt").write_text("keep me")
    state = tmp_path / "state"
    state.mkdir()
    (state / "bundles").symlink_to(elsewhere)
    exe = str(Path(sys.executable).parent / "lepton-edge")
    try:
        r = subprocess.run([exe, "agent", "--broker", mosquitto.url, "--bundle", str(tiny["start"]), "--source",
                            str(tiny["video"]), "--fleet", "f1", "--device-id", "dev1", "--state-dir", str(state)],
                           capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        r = None
    assert sorted(p.name for p in elsewhere.iterdir()) == ["precious.txt", "sub"]
    assert r is not None, "the agent started on a bundles/ symlink"
    assert r.returncode == 2 and "bundles is a symlink" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("line", ['state_dir = "/tmp/x\\u0000y"', 'bundle = "/tmp/x\\u0000y"',
                                  'ca_file = "/tmp/x\\u0000y"', 'key_file = "/tmp/x\\u0000y"',
                                  '[delegates]\nedgetpu = "/usr/lib/x\\u0000y.so"'])
def test_a_nul_byte_in_a_path_of_agent_toml_is_one_line(tiny, tmp_path, line):
    """TOML strings may hold \\u0000; a path cannot. state_dir, bundle or ca_file with one ended the agent's
    start in a ValueError traceback (exit 1); key_file (unused over mqtt://) and a delegate's library were taken."""
    import sys

    key = line.split()[0]
    base = {"broker": "mqtt://127.0.0.1:1", "fleet": "f1", "device_id": "dev1", "bundle": str(tiny["start"]),
            "source": str(tiny["video"]), "state_dir": str(tmp_path / "s")}
    conf = tmp_path / "agent.toml"
    conf.write_text("".join(f'{k} = "{v}"\n' for k, v in base.items() if k != key) + line + "\n")
    exe = str(Path(sys.executable).parent / "lepton-edge")
    r = subprocess.run([exe, "agent", "--config", str(conf)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "NUL byte" in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_stock_mosquitto_clients_watch_and_command_a_device(tiny, tmp_path, mosquitto):
    """What the README shows an operator with Debian's mosquitto-clients, run as written: `mosquitto_sub -v`
    sees the device's retained status and meta and its telemetry windows as plain JSON, and `mosquitto_rr`
    (subscribes to the reply topic, then publishes) gets ping's and set's replies."""

    sub, rr = shutil.which("mosquitto_sub"), shutil.which("mosquitto_rr")
    if not (sub and rr):
        pytest.skip("Debian mosquitto-clients not installed (apt-get install mosquitto-clients)")
    host = ["-h", "127.0.0.1", "-p", str(mosquitto.port)]
    agent = Agent(_cfg(tmp_path / "state", tiny["start"], tiny["video"], broker=mosquitto.url))
    with _running(agent):
        r = subprocess.run([sub, *host, "-v", "-t", "lepton/v1/f1/dev1/#", "-C", "6", "-W", "60"],
                           capture_output=True, text=True, timeout=90)
        assert r.returncode == 0, r.stderr
        got = [line.split(" ", 1) for line in r.stdout.splitlines()]
        by_topic = {t.rsplit("/", 1)[1]: json.loads(p) for t, p in got}
        assert by_topic["status"]["online"] is True and by_topic["meta"]["bundle"]["name"] == "tiny1"
        r = subprocess.run([sub, *host, "-t", "lepton/v1/f1/dev1/telemetry", "-C", "1", "-W", "60"],
                           capture_output=True, text=True, timeout=90)
        window = json.loads(r.stdout)
        assert r.returncode == 0 and window["frames"] > 0 and window["boot_id"] == agent.boot_id
        cmd = "lepton/v1/f1/dev1/cmd"
        r = subprocess.run([rr, *host, "-t", f"{cmd}/ping", "-e", f"{cmd}/ping/reply", "-m", '{"id": "p1"}',
                            "-W", "60"], capture_output=True, text=True, timeout=90)
        reply = json.loads(r.stdout)
        assert r.returncode == 0 and reply["ok"] is True and reply["id"] == "p1", (r.stdout, r.stderr)
        r = subprocess.run([rr, *host, "-t", f"{cmd}/set", "-e", f"{cmd}/set/reply", "-m",
                            '{"id": "s1", "window_s": 0.5}', "-W", "60"], capture_output=True, text=True, timeout=90)
        assert json.loads(r.stdout)["ok"] is True and agent.window_s == 0.5, (r.stdout, r.stderr)


def test_a_stop_signal_landing_while_run_holds_its_stop_events_lock_still_stops_the_agent(tiny, tmp_path,
                                                                                          mosquitto):
    """A SIGINT found the main thread inside run()'s wait on its stop Event, holding that Event's lock, and the
    handler (stop(), which sets the Event) waited for that lock for good: an agent found 48 minutes after its
    SIGINT, pipeline at 90 % of a core, only SIGKILL ended it. Here the handler run() installs is called by a
    thread that holds the same lock, as the main thread did: it must return at once, and the agent stop."""
    import signal

    agent = Agent(_cfg(tmp_path / "state", tiny["start"], tiny["video"], broker=mosquitto.url))
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    returned, outcome = threading.Event(), {}

    def signal_it():
        deadline = time.monotonic() + 30
        while signal.getsignal(signal.SIGINT) is saved[signal.SIGINT] and time.monotonic() < deadline:
            time.sleep(0.01)
        handler = signal.getsignal(signal.SIGINT)
        with agent._stop._cond:  # (what the main thread holds inside Event.wait)
            waiter = threading.Thread(target=lambda: (handler(signal.SIGINT, None), returned.set()), daemon=True)
            waiter.start()
            outcome["handler_returned"] = returned.wait(3)
        if not outcome["handler_returned"]:
            agent.stop()  # (the old handler is stuck: end the agent some other way)
        outcome["at"] = time.monotonic()

    th = threading.Thread(target=signal_it)
    th.start()
    try:
        rc = agent.run()  # in the main thread: it installs its handlers
    finally:
        th.join(30)
        for s, h in saved.items():
            signal.signal(s, h)
    assert outcome["handler_returned"], "the signal handler waited on the stop Event's lock"
    assert rc == 0 and agent._stop.is_set()
