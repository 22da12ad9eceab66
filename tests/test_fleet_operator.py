"""The fleet monitor as an operator uses it: the `lepton-edge` processes against a real mosquitto and
real SQLite files; what a stock MQTT client sees on the broker; one line, never a traceback."""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from lepton_edge.fleet.store import open_store
from lepton_edge.fleet.store.base import Alert
from lepton_edge.telemetry.schema import Status, Telemetry

EXE = str(Path(sys.executable).parent / "lepton-edge")
ENV = {**os.environ, "COLUMNS": "200"}


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def wait(pred, timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    assert pred(), f"timed out waiting for {what}"


def client(port: int, cid: str) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid)
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def announce(c: mqtt.Client, fleet: str, device: str, windows: int = 2) -> None:
    """What an agent sends: retained status and meta, then windows (QoS 1, acknowledged)."""
    base = f"lepton/v1/{fleet}/{device}"
    infos = [c.publish(f"{base}/status", Status(online=True, boot_id="b1").model_dump_json(), qos=1, retain=True),
             c.publish(f"{base}/meta", json.dumps({"v": 1, "software": "0.1.0", "bundle": {"name": "demo"}}),
                       qos=1, retain=True)]
    infos += [c.publish(f"{base}/telemetry", Telemetry(boot_id="b1", seq=i, window_s=1, frames=5, fps=5.0)
                        .model_dump_json(), qos=1) for i in range(windows)]
    for i in infos:
        i.wait_for_publish(10)


def retained(port: int, topic: str = "#", quiet_s: float = 1.0) -> dict[str, bytes]:
    """Every retained message a fresh subscriber gets (what Home Assistant or mosquitto_sub would see)."""
    got: dict[str, bytes] = {}
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"look-{time.monotonic_ns()}")
    c.on_message = lambda cl, u, m: got.__setitem__(m.topic, m.payload) if m.retain else None
    c.connect("127.0.0.1", port)
    c.subscribe(topic, qos=1)
    c.loop_start()
    time.sleep(quiet_s)
    c.loop_stop()
    c.disconnect()
    return got


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the store: locked, corrupt -> one line (and a retry) ------------------------------------------
def test_a_corrupt_store_is_one_line_from_monitor_and_fleet_ls(tmp_path):
    bad = tmp_path / "fleet.sqlite"
    bad.write_bytes(b"\x13not a database" * 400)
    for args in (["monitor", "--broker", "mqtt://127.0.0.1:1", "--store", str(bad), "--once"],
                 ["fleet", "ls", "--store", str(bad)]):
        r = cli(*args)
        assert r.returncode in (1, 2), (args, r.stderr)
        assert "Traceback" not in r.stderr and "StoreError" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "corrupt" in r.stderr and r.stderr.count(str(bad)) == 1, r.stderr


def test_a_store_that_cannot_be_opened_fails_at_once_with_one_line(tmp_path):
    """`monitor --store` given a directory or /dev/null (or a newer lepton-edge's store) retried for 58 s as
    if the database were locked, then ended with exit 1. Waiting cannot change any of them: one line, exit 2,
    within a couple of seconds. (A locked store is still waited for: the test below.)"""
    folder = tmp_path / "a-folder"
    folder.mkdir()
    newer = tmp_path / "newer.sqlite"
    open_store(newer).close()
    with sqlite3.connect(newer) as c:
        c.execute("INSERT INTO schema_version (version) VALUES (99)")
    too_long = tmp_path / ("a" * 300) / "f.sqlite"  # (stat raises for it: a traceback, as for a folder not entered)
    for store, words in ((folder, "a directory"), ("/dev/null", "not a regular file"), (newer, "upgrade"),
                         (too_long, "File name too long")):
        t0 = time.monotonic()
        r = cli("monitor", "--broker", "mqtt://127.0.0.1:1", "--store", str(store), "--no-tui", "--seconds", "30",
                timeout=40)
        took = time.monotonic() - t0
        assert r.returncode == 2 and took < 10, (store, r.returncode, took, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: fleet store ") and words in lines[0], r.stderr
        assert str(store) in lines[0] and "Traceback" not in r.stderr and "retrying" not in r.stderr


def test_a_port_in_use_for_the_dashboard_or_metrics_is_our_one_line(tmp_path, mosquitto):
    """A port in use printed uvicorn's own line ('ERROR: [Errno 98] error while attempting to bind on
    address ...') and then ours: ours alone now, with the reason."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flag, what in (("--web", "the web dashboard"), ("--metrics", "metrics")):
            r = cli("monitor", "--broker", mosquitto.url, "--store", str(tmp_path / "f.sqlite"), "--no-tui",
                    "--seconds", "20", flag, f"127.0.0.1:{port}")
            assert r.returncode == 2, (flag, r.returncode, r.stderr)
            assert r.stderr.strip().splitlines() == [f"error: {what} could not listen on 127.0.0.1:{port} "
                                                     "(address already in use)"], r.stderr


def test_monitor_waits_for_a_locked_store_with_one_line_then_runs(tmp_path, mosquitto):
    path = tmp_path / "fleet.sqlite"
    open_store(path).close()
    other = sqlite3.connect(path, isolation_level=None)  # another writer holds the file
    other.execute("BEGIN IMMEDIATE")
    p = subprocess.Popen([EXE, "monitor", "--broker", mosquitto.url, "--store", str(path), "--once", "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        first = p.stderr.readline()  # after the 5 s busy timeout: one line saying it retries
        assert "locked" in first and "retrying" in first, first
        other.execute("COMMIT")  # the lock goes away: the monitor goes on by itself
        out, rest = p.communicate(timeout=60)
    finally:
        other.close()
        p.kill()
    assert p.returncode == 0, first + rest
    assert "Traceback" not in rest and "locked" not in rest, rest
    assert json.loads(out)["devices"] == []


def test_monitor_log_lines_follow_log_json(tmp_path, mosquitto):
    """The monitor's own lines (a locked store, connecting) are log records: with --log-json every
    stderr line is one JSON object a log shipper can read."""
    path = tmp_path / "fleet.sqlite"
    open_store(path).close()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    p = subprocess.Popen([EXE, "--log-json", "monitor", "--broker", mosquitto.url, "--store", str(path), "--once",
                          "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        first = p.stderr.readline()
        other.execute("COMMIT")
        out, rest = p.communicate(timeout=60)
    finally:
        other.close()
        p.kill()
    assert p.returncode == 0, first + rest
    records = [json.loads(line) for line in (first + rest).splitlines() if line.strip()]
    assert records and "locked" in records[0]["message"] and records[0]["level"] == "WARNING", records
    assert json.loads(out)["devices"] == []


# ---- --once: a read that disturbs nothing --------------------------------------------------------
def test_once_does_not_take_over_the_session_of_a_running_monitor(tmp_path, mosquitto):
    service = subprocess.Popen([EXE, "monitor", "--broker", mosquitto.url, "--store", str(tmp_path / "a.sqlite"),
                                "--no-tui", "--seconds", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=ENV)
    try:
        # subscribed, not just connected: windows published before its SUBSCRIBE reached the broker were lost
        wait(lambda: "Sending SUBACK to lepton-monitor-" in mosquitto.log(), 20, "the service monitor's session")
        service_id = mosquitto.log().split("as lepton-monitor-")[1].split()[0]
        pub = client(mosquitto.port, "agent-like")
        announce(pub, "f1", "cam1")
        r = cli("monitor", "--broker", mosquitto.url, "--store", str(tmp_path / "b.sqlite"), "--once", "--json")
        assert r.returncode == 0, r.stderr
        assert [d["device"] for d in json.loads(r.stdout)["devices"]] == ["cam1"]  # the retained state
        time.sleep(1.0)  # a taken-over service reconnects within its 0.5 s back-off: give it the chance
        log = mosquitto.log()
        assert "already connected" not in log, log[-2000:]
        assert log.count(f"as lepton-monitor-{service_id} ") == 1  # the service never had to reconnect
        st = open_store(tmp_path / "a.sqlite")
        wait(lambda: (st.device("f1", "cam1") or 0) and st.device("f1", "cam1").windows == 2, 10, "the windows")
        st.close()
        pub.loop_stop()
    finally:
        service.terminate()
        service.wait(timeout=30)


def test_once_with_an_unreachable_broker_fails_instead_of_printing_a_stale_fleet(tmp_path):
    st = open_store(tmp_path / "s.sqlite")
    st.set_status("f1", "cam1", {"v": 1, "online": True, "boot_id": "b1"}, time.time())
    st.close()
    r = cli("monitor", "--broker", f"mqtt://127.0.0.1:{free_port()}", "--store", str(tmp_path / "s.sqlite"),
            "--once", "--json")
    assert r.returncode == 2, (r.stdout, r.stderr)  # a broker that cannot be reached: bad input, as simulate's
    doc = json.loads(r.stdout)  # the refusal as the one document, not a stale fleet
    assert doc["ok"] is False and "not reachable" in doc["error"] and "devices" not in doc and doc["exit_code"] == 2
    assert "not reachable" in r.stderr and "Traceback" not in r.stderr


def test_a_broker_that_refuses_the_monitors_subscriptions_is_one_line_at_once(tmp_path):
    """A user the broker lets connect but read nothing (mosquitto's dynamic-security plugin, a client with no
    role): the live fleet would stay empty for good, so the monitor names the refused subscriptions and what to
    give, at once and with exit 2, not after its 10 s wait for the broker."""
    import glob

    from mqtt_broker import Mosquitto

    plugin = glob.glob("/usr/lib/*/mosquitto_dynamic_security.so")
    assert plugin, "mosquitto's dynamic-security plugin (Debian's mosquitto package) is missing"
    dynsec = tmp_path / "dynsec.json"
    subprocess.run(["mosquitto_ctrl", "dynsec", "init", str(dynsec), "admin", "pw"], check=True, capture_output=True)
    conf = json.loads(dynsec.read_text())
    admin = conf["clients"][0]
    conf["clients"].append({**admin, "username": "watcher", "textName": "reads nothing", "roles": []})
    dynsec.write_text(json.dumps(conf))
    broker = Mosquitto(tmp_path / "mq", extra=f"plugin {plugin[0]}\nplugin_opt_config_file {dynsec}\n").start()
    try:
        t0 = time.monotonic()
        r = cli("monitor", "--broker", broker.url.replace("mqtt://", "mqtt://watcher:pw@"),
                "--store", str(tmp_path / "s.sqlite"), "--once")
        took = time.monotonic() - t0
    finally:
        broker.stop()
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "refused the monitor's subscriptions" in r.stderr and "read access" in r.stderr, r.stderr
    assert "pw" not in r.stderr.replace("password", "")  # (the URL is named without its password)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert took < 9, took


# ---- forget: store, broker and Home Assistant -------------------------------------------------------
def test_fleet_forget_removes_the_device_from_store_broker_and_home_assistant(tmp_path, mosquitto):
    from lepton_edge.fleet.homeassistant import HomeAssistantBridge
    from lepton_edge.fleet.monitor import Monitor

    path = tmp_path / "fleet.sqlite"
    st = open_store(path)
    ha: list = []
    mon = Monitor(mosquitto.url, st, client_id="op-test", log=lambda line: None,
                  on_change=lambda changed: [b(changed) for b in ha]).start()
    assert mon.connected.wait(10)
    ha.append(HomeAssistantBridge(mon.client, st, interval_s=0.2).attach())
    pub = client(mosquitto.port, "agents")
    announce(pub, "f1", "old-cam")
    announce(pub, "f1", "new-cam")
    cfg = "homeassistant/device/lepton_f1_{}/config"
    wait(lambda: {cfg.format("old-cam"), cfg.format("new-cam")} <= set(retained(mosquitto.port, quiet_s=0.3)),
         20, "both devices' Home Assistant discovery")
    ha[0].close()
    mon.stop()
    st.close()

    r = cli("fleet", "forget", "old-cam", "--store", str(path), "--broker", mosquitto.url)
    assert r.returncode == 0, r.stderr
    assert "forgot f1/old-cam" in r.stdout

    kept = retained(mosquitto.port)
    assert not [t for t in kept if "old-cam" in t], kept  # status, meta and HA config: all cleared
    assert {"lepton/v1/f1/new-cam/status", "lepton/v1/f1/new-cam/meta", cfg.format("new-cam")} <= set(kept)
    r = cli("fleet", "ls", "--store", str(path), "--json")
    assert [d["device"] for d in json.loads(r.stdout)["devices"]] == ["new-cam"]

    # the next monitor start does not bring it back from the broker's retained messages
    st = open_store(path)
    mon = Monitor(mosquitto.url, st, client_id="op-test-2", log=lambda line: None).start()
    try:
        assert mon.connected.wait(10)
        wait(lambda: st.device("f1", "new-cam") is not None, 10, "the retained state of the kept device")
        mon.wait_idle(timeout=5, quiet=0.5)
        assert st.device("f1", "old-cam") is None
    finally:
        mon.stop()
        st.close()
        pub.loop_stop()

    r = cli("fleet", "forget", "old-cam", "--store", str(path))
    assert r.returncode == 2 and "unknown device" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_forget_with_an_unreachable_broker_deletes_nothing(tmp_path):
    path = tmp_path / "fleet.sqlite"
    st = open_store(path)
    st.set_status("f1", "cam1", {"v": 1, "online": True, "boot_id": "b1"}, time.time())
    st.close()
    r = cli("fleet", "forget", "f1/cam1", "--store", str(path), "--broker", f"mqtt://127.0.0.1:{free_port()}")
    assert r.returncode == 2 and "cannot reach the broker" in r.stderr and "Traceback" not in r.stderr
    with open_store(path) as st:
        assert st.device("f1", "cam1") is not None


# ---- alerts in the terminal dashboard (the web page lists them too) ---------------------------------
def test_the_terminal_dashboard_lists_the_active_alerts(tmp_path):
    from rich.console import Console

    from lepton_edge.fleet import tui

    st = open_store(tmp_path / "fleet.sqlite")
    now = time.time()
    for i in range(8):
        st.set_status("f1", f"cam{i}", {"v": 1, "online": i != 3, "boot_id": "b1"}, now)
    st.upsert_alert(Alert(fleet="f1", device="cam3", rule="offline", severity="critical",
                          message="f1/cam3 offline for 75 s", started=now - 75))
    for i in (4, 5, 6, 7):
        st.upsert_alert(Alert(fleet="f1", device=f"cam{i}", rule="fps", message=f"f1/cam{i} fps 0.2 below 1",
                              started=now - i))
    st.upsert_alert(Alert(fleet="f1", device="cam1", rule="latency", message="p95 above the budget", started=now))
    con = Console(record=True, width=140, color_system=None)
    con.print(tui.render(st, now=now))
    text = con.export_text()
    assert "f1/cam3 offline for 75 s" in text and "critical" in text
    assert "f1/cam1  p95 above the budget" in text  # a message without the device name gets it
    assert "1 more active alerts" in text  # 6 active, 5 lines
    st.close()
