"""`lepton-edge simulate` against a real mosquitto: what a stock subscriber sees is what a fleet of
agents would send (schema-valid windows, retained status and meta, Last Will), with every behaviour
the monitor must show, and a thousand connections from one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from lepton_edge.fleet.simulate import Simulator
from lepton_edge.telemetry.schema import Event, Status, Telemetry
from mjpeg_server import free_port
from mqtt_helpers import Recorder, command

ALL = {"lossy": 0.5, "slow": 0.3, "hot": 0.2, "restart": 0.4, "rollback": 0.4, "dies": 0.25}


def test_simulated_devices_send_what_agents_send_with_every_behaviour(mosquitto):
    rec = Recorder(mosquitto.port, client_id="sim-rec")
    sim = Simulator(mosquitto.url, devices=24, window_s=0.25, seconds=5, seed=7, fleet="demo", shares=ALL).start()
    assert sim.wait_connected(10)
    reply = command(mosquitto.port, "lepton/v1/demo/sim-0000/cmd/ping", {"id": "p1"},
                    "lepton/v1/demo/sim-0000/cmd/ping/reply", timeout=10)
    bad = command(mosquitto.port, "lepton/v1/demo/sim-0000/cmd/set", {"id": "s1", "window_s": -3},
                  "lepton/v1/demo/sim-0000/cmd/set/reply", timeout=10)
    sim.wait()
    s = sim.summary()
    time.sleep(0.5)
    rec.close()
    assert reply["ok"] and reply["data"]["simulated"] and reply["id"] == "p1"
    assert bad["ok"] is False and "window_s" in bad["error"]

    by_dev: dict[str, dict] = {}
    for topic, body, _retained in rec.messages:
        dev, kind = topic.split("/")[3], "/".join(topic.split("/")[4:])
        by_dev.setdefault(dev, {}).setdefault(kind, []).append(body)
    assert len(by_dev) == 24 and s["connected"] == 24
    for kinds in by_dev.values():
        for w in kinds["telemetry"]:
            Telemetry.model_validate(w)  # every window is schema-valid
        for e in kinds["events"]:
            Event.model_validate(e)
        statuses = [Status.model_validate(x) for x in kinds["status"]]
        assert statuses[0].online and statuses[-1].online is False  # online at start, offline at the end
        assert kinds["meta"][0]["bundle"]["latency_budget_ms"] == 50.0
    devs = {d.name: d for d in sim.devices}
    # dropouts: seq gaps in what was received, exactly as many as the simulator skipped
    gaps = 0
    for dev, kinds in by_dev.items():
        boots: dict[str, list[int]] = {}
        for w in kinds["telemetry"]:
            boots.setdefault(w["boot_id"], []).append(w["seq"])
        lost = sum(max(s_) - min(s_) + 1 - len(set(s_)) for s_ in boots.values())
        assert lost == 0 or "lossy" in devs[dev].traits, dev  # only lossy devices skip windows
        gaps += lost
        # restarts: a second boot_id, seq starting again from 0
        if "restart" in devs[dev].traits and "dies" not in devs[dev].traits:
            assert len(boots) == 2, dev
            assert all(min(v) <= 3 for v in boots.values())  # seq starts again (a lossy one may skip the first)
    assert 0 < gaps <= s["skipped"]  # a skip before a boot's first or after its last window shows no gap
    # slow devices: inference p95 above the 50 ms budget; the others under it
    for name, d in devs.items():
        p95s = [w["latency_ms"]["inference"]["p95"] for w in by_dev[name]["telemetry"]]
        assert (max(p95s) > 50) == ("slow" in d.traits), name
    # rollbacks as events, and devices that died: the broker's Last Will, no graceful stop
    assert any(e["kind"] == "rollback" and e["level"] == "warning" for k in by_dev.values() for e in k["events"])
    died = [n for n, d in devs.items() if d.dead]
    assert died and len(died) == s["died"]
    for n in died:
        last_boot = by_dev[n]["status"][-1]["boot_id"]
        assert by_dev[n]["status"][-1]["online"] is False
        assert not any(e["kind"] == "stopped" and e["boot_id"] == last_boot for e in by_dev[n]["events"]), n
    # the same seed draws the same fleet
    again = Simulator(mosquitto.url, devices=24, window_s=0.25, seconds=5, seed=7, fleet="demo", shares=ALL)
    assert [d.traits for d in again.devices] == [d.traits for d in sim.devices]


def test_a_thousand_devices_connect_from_one_process(mosquitto):
    sim = Simulator(mosquitto.url, devices=1000, window_s=1.0, seconds=4, seed=1).start()
    try:
        assert sim.wait_connected(60), f"{sim._n_connected} of 1000 connected"
    finally:
        sim.wait()
    s = sim.summary()
    assert s["connected"] == 1000 and s["loops"] == 4 and s["reconnects"] == 0, s
    assert s["windows"] >= 1000, s  # ~1000 a second on an idle machine; a loaded shared one sends fewer


def run_cli(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    """The fleet verbs as a user runs them (the module entry; `lepton-edge simulate` mounts the same app)."""
    return subprocess.run([sys.executable, "-m", "lepton_edge.fleet.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "160"})


def test_simulate_cli_bounds_and_bad_input(mosquitto):
    r = run_cli("simulate", "--broker", mosquitto.url, "--devices", "0")
    assert r.returncode == 2 and "--devices" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("simulate", "--broker", f"mqtt://127.0.0.1:{free_port()}", "--devices", "3", "--seconds", "1")
    assert r.returncode == 2 and "cannot reach the broker" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("simulate", "--broker", mosquitto.url, "--devices", "5", "--window", "0.2", "--seconds", "1.5",
                "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["connected"] == 5 and s["windows"] >= 20


def test_a_device_counts_as_connected_once_its_command_subscription_is_taken(mosquitto):
    """wait_connected() returns when every device's command subscription is in place (its SUBACK), not
    on CONNACK: on a slow link a ping sent at once to a device was lost before its SUBSCRIBE arrived."""
    from mqtt_helpers import SlowLink

    link = SlowLink(mosquitto.port, 0.8)
    sim = Simulator(f"mqtt://127.0.0.1:{link.port}", devices=2, window_s=1, seconds=20, seed=3,
                    fleet="slow").start()
    try:
        assert sim.wait_connected(20)
        for dev in ("sim-0000", "sim-0001"):
            reply = command(mosquitto.port, f"lepton/v1/slow/{dev}/cmd/ping", {"id": dev},
                            f"lepton/v1/slow/{dev}/cmd/ping/reply", timeout=10)
            assert reply and reply["ok"] and reply["id"] == dev, (dev, reply)
    finally:
        sim.stop()
        link.close()
