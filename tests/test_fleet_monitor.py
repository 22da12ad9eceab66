"""The monitor's ingest against a real mosquitto: bad input, a kill and restart, two $share workers."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from lepton_edge.fleet.monitor import Monitor
from lepton_edge.fleet.store import open_store
from lepton_edge.telemetry.schema import Telemetry
from mqtt_helpers import SlowLink


def pub_client(port: int, cid: str) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid)
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def window(seq: int, boot: str = "b1") -> bytes:
    return Telemetry(boot_id=boot, seq=seq, window_s=1, frames=5, fps=5.0).model_dump_json().encode()


def wait(pred, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def test_malformed_messages_counted_per_device_never_stored(tmp_path, mosquitto):
    store = open_store(tmp_path / "f.sqlite")
    lines: list[str] = []
    m = Monitor(mosquitto.url, store, client_id="mon-bad", log=lines.append, flood_rate=5, flood_burst=20).start()
    assert m.connected.wait(10)
    c = pub_client(mosquitto.port, "pub-bad")
    t = "lepton/v1/f/dev/telemetry"
    good = json.loads(window(0))
    bads = [b"not json", b"[1,2]", json.dumps({**good, "seq": "x"}), json.dumps({"v": 1, "boot_id": "b1"}),
            json.dumps({**good, "v": 2}), b"{" + b" " * (1024 * 1024) + b"}"]
    c.publish(t, window(0), qos=1).wait_for_publish(5)
    assert wait(lambda: (d := store.device("f", "dev")) is not None and d.windows == 1)
    for b in bads:
        c.publish(t, b, qos=1).wait_for_publish(5)
    c.publish("lepton/v1/-bad/dev/telemetry", window(1), qos=1).wait_for_publish(5)
    for i in range(50):  # refused messages under made-up names: counted, and no device made of them
        c.publish(f"lepton/v1/f/ghost-{i}/telemetry", b"x", qos=1).wait_for_publish(5)
    assert wait(lambda: (store.device("f", "dev") or 0) and store.device("f", "dev").bad_messages == 6
                and store.device("f", "dev").windows == 1)
    assert wait(lambda: m.stats["bad"] >= 57), m.stats
    assert [d.device for d in store.devices()] == ["dev"]
    assert len([x for x in lines if "refused a message" in x and ": not_json" in x]) == 1, lines  # once per reason
    for i in range(1, 200):  # a flooding device: beyond its burst, windows are refused and counted
        c.publish(t, window(i), qos=1)
    assert wait(lambda: store.device("f", "dev").windows + store.device("f", "dev").bad_messages >= 205)
    d = store.device("f", "dev")
    assert 15 <= d.windows <= 60 and d.bad_messages >= 150
    assert len([x for x in lines if "flood" in x]) == 1  # rate-limited log
    m.stop()
    c.loop_stop()


def known_device(client, store, device: str, fleet: str = "f") -> None:
    """`device` sends one valid message (its status), so the store knows it: refused messages are counted
    against a device the store knows, and against no device otherwise."""
    client.publish(f"lepton/v1/{fleet}/{device}/status",
                   json.dumps({"v": 1, "online": True, "boot_id": "b1", "version": "0.9"}), qos=1).wait_for_publish(5)
    assert wait(lambda: store.device(fleet, device) is not None)


def test_poison_messages_are_refused_and_the_fleet_keeps_being_stored(tmp_path, mosquitto):
    """One message stopped the whole fleet's ingest: 60 KB of '[' (RecursionError) and a 20-digit seq
    (OverflowError) killed the writer thread; a NaN fps reached a NOT NULL column and that batch was
    retried forever; a 400-digit number in meta overflowed. None was acknowledged, so each came back
    at every restart. A device whose events flood no longer loses its telemetry to the limit."""
    store = open_store(tmp_path / "f.sqlite")
    lines: list[str] = []
    m = Monitor(mosquitto.url, store, client_id="mon-poison", log=lines.append, flood_rate=5, flood_burst=20).start()
    assert m.connected.wait(10)
    c = pub_client(mosquitto.port, "pub-poison")
    known_device(c, store, "evil")
    good = json.loads(window(0))
    raw = window(0).decode()
    poison = [("evil/telemetry", b"[" * 60000), ("evil/meta", b"[" * 60000),
              ("evil/telemetry", raw.replace('"seq":0', '"seq":99999999999999999999')),
              ("evil/telemetry", raw.replace('"fps":5.0', '"fps":NaN')),
              ("evil/telemetry", raw.replace('"fps":5.0', '"fps":1e400')),
              ("evil/meta", json.dumps({"v": 1, "bundle": {"name": "x", "latency_budget_ms": 0}}).replace(
                  '"latency_budget_ms": 0', '"latency_budget_ms": ' + "9" * 400)),
              ("evil/events", json.dumps({"v": 1, "boot_id": "b1", "kind": "x", "message": "m"}).replace(
                  '"v": 1', '"v": 1, "n": -Infinity'))]
    assert all(p in raw for p in ('"seq":0', '"fps":5.0'))
    for topic, body in poison:
        c.publish(f"lepton/v1/f/{topic}", body, qos=1).wait_for_publish(5)
    for i in range(40):  # events flooding past the limit; telemetry beside them
        c.publish("lepton/v1/f/dev/events", json.dumps({"v": 1, "boot_id": "b1", "kind": "x", "message": str(i)}),
                  qos=1).wait_for_publish(5)
    for i in range(5):
        c.publish("lepton/v1/f/dev/telemetry", window(i), qos=1).wait_for_publish(5)
    assert wait(lambda: (d := store.device("f", "dev")) is not None and d.windows == 5), lines
    assert wait(lambda: (e := store.device("f", "evil")) is not None and e.bad_messages == len(poison)), lines
    assert good["fps"] == 5.0 and store.device("f", "evil").windows == 0
    assert all(t.is_alive() for t in m._threads) and m.stats["store_errors"] == 0, lines
    m.stop()
    c.loop_stop()


@pytest.mark.parametrize("error", ["OverflowError", "ValueRefused"])
def test_a_message_the_store_cannot_take_is_counted_and_the_rest_stored(tmp_path, mosquitto, error):
    """Whatever a store raises besides a retryable StoreError (a value a database refuses: ValueRefused,
    or a Python error on the way) no longer ends the writer thread or stalls the batch: it is stored
    message by message and the one that fails again is counted `unstorable`."""
    from lepton_edge.fleet.store.base import ValueRefused

    store = open_store(tmp_path / "f.sqlite")
    real = store.add_windows
    exc = {"OverflowError": OverflowError, "ValueRefused": ValueRefused}[error]

    def picky(rows):
        if any(dev == "evil" for _f, dev, _d, _t in rows):
            raise exc("a value the store refuses")
        return real(rows)

    store.add_windows = picky
    lines: list[str] = []
    m = Monitor(mosquitto.url, store, client_id="mon-unstorable", log=lines.append).start()
    assert m.connected.wait(10)
    c = pub_client(mosquitto.port, "pub-unstorable")
    for i in range(3):
        c.publish("lepton/v1/f/evil/telemetry", window(i), qos=1).wait_for_publish(5)
        c.publish("lepton/v1/f/dev/telemetry", window(i), qos=1).wait_for_publish(5)
    assert wait(lambda: (d := store.device("f", "dev")) is not None and d.windows == 3), lines
    assert wait(lambda: (e := store.device("f", "evil")) is not None and e.bad_messages == 3), lines
    assert all(t.is_alive() for t in m._threads) and any(f"unstorable ({error}" in x for x in lines), lines
    assert m.stats["store_errors"] == 0
    m.stop()
    c.loop_stop()



def test_a_store_outage_while_storing_one_by_one_counts_nothing_twice(tmp_path, mosquitto):
    """A StoreError half way through the one-by-one pass (after a refused value) used to retry the whole
    batch: the message done before it was stored or counted `unstorable` a second time. Now the retry
    holds only what was not yet done, and what was done is acknowledged."""
    import threading

    from lepton_edge.fleet.store.base import StoreError, ValueRefused

    store = open_store(tmp_path / "f.sqlite")
    real = store.add_windows
    gate, outage = threading.Event(), {"left": 1}

    def flaky(rows):
        devs = {dev for _f, dev, _d, _t in rows}
        if "slow" in devs:
            gate.wait(10)  # holds the writer while evil and dev queue up behind it: one batch
        if "evil" in devs:
            raise ValueRefused("a value the database refuses")
        if "dev" in devs and outage["left"]:
            outage["left"] -= 1
            raise StoreError("the database went away")
        return real(rows)

    store.add_windows = flaky
    lines: list[str] = []
    m = Monitor(mosquitto.url, store, client_id="mon-outage", log=lines.append).start()
    try:
        assert m.connected.wait(10)
        c = pub_client(mosquitto.port, "pub-outage")
        c.publish("lepton/v1/f/slow/telemetry", window(0), qos=1).wait_for_publish(5)
        assert wait(lambda: m._busy)
        c.publish("lepton/v1/f/evil/telemetry", window(0), qos=1).wait_for_publish(5)
        c.publish("lepton/v1/f/dev/telemetry", window(0), qos=1).wait_for_publish(5)
        assert wait(lambda: m.q.qsize() == 2)
        gate.set()
        assert wait(lambda: (d := store.device("f", "dev")) is not None and d.windows == 1), lines
        assert m.stats["store_errors"] == 1 and outage["left"] == 0, (m.stats, lines)
        time.sleep(1.0)  # (a second count would come with the retry, 0.5 s after the outage)
        e = store.device("f", "evil")
        assert e is not None and e.bad_messages == 1 and e.windows == 0, lines
        assert store.device("f", "dev").duplicates == 0
        c.loop_stop()
    finally:
        m.stop()
        store.close()


MONITOR = """
import sys, time
from lepton_edge.fleet.monitor import Monitor
from lepton_edge.fleet.store import open_store
store = open_store(sys.argv[2])
if sys.argv[5:]:  # a slow store: the kill always finds messages received but not yet written
    fast = store.add_windows
    store.add_windows = lambda rows: (time.sleep(0.3), fast(rows))[1]
Monitor(sys.argv[1], store, client_id=sys.argv[3], group=sys.argv[4] or None, batch=20).run_forever()
"""


def start_monitor(url, store, cid, group="", slow=False):
    return subprocess.Popen([sys.executable, "-c", MONITOR, url, store, cid, group, *(["slow"] if slow else [])],
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)


def test_monitor_killed_and_restarted_loses_nothing(tmp_path, mosquitto):
    path = str(tmp_path / "f.sqlite")
    store = open_store(path)
    p = start_monitor(mosquitto.url, path, "mon-restart", slow=True)
    try:
        c = pub_client(mosquitto.port, "pub-restart")
        n = 0
        assert wait(lambda: store.device("f", "dev") is not None or c.publish(
            "lepton/v1/f/dev/status", b'{"v":1,"online":true,"boot_id":"b1"}', qos=1) and False, 15)
        for _ in range(3):
            for _ in range(100):
                c.publish("lepton/v1/f/dev/telemetry", window(n), qos=1)
                n += 1
                time.sleep(0.002)
            assert store.device("f", "dev") is None or store.device("f", "dev").windows < n  # a backlog
            os.kill(p.pid, signal.SIGKILL)  # mid-stream: queued, unacknowledged messages stay at the broker
            p.wait(10)
            for _ in range(50):
                c.publish("lepton/v1/f/dev/telemetry", window(n), qos=1)
                n += 1
            p = start_monitor(mosquitto.url, path, "mon-restart", slow=True)
        assert wait(lambda: store.device("f", "dev") and store.device("f", "dev").windows == n, 60), \
            store.device("f", "dev")
        assert store.device("f", "dev").seq_gaps == 0
    finally:
        p.kill()
        p.wait(10)


def test_two_share_workers_on_postgres_store_each_window_once(mosquitto, postgres):
    stores = [open_store(postgres), open_store(postgres)]
    ms = [Monitor(mosquitto.url, s, group="g", client_id=f"mon-share-{i}").start() for i, s in enumerate(stores)]
    try:
        assert all(m.connected.wait(10) for m in ms)
        time.sleep(0.3)
        c = pub_client(mosquitto.port, "pub-share")
        for d in range(10):
            for i in range(100):
                c.publish(f"lepton/v1/f/dev{d}/telemetry", window(i), qos=1)
        assert wait(lambda: sum(d.windows for d in stores[0].devices()) == 1000, 30)
        assert all(m.stats["stored"] > 0 for m in ms)  # the broker split the load
        assert sum(m.stats["stored"] for m in ms) == 1000
        assert all(d.seq_gaps == 0 and d.duplicates == 0 for d in stores[0].devices())
    finally:
        for m in ms:
            m.stop()


def start_cli_monitor(url: str, store: Path, log: Path) -> subprocess.Popen:
    """The real `lepton-edge monitor` process (its default client id is fixed per host: a restart resumes
    the persistent session)."""
    exe = Path(sys.executable).parent / "lepton-edge"
    with open(log, "ab") as out:
        return subprocess.Popen([str(exe), "monitor", "--broker", url, "--store", str(store), "--no-tui"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow
def test_real_agent_monitor_killed_twice_while_windows_flow_loses_nothing(tmp_path, mosquitto, int8_bundle,
                                                                          fashion_video):
    """agent process -> mosquitto -> `lepton-edge monitor` process -> SQLite, the monitor SIGKILLed twice
    mid-stream: the broker keeps the session's windows, so every seq of the boot is stored exactly once."""
    from lepton_edge.fleet.commands import send_command
    from mqtt_helpers import start_agent

    path, log = tmp_path / "fleet.sqlite", tmp_path / "monitor.log"
    store = open_store(path)
    mon = start_cli_monitor(mosquitto.url, path, log)
    agent = None
    probe = pub_client(mosquitto.port, "probe")
    try:
        # the monitor's session exists (it stored a message) before the agent sends its first window
        assert wait(lambda: probe.publish("lepton/v1/probe/p0/status", b'{"v":1,"online":true,"boot_id":"p"}',
                                          qos=1) and store.device("probe", "p0") is not None, 30), log.read_text()
        video, _ = fashion_video
        agent = start_agent("--broker", mosquitto.url, "--fleet", "f1", "--device-id", "dev1", "--bundle",
                            str(int8_bundle.bundle.path), "--source", str(video), "--loop", "--window", "0.5",
                            "--state-dir", str(tmp_path / "agent"))
        dev = lambda: store.device("f1", "dev1")  # noqa: E731
        assert wait(lambda: dev() and dev().online and dev().windows >= 3, 60), (dev(), log.read_text())
        for _ in range(2):
            before = dev().windows
            os.kill(mon.pid, signal.SIGKILL)  # no clean disconnect: whatever it had not acknowledged stays queued
            mon.wait(10)
            time.sleep(1.5)  # down for about 3 windows, which the broker queues for the session
            assert agent.poll() is None
            mon = start_cli_monitor(mosquitto.url, path, log)
            assert wait(lambda before=before: dev().windows >= before + 4, 30), (before, dev(), log.read_text())
        boot = dev().boot_id
        ping = send_command(mosquitto.url, "f1", "dev1", "ping", timeout=20)
        assert ping["ok"] and ping["data"]["boot_id"] == boot, ping
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0, agent.stderr.read()

        def seqs() -> list[int]:
            with store._tx(write=False) as cur:
                return [r[0] for r in cur.execute("SELECT seq FROM windows WHERE fleet = 'f1' AND device = 'dev1' "
                                                  "AND boot_id = ? ORDER BY seq", (boot,))]
        assert wait(lambda: dev().online is False and seqs() == list(range(len(seqs()))), 30), (dev(), seqs())
        got, d = seqs(), dev()
        assert len(got) >= ping["data"]["seq"] and got == list(range(len(got)))  # 0..last, each once
        assert d.windows == len(got) and d.seq_gaps == 0 and store.seq_gaps()[("f1", "dev1")] == 0
        m = int8_bundle.bundle.manifest
        assert (d.bundle_name, d.bundle_sha256, d.precision) == (m.name, m.files[m.model_file].sha256, m.precision)
    finally:
        probe.loop_stop()
        store.close()
        for p in (agent, mon):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)


def test_on_postgresql_values_the_database_refuses_never_stall_or_break_the_fleet(mosquitto, postgres):
    """On PostgreSQL, in-range JSON could still poison the store: seq 2^63-1 beside 0 made every device
    listing fail on `bigint out of range` (the seq-gap sum), dropped counters overflowed a batch's sum, and
    a NUL in an event's text was refused by PostgreSQL: each a StoreError that the writer retried for
    ever. Counters are bounded in the schema, NUL refused at ingest, and a value the database refuses is
    counted for its message alone (store.ValueRefused), the others stored."""
    import psycopg

    from lepton_edge.fleet.store.base import ValueRefused

    store = open_store(postgres)
    lines: list[str] = []
    m = Monitor(mosquitto.url, store, client_id="mon-pg-poison", log=lines.append).start()
    assert m.connected.wait(10)
    c = pub_client(mosquitto.port, "pub-pg-poison")
    known_device(c, store, "evil")
    raw = window(0).decode()
    poison = [raw.replace('"seq":0', f'"seq":{2**63 - 1}'), raw.replace('"dropped":0', f'"dropped":{2**62}'),
              raw.replace('"seq":0', '"seq":-1')]
    assert all(p != raw for p in poison)
    for body in poison:
        c.publish("lepton/v1/f/evil/telemetry", body, qos=1).wait_for_publish(5)
    c.publish("lepton/v1/f/evil/events", json.dumps({"v": 1, "boot_id": "b1", "kind": "x", "message": "a\u0000b"}),
              qos=1).wait_for_publish(5)
    for i in range(3):
        c.publish("lepton/v1/f/dev/telemetry", window(i), qos=1).wait_for_publish(5)
    assert wait(lambda: (d := store.device("f", "dev")) is not None and d.windows == 3), lines
    assert wait(lambda: (e := store.device("f", "evil")) is not None and e.bad_messages == 4), lines
    assert len(store.devices()) == 2 and m.stats["store_errors"] == 0, lines
    m.stop()
    c.loop_stop()
    # what the database itself refuses is ValueRefused (not retried), whatever got past the schema
    with pytest.raises(ValueRefused), store._tx() as cur:
        cur.execute("SELECT 9223372036854775807::bigint + 1")  # bigint out of range: SQLSTATE 22003
    with psycopg.connect(postgres) as con:
        assert con.execute("SELECT count(*) FROM windows").fetchone()[0] == 3
    store.close()


def test_a_device_clock_the_monitor_cannot_believe_is_replaced_by_arrival_time(tmp_path, mosquitto):
    """One window stamped 1e12 froze the device's state (the store keeps the newest by device time) and
    hid its alerts; an event at 1e300 broke `fleet show`; a Pi before NTP (ts 1000) never alerted. Such
    times become the arrival time; an old backlog (an outbox after an outage) keeps its own. Strings past
    the schema's bounds (a 60 KB boot_id cost 160 KB of store per window) are refused."""
    store = open_store(tmp_path / "f.sqlite")
    lines: list[str] = []
    m = Monitor(mosquitto.url, store, client_id="mon-clock", log=lines.append).start()
    assert m.connected.wait(10)
    c = pub_client(mosquitto.port, "pub-clock")
    now = time.time()
    future = json.loads(window(0))
    future.update(ts=1e12, fps=30.0)
    old = json.loads(window(1))
    old.update(ts=now - 3 * 3600, fps=7.0)  # a backlog window: history, kept as sent
    for w in (future, old):
        c.publish("lepton/v1/f/dev/telemetry", json.dumps(w), qos=1).wait_for_publish(5)
    assert wait(lambda: (d := store.device("f", "dev")) is not None and d.windows == 2)
    time.sleep(0.2)
    real = json.loads(window(2))  # a second later on the device's (right) clock
    real.update(fps=0.2)
    c.publish("lepton/v1/f/dev/telemetry", json.dumps(real), qos=1).wait_for_publish(5)
    for ts in (1e300, 1000.0):
        c.publish("lepton/v1/f/dev/events", json.dumps({"v": 1, "ts": ts, "boot_id": "b1", "kind": "x",
                                                        "message": f"at {ts}"}), qos=1).wait_for_publish(5)
    huge = json.loads(window(3))
    huge["boot_id"] = "b" * 60_000
    c.publish("lepton/v1/f/dev/telemetry", json.dumps(huge), qos=1).wait_for_publish(5)
    assert wait(lambda: (d := store.device("f", "dev")) is not None and d.windows == 3 and d.bad_messages == 1), lines
    assert wait(lambda: len(store.events(fleet="f", device="dev", limit=10)) == 2)
    d = store.device("f", "dev")
    assert d.fps == 0.2, d  # the real window is the newest, not the one from the year 33658
    assert all(abs(e.ts - now) < 120 for e in store.events(fleet="f", device="dev", limit=10))
    hist = store.history("f", "dev", since=now - 4 * 3600, until=now + 600, max_points=100)
    assert any(p.fps == 7.0 and p.ts < now - 2 * 3600 for p in hist), hist  # the backlog window at its own time
    assert any("clock says" in x for x in lines), lines
    m.stop()
    c.loop_stop()



def test_connected_means_subscribed_so_the_first_messages_after_it_are_received(tmp_path, mosquitto):
    """`connected` is set on the broker's SUBACK, not on its CONNACK. Callers (`monitor --once`, the
    quick start, these tests) wait for it and then expect devices' messages: a CI run lost 2 of 4 such
    messages in the gap between the two, here widened by a link that holds what the monitor sends."""
    link = SlowLink(mosquitto.port, 0.8)
    store = open_store(tmp_path / "f.sqlite")
    m = Monitor(f"mqtt://127.0.0.1:{link.port}", store, client_id="mon-slow-link").start()
    try:
        assert m.connected.wait(15)
        c = pub_client(mosquitto.port, "pub-slow-link")
        c.publish("lepton/v1/f/dev/telemetry", window(0), qos=1).wait_for_publish(5)
        assert wait(lambda: (d := store.device("f", "dev")) is not None and d.windows == 1)
        c.loop_stop()
    finally:
        m.stop()
        store.close()
        link.close()


def test_a_nul_character_is_refused_but_the_text_backslash_u0000_is_kept():
    """The NUL check looked at the raw bytes for `\\u0000`, which an escaped backslash followed by `u0000` (the
    text of a path or a regex a device reports) also is: that event was refused as `nul_char`."""
    m = Monitor.__new__(Monitor)
    text = {"v": 1, "boot_id": "b1", "kind": "x", "message": "bad escape \\u0000 in C:\\\\u0000"}
    d, why = m._parse("events", json.dumps(text).encode())
    assert why is None and d["message"] == text["message"]
    for nul in ({**text, "message": "a\u0000b"}, {**text, "data": {"k\u0000": 1}}, {**text, "data": [["\u0000"]]}):
        assert m._parse("events", json.dumps(nul).encode()) == (None, "nul_char"), nul


def test_a_latency_no_sum_can_hold_is_refused_and_a_bad_run_time_is_one_line(tmp_path):
    """Two windows of p95 1.7e308 ms (finite, strict JSON) summed to Infinity in the minute rows: `fleet history
    --json` printed invalid JSON and the dashboard lost the point. And `monitor --seconds nan` did nothing and
    exited 0; `inf` printed a Timer thread's traceback and ran on."""
    from conftest import run_cli

    m = Monitor.__new__(Monitor)
    win = json.loads(window(0))
    huge = {**win, "latency_ms": {"inference": {"p50": 1.7e308, "p95": 1.7e308, "p99": 1.7e308, "max": 1.7e308}}}
    assert m._parse("telemetry", json.dumps(huge).encode()) == (None, "schema")
    assert m._parse("telemetry", window(0))[1] is None
    for bad in ("nan", "inf", "1e308", "0"):
        r = run_cli("monitor", "--broker", "mqtt://127.0.0.1:1", "--store", str(tmp_path / "f.sqlite"), "--no-tui",
                    "--seconds", bad, timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (bad, r.stderr[-2000:])
        assert "--seconds must be above 0 and at most" in r.stderr, (bad, r.stderr)


def test_large_event_data_is_kept_as_a_marker_not_stored_whole(tmp_path, mosquitto):
    """An event's `data` was stored as sent: 500 events with 60 KB of data each took 43 MiB of SQLite files
    (the flood limit lets 20 a second through per device) and made /api/events 29 MB. Past MAX_EVENT_DATA
    characters only its size is kept; the event itself (kind, message: what alerts read) is stored."""
    store = open_store(tmp_path / "f.sqlite")
    m = Monitor(mosquitto.url, store, client_id="mon-data", log=lambda line: None).start()
    try:
        assert m.connected.wait(10)
        c = pub_client(mosquitto.port, "pub-data")
        t0 = time.time()
        for i in range(200):
            c.publish("lepton/v1/f/evil/events", json.dumps({"v": 1, "ts": t0 + i / 1000, "boot_id": "b1",
                      "kind": "note", "message": str(i), "data": {"blob": "x" * 60000}}), qos=1)
        small = {"bundle": {"name": "demo", "version": "1"}, "health_frames": 30}
        c.publish("lepton/v1/f/evil/events", json.dumps({"v": 1, "ts": t0 + 1, "boot_id": "b1", "kind": "deploy",
                  "message": "now running demo", "data": small}), qos=1).wait_for_publish(5)
        assert wait(lambda: len(store.events(fleet="f", device="evil", limit=1000)) == 201)
        evs = store.events(fleet="f", device="evil", limit=1000)
        assert evs[0].kind == "deploy" and evs[0].data == small  # an agent's data is kept as sent
        assert {e.message for e in evs[1:]} == {str(i) for i in range(200)}
        assert all(e.data == {"truncated": True, "chars": len(json.dumps({"blob": "x" * 60000}))} for e in evs[1:])
        c.loop_stop()
    finally:
        m.stop()
        store.close()
    size = sum(p.stat().st_size for p in tmp_path.glob("f.sqlite*"))
    assert size < 4 * 2**20, size  # (12 MB of data sent; 17 MiB stored before)


def test_large_qos0_messages_during_a_store_outage_are_held_to_a_byte_budget(tmp_path, mosquitto):
    """The queue between paho's thread and the writer was bounded in messages only (20,000). QoS 0 messages are
    not held back by the broker's in-flight window, so while the store was locked 20,000 events of 30 KB each
    sat in the queue: 574 MiB of monitor memory (1.2 GiB at the 64 KB size limit). The queue now also holds
    at most 64 MiB of payload (paho stops reading, as at the count limit) and every message is stored once the
    store is back."""
    import sqlite3

    store = open_store(tmp_path / "f.sqlite")
    m = Monitor(mosquitto.url, store, client_id="mon-bytes", log=lambda line: None).start()
    lock = sqlite3.connect(tmp_path / "f.sqlite", timeout=1, isolation_level=None)
    c = None
    try:
        assert m.connected.wait(10)
        lock.execute("BEGIN EXCLUSIVE")  # the store is unavailable: the writer retries, the queue fills
        c = pub_client(mosquitto.port, "pub-bytes")
        n, body = 3000, "x" * 30000  # 90 MB in all, 75 messages per device (under the flood burst)
        for i in range(n):
            c.publish(f"lepton/v1/f/d{i % 40}/events", json.dumps({"v": 1, "boot_id": "b1", "kind": "note",
                      "message": str(i), "data": {"blob": body}}), qos=0)
            if i % 100 == 99:
                time.sleep(0.01)

        def queued() -> int:
            return sum(len(it[0][3]) for it in list(m.q.queue) if it[0][0] != "bad")

        held, still = -1, 0
        deadline = time.monotonic() + 60
        while still < 10 and time.monotonic() < deadline:  # until the queue stops growing for a second
            now = queued()
            still, held = (still + 1, held) if now == held else (0, now)
            time.sleep(0.1)
        assert held <= 64 * 2**20 + 64 * 1024, f"{held / 2**20:.0f} MiB queued"
        lock.execute("ROLLBACK")
        assert wait(lambda: sum(len(store.events(fleet="f", device=f"d{k}", limit=1000)) for k in range(40)) == n,
                    120), m.stats
    finally:
        lock.close()
        if c is not None:
            c.loop_stop()
        m.stop()
        store.close()
