"""The device agent against a real mosquitto: telemetry that survives broker restarts and an agent
crash, Last Will, commands, signed deploys with rollback, TLS, passwords and ACLs."""
from __future__ import annotations

import json
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from conftest import run_cli
from http_helpers import serve_directory
from lepton_edge.agent.deploy import pack
from lepton_edge.bundle import Bundle, write_manifest
from lepton_edge.signing import new_keys, sign
from mjpeg_server import free_port
from mqtt_broker import Mosquitto
from mqtt_helpers import Recorder, command, make_ca, start_agent

BASE = "lepton/v1/f1/dev1"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return new_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def signed(tmp_path_factory, keys, rpi4_bundle, int8_bundle):
    """Signed copies: the running bundle (rpi4 TFLite) and the one to deploy (x86 ONNX)."""
    root = tmp_path_factory.mktemp("signed")
    out = {}
    for name, b in (("running", rpi4_bundle), ("new", int8_bundle)):
        d = root / name
        shutil.copytree(b.bundle.path, d)
        sign(d, keys[0])
        out[name] = d
    return out


def _agent_args(broker_url: str, state: Path, bundle: Path, video: Path, *extra: str) -> list[str]:
    return ["--broker", broker_url, "--fleet", "f1", "--device-id", "dev1", "--bundle", str(bundle), "--source",
            str(video), "--loop", "--window", "0.2", "--state-dir", str(state), "--deploy-path", str(state.parent),
            *extra]


def _stop(p: subprocess.Popen) -> int:
    p.send_signal(signal.SIGTERM)
    return p.wait(timeout=30)


def test_no_window_lost_across_broker_restarts_and_an_agent_crash(tmp_path, mosquitto, rpi4_bundle, fashion_video):
    video, _ = fashion_video
    rec = Recorder(mosquitto.port)
    args = _agent_args(mosquitto.url, tmp_path / "state", rpi4_bundle.bundle.path, video)
    agent = start_agent(*args)
    assert rec.wait_for(lambda r: len(r.of("/telemetry")) >= 3), agent.stderr.read() if agent.poll() else ""
    for _ in range(3):  # the broker goes away three times while the agent keeps measuring
        mosquitto.stop()
        time.sleep(1.2)
        mosquitto.start()
        time.sleep(1.5)
    first_boot = rec.of("/telemetry")[0]["boot_id"]
    agent.send_signal(signal.SIGKILL)  # a crash: no goodbye
    agent.wait()
    will = rec.wait_for(lambda r: [s for s in r.of("/status") if s["boot_id"] == first_boot and not s["online"]])
    assert will, "Last Will not seen after SIGKILL"
    agent = start_agent(*args)
    assert rec.wait_for(lambda r: [e for e in r.of("/events") if e["kind"] == "started" and e["boot_id"] != first_boot],
                        timeout=30)  # (a sleep here ended a CI run's agent while its model loaded)
    # the second boot measures frames before it is stopped (a fixed sleep here, on a loaded machine, stopped
    # it before its first frame: every window of its boot had 0 frames)
    assert rec.wait_for(lambda r: [w for w in r.of("/telemetry") if w["boot_id"] != first_boot and w["frames"] > 0],
                        timeout=30)
    assert _stop(agent) == 0
    err = agent.stderr.read()
    windows = rec.wait_for(lambda r: (lambda t: t if {w["boot_id"] for w in t} >= {first_boot} and len(
        {w["boot_id"] for w in t}) == 2 and r.of("/events") and any(e["kind"] == "stopped" for e in r.of("/events"))
        else None)(r.of("/telemetry")), timeout=30)
    assert windows, err
    rec.close()
    by_boot: dict[str, set[int]] = {}
    for w in windows:
        by_boot.setdefault(w["boot_id"], set()).add(w["seq"])
    assert len(by_boot) == 2
    for boot, seqs in by_boot.items():
        assert seqs == set(range(max(seqs) + 1)), f"gap in boot {boot}: {sorted(set(range(max(seqs) + 1)) - seqs)}"
    # ~10 s of 0.2 s windows before the crash
    assert len(by_boot[first_boot]) >= 30, (sorted(by_boot[first_boot]), {b: len(s) for b, s in by_boot.items()}, err)
    db = sqlite3.connect(tmp_path / "state" / "outbox.sqlite")
    assert db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0  # every committed row was acknowledged
    w = [w for w in windows if w["boot_id"] != first_boot and w["frames"] > 0][-1]
    assert w["latency_ms"]["inference"]["p50"] > 0 and w["rss_bytes"] > 0
    assert {"capture", "preprocess", "inference", "postprocess"} <= set(w["latency_ms"])
    assert w["bundle"]["name"] == "fashion-cnn" and w["window_s"] == 0.2


def test_broker_down_at_start_outbox_bounded_then_drained(tmp_path, rpi4_bundle, fashion_video):
    video, _ = fashion_video
    broker = Mosquitto(tmp_path / "broker")  # not started yet
    agent = start_agent(*_agent_args(broker.url, tmp_path / "state", rpi4_bundle.bundle.path, video),
                        "--outbox-max", "15")
    try:
        db_path = tmp_path / "state" / "outbox.sqlite"

        def full_and_dropping() -> bool:  # 15 rows kept while more were written: the oldest went first
            if not db_path.exists():
                return False
            try:
                with sqlite3.connect(db_path) as c:
                    n, top = c.execute("SELECT COUNT(*), MAX(id) FROM outbox").fetchone()
            except sqlite3.OperationalError:  # (the agent is still creating it)
                return False
            return n == 15 and (top or 0) >= 20

        deadline = time.monotonic() + 30  # start-up takes 0.5 s idle and 3.5 s on a loaded CI host
        while not full_and_dropping() and time.monotonic() < deadline and agent.poll() is None:
            time.sleep(0.2)
        assert agent.poll() is None and full_and_dropping()
        db = sqlite3.connect(db_path)
        assert db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 15
        broker.start()
        rec = Recorder(broker.port)
        got = rec.wait_for(lambda r: [w for w in r.of("/telemetry") if w["outbox_dropped"] > 0], timeout=30)
        assert got and got[0]["frames"] > 0  # the pipeline ran all along; the loss is reported, not hidden
        assert rec.wait_for(lambda r: db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] <= 2)
        rec.close()
    finally:
        _stop(agent)
        broker.stop()


def test_commands_and_bad_commands(tmp_path, mosquitto, rpi4_bundle, fashion_video):
    video, _ = fashion_video
    agent = start_agent(*_agent_args(mosquitto.url, tmp_path / "state", rpi4_bundle.bundle.path, video))
    rec = Recorder(mosquitto.port)
    try:
        assert rec.wait_for(lambda r: r.of("/meta"))  # subscribed to its commands from here on
        r = command(mosquitto.port, f"{BASE}/cmd/ping", {"id": "p1"}, f"{BASE}/cmd/ping/reply")
        assert r["ok"] and r["data"]["bundle"]["name"] == "fashion-cnn"
        r = command(mosquitto.port, f"{BASE}/cmd/set", {"id": "s1", "window_s": 0.5, "sample_every": 2, "threads": 1},
                    f"{BASE}/cmd/set/reply")
        assert r["ok"] and r["data"] == {"window_s": 0.5, "sample_every": 2, "threads": 1}
        assert rec.wait_for(lambda r: [w for w in r.of("/telemetry") if w["window_s"] == 0.5 and w["frames"] > 0])
        # pause telemetry: no window while paused, the agent still answers; resume: windows again
        r = command(mosquitto.port, f"{BASE}/cmd/set", {"id": "t0", "telemetry": False}, f"{BASE}/cmd/set/reply")
        assert r["ok"] and r["data"] == {"telemetry": False}
        time.sleep(0.6)  # a window already being sent may still land
        paused_at = len(rec.of("/telemetry"))
        time.sleep(1.6)  # three window periods
        assert len(rec.of("/telemetry")) == paused_at
        assert command(mosquitto.port, f"{BASE}/cmd/ping", {"id": "p0"}, f"{BASE}/cmd/ping/reply")["ok"]
        r = command(mosquitto.port, f"{BASE}/cmd/set", {"id": "t1", "telemetry": True}, f"{BASE}/cmd/set/reply")
        assert r["ok"] and rec.wait_for(lambda r: len(r.of("/telemetry")) > paused_at)
        for verb, payload, words in [("ping", "{not json", "not JSON"), ("reboot", "{}", "unknown verb"),
                                     ("set", {"id": "s2", "window_s": "fast"}, "window_s"),
                                     ("set", {"id": "s3", "threads": 0}, "threads"),
                                     ("set", {"id": "s4", "colour": 1}, "colour"),
                                     ("deploy", {"id": "d0"}, "exactly one of"),
                                     ("ping", json.dumps({"id": "big", "pad": "x" * 70000}), "exceeds")]:
            r = command(mosquitto.port, f"{BASE}/cmd/{verb}", payload, f"{BASE}/cmd/{verb}/reply")
            assert not r["ok"] and words in r["error"], (verb, r)
        r = command(mosquitto.port, f"{BASE}/cmd/ping", {"id": "p2"}, f"{BASE}/cmd/ping/reply")
        assert r["ok"]  # still serving after all that
        assert agent.poll() is None
        errs = [e for e in rec.of("/events") if e["kind"] == "command_error"]  # rate-limited: 7 in a burst
        assert 1 <= len(errs) <= 3 and errs[0]["data"]["verb"] == "ping", errs
    finally:
        rec.close()
        assert _stop(agent) == 0


def test_signed_deploys_and_rollbacks(tmp_path, mosquitto, signed, keys, fashion_video):
    video, _ = fashion_video
    state = tmp_path / "state"
    rec = Recorder(mosquitto.port)
    agent = start_agent(*_agent_args(mosquitto.url, state, signed["running"], video), "--trusted-key", str(keys[1]))
    try:
        assert rec.wait_for(lambda r: r.of("/meta"))

        def deploy(payload):
            return command(mosquitto.port, f"{BASE}/cmd/deploy", payload, f"{BASE}/cmd/deploy/reply")

        # an unsigned bundle, a foreign key, a file changed after signing, a URL nobody answers
        unsigned = tmp_path / "unsigned"
        shutil.copytree(signed["new"], unsigned)
        (unsigned / "signature").unlink()
        other = tmp_path / "other"
        shutil.copytree(signed["new"], other)
        sign(other, new_keys(tmp_path / "otherkeys")[0])
        tampered = tmp_path / "tampered"
        shutil.copytree(signed["new"], tampered)
        (tampered / "labels.txt").write_text("cat\n" * 10)
        www = tmp_path / "www"  # the well-signed bundle packed, at a path and a URL, with a wrong sha256
        www.mkdir()
        packed = pack(signed["new"], www / "new.tar.gz")
        with serve_directory(www) as base:
            for i, (payload, words) in enumerate([
                    ({"path": str(unsigned)}, "not signed"), ({"path": str(other)}, "not trusted"),
                    ({"path": str(tampered)}, "checksum mismatch"),
                    ({"url": f"http://127.0.0.1:{free_port()}/b.tar.gz"}, "cannot download"),
                    ({"path": str(packed), "sha256": "0" * 64}, "sha256 differs from the command's"),
                    ({"url": f"{base}/new.tar.gz", "sha256": "0" * 64}, "differs from the command's")]):
                r = deploy(payload | {"id": f"bad{i}"})
                assert not r["ok"] and words in r["error"], r

        # a well-signed bundle whose model misses its target's latency budget on this device: rolled back
        slow = tmp_path / "slow"
        shutil.copytree(signed["new"], slow)
        m = Bundle.load(slow).manifest
        m.target["latency_budget_ms"] = 0.0001
        write_manifest(slow, m)
        sign(slow, keys[0])
        r = deploy({"id": "slow", "path": str(slow), "health_frames": 20})
        assert not r["ok"] and "rolled back" in r["error"] and "latency budget" in r["error"], r
        assert rec.wait_for(lambda r: [e for e in r.of("/events") if e["kind"] == "rollback"])

        # the operator's CLI: pack, serve over HTTP, command, wait for the reply
        # fleet-wide
        res = run_cli("deploy", "f1", str(signed["new"]), "--broker", mosquitto.url, "--json", timeout=120)
        assert res.returncode == 0, res.stderr + res.stdout
        (row,) = json.loads(res.stdout)  # the one online device of fleet f1, found by its retained status
        assert row["device"] == "dev1" and row["ok"] and row["data"]["bundle"]["format"] == "onnx"
        assert row["data"]["signed_by"]
        assert row["data"]["inference_p50_ms"] <= row["data"]["latency_budget_ms"]
        r = command(mosquitto.port, f"{BASE}/cmd/ping", {"id": "after"}, f"{BASE}/cmd/ping/reply")
        assert r["data"]["bundle"]["format"] == "onnx"  # serving the new model
        assert (state / "current").resolve().joinpath("model.onnx").is_file()
        kinds = [e["kind"] for e in rec.of("/events")]
        assert kinds.count("deploy_failed") == 6 and "deploy" in kinds
    finally:
        assert _stop(agent) == 0
    # a restart comes back with the deployed bundle, not the configured one
    n_meta = len(rec.of("/meta"))
    agent = start_agent(*_agent_args(mosquitto.url, state, signed["running"], video), "--trusted-key", str(keys[1]))
    try:
        assert rec.wait_for(lambda r: len(r.of("/meta")) > n_meta)
        r = command(mosquitto.port, f"{BASE}/cmd/ping", {"id": "restart"}, f"{BASE}/cmd/ping/reply")
        assert r["data"]["bundle"]["format"] == "onnx"
    finally:
        _stop(agent)
        rec.close()


def test_unsigned_start_bundle_refused_and_bad_config(tmp_path, keys, int8_bundle, fashion_video):
    video, _ = fashion_video
    r = run_cli("agent", "--broker", "mqtt://127.0.0.1:1", "--bundle", str(int8_bundle.bundle.path), "--source",
                str(video), "--state-dir", str(tmp_path / "s"), "--trusted-key", str(keys[1]))
    assert r.returncode == 2 and "not signed" in r.stderr and "Traceback" not in r.stderr
    cfg = tmp_path / "agent.toml"
    for text, words in [('brokr = "mqtt://x"\n', "unknown field 'brokr' (did you mean: broker"),
                        ('window_s = "often"\n', "field 'window_s'"),
                        ('device_id = "a/b"\n', "not a safe MQTT topic segment"),
                        ('broker = "http://x"\n', "scheme must be one of"),
                        ('window_s = \n', "not valid TOML")]:
        cfg.write_text(text + f'bundle = "{int8_bundle.bundle.path}"\nsource = "{video}"\nstate_dir = "{tmp_path}/s"\n')
        r = run_cli("agent", "--config", str(cfg))
        assert r.returncode == 2 and words in r.stderr, (text, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_tls_password_and_acl(tmp_path, rpi4_bundle, fashion_video):
    video, _ = fashion_video
    certs = make_ca(tmp_path / "certs")
    pw = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pw), "dev1", "s3cret"], check=True)
    subprocess.run(["mosquitto_passwd", "-b", str(pw), "ops", "0ps"], check=True)
    acl = tmp_path / "acl"
    acl.write_text("user ops\ntopic readwrite lepton/v1/#\n\npattern readwrite lepton/v1/+/%u/#\n")
    tls_port = free_port()
    broker = Mosquitto(tmp_path / "broker", extra=(
        f"listener {tls_port} 127.0.0.1\ncafile {certs['ca']}\ncertfile {certs['cert']}\nkeyfile {certs['key']}\n"
        f"password_file {pw}\nacl_file {acl}\nallow_anonymous false\nper_listener_settings false\n"))
    broker.conf.write_text(broker.conf.read_text().replace("allow_anonymous true\n", ""))
    broker.start()
    tls = {"ca_certs": str(certs["ca"])}
    rec = Recorder(tls_port, tls=tls, username="ops", password="0ps")
    agent = start_agent("--broker", f"mqtts://localhost:{tls_port}", "--ca-file", str(certs["ca"]), "--username",
                        "dev1", "--password", "s3cret", "--fleet", "f1", "--device-id", "dev1", "--bundle",
                        str(rpi4_bundle.bundle.path), "--source", str(video), "--loop", "--window", "0.2",
                        "--state-dir", str(tmp_path / "state"))
    try:
        assert rec.wait_for(lambda r: len(r.of("dev1/telemetry")) >= 2), broker.log()[-2000:]
        import paho.mqtt.client as mqtt

        # dev1 may neither write into nor read from another device's subtree
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="intruder")
        c.username_pw_set("dev1", "s3cret")
        c.tls_set(ca_certs=str(certs["ca"]))
        seen = []
        c.on_message = lambda cl, u, m: seen.append(m.topic)
        c.connect("localhost", tls_port)
        c.loop_start()
        c.subscribe("lepton/v1/f1/dev2/#", qos=1)
        c.subscribe("lepton/v1/f1/dev1/#", qos=1)  # its own subtree: allowed
        time.sleep(0.5)
        c.publish("lepton/v1/f1/dev2/telemetry", b'{"spoofed": true}', qos=1).wait_for_publish(5)
        rec.client.publish("lepton/v1/f1/dev2/cmd/ping", b'{"id": "x"}', qos=1).wait_for_publish(5)
        time.sleep(1.0)
        c.loop_stop()
        c.disconnect()
        assert not rec.of("dev2/telemetry")  # the spoofed message never reached anyone
        assert not [t for t in seen if "/dev2/" in t] and [t for t in seen if "/dev1/" in t]
        # a wrong password is refused
        bad = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="badpw")
        bad.username_pw_set("dev1", "wrong")
        bad.tls_set(ca_certs=str(certs["ca"]))
        codes = []
        bad.on_connect = lambda cl, u, f, rc, p=None: codes.append(rc)
        bad.connect("localhost", tls_port)
        bad.loop_start()
        deadline = time.monotonic() + 5
        while not codes and time.monotonic() < deadline:
            time.sleep(0.05)
        bad.loop_stop()
        assert codes and codes[0].is_failure
    finally:
        assert _stop(agent) == 0
        rec.close()
        broker.stop()


def test_mutual_tls_with_a_device_certificate(tmp_path, rpi4_bundle, fashion_video):
    """A broker that admits only clients with a certificate from its CA, the certificate's name
    taken as the user name: the agent gets in with --cert-file/--key-file, a client without one
    does not."""
    import paho.mqtt.client as mqtt

    video, _ = fashion_video
    certs = make_ca(tmp_path / "certs")
    mtls_port = free_port()
    broker = Mosquitto(tmp_path / "broker", extra=(
        f"listener {mtls_port} 127.0.0.1\ncafile {certs['ca']}\ncertfile {certs['cert']}\nkeyfile {certs['key']}\n"
        "require_certificate true\nuse_identity_as_username true\n")).start()
    rec = Recorder(broker.port)  # the plain loopback listener, for the test's own eyes
    agent = start_agent(*_agent_args(f"mqtts://localhost:{mtls_port}", tmp_path / "state", rpi4_bundle.bundle.path,
                                     video, "--ca-file", str(certs["ca"]), "--cert-file", str(certs["client_cert"]),
                                     "--key-file", str(certs["client_key"])))
    try:
        assert rec.wait_for(lambda r: len(r.of("/telemetry")) >= 2), broker.log()[-2000:]
        # connected as the certificate's name: mosquitto logs the user name as u'<name>' (the client id
        # lepton-f1-dev1 holds "dev1" too, so a bare "dev1" in the log proves nothing)
        assert re.search(r"as lepton-f1-dev1 \(.*u'dev1'\)", broker.log()), broker.log()[-2000:]
        bare = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="no-cert")
        bare.tls_set(ca_certs=str(certs["ca"]))
        try:  # refused in the handshake (TLS 1.2) or right after it (TLS 1.3)
            bare.connect("localhost", mtls_port)
            bare.loop_start()
            time.sleep(1.0)
            refused = not bare.is_connected()
            bare.loop_stop()
        except OSError:  # ssl.SSLError is an OSError
            refused = True
        assert refused
    finally:
        rec.close()
        code = _stop(agent)
        broker.stop()
    assert code == 0


def test_keys_and_sign_cli(tmp_path, int8_bundle):
    r = run_cli("keys", "new", "--out", str(tmp_path / "k"))
    assert r.returncode == 0 and (tmp_path / "k" / "private.pem").stat().st_mode & 0o777 == 0o600
    assert run_cli("keys", "new", "--out", str(tmp_path / "k")).returncode == 2  # never overwrites a key
    b = tmp_path / "b"
    shutil.copytree(int8_bundle.bundle.path, b)
    r = run_cli("sign", str(b), "--key", str(tmp_path / "k" / "private.pem"))
    assert r.returncode == 0 and json.loads((b / "signature").read_text())["alg"] == "ed25519"
    assert "other users" not in r.stderr
    (tmp_path / "k" / "private.pem").chmod(0o644)  # a key anyone on the machine can read: signed, and said
    r = run_cli("sign", str(b), "--key", str(tmp_path / "k" / "private.pem"))
    assert r.returncode == 0 and "can be read by other users (mode 644)" in r.stderr and "chmod 600" in r.stderr
    (b / "labels.txt").write_text("x\n")
    r = run_cli("sign", str(b), "--key", str(tmp_path / "k" / "private.pem"))
    assert r.returncode == 2 and "checksum mismatch" in r.stderr


def test_raspberry_pi_example_config_is_valid():
    from conftest import ROOT
    from lepton_edge.agent.config import load

    cfg = load(ROOT / "examples" / "raspberry_pi" / "agent.toml", {})
    assert cfg.broker.startswith("mqtts://") and cfg.trusted_keys and cfg.fleet == "shop-floor"
    unit = (ROOT / "examples" / "raspberry_pi" / "lepton-edge-agent.service").read_text()
    assert "lepton-edge agent --config /etc/lepton-edge/agent.toml" in unit and "KillSignal=SIGTERM" in unit


@pytest.mark.parametrize("scheme", ["ws", "wss"])
def test_websockets_broker_url(scheme, tmp_path, rpi4_bundle, fashion_video):
    """ws:// and wss:// (MQTT over WebSockets, for brokers behind HTTP proxies; wss with the test
    CA): telemetry out and commands in."""
    video, _ = fashion_video
    ws_port = free_port()
    tls, extra = [], ""
    if scheme == "wss":
        certs = make_ca(tmp_path / "certs")
        extra = f"cafile {certs['ca']}\ncertfile {certs['cert']}\nkeyfile {certs['key']}\n"
        tls = ["--ca-file", str(certs["ca"])]
    # mosquitto 2.0's websockets listener binds every interface and needs a plain listener beside it
    broker = Mosquitto(tmp_path / "broker", extra=f"listener {ws_port}\nprotocol websockets\n{extra}").start()
    rec = Recorder(broker.port)
    agent = start_agent(*_agent_args(f"{scheme}://localhost:{ws_port}", tmp_path / "state",
                                     rpi4_bundle.bundle.path, video, *tls))
    try:
        assert rec.wait_for(lambda r: len(r.of("/telemetry")) >= 2 and r.of("/meta")), broker.log()[-2000:]
        r = command(broker.port, f"{BASE}/cmd/ping", {"id": "w1"}, f"{BASE}/cmd/ping/reply")
        assert r["ok"] and r["data"]["bundle"]["name"] == "fashion-cnn"
    finally:
        rec.close()
        code = _stop(agent)
        broker.stop()
    assert code == 0
