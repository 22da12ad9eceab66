"""`lepton-edge deploy` against devices that answer as they please: a real mosquitto and a fake device
(paho) that announces itself with a retained online status and answers each deploy command with the
reply a test gives it. What the operator's command must never do: deploy to the whole fleet when a
device name came out empty, send a command it then reports as failed, crash on one device's reply and
lose every other device's outcome, write a device's escape sequences to the terminal, or wait on and
print a reply of megabytes."""
from __future__ import annotations

import json
import os
import tempfile
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from conftest import run_cli
from lepton_edge.errors import BadInput
from lepton_edge.fleet.deploy import deploy
from tmpfs import tmpfs

URL = "https://example.invalid/b.tar.gz"


class FakeDevices:
    """Devices of fleet `lab`, each online (retained status), answering cmd/deploy with `reply(device, id)`;
    `received` lists the devices each command reached."""

    def __init__(self, port: int, names: list[str], reply):
        self.received: list[str] = []
        self.reply, self.ready = reply, threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fake-devices")
        c.on_connect = lambda cl, u, f, rc, p=None: self._announce(cl, names)
        c.on_subscribe = lambda *a: self.ready.set()
        c.on_message = self._on_message
        c.connect("127.0.0.1", port)
        c.loop_start()
        self.client = c
        assert self.ready.wait(10)

    def _announce(self, c, names):
        for d in names:
            c.publish(f"lepton/v1/lab/{d}/status", json.dumps({"v": 1, "online": True, "boot_id": "b1"}), qos=1,
                      retain=True)
        c.subscribe("lepton/v1/lab/+/cmd/+", qos=1)

    def _on_message(self, c, u, msg):
        parts = msg.topic.split("/")
        if len(parts) != 6:  # (its own replies)
            return
        self.received.append(parts[3])
        body = self.reply(parts[3], json.loads(msg.payload)["id"])
        c.publish(msg.topic + "/reply", body if isinstance(body, bytes) else json.dumps(body), qos=1)

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def devices(mosquitto):
    made: list[FakeDevices] = []

    def make(names, reply=lambda device, rid: {"v": 1, "id": rid, "ok": True, "data": {}}):
        made.append(FakeDevices(mosquitto.port, names, reply))
        return made[-1]

    yield make
    for d in made:
        d.close()


def test_an_empty_device_name_is_refused_not_taken_as_the_whole_fleet(mosquitto, devices):
    """`deploy "lab/$DEV"` with DEV unset reached every online device of the fleet."""
    fake = devices(["cam1", "cam2"])
    with pytest.raises(BadInput, match="device '' is not a safe MQTT topic segment"):
        deploy("lab/", URL, mosquitto.url, timeout=5)
    time.sleep(0.5)
    assert fake.received == []
    assert sorted(r["device"] for r in deploy("lab", URL, mosquitto.url, timeout=10)) == ["cam1", "cam2"]


@pytest.mark.parametrize("timeout", [float("nan"), -5.0, 0.0, float("inf"), 1e300])
def test_a_bad_timeout_is_refused_before_any_command_is_sent(mosquitto, devices, timeout):
    """nan, -5 and 0 sent the command and then reported every device as failed ('no reply within nan s',
    while the devices switched bundles); inf and 1e300 were an OverflowError traceback, after sending."""
    fake = devices(["cam1"])
    with pytest.raises(BadInput, match="--timeout must be more than 0"):
        deploy("lab", URL, mosquitto.url, timeout=timeout)
    time.sleep(0.5)
    assert fake.received == []


def test_discovery_skips_device_names_the_monitor_would_refuse(mosquitto, devices):
    """A retained status under a name with a space or a bidi override made that 'device' a deploy target."""
    fake = devices(["cam1", "evil name\u202e[bold]x"])
    rows = deploy("lab", URL, mosquitto.url, timeout=10)
    assert [r["device"] for r in rows] == ["cam1"] and fake.received == ["cam1"]


def test_odd_replies_are_each_one_row_and_never_reach_the_terminal_raw(mosquitto, devices):
    """One fleet-wide deploy, one odd reply per device: a `bundle` that is a string or null (a traceback
    that lost every row), an error full of escape sequences and Rich markup (written to the terminal as
    sent: a window title, a cleared screen), and a 200 KB reply (ignored as silence, not printed)."""
    replies = {
        "a-str": lambda rid: {"v": 1, "id": rid, "ok": True, "data": {"bundle": "evil", "inference_p50_ms": 3}},
        "b-null": lambda rid: {"v": 1, "id": rid, "ok": True, "data": {"bundle": None}},
        "c-esc": lambda rid: {"v": 1, "id": rid, "ok": False,
                              "error": "\x1b]0;PWNED\x07\x1b[2J\x1b[31mRED\x1b[0m [bold]markup[/bold]"},
        "d-big": lambda rid: {"v": 1, "id": rid, "ok": False, "error": "A " * 100_000},
        "e-good": lambda rid: {"v": 1, "id": rid, "ok": True,
                               "data": {"bundle": {"name": "cnn"}, "inference_p50_ms": 4.5, "latency_budget_ms": 50}},
    }
    fake = devices(list(replies), reply=lambda device, rid: replies[device](rid))
    t0 = time.monotonic()
    r = run_cli("deploy", "lab", URL, "--broker", mosquitto.url, "--timeout", "8", timeout=120)
    said = r.stdout + r.stderr
    assert r.returncode == 1 and "Traceback" not in said, said[-2000:]  # two devices did not take it
    assert "\x1b" not in said and "\x07" not in said and "?]0;PWNED" in said and "[bold]markup[/bold]" in said
    assert "cnn: inference p50 4.5 ms (budget 50 ms)" in said and "None: inference p50 3 ms" in said
    assert said.count("A A A") < 5 and len(said) < 20_000  # the 200 KB reply: neither waited on nor printed
    assert "no reply within 8 s" in said and time.monotonic() - t0 < 60
    assert sorted(fake.received) == sorted(replies)


@pytest.mark.root
def test_a_full_temporary_folder_is_one_line_before_anything_is_sent(tmp_path, monkeypatch):
    """The bundle is packed in the temporary folder before any device is asked: on a full one that was an
    OSError traceback (exit 1). One line now, naming the folder, and nothing left in it."""
    from test_bundle_hardening import make_bundle

    bundle = make_bundle(tmp_path / "b", model=os.urandom(1 << 20))  # incompressible: more than the room left
    with tmpfs(tmp_path / "tmp", "size=512k") as work:
        monkeypatch.setattr(tempfile, "tempdir", str(work))
        with pytest.raises(BadInput, match=f"cannot pack .* in {work}: No space left on device"):
            deploy("f1/dev1", str(bundle), "mqtt://127.0.0.1:1", timeout=1)
        assert os.listdir(work) == []
