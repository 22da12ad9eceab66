"""Alert rules over the store: fire once, resolve once, published to MQTT and POSTed to a webhook."""
from __future__ import annotations

import http.server
import json
import threading
import time
from pathlib import Path

import pytest

from lepton_edge.errors import BadInput
from lepton_edge.fleet.alerts import ALERT_TOPIC, AlertEngine, AlertRules, load_rules
from lepton_edge.fleet.store import open_store
from lepton_edge.telemetry.schema import Event, Telemetry


def win(seq, p95=5.0, fps=10.0, temp=50.0):
    return Telemetry(boot_id="b1", seq=seq, window_s=1, frames=10, fps=fps, temperature_c=temp,
                     latency_ms={"inference": {"p50": 1, "p95": p95, "p99": p95, "max": p95}}).model_dump()


@pytest.fixture
def webhook():
    got: list[dict] = []

    class H(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/hook", got
    srv.shutdown()
    srv.server_close()


def test_rules_fire_once_resolve_once_and_notify(tmp_path, webhook):
    url, got = webhook
    s = open_store(tmp_path / "f.sqlite")
    published = []
    eng = AlertEngine(s, AlertRules(offline_after_s=5, webhook=url, event_hold_s=100),
                      publish=lambda t, p: published.append((t, json.loads(p))), log=lambda _: None)
    now = time.time()
    s.set_status("f", "d", {"online": True, "boot_id": "b1"}, now)
    s.set_meta("f", "d", {"v": 1, "bundle": {"name": "x", "latency_budget_ms": 10}}, now)
    s.add_window("f", "d", win(0, p95=30), now)
    fired = eng.evaluate(now)
    assert [(w, a.rule) for w, a in fired] == [("fired", "latency")] and fired[0][1].threshold == 10
    assert eng.evaluate(now + 1) == []  # once
    s.add_window("f", "d", win(1, p95=9.5), now + 2)  # inside the hysteresis margin: still open
    assert eng.evaluate(now + 2) == []
    s.add_window("f", "d", win(2, p95=5), now + 3)
    assert [(w, a.rule) for w, a in eng.evaluate(now + 3)] == [("resolved", "latency")]
    s.add_window("f", "d", win(5), now + 4)  # two windows lost
    s.add_event("f", "d", Event(boot_id="b1", kind="rollback", message="health check failed").model_dump(), now + 4)
    assert sorted(a.rule for _, a in eng.evaluate(now + 4)) == ["rollback", "seq_gaps"]
    s.set_status("f", "d", {"online": False, "boot_id": "b1"}, now + 5)
    assert eng.evaluate(now + 6) == []  # not yet offline_after_s
    assert [a.rule for _, a in eng.evaluate(now + 10)] == ["offline"]
    assert s.device("f", "d").severity == 3
    s.set_status("f", "d", {"online": True, "boot_id": "b1"}, now + 11)
    assert [(w, a.rule) for w, a in eng.evaluate(now + 11)] == [("resolved", "offline")]
    assert len(s.alerts()) == 4 and published and all(t == ALERT_TOPIC for t, _ in published)
    deadline = time.monotonic() + 10
    while len(got) < len(published) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [(b["event"], b["rule"]) for b in got] == [(b["event"], b["rule"]) for _, b in published]
    # what goes on the topic (and to the webhook) is the wire schema third parties read
    import jsonschema

    from lepton_edge.telemetry.schema_export import name_for
    schema = json.loads((Path(__file__).parents[1] / "docs" / "schemas" / "alert.schema.json").read_text())
    assert name_for(ALERT_TOPIC) == "alert" and schema["x-topic"] == ALERT_TOPIC
    for _, body in published:
        jsonschema.validate(body, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**published[0][1], "event": "exploded"}, schema)


def test_bad_rules_file_is_one_line(tmp_path):
    p = tmp_path / "alerts.toml"
    p.write_text("[alerts]\nfps_floor = -1\n")
    with pytest.raises(BadInput, match="fps_floor"):
        load_rules(p)
    p.write_text("[alerts]\nnope = 1\n")
    with pytest.raises(BadInput, match="nope"):
        load_rules(p)
    p.write_text("[alerts]\noffline_after_s = 30\n")
    assert load_rules(p).offline_after_s == 30
    # /dev/zero (st_size 0) read without end, a FIFO blocked, deep nesting was a RecursionError traceback
    p.write_text("a = " + "[" * 100_000)
    with pytest.raises(BadInput, match="nested too deeply|not valid TOML"):
        load_rules(p)
    for bad in ("/dev/zero", tmp_path):
        with pytest.raises(BadInput, match="not a regular file"):
            load_rules(bad)
    p.write_text("x" * 300_000)
    with pytest.raises(BadInput, match="larger than 256 KB"):
        load_rules(p)


@pytest.mark.parametrize("line, where", [
    ('topic = "lepton/v1/+/#"', "topic"),  # loaded, then every alert's publish failed
    ('topic = ""', "topic"),
    ('topic = "alerts\\u0000x"', "topic"),
    ('topic = "lepton/v1/lab/cam-1/cmd/deploy"', "topic"),  # a device's own command topic
    ('topic = "$SYS/alerts"', "topic"),
    (f'topic = "{"a" * 300}"', "topic"),
    ('webhook = "http://hooks.example/a\\nb"', "webhook"),  # loaded, then every POST failed
    ('events = ["offline"]', "events"),  # a threshold rule as an event: its alert flapped for ever
    ('events = ["seq_gaps", "rollback"]', "events"),
])
def test_rules_that_would_misfire_at_run_time_are_refused_at_load(tmp_path, line, where):
    p = tmp_path / "alerts.toml"
    p.write_text(f"[alerts]\n{line}\n")
    with pytest.raises(BadInput, match=f"alert rules .*: {where}"):
        load_rules(p)


def test_good_topics_and_event_kinds_still_load(tmp_path):
    p = tmp_path / "alerts.toml"
    for line in ('topic = "lepton/v1/_monitor/alerts/site-a"', 'topic = "plant/alerts"',
                 'events = ["rollback", "error", "deploy_failed"]', 'webhook = "https://hooks.example/x?a=1"'):
        p.write_text(f"[alerts]\n{line}\n")
        load_rules(p)


def test_send_command_validates_and_matches_its_reply(mosquitto):
    """commands.send_command: bad fields are one BadInput line; the reply with our id is returned."""
    import paho.mqtt.client as mqtt

    from lepton_edge.fleet.commands import send_command

    with pytest.raises(BadInput, match="window_s"):
        send_command(mosquitto.url, "f", "d", "set", {"window_s": 0})
    with pytest.raises(BadInput, match="unknown command"):
        send_command(mosquitto.url, "f", "d", "reboot", {})
    dev = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fake-device")

    def on_message(c, u, m):  # answers like the agent: a stale reply first, then ours
        cid = json.loads(m.payload)["id"]
        c.publish("lepton/v1/f/d/cmd/ping/reply", json.dumps({"v": 1, "id": "other", "ok": False}), qos=1)
        c.publish("lepton/v1/f/d/cmd/ping/reply", json.dumps({"v": 1, "id": cid, "ok": True, "data": {"x": 1}}), qos=1)

    dev.on_message = on_message
    dev.connect("127.0.0.1", mosquitto.port)
    dev.subscribe("lepton/v1/f/d/cmd/ping", qos=1)
    dev.loop_start()
    try:
        time.sleep(0.2)
        r = send_command(mosquitto.url, "f", "d", "ping", {}, timeout=5)
        assert r["ok"] and r["data"] == {"x": 1}
        assert send_command(mosquitto.url, "f", "nobody", "ping", {}, timeout=0.5)["error"] == "no reply within 0.5 s"
    finally:
        dev.loop_stop()
        dev.disconnect()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_one_devices_event_flood_never_hides_anothers_rollback(tmp_path, request, backend):
    """The event rules read the fleet's newest 10,000 events by device time, so 10,000 events of one device
    stamped 290 s ahead (inside what the monitor believes, MAX_CLOCK_AHEAD_S) pushed another device's real
    rollback out of the read and its alert never fired. The rules now read each device's newest event per
    rule, so a device can bury only its own."""
    from lepton_edge.fleet.monitor import MAX_CLOCK_AHEAD_S

    s = open_store(str(tmp_path / "f.sqlite") if backend == "sqlite" else request.getfixturevalue("postgres"))
    try:
        now = time.time()
        ahead = now + MAX_CLOCK_AHEAD_S - 10
        for i in range(10_000):
            s.add_event("f", "noisy", Event(boot_id="b1", ts=ahead, kind="rollback", message=f"flood {i}").model_dump(),
                        now)
        s.add_event("f", "cam-1", Event(boot_id="b1", ts=now, kind="rollback", message="health check failed")
                    .model_dump(), now + 1)
        s.add_event("f", "cam-2", Event(boot_id="b1", ts=now, kind="source_state", level="error", message="failed")
                    .model_dump(), now + 1)  # (the 'error' rule: an event of level error, whatever its kind)
        eng = AlertEngine(s, AlertRules(), log=lambda _: None)
        fired = {(a.device, a.rule): a for what, a in eng.evaluate(now + 2) if what == "fired"}
        assert set(fired) == {("noisy", "rollback"), ("cam-1", "rollback"), ("cam-2", "error")}, fired
        assert fired[("cam-1", "rollback")].message == "f/cam-1 rollback: health check failed"
        assert fired[("cam-1", "rollback")].severity == "critical"
    finally:
        s.close()
