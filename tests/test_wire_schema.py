"""The wire format has one source of truth: the models in telemetry/schema.py. The JSON Schemas shipped
in docs/schemas/ are what those models generate (they cannot drift), and what a real agent, the
simulator and the operator's commands put on a real mosquitto validates against them."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest

from lepton_edge.errors import BadInput
from lepton_edge.telemetry import schema_export
from lepton_edge.telemetry.schema import PAYLOADS
from lepton_edge.telemetry.topics import Topics
from mqtt_helpers import Recorder, start_agent

SHIPPED = Path(__file__).resolve().parent.parent / "docs" / "schemas"


def _validators() -> dict[str, jsonschema.Draft202012Validator]:
    out = {}
    for name in PAYLOADS:
        doc = json.loads((SHIPPED / f"{name}.schema.json").read_text())
        jsonschema.Draft202012Validator.check_schema(doc)  # a schema a stock validator accepts
        out[name] = jsonschema.Draft202012Validator(doc)
    return out


def _check_recorded(messages, want: set[str]) -> dict[str, int]:
    """Every recorded payload validates against the shipped schema its topic names; counts by name."""
    validators, seen = _validators(), {}
    for topic, body, _retained in messages:
        name = schema_export.name_for(topic)
        assert name is not None, f"a topic outside the documented tree: {topic}"
        errors = [e.message for e in validators[name].iter_errors(body)]
        assert not errors, (topic, body, errors)
        seen[name] = seen.get(name, 0) + 1
    assert want <= set(seen), f"never seen: {want - set(seen)}"
    return seen


def test_the_shipped_schemas_are_what_the_models_generate():
    assert schema_export.stale(SHIPPED) == [], "run: python -m lepton_edge.telemetry.schema_export docs/schemas"
    assert {p.name for p in SHIPPED.glob("*.schema.json")} == {f"{n}.schema.json" for n in PAYLOADS}
    for name in PAYLOADS:  # each names the topic it travels on, in the tree Topics builds
        doc = json.loads((SHIPPED / f"{name}.schema.json").read_text())
        assert schema_export.name_for(doc["x-topic"].replace("{fleet}", "f").replace("{device}", "d")
                                      .replace("{verb}", "ping")) == name


def test_check_names_a_schema_file_that_drifted_from_its_model(tmp_path):
    copy = tmp_path / "schemas"
    shutil.copytree(SHIPPED, copy)
    doc = json.loads((copy / "telemetry.schema.json").read_text())
    del doc["properties"]["seq"]  # what a hand edit, or a model changed without regenerating, looks like
    (copy / "telemetry.schema.json").write_text(json.dumps(doc))
    (copy / "status.schema.json").unlink()
    (copy / "old.schema.json").write_text("{}")
    r = subprocess.run([sys.executable, "-m", "lepton_edge.telemetry.schema_export", "--check", str(copy)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 3 and "Traceback" not in r.stderr, r.stderr
    assert "telemetry.schema.json: differs from the model Telemetry" in r.stderr
    assert "status.schema.json: missing" in r.stderr and "old.schema.json: no such payload" in r.stderr
    r = subprocess.run([sys.executable, "-m", "lepton_edge.telemetry.schema_export", str(copy)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0 and schema_export.stale(copy) == [f"{copy / 'old.schema.json'}: no such payload any more"]


def test_the_deploy_schema_refuses_what_the_agent_refuses():
    v = _validators()["command-deploy"]
    assert v.is_valid({"id": "a", "url": "https://h/b.tar.gz"}) and v.is_valid({"path": "/opt/b"})
    for bad in ({}, {"url": "https://h/b.tar.gz", "path": "/opt/b"}, {"url": "x", "colour": 1},
                {"path": "/opt/b", "sha256": "ABC"}, {"path": "/opt/b", "health_frames": 0}):
        assert not v.is_valid(bad), bad


def test_simulated_devices_and_operator_commands_validate(mosquitto):
    from lepton_edge.fleet.commands import send_command
    from lepton_edge.fleet.deploy import deploy
    from lepton_edge.fleet.simulate import Simulator

    rec = Recorder(mosquitto.port, client_id="wire-sim")
    sim = Simulator(mosquitto.url, devices=3, window_s=0.2, seconds=4, seed=3, fleet="wire",
                    shares={"rollback": 1.0}).start()
    try:
        assert sim.wait_connected(10)
        assert send_command(mosquitto.url, "wire", "sim-0000", "ping", timeout=10)["ok"]
        assert send_command(mosquitto.url, "wire", "sim-0001", "set", {"window_s": 0.5}, timeout=10)["ok"]
        rows = deploy("wire", "https://example.invalid/b.tar.gz", mosquitto.url, timeout=10, health_frames=5)
        assert sorted(r["device"] for r in rows) == ["sim-0000", "sim-0001", "sim-0002"] and all(r["ok"] for r in rows)
        sim.wait()
    finally:
        sim.stop()
    assert rec.wait_for(lambda r: len(r.of("/status")) >= 6, timeout=10)  # online, then offline, per device
    rec.close()
    seen = _check_recorded(rec.messages, set(PAYLOADS) - {"alert"})  # alerts: test_fleet_alerts
    assert seen["command-deploy"] == 3 and seen["reply"] == 5


def test_an_operator_deploy_with_a_bad_field_is_one_line_before_the_wire(mosquitto):
    from lepton_edge.fleet.deploy import deploy

    rec = Recorder(mosquitto.port, client_id="wire-bad")
    with pytest.raises(BadInput, match=r"^deploy: health_frames: Input should be less than or equal to 10000$"):
        deploy("f1/dev1", "/opt/bundle", mosquitto.url, device_path=True, health_frames=10**6, timeout=1)
    time.sleep(0.5)  # what would have arrived by now had it been sent
    rec.close()
    assert not [t for t, *_ in rec.messages if t.startswith(Topics("f1", "dev1").cmd(""))]


@pytest.mark.slow
def test_a_real_agent_sends_only_schema_valid_payloads(tmp_path, mosquitto, rpi4_bundle, fashion_video):
    from lepton_edge.fleet.commands import send_command
    from lepton_edge.fleet.deploy import deploy

    video, _ = fashion_video
    rec = Recorder(mosquitto.port, client_id="wire-agent")
    agent = start_agent("--broker", mosquitto.url, "--fleet", "f1", "--device-id", "dev1", "--bundle",
                        str(rpi4_bundle.bundle.path), "--source", str(video), "--loop", "--window", "0.2",
                        "--state-dir", str(tmp_path / "state"))
    try:
        assert rec.wait_for(lambda r: r.of("/meta") and len(r.of("/telemetry")) >= 2, timeout=60), \
            agent.stderr.read() if agent.poll() is not None else ""
        assert send_command(mosquitto.url, "f1", "dev1", "ping", timeout=20)["ok"]
        assert send_command(mosquitto.url, "f1", "dev1", "set", {"window_s": 0.3}, timeout=20)["ok"]
        (row,) = deploy("f1/dev1", str(tmp_path / "missing"), mosquitto.url, device_path=True, timeout=20)
        assert not row["ok"] and row["error"], row  # refused with a reply: a reply all the same
        bad = Recorder(mosquitto.port, client_id="wire-raw")  # a malformed command: its error reply too
        bad.client.publish(Topics("f1", "dev1").cmd("set"), b'{"id": "x", "window_s": "fast"}', qos=1)
        assert rec.wait_for(lambda r: [x for x in r.of("/cmd/set/reply") if x.get("id") == "x"], timeout=20)
        bad.close()
    finally:
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0
    assert rec.wait_for(lambda r: [s for s in r.of("/status") if not s["online"]], timeout=10)
    rec.close()
    messages = [m for m in rec.messages if m[0] != Topics("f1", "dev1").cmd("set") or m[1].get("id") != "x"]
    seen = _check_recorded(messages, set(PAYLOADS) - {"alert"})  # the monitor sends alerts
    assert seen["reply"] >= 4 and seen["meta"] >= 2  # meta again after `set`


def test_rates_beyond_any_device_are_refused_so_a_fleets_sums_stay_finite(tmp_path):
    """fps (and CPU percent, temperature) had no bound: two devices' fps 1e308 made the fleet summary's
    SUM infinite (`Infinity` in /api/summary and `fleet ls --json`, which is not JSON) and, on PostgreSQL,
    an overflow error for every summary reader. Refused by the model and by the shipped JSON Schema alike;
    the largest accepted values still sum to a finite total."""
    import math

    from pydantic import ValidationError

    from fleet_views_data import add_device, window
    from lepton_edge.fleet.store import open_store
    from lepton_edge.telemetry.schema import MAX_RATE, Telemetry

    shipped = json.loads((SHIPPED / "telemetry.schema.json").read_text())
    for field, bad in (("fps", 1e308), ("fps", -1.0), ("cpu_percent", 1e300), ("system_cpu_percent", 2e6),
                       ("temperature_c", -400.0), ("temperature_c", 1e12)):
        w = window("b1", 0, 30.0, 10.0)
        w[field] = bad
        with pytest.raises(ValidationError, match=field):
            Telemetry.model_validate(w)
        assert not jsonschema.Draft202012Validator(shipped).is_valid(json.loads(json.dumps(w))), (field, bad)
    store = open_store(tmp_path / "f.sqlite")
    for d in ("a", "b"):
        add_device(store, "lab", d, fps=MAX_RATE)
    total = store.summary().total_fps
    assert math.isfinite(total) and total == 2 * MAX_RATE
    store.close()
