"""`lepton-edge deploy FLEET[/DEVICE] BUNDLE`: ask devices to switch bundle, and wait for their answers.

Why the operator serves the bundle itself: a device fetches over http(s), and the simplest
source it can reach is the machine the operator is on; a local bundle is packed, served from a
short-lived HTTP server on the address that reaches the broker, and the archive's sha256 goes
in the command. A bundle already on a web server is passed as its URL; one already copied to
the device as --device-path.
"""
from __future__ import annotations

import http.server
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import ValidationError

from lepton_edge.errors import BadInput, disk_full
from lepton_edge.fleet.commands import ask, connect, make_command, outcome
from lepton_edge.telemetry.schema import Status
from lepton_edge.telemetry.topics import Topics, is_segment, safe_segment

MAX_TIMEOUT_S = 3600.0  # a deploy's wait for its replies (a large bundle over a slow link takes minutes)


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
    """Devices of the fleet whose retained status says online (the client's loop must be running)."""
    found: dict[str, bool] = {}

    def on_message(c, u, msg):
        parsed = Topics.parse(msg.topic)
        if parsed is None or not is_segment(parsed[1]):  # (a name the monitor would refuse: never a target)
            return
        try:
            found[parsed[1]] = Status.model_validate_json(msg.payload).online
        except ValidationError:
            pass

    pattern = Topics(fleet, "+").status
    client.on_message = on_message
    client.subscribe(pattern, qos=1)
    time.sleep(wait_s)  # retained statuses arrive at once; there is no "that was all" from the broker
    client.unsubscribe(pattern)
    return sorted(d for d, online in found.items() if online)


class _Offer:
    """Where the devices fetch the bundle from: a URL as given, a path already on the device, or a
    local bundle packed here (checked whole first) and served over HTTP while the devices answer."""

    def __init__(self, bundle: str, device_path: bool):
        self.archive: Path | None = None
        self._tmp: Path | None = None
        if bundle.startswith(("http://", "https://")):
            self.fields: dict = {"url": bundle}
        elif device_path:
            self.fields = {"path": bundle}
        else:
            from lepton_edge.agent.deploy import pack
            from lepton_edge.bundle import Bundle, sha256_file

            b = Bundle.load(bundle)  # a local bundle must be whole before it is offered to devices
            try:
                self._tmp = Path(tempfile.mkdtemp(prefix="lepton-deploy-"))
                self.archive = pack(b.path, self._tmp / f"{b.path.name}.tar.gz")
                self.fields = {"sha256": sha256_file(self.archive)}
            except OSError as e:  # a full temporary folder (it was a traceback, exit 1)
                self.close()
                hint = " (free some room there, or set TMPDIR)" if disk_full(e) else ""
                raise BadInput(f"cannot pack {b.path} in {tempfile.gettempdir()}: {e.strerror or e}{hint}") from None
            except BaseException:
                self.close()
                raise

    @contextmanager
    def served(self, host, port: int) -> Iterator[dict]:
        """The command's source fields, valid while the block runs; `host()` is the address devices
        reach this machine at, asked only when there is something to serve."""
        if self.archive is None:
            yield self.fields
            return
        server = _Serve(self.archive, host(), port)
        try:
            yield self.fields | {"url": server.url}
        finally:
            server.close()

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


def _devices(client, fleet: str, device: str) -> list[str]:
    """The one device named, or every device of the fleet that is online; none is an error."""
    devices = [device] if device else discover(client, fleet)
    if not devices:
        raise BadInput(f"no online device in fleet {fleet!r} (none has a retained online status)")
    return devices


def deploy(target: str, bundle: str, broker: str, *, username=None, password=None, ca_file=None, cert_file=None,
           key_file=None, device_path: bool = False, serve_host: str | None = None, serve_port: int = 0,
           timeout: float = 120.0, health_frames: int | None = None) -> list[dict]:
    """One row per device: {"device", "ok", "error", "data"} from its reply (or its silence)."""
    fleet, slash, device = target.partition("/")
    safe_segment(fleet, "fleet")
    if slash:  # "lab/" (a script's "lab/$DEV" with DEV unset) is one device with no name, never the whole fleet
        safe_segment(device, "device")
    if not (isinstance(timeout, (int, float)) and 0 < timeout <= MAX_TIMEOUT_S):  # (nan fails both)
        raise BadInput(f"--timeout must be more than 0 and at most {MAX_TIMEOUT_S:g} seconds, got {timeout}")
    offer = _Offer(bundle, device_path)
    try:
        client, addr = connect(broker, username, password, ca_file, cert_file, key_file)
        client.loop_start()
        try:
            devices = _devices(client, fleet, device)
            with offer.served(lambda: serve_host or _local_address(addr.host, addr.port), serve_port) as source:
                orders = {d: make_command("deploy", source | {"health_frames": health_frames or None})
                          for d in devices}
                replies = ask(client, fleet, "deploy", orders, timeout)
        finally:
            client.loop_stop()
            client.disconnect()
    finally:
        offer.close()
    return [{"device": d, **outcome(replies.get(d), timeout)} for d in devices]
