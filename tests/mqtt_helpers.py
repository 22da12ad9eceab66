"""Test-side MQTT helpers: a recording subscriber with a persistent session, an agent process,
and a test certificate authority for TLS."""
from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt


class Recorder:
    """Subscribes to lepton/v1/# (QoS 1, persistent session) and keeps every message.

    The constructor returns once the broker has acknowledged the subscription (up to 10 s), so a
    message published right after it (an agent's or simulator's `started` event, which is not
    retained) is never missed because the subscription was still on its way."""

    def __init__(self, port: int, client_id: str = "recorder", topic: str = "lepton/v1/#", tls: dict | None = None,
                 username: str | None = None, password: str | None = None):
        self.messages: list[tuple[str, dict | str, bool]] = []
        self.lock = threading.Lock()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        if username:
            c.username_pw_set(username, password)
        if tls:
            c.tls_set(**tls)
        c.reconnect_delay_set(1, 2)
        self.subscribed = threading.Event()
        # (cleared at each connect: after a broker restart without persistence the session is gone, and a
        # test that needs the subscription again waits for this)
        c.on_connect = lambda cl, u, f, rc, p=None: (self.subscribed.clear(), cl.subscribe(topic, qos=1))
        c.on_subscribe = lambda cl, u, mid, codes, p=None: self.subscribed.set()
        c.on_message = self._on_message
        c.connect("localhost" if tls else "127.0.0.1", port, keepalive=10)
        c.loop_start()
        self.client = c
        self.subscribed.wait(10)

    def _on_message(self, client, userdata, msg):
        try:
            body = json.loads(msg.payload)
        except (ValueError, RecursionError):  # hostile payloads (60 KB of '[') are recorded as text
            body = msg.payload.decode(errors="replace")
        with self.lock:
            self.messages.append((msg.topic, body, bool(msg.retain)))

    def of(self, suffix: str) -> list:
        with self.lock:
            return [b for t, b, _ in self.messages if t.endswith(suffix)]

    def wait_for(self, pred, timeout: float = 20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = pred(self)
            if got:
                return got
            time.sleep(0.05)
        return pred(self)

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


def start_agent(*args: str, cwd: Path | None = None) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "lepton-edge"
    return subprocess.Popen([str(exe), "agent", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=cwd, env={**os.environ, "COLUMNS": "200"})


def command(port: int, topic: str, payload, reply_topic: str, timeout: float = 60.0, **client_kw) -> dict:
    """Publish a command and wait for the reply with the same id."""
    got: list[dict] = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"op-{time.monotonic_ns()}")
    c.on_message = lambda cl, u, m: got.append(json.loads(m.payload))
    c.connect("127.0.0.1", port)
    c.subscribe(reply_topic, qos=1)
    c.loop_start()
    time.sleep(0.2)
    body = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
    c.publish(topic, body, qos=1)
    want = payload.get("id") if isinstance(payload, dict) else None
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for r in got:
                if want is None or r.get("id") == want:
                    return r
            time.sleep(0.05)
    finally:
        c.loop_stop()
        c.disconnect()
    raise AssertionError(f"no reply on {reply_topic} within {timeout} s")


def make_ca(out: Path, host: str = "localhost") -> dict[str, Path]:
    """A test CA, a server certificate for host (and 127.0.0.1) and a client certificate for a
    device called dev1 (mutual TLS), both signed by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("lepton test CA")).issuer_name(name("lepton test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name(host)).issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = (x509.CertificateBuilder().subject_name(name("dev1")).issuer_name(ca.subject)
              .public_key(client_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
              .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA256()))
    files = {"ca": out / "ca.crt", "cert": out / "server.crt", "key": out / "server.key",
             "client_cert": out / "dev1.crt", "client_key": out / "dev1.key"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for c, k, cert_file, key_file in [(cert, key, "cert", "key"), (client, client_key, "client_cert", "client_key")]:
        files[cert_file].write_bytes(c.public_bytes(serialization.Encoding.PEM))
        files[key_file].write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    return files


@contextlib.contextmanager
def running_agent(agent):
    """agent.run() in a thread (no signal handlers: not the main thread); stopped and joined on the way out."""
    t = threading.Thread(target=agent.run, kwargs={"install_signals": False}, name="test:agent")
    t.start()
    try:
        yield t
    finally:
        agent.stop()
        t.join(30)
        assert not t.is_alive()


class SlowLink:
    """A TCP relay to the broker that holds each client-to-broker chunk for `delay` seconds: a client on
    a slow link, whose SUBSCRIBE reaches the broker well after the CONNACK came back."""

    def __init__(self, port: int, delay: float):
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port, self.target, self.delay = self.srv.getsockname()[1], port, delay
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                a, _ = self.srv.accept()
            except OSError:
                return
            b = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pump, args=(a, b, self.delay), daemon=True).start()
            threading.Thread(target=self._pump, args=(b, a, 0.0), daemon=True).start()

    @staticmethod
    def _pump(src, dst, delay):
        try:
            while chunk := src.recv(65536):
                time.sleep(delay)
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            dst.close()

    def close(self):
        self.srv.close()
