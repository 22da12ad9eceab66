"""The agent under systemd's notify protocol (issue #12): a real AF_UNIX datagram socket stands in for
$NOTIFY_SOCKET, a real agent process runs on a real video or a real MJPEG stream, and the test reads
what systemd would: READY=1 after the first inference, WATCHDOG=1 only while frames flow, STOPPING=1
on SIGTERM. Plus the plain log lines the journal gets."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from mjpeg_server import MjpegServer
from mqtt_helpers import Recorder, command


class NotifySocket:
    """What systemd listens on: an AF_UNIX datagram socket; every datagram kept with its arrival time."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path if not path.startswith("@") else "\0" + path[1:])
        self.sock.settimeout(0.2)
        self.address = path
        self.got: list[tuple[float, dict[str, str]]] = []
        self._run = True
        self._t = threading.Thread(target=self._recv, daemon=True)
        self._t.start()

    def _recv(self):
        while self._run:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.got.append((time.monotonic(), fields))

    def times(self, key: str) -> list[float]:
        return [t for t, f in list(self.got) if key in f]

    def wait(self, pred, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return True
            time.sleep(0.05)
        return bool(pred())

    def close(self):
        self._run = False
        self._t.join(2)
        self.sock.close()


def _agent(broker: str, state: Path, bundle: Path, source: str, notify: str, watchdog_usec: int | None,
           *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env["NOTIFY_SOCKET"] = notify
    if watchdog_usec:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    exe = Path(sys.executable).parent / "lepton-edge"
    return subprocess.Popen([str(exe), "agent", "--broker", broker, "--fleet", "f1", "--device-id", "dev1",
                             "--bundle", str(bundle), "--source", source, "--window", "1", "--state-dir", str(state),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _stop(p: subprocess.Popen) -> tuple[int, str]:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    return p.returncode, p.stderr.read()


def test_ready_watchdog_while_frames_flow_and_stopping_on_sigterm(tmp_path, mosquitto, rpi4_bundle, fashion_video):
    video, _ = fashion_video
    ns = NotifySocket(str(tmp_path / "notify"))
    rec = Recorder(mosquitto.port)
    agent = _agent(mosquitto.url, tmp_path / "state", rpi4_bundle.bundle.path, str(video), str(tmp_path / "notify"),
                   1_000_000, "--loop")
    try:
        assert ns.wait(lambda: ns.times("READY"), 60), _stop(agent)[1][-2000:]
        ready = next(f for _, f in ns.got if "READY" in f)
        assert "fps" in ready.get("STATUS", "") or "results" in ready.get("STATUS", "")
        assert not ns.times("WATCHDOG") or ns.times("WATCHDOG")[0] >= ns.times("READY")[0]  # never before READY
        # WatchdogSec=1 s: a ping every half period while the video plays
        assert ns.wait(lambda: len(ns.times("WATCHDOG")) >= 6, 20), ns.got[-5:]
        t = ns.times("WATCHDOG")
        assert max(b - a for a, b in zip(t, t[1:])) < 1.0  # never late: systemd would have killed it
        assert "fps" in [f for _, f in ns.got if "WATCHDOG" in f][-1]["STATUS"]
        assert not ns.times("STOPPING")
        # the agent is the real one: it answers a ping over MQTT meanwhile
        r = command(mosquitto.port, "lepton/v1/f1/dev1/cmd/ping", {"id": "p1"}, "lepton/v1/f1/dev1/cmd/ping/reply")
        assert r["ok"]
        code, err = _stop(agent)
        assert code == 0 and ns.wait(lambda: ns.times("STOPPING"), 5), ns.got[-3:]
        # the journal's lines: plain text, one per message, no markup, no time stamp (journald adds one)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert any(ln.startswith("started: ") for ln in lines), err[-2000:]
        assert not [ln for ln in lines if "[dim]" in ln or "\x1b[" in ln]
    finally:
        _stop(agent)
        rec.close()
        ns.close()


def test_a_stalled_camera_stops_the_watchdog_pings(tmp_path, mosquitto, rpi4_bundle):
    """A camera whose connection stays open but sends nothing (a hung camera): the pings stop while it
    hangs (systemd would restart the agent), a STATUS line and an event say why; they come back when
    capture reconnects (here after its 5 s read timeout; the second connection is served)."""
    rng = np.random.default_rng(0)
    cam = MjpegServer([rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for _ in range(8)], fps=30, mode="stall",
                      stall_after=45).start()
    ns = NotifySocket(str(tmp_path / "notify"))
    rec = Recorder(mosquitto.port)
    agent = _agent(mosquitto.url, tmp_path / "state", rpi4_bundle.bundle.path, cam.url, str(tmp_path / "notify"),
                   1_000_000)
    try:
        assert ns.wait(lambda: ns.times("READY"), 60), _stop(agent)[1][-2000:]
        assert ns.wait(lambda: any("stalled" in f.get("STATUS", "") for _, f in ns.got), 20), ns.got[-5:]
        stalled_at = next(t for t, f in ns.got if "stalled" in f.get("STATUS", ""))
        # the pings resume once capture reconnects; meanwhile there was a gap systemd (WatchdogSec=1) acts on
        assert ns.wait(lambda: [t for t in ns.times("WATCHDOG") if t > stalled_at], 30), ns.got[-5:]
        t = ns.times("WATCHDOG")
        gaps = [b - a for a, b in zip(t, t[1:])]
        assert gaps and max(gaps) > 2.5, gaps  # no ping for more than twice WatchdogSec while it hung
        assert rec.wait_for(lambda r: [e for e in r.of("/events") if e.get("kind") == "stalled"], 10)
    finally:
        code, err = _stop(agent)
        rec.close()
        ns.close()
        cam.stop()
    assert code == 0, err[-2000:]


def test_nothing_is_sent_without_notify_socket_and_abstract_sockets_work(tmp_path):
    from lepton_edge.agent.systemd import Notifier

    n = Notifier(env={})
    assert not n.enabled and not n.ready("x") and not n.watchdog() and n.watchdog_s is None
    assert not Notifier(env={"NOTIFY_SOCKET": "relative/path"}).enabled  # only absolute or '@' addresses
    name = f"@lepton-test-{os.getpid()}-{time.monotonic_ns()}"
    ns = NotifySocket(name)
    try:
        n = Notifier(env={"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "30000000"})
        assert n.enabled and n.watchdog_s == 30.0
        assert n.ready("a\nb  c") and n.watchdog() and n.stopping()
        assert ns.wait(lambda: len(ns.got) == 3, 5)
        assert ns.got[0][1] == {"READY": "1", "STATUS": "a b c"}  # a status is one line
        assert "WATCHDOG" in ns.got[1][1] and "STOPPING" in ns.got[2][1]
    finally:
        ns.close()
    # a watchdog meant for another process is not ours; a socket that is gone costs nothing
    assert Notifier(env={"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).watchdog_s is None
    assert Notifier(env={"NOTIFY_SOCKET": str(tmp_path / "gone")}).ready() is False


def test_agent_log_is_plain_lines_and_survives_markup(tmp_path):
    """Under systemd stderr is the journal: one line per message, and text from a payload such as
    '[/x]' is printed, not parsed (rich's console raised MarkupError on it)."""
    import io

    from lepton_edge.agent.systemd import agent_log

    buf = io.StringIO()
    log = agent_log(buf)
    log("command_error: deploy: bad url 'http://x/[/x]'\nsecond line")
    log("y" * 5000)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "command_error: deploy: bad url 'http://x/[/x]' second line"
    assert len(lines) == 2 and len(lines[1]) <= 1003
