"""`lepton-edge deploy FLEET[/DEVICE] BUNDLE`: ask devices to switch bundle, and wait for their answers.

Why the operator serves the bundle itself: a device fetches over http(s), and the simplest
source it can reach is the machine the operator is on; a local bundle is packed, served from a
short-lived HTTP server on the address that reaches the broker, and the archive's sha256 goes
in the command. A bundle already on a web server is passed as its URL; one already copied to
the device as --device-path.
"""
from __future__ import annotations

import http.server
import json
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path

from lepton_edge.errors import BadInput
from lepton_edge.telemetry.broker import make_client, parse_broker
from lepton_edge.telemetry.topics import PREFIX, safe_segment


def _client(broker: str, username, password, ca_file, cert_file, key_file):
    addr = parse_broker(broker)
    c = make_client(addr, f"lepton-operator-{uuid.uuid4().hex[:8]}", username=username, password=password,
                    ca_file=ca_file, cert_file=cert_file, key_file=key_file)
    try:
        c.connect(addr.host, addr.port, keepalive=30)
    except (OSError, ValueError) as e:
        raise BadInput(f"cannot reach the broker {broker}: {e}") from None
    return c, addr


def _local_address(host: str, port: int) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        return s.getsockname()[0]


class _Serve:
    """One file over HTTP until closed."""

    def __init__(self, path: Path, host: str, port: int):
        data = path.read_bytes()
        name = path.name

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.lstrip("/") != name:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/gzip")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.srv = http.server.ThreadingHTTPServer(("0.0.0.0", port), H)
        self.url = f"http://{host}:{self.srv.server_address[1]}/{name}"
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()


def discover(client, fleet: str, wait_s: float = 1.5) -> list[str]:
    """Devices of the fleet whose retained status says online."""
    found: dict[str, bool] = {}

    def on_message(c, u, msg):
        parts = msg.topic.split("/")
        try:
            found[parts[3]] = bool(json.loads(msg.payload).get("online"))
        except (ValueError, AttributeError, IndexError):
            pass

    client.on_message = on_message
    client.subscribe(f"{PREFIX}/{fleet}/+/status", qos=1)
    time.sleep(wait_s)
    client.unsubscribe(f"{PREFIX}/{fleet}/+/status")
    return sorted(d for d, online in found.items() if online)


def deploy(target: str, bundle: str, broker: str, *, username=None, password=None, ca_file=None, cert_file=None,
           key_file=None, device_path: bool = False, serve_host: str | None = None, serve_port: int = 0,
           timeout: float = 120.0, health_frames: int | None = None) -> list[dict]:
    fleet, _, device = target.partition("/")
    safe_segment(fleet, "fleet")
    if device:
        safe_segment(device, "device")
    server = tmp = None
    if bundle.startswith(("http://", "https://")):
        payload = {"url": bundle}
    elif device_path:
        payload = {"path": bundle}
    else:
        from lepton_edge.agent.deploy import pack
        from lepton_edge.bundle import Bundle, sha256_file

        b = Bundle.load(bundle)  # a local bundle must be whole before it is offered to devices
        tmp = Path(tempfile.mkdtemp(prefix="lepton-deploy-"))
        archive = pack(b.path, tmp / f"{b.path.name}.tar.gz")
        payload = {"sha256": sha256_file(archive)}
    client, addr = _client(broker, username, password, ca_file, cert_file, key_file)
    client.loop_start()
    try:
        devices = [device] if device else discover(client, fleet)
        if not devices:
            raise BadInput(f"no online device in fleet {fleet!r} (none has a retained online status)")
        if tmp is not None:
            server = _Serve(archive, serve_host or _local_address(addr.host, addr.port), serve_port)
            payload["url"] = server.url
        if health_frames:
            payload["health_frames"] = health_frames
        replies: dict[str, dict] = {}
        ids = {d: uuid.uuid4().hex[:12] for d in devices}

        def on_message(c, u, msg):
            dev = msg.topic.split("/")[3]
            try:
                r = json.loads(msg.payload)
            except ValueError:
                return
            if r.get("id") == ids.get(dev):
                replies[dev] = r

        client.on_message = on_message
        for d in devices:
            client.subscribe(f"{PREFIX}/{fleet}/{d}/cmd/deploy/reply", qos=1)
        time.sleep(0.2)
        for d in devices:
            client.publish(f"{PREFIX}/{fleet}/{d}/cmd/deploy", json.dumps(payload | {"id": ids[d]}), qos=1)
        deadline = time.monotonic() + timeout
        while len(replies) < len(devices) and time.monotonic() < deadline:
            time.sleep(0.1)
        return [{"device": d, "ok": replies[d]["ok"], "error": replies[d].get("error"), "data": replies[d].get("data", {})}
                if d in replies else {"device": d, "ok": False, "error": f"no reply within {timeout:g} s", "data": {}}
                for d in devices]
    finally:
        if server:
            server.close()
        client.loop_stop()
        client.disconnect()
        if tmp is not None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
