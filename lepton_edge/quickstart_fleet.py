"""The last step of `lepton-edge quickstart`: the whole loop on one machine, with real parts.

A local mosquitto (on a free loopback port, unless a broker is given) carries the telemetry of a real
agent (lepton_edge.agent, the code a Pi runs) looping the demo video with the rpi4 bundle, 1 s windows,
to the fleet monitor, which writes them to a SQLite store under the output directory; the printed
fleet table and the web dashboard both read that store. Why the real parts and not a simulation: the
quickstart is the first thing a user runs, and it should show that the three halves of the product
(export, device, fleet) meet on the documented topic tree, nothing faked in between.

Every part is bounded (start-up deadlines, a few windows of waiting) and stopped in reverse order on
every path; without mosquitto or the [fleet] extra the loop is skipped with one line, not a traceback.
"""
from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

FLEET, DEVICE = "quickstart", "rpi4-demo"
WINDOW_S = 1.0
MIN_WINDOWS = 3  # what "a few telemetry windows" means before the table is printed
MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")  # Debian's, a source build's (not on PATH)


class LoopSkipped(Exception):
    """A part the loop needs is missing here (mosquitto, the [fleet] extra): one line, not an error."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def start_mosquitto(workdir: Path, timeout: float = 10.0) -> tuple[subprocess.Popen, str]:
    """mosquitto on a free loopback port, anonymous, no persistence, logging to a file in workdir.
    The port is picked then bound by mosquitto: if another process takes it in between, try again."""
    exe = shutil.which("mosquitto") or next((p for p in MOSQUITTO_PATHS if Path(p).is_file()), None)
    if not exe:
        raise LoopSkipped("mosquitto is not installed (Debian: apt-get install mosquitto), "
                          "or pass --broker mqtt://HOST:PORT")
    last = ""
    for _ in range(3):
        port = _free_port()
        conf, log = workdir / "mosquitto.conf", workdir / "mosquitto.log"
        # `user`: started as root, mosquitto would switch to the 'mosquitto' user, who cannot write our log
        conf.write_text(f"user {getpass.getuser()}\nlistener {port} 127.0.0.1\nallow_anonymous true\n"
                        f"persistence false\nlog_dest file {log}\n")
        proc = subprocess.Popen([exe, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None and not _listening(port):
            time.sleep(0.05)
        if proc.poll() is None and _listening(port):
            return proc, f"mqtt://127.0.0.1:{port}"
        _stop_process(proc)
        err = (proc.stderr.read() if proc.stderr else b"").decode(errors="replace").strip()
        logged = log.read_text(errors="replace").strip() if log.exists() else ""
        last = (err or logged).splitlines()[-1:] or ["did not listen in time"]
        last = last[0][:200]
    raise LoopSkipped(f"mosquitto could not start: {last}")


def _stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    if proc.stderr:
        proc.stderr.close()


def probe_broker(broker: str) -> None:
    """A given broker that does not answer is the user's mistake: one line (exit 2), before anything starts."""
    from lepton_edge.errors import BadInput
    from lepton_edge.telemetry.broker import parse_broker

    addr = parse_broker(broker)
    try:
        socket.create_connection((addr.host, addr.port), timeout=5).close()
    except OSError as e:
        raise BadInput(f"--broker {broker}: cannot connect ({e.strerror or e})") from None


def _get(url: str, timeout: float = 5.0) -> int:
    """The HTTP status of a GET (0 when nothing answered)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def fleet_loop(bundle: str | Path, video: Path, out: Path, *, broker: str | None = None, serve: bool = False,
               wait_s: float = 10.0, console=None, quiet: bool = False) -> dict[str, Any]:
    """Run the loop, print the fleet table and the dashboard URL; -> what was seen while it ran:
    {"broker", "store", "url", "dashboard_status", "api_status", "waited_s", "snapshot"} or {"skipped": why}.
    serve: keep everything up until Ctrl-C (the URL is only useful then)."""
    from lepton_edge import ui

    c = console or ui.console()
    try:
        with ExitStack() as stack:
            return _loop(stack, Path(bundle), Path(video), Path(out), broker, serve, wait_s, c, quiet)
    except LoopSkipped as e:
        if not quiet:
            c.print(f"fleet loop skipped: {e}", soft_wrap=True)
        return {"skipped": str(e)}


def _loop(stack: ExitStack, bundle: Path, video: Path, out: Path, broker: str | None, serve: bool, wait_s: float,
          c, quiet: bool) -> dict[str, Any]:
    try:
        from lepton_edge.agent.config import AgentConfig
        from lepton_edge.agent.service import Agent
        from lepton_edge.fleet import tui
        from lepton_edge.fleet.alerts import AlertEngine
        from lepton_edge.fleet.commands import send_command
        from lepton_edge.fleet.monitor import Monitor
        from lepton_edge.fleet.store import open_store
        from lepton_edge.fleet.web.app import WebServer, create_app, new_token
    except ImportError as e:
        raise LoopSkipped(f"{e.name or e} is not installed (pip install 'lepton-edge[device,fleet]')") from None
    from lepton_edge.telemetry.topics import sanitize

    t0 = time.monotonic()
    if broker is None:
        tmp = Path(tempfile.mkdtemp(prefix="lepton-quickstart-mqtt-"))
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        proc, broker = start_mosquitto(tmp)
        stack.callback(_stop_process, proc)
    else:
        probe_broker(broker)
    store_path = out / "fleet.sqlite"
    store = open_store(store_path)
    stack.callback(store.close)
    logs: list[str] = []
    log = logs.append
    mon = Monitor(broker, store, fleet=FLEET, log=log,
                  client_id=f"lepton-quickstart-monitor-{sanitize(socket.gethostname())}"[:64],
                  alerts=AlertEngine(store, log=log), alert_every_s=1.0)
    mon.start()
    stack.callback(mon.stop)
    if not mon.connected.wait(10):
        raise LoopSkipped(f"the monitor could not reach the broker {broker} within 10 s")
    token = new_token()
    app = create_app(store, token=token, command_sender=lambda fleet, device, verb, payload, timeout:
                     send_command(broker, fleet, device, verb, payload, timeout))
    mon.on_change = lambda changed: app.state.hub.notify()
    web = WebServer(app, "127.0.0.1", 0).start()
    stack.callback(web.stop)
    cfg = AgentConfig(broker=broker, fleet=FLEET, device_id=DEVICE, bundle=bundle, source=str(video), loop=True,
                      window_s=WINDOW_S, state_dir=out / "agent-state")
    agent = Agent(cfg, log=log)
    agent_exit: list = []

    def run_agent() -> None:
        try:
            agent_exit.append(agent.run(install_signals=False))
        except Exception as e:  # one line in the result and on screen, not a thread traceback
            agent_exit.append(f"{type(e).__name__}: {e}")

    thread = threading.Thread(target=run_agent, name="quickstart:agent", daemon=True)
    thread.start()
    stack.callback(thread.join, 30)
    stack.callback(agent.stop)
    if not quiet:
        c.print(f"fleet loop: agent {FLEET}/{DEVICE} on {video.name} (looped, {WINDOW_S:g} s windows) -> {broker} "
                f"-> monitor -> {store_path}", soft_wrap=True)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and thread.is_alive():
        d = store.device(FLEET, DEVICE)
        if d and d.windows >= MIN_WINDOWS and (d.fps or 0) > 0:
            break
        time.sleep(0.1)
    mon.wait_idle(timeout=2, quiet=0.1)
    url = web.url
    result = {"broker": broker, "store": str(store_path), "url": url,
              "dashboard_status": _get(url), "api_status": _get(f"{url}api/devices"),
              "waited_s": round(time.monotonic() - t0, 1), "snapshot": tui.snapshot(store)}
    d = store.device(FLEET, DEVICE)
    result["windows"] = d.windows if d else 0
    if not result["windows"]:
        why = agent_exit[0] if agent_exit else (logs[-1] if logs else "nothing logged")
        result["problem"] = f"no telemetry window within {wait_s:g} s ({why})"
        if not quiet:
            c.print(f"[yellow]{result['problem']}[/]", soft_wrap=True)
    if quiet:
        return result
    c.print(tui.render(store))
    c.print(f"dashboard: {url}#token={token}" + ("" if serve else " (stopped now: add --serve to keep it up)"),
            soft_wrap=True)
    c.print(f"  lepton-edge fleet ls --store {store_path}", soft_wrap=True)
    c.print(f"  lepton-edge fleet history {FLEET}/{DEVICE} --since 15m --store {store_path}", soft_wrap=True)
    if serve:
        c.print(f"  lepton-edge monitor --broker {broker} --store {store_path}  (a second shell)", soft_wrap=True)
        c.print("serving until Ctrl-C", style="bold")
        try:
            if c.is_terminal:
                tui.run_live(store, stop_event=threading.Event())
            else:
                threading.Event().wait()
        except KeyboardInterrupt:
            pass
    else:
        c.print(f"  lepton-edge quickstart -o {out} --serve   (keeps the agent, monitor and dashboard up)",
                soft_wrap=True)
    return result
