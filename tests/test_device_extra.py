"""The device side on its own (issue #12): `inspect` without the `onnx` package, every device verb in
a venv with only the `[device]` extra, and the Raspberry Pi example's broker (TLS, a certificate
per device, the ACL) against a real mosquitto."""
from __future__ import annotations

import datetime
import ipaddress
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ROOT
from lepton_edge.errors import BadInput

EXAMPLE = ROOT / "examples" / "raspberry_pi"


# ---- inspect on ONNX without the onnx package -------------------------------------------------------
def _onnx_file(int8_bundle) -> Path:
    return next(Path(int8_bundle.bundle.path).glob("*.onnx"))


def test_onnx_wire_reader_agrees_with_onnx(int8_bundle, tmp_path):
    """The protobuf reader a device uses gives what `onnx` gives, key for key: a quantized bundle, and a
    foreign model with dynamic dimensions, two outputs, a custom-domain op and an fp16 initializer."""
    import onnx
    from onnx import TensorProto, helper

    from lepton_edge.inspect import inspect_onnx, inspect_onnx_wire

    f = _onnx_file(int8_bundle)
    assert inspect_onnx_wire(f) == inspect_onnx(f)
    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["n", 64, 64, 3])
    y1 = helper.make_tensor_value_info("feat", TensorProto.FLOAT16, ["n", 3])
    y2 = helper.make_tensor_value_info("extra", TensorProto.FLOAT, None)  # no shape: rank unknown
    y3 = helper.make_tensor_value_info("total", TensorProto.FLOAT, [])  # a scalar
    w = helper.make_tensor("w", TensorProto.FLOAT16, [3, 3], [0.5] * 9)
    g = helper.make_graph([helper.make_node("ReduceMean", ["pixels"], ["m"], axes=[1, 2], keepdims=0),
                           helper.make_node("Cast", ["m"], ["mh"], to=TensorProto.FLOAT16),
                           helper.make_node("MatMul", ["mh", "w"], ["feat"]),
                           helper.make_node("Mystery", ["m"], ["extra"], domain="com.acme"),
                           helper.make_node("ReduceSum", ["m"], ["total"], keepdims=0)],
                          "g", [x], [y1, y2, y3], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.acme", 2)],
                          producer_name="acme", producer_version="9")
    path = tmp_path / "foreign.onnx"
    onnx.save(m, str(path))
    a, b = inspect_onnx(path), inspect_onnx_wire(path)
    assert a == b
    assert b["inputs"][0]["dynamic"] == [0] and b["custom_ops"] == ["com.acme::Mystery"]
    assert b["domains"] == {"com.acme": 2} and b["opset"] == 13 and b["precision"] == "fp16"
    # an output with no shape in the file is of unknown rank, told apart from a scalar's []
    assert [o["shape"] for o in b["outputs"]] == [["n", 3], None, []]
    from typer.testing import CliRunner

    from lepton_edge.cli import app

    shown = CliRunner().invoke(app, ["inspect", str(path)], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "extra: float32 (rank unknown)" in shown.output and "total: float32 []" in shown.output


def test_inspect_counts_the_ops_inside_if_branches_and_loop_bodies(tmp_path):
    """A model whose work sits in an If's branches (openwakeword's silero VAD) was listed as 'Equal 1, If 1',
    and a custom op inside a branch was missed. Both readers now count every subgraph's nodes, alike."""
    from onnx import TensorProto, helper

    from lepton_edge.inspect import inspect_onnx, inspect_onnx_wire

    def branch(name, nodes, out):
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 4])])

    inner = branch("inner", [helper.make_node("Secret", ["x"], ["s"], domain="com.acme")], "s")
    then = branch("then", [helper.make_node("Relu", ["x"], ["r"]),
                           helper.make_node("If", ["c"], ["t"], then_branch=inner, else_branch=inner)], "t")
    other = branch("else", [helper.make_node("Sigmoid", ["x"], ["e"])], "e")
    g = helper.make_graph([helper.make_node("ReduceMax", ["x"], ["mx"], keepdims=0),
                           helper.make_node("Greater", ["mx", "zero"], ["c"]),
                           helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.acme", 1)])
    path = tmp_path / "branches.onnx"
    path.write_bytes(m.SerializeToString())
    a, b = inspect_onnx(path), inspect_onnx_wire(path)
    assert a == b
    assert b["ops"] == {"If": 2, "ReduceMax": 1, "Greater": 1, "Relu": 1, "com.acme::Secret": 2, "Sigmoid": 1}
    assert b["nodes"] == 8 and b["custom_ops"] == ["com.acme::Secret"] and b["domains"] == {"com.acme": 1}


@pytest.mark.parametrize("data", [b"\x08", b"\x0a\xff\xff\xff\xff\x0f", b"\x3a\x05abc", b"\x0f" * 40,
                                  bytes(range(256)) * 8, b"\x08\x07"])
def test_onnx_wire_reader_refuses_junk_in_one_line(data, tmp_path):
    """Truncated varints, lengths past the end, odd wire types, a model without a graph: BadInput."""
    from lepton_edge.inspect import inspect_onnx_wire

    f = tmp_path / "junk.onnx"
    f.write_bytes(data)
    with pytest.raises(BadInput, match="not a readable ONNX model"):
        inspect_onnx_wire(f)


# ---- every device verb with only the [device] extra ---------------------------------------------------
@pytest.fixture(scope="module")
def device_venv():
    from device_venv import device_venv as build

    try:
        return build()
    except RuntimeError as e:  # no network and nothing cached: say so rather than pass
        if re.search(r"No matching distribution|Could not find a version|NewConnectionError|Network is unreachable",
                     str(e)):
            pytest.skip(f"cannot build the device venv offline: {str(e)[-300:]}")
        raise


def _dev(venv: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "lepton-edge"), *args], capture_output=True, text=True,
                          timeout=timeout, env={"PATH": "/usr/bin:/bin", "HOME": str(venv), "COLUMNS": "160"})


@pytest.mark.slow
def test_every_device_verb_with_only_the_device_extra(device_venv, int8_bundle, rpi4_bundle, fashion_video,
                                                      mosquitto, tmp_path):
    """In a venv made by `pip install -e .[device]`: torch, onnx and TensorFlow cannot be imported, and
    inspect (ONNX and TFLite), run, bench, keys/sign/verify (a device verifies what it is sent; an
    operator may sign on the Pi too) and the agent (status, meta, telemetry, a ping) all work."""
    from mqtt_helpers import Recorder, command

    py = str(device_venv / "bin" / "python")
    for mod in ("torch", "onnx", "tensorflow", "litert_torch"):
        r = subprocess.run([py, "-c", f"import {mod}"], capture_output=True, text=True)
        assert r.returncode != 0 and "No module named" in r.stderr, mod
    video, _ = fashion_video
    onnx_b, tfl_b = str(int8_bundle.bundle.path), str(rpi4_bundle.bundle.path)
    for b, fmt, layout in ((onnx_b, "onnx", "NCHW"), (tfl_b, "tflite", "NHWC")):
        r = _dev(device_venv, "inspect", b, "--json")
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
        info = json.loads(r.stdout)
        assert info["format"] == fmt and info["inputs"][0]["layout"] == layout and info["bundle"]["checksums"] == "ok"
        assert info["precision"] == "int8" and info["ops"]
        r = _dev(device_venv, "inspect", b)  # the table, too
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
        r = _dev(device_venv, "run", b, "--source", str(video), "--max-frames", "200", "--jsonl",
                 str(tmp_path / f"{fmt}.jsonl"))
        assert r.returncode == 0, r.stderr[-2000:]
        assert len((tmp_path / f"{fmt}.jsonl").read_text().splitlines()) == 200
        r = _dev(device_venv, "bench", b, "--runs", "50", "--warmup", "5", "--json")
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    r = _dev(device_venv, "keys", "new", "--out", str(tmp_path / "k"))
    assert r.returncode == 0, r.stderr[-2000:]
    signed = tmp_path / "signed"
    subprocess.run(["cp", "-r", tfl_b, str(signed)], check=True)
    r = _dev(device_venv, "sign", str(signed), "--key", str(tmp_path / "k" / "private.pem"))
    assert r.returncode == 0, r.stderr[-2000:]
    # the agent, with the signed bundle and its key: the device-side signature check
    rec = Recorder(mosquitto.port)
    agent = subprocess.Popen([str(device_venv / "bin" / "lepton-edge"), "agent", "--broker", mosquitto.url,
                              "--fleet", "f1", "--device-id", "pi1", "--bundle", str(signed), "--source", str(video),
                              "--loop", "--window", "0.5", "--state-dir", str(tmp_path / "state"), "--trusted-key",
                              str(tmp_path / "k" / "public.pem")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    try:
        assert rec.wait_for(lambda r: len(r.of("pi1/telemetry")) >= 2 and r.of("pi1/meta") and r.of("pi1/status"),
                            60), (agent.poll(), agent.stderr.read()[-2000:] if agent.poll() is not None else "")
        assert rec.of("pi1/telemetry")[-1]["frames"] > 0
        reply = command(mosquitto.port, "lepton/v1/f1/pi1/cmd/ping", {"id": "dv"}, "lepton/v1/f1/pi1/cmd/ping/reply")
        assert reply["ok"] and reply["data"]["bundle"]["format"] == "tflite"
    finally:
        rec.close()
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(timeout=30)
    assert code == 0, agent.stderr.read()[-2000:]


# ---- the example broker: TLS, a certificate per device, the ACL ---------------------------------------
def _pki(out: Path, clients: tuple[str, ...]) -> dict[str, Path]:
    """A CA, a server certificate for localhost/127.0.0.1, and one client certificate per name (its CN
    becomes the MQTT user name under use_identity_as_username), as provisioning makes them."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(cn, key, ca_key, issuer, *ext):
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
             .not_valid_after(now + datetime.timedelta(days=30)))
        for e, crit in ext:
            b = b.add_extension(e, critical=crit)
        return b.sign(ca_key, hashes.SHA256())

    def write(stem, c, k):
        files[f"{stem}.crt"] = out / f"{stem}.crt"
        files[f"{stem}.crt"].write_bytes(c.public_bytes(serialization.Encoding.PEM))
        if k is not None:
            files[f"{stem}.key"] = out / f"{stem}.key"
            files[f"{stem}.key"].write_bytes(k.private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))

    files: dict[str, Path] = {}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert("lepton fleet CA", ca_key, ca_key, name("lepton fleet CA"),
              (x509.BasicConstraints(ca=True, path_length=None), True))
    write("ca", ca, None)
    k = ec.generate_private_key(ec.SECP256R1())
    write("server", cert("localhost", k, ca_key, ca.subject, (x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)), k)
    for cn in clients:
        k = ec.generate_private_key(ec.SECP256R1())
        write(cn, cert(cn, k, ca_key, ca.subject, (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)),
              k)
    return files


def _acl_lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_readme_security_acl_is_the_example_acl():
    """README's Security section shows the ACL the example ships and the test below exercises."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Security"):]
    block = re.search(r"```\n(user ops\n.*?)```", section, re.S).group(1)
    assert _acl_lines(block) == _acl_lines((EXAMPLE / "mosquitto" / "lepton.acl").read_text())


def test_example_broker_confines_each_device_to_its_subtree(tmp_path, rpi4_bundle, fashion_video):
    """The example mosquitto config and ACL, as shipped (only paths and port changed), with a real
    agent holding the certificate of `pi-kitchen`: its status, meta and telemetry get through and it
    answers the operator's ping; with the same certificate a client cannot publish into `pi-hall`'s
    subtree, cannot command itself, cannot read another device; the monitor cannot command anyone;
    a client without a certificate is refused."""
    import paho.mqtt.client as mqtt

    from mjpeg_server import free_port
    from mqtt_broker import Mosquitto
    from mqtt_helpers import Recorder, start_agent

    pki = _pki(tmp_path / "pki", ("ops", "monitor", "pi-kitchen", "pi-hall"))
    port = free_port()
    conf = (EXAMPLE / "mosquitto" / "lepton.conf").read_text()
    conf = (conf.replace("listener 8883", f"listener {port} 127.0.0.1")
            .replace("/etc/mosquitto/certs/", f"{tmp_path / 'pki'}/")
            .replace("/etc/mosquitto/lepton.acl", str(EXAMPLE / "mosquitto" / "lepton.acl")))
    conf = "\n".join(ln for ln in conf.splitlines() if not ln.startswith(("persistence ", "max_queued")))
    broker = Mosquitto(tmp_path / "broker", extra=conf + "\n")
    broker.conf.write_text(broker.conf.read_text().replace("allow_anonymous true\n", ""))
    broker.start()

    def tls(cn):
        return {"ca_certs": str(pki["ca.crt"]), "certfile": str(pki[f"{cn}.crt"]), "keyfile": str(pki[f"{cn}.key"])}

    ops = Recorder(port, client_id="ops-rec", tls=tls("ops"))
    mon = Recorder(port, client_id="mon-rec", tls=tls("monitor"))
    video, _ = fashion_video
    agent = start_agent("--broker", f"mqtts://localhost:{port}", "--ca-file", str(pki["ca.crt"]), "--cert-file",
                        str(pki["pi-kitchen.crt"]), "--key-file", str(pki["pi-kitchen.key"]), "--fleet", "shop-floor",
                        "--device-id", "pi-kitchen", "--bundle", str(rpi4_bundle.bundle.path), "--source", str(video),
                        "--loop", "--window", "0.3", "--state-dir", str(tmp_path / "state"))
    base, other = "lepton/v1/shop-floor/pi-kitchen", "lepton/v1/shop-floor/pi-hall"
    clients = []

    def client(cn, cid):
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid)
        c.tls_set(**tls(cn))
        seen: list[str] = []
        c.on_message = lambda cl, u, m: seen.append(m.topic)
        c.connect("localhost", port)
        c.loop_start()
        clients.append(c)
        return c, seen

    try:
        for who in (ops, mon):  # the device's own publications are allowed, and both readers see them
            assert who.wait_for(lambda r: len(r.of("pi-kitchen/telemetry")) >= 2 and r.of("pi-kitchen/meta")
                                and r.of("pi-kitchen/status"), 60), broker.log()[-3000:]
        ops.client.publish(f"{base}/cmd/ping", json.dumps({"id": "from-ops"}), qos=1)
        assert ops.wait_for(lambda r: [x for x in r.of(f"{base}/cmd/ping/reply") if x.get("id") == "from-ops"], 30)

        spy, spy_seen = client("pi-kitchen", "pi-kitchen-spy")  # the device's certificate, stolen
        spy.subscribe(f"{other}/#", qos=1)
        spy.subscribe(f"{base}/cmd/#", qos=1)  # its own commands: allowed
        hall, _ = client("pi-hall", "pi-hall")
        mon_c, _ = client("monitor", "monitor-pub")
        time.sleep(0.5)
        spy.publish(f"{other}/telemetry", b'{"spoofed": true}', qos=1).wait_for_publish(5)
        spy.publish(f"{other}/status", b'{"online": false}', qos=1, retain=True).wait_for_publish(5)
        spy.publish(f"{base}/cmd/ping", json.dumps({"id": "from-self"}), qos=1).wait_for_publish(5)
        mon_c.publish(f"{base}/cmd/ping", json.dumps({"id": "from-monitor"}), qos=1).wait_for_publish(5)
        hall.publish(f"{other}/telemetry", b'{"real": true}', qos=1).wait_for_publish(5)  # its own: allowed
        ops.client.publish(f"{base}/cmd/ping", json.dumps({"id": "after"}), qos=1)
        assert ops.wait_for(lambda r: [x for x in r.of(f"{base}/cmd/ping/reply") if x.get("id") == "after"], 30)
        assert ops.wait_for(lambda r: [x for x in r.of("pi-hall/telemetry") if x == {"real": True}], 10)
        time.sleep(0.5)
        replies = {x.get("id") for x in ops.of(f"{base}/cmd/ping/reply")}
        assert "from-self" not in replies and "from-monitor" not in replies, replies  # never reached the agent
        assert {"spoofed": True} not in ops.of("pi-hall/telemetry") and not ops.of("pi-hall/status")
        assert not [t for t in spy_seen if "/pi-hall/" in t], spy_seen  # another device's subtree is unreadable
        assert [t for t in spy_seen if t == f"{base}/cmd/ping"], spy_seen  # its own commands are readable
        log = broker.log()
        assert "Denied PUBLISH from pi-kitchen-spy" in log and "Denied PUBLISH from monitor-pub" in log

        bare = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="no-cert")
        bare.tls_set(ca_certs=str(pki["ca.crt"]))
        try:  # refused in the handshake (TLS 1.2) or right after it (TLS 1.3)
            bare.connect("localhost", port)
            bare.loop_start()
            time.sleep(1.0)
            refused = not bare.is_connected()
            bare.loop_stop()
        except OSError:
            refused = True
        assert refused
    finally:
        for c in clients:
            c.loop_stop()
            c.disconnect()
        ops.close()
        mon.close()
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(timeout=30)
        broker.stop()
    assert code == 0, agent.stderr.read()[-2000:]


def test_raspberry_pi_example_unit_and_config_agree():
    """The unit the README installs: Type=notify with a watchdog, the state directory the config names."""
    from lepton_edge.agent.config import load

    unit = (EXAMPLE / "lepton-edge-agent.service").read_text()
    kv = dict(ln.split("=", 1) for ln in unit.splitlines() if "=" in ln and not ln.startswith("#"))
    assert kv["Type"] == "notify" and kv["NotifyAccess"] == "main" and 10 <= int(kv["WatchdogSec"]) <= 120
    cfg = load(EXAMPLE / "agent.toml", {})
    assert str(cfg.state_dir) == "/var/lib/lepton-edge" and kv["StateDirectory"] == "lepton-edge"
    readme = (EXAMPLE / "README.md").read_text()
    assert "lepton-edge kit" in readme.split("\n## ")[0]  # the kit flow comes first
    for needle in ("v4l2-ctl --list-devices", "libcamerasrc ! video/x-raw,width=640,height=480,framerate=30/1 ! "
                   "videoconvert ! appsink", "--system-site-packages", "/etc/machine-id", "use_identity_as_username"):
        assert needle in readme, needle
