"""The operator's fleet verbs: `monitor`, `simulate` (and `fleet ls|show|history|alerts`).

Thin over lepton_edge.fleet: option parsing, wiring of the parts (ingest, store, web, terminal
dashboard, alerts, Home Assistant), one line per error. The main `lepton-edge` CLI mounts this app;
`python -m lepton_edge.fleet.cli` runs it alone.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time

import typer
from rich.markup import escape

from lepton_edge import ui
from lepton_edge.errors import BadInput, LeptonError
from lepton_edge.telemetry.broker import redacted
from lepton_edge.ui import printable

_log = logging.getLogger("lepton_edge.fleet.monitor")

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Watch the fleet: monitor, simulate.")

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d|w)?$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, None: 1}


def parse_duration(text: str, what: str) -> float:
    m = _DURATION.match(text.strip()) if text else None
    if not m or float(m.group(1)) <= 0:
        raise BadInput(f"{what} {text!r}: a duration like 90s, 15m, 24h or 7d")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_listen(text: str) -> tuple[str, int]:
    """--web's HOST:PORT (metrics.parse_listen; port 8080 by default, 0 for any free one)."""
    from lepton_edge.fleet.metrics import parse_listen as parse

    return parse(text, 8080, "--web", lowest_port=0)


_emit = ui.emit_json


def _command_sender(broker: str, **tls):
    """fleet.commands.send_command bound to the monitor's broker (None when that part is absent)."""
    try:
        from lepton_edge.fleet.commands import send_command
    except ImportError:
        return None

    def send(fleet: str, device: str, verb: str, payload: dict, timeout: float) -> dict:
        return send_command(broker, fleet, device, verb, payload, timeout, **tls)

    return send


STORE_WAIT_S = 60.0  # a service waits this long for its database at start, then exits (systemd restarts it)


def open_store_retrying(url: str | None, log, wait_s: float):
    """open_store, retried while the database is locked or unreachable (one line, then quiet); a store that
    cannot be opened at all (StoreUnusable: a directory, /dev/null, a corrupt file, a newer schema) is not
    retried (it will not heal) and ends at once with its one line and exit 2, as does the last failure."""
    from lepton_edge.fleet.store import StoreError, StoreUnusable, open_store

    deadline, delay, said = time.monotonic() + wait_s, 0.5, False
    while True:
        try:
            return open_store(url)
        except StoreError as e:
            if isinstance(e, StoreUnusable) or time.monotonic() + delay > deadline:
                raise
            if not said:
                log(f"monitor: {e}; retrying for up to {wait_s:g} s")
                said = True
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


def _alerts(store, rules, publish, log):
    """The alert engine: rules from a TOML file (or the defaults); alerts also go out on MQTT."""
    from lepton_edge.fleet.alerts import AlertEngine

    return AlertEngine(store, rules, publish=publish, log=log)


def _check_before_store(broker: str, fleet: str, group: str | None, alerts: str | None, tls: dict):
    """The broker URL, topic segments, TLS files and alert rules, checked before the store is opened;
    returns the rules. Why: the Monitor and the alert engine refused them only once the store was open,
    so `monitor --store new.sqlite --broker bogus://h` (or --alerts nope.toml) left a new fleet store."""
    from lepton_edge.fleet.alerts import load_rules
    from lepton_edge.telemetry.broker import _check_tls_files, parse_broker
    from lepton_edge.telemetry.topics import safe_segment

    parse_broker(broker)
    if fleet != "+":
        safe_segment(fleet, "fleet")
    if group is not None:
        safe_segment(group, "group")
    _check_tls_files(**tls)
    return load_rules(alerts)


def _wait_subscribed(mon, broker: str, once: bool, log) -> None:
    """Up to 10 s for the monitor's SUBACK; a refusal is one line at once (waiting will not change an ACL),
    and --once does not take the store's last view for the live fleet."""
    mon.answered.wait(10)
    if mon.connected.is_set():
        return
    if mon.refused:
        raise BadInput(f"broker {redacted(broker)} refused the monitor's subscriptions ({mon.refused}): "
                          "give its user read access to them")
    if once:
        raise BadInput(f"broker {redacted(broker)} not reachable in 10 s "
                          "(the store's last view: `lepton-edge fleet ls`)")
    log(f"monitor: {redacted(broker)} not reachable yet; retrying in the background")


@app.command()
def monitor(
    broker: str = typer.Option(..., help="mqtt://host:1883 (mqtts://, ws://, wss://; user:pass@ in the URL)."),
    store: str | None = typer.Option(None, help="SQLite path or postgresql://... (default "
                                                    "~/.local/share/lepton-edge/fleet.sqlite)."),
    web: str | None = typer.Option(None, help="Serve the web dashboard, JSON API and /metrics on HOST:PORT."),
    token: str | None = typer.Option(None, envvar="LEPTON_DASHBOARD_TOKEN",
                                        help="Token for commands from the web page (generated when not given)."),
    web_host: list[str] | None = typer.Option(None, "--web-host", envvar="LEPTON_DASHBOARD_HOSTS",
                                              help="A further Host name the dashboard (or --metrics) answers to (a "
                                              "reverse proxy that passes its own; repeatable). Others get 421, so "
                                              "a web page rebinding its domain to this machine cannot read the "
                                              "fleet."),
    group: str | None = typer.Option(None, help="Share telemetry/events with other workers ($share/GROUP)."),
    fleet: str = typer.Option("+", help="Only this fleet (default: every fleet)."),
    alerts: str | None = typer.Option(None, "--alerts", help="Alert rules (TOML); defaults without it."),
    homeassistant: bool = typer.Option(False, "--homeassistant", help="Publish Home Assistant MQTT discovery."),
    metrics: str | None = typer.Option(None, "--metrics", help="Serve Prometheus /metrics on HOST:PORT "
                                          "(without --web; with --web it is at /metrics there)."),
    retain: str | None = typer.Option(None, help="Delete history older than this (e.g. 7d)."),
    once: bool = typer.Option(False, "--once", help="Read the devices' retained states from the broker into the "
                              "store, print the fleet, exit (a clean session of its own: a running monitor is not "
                              "disturbed)."),
    as_json: bool = typer.Option(False, "--json", help="With --once: the fleet table as JSON."),
    seconds: float | None = typer.Option(None, help="Stop after this many seconds (demos, scripts)."),
    no_tui: bool = typer.Option(False, "--no-tui", help="No live table: one status line a minute (logs, services)."),
    ca_file: str | None = typer.Option(None, help="CA certificate for TLS to the broker."),
    cert_file: str | None = typer.Option(None, help="Client certificate (mutual TLS)."),
    key_file: str | None = typer.Option(None, help="Client key (mutual TLS)."),
):
    """Ingest the fleet's telemetry into the store; live terminal table, optional web dashboard."""
    from lepton_edge.fleet.monitor import Monitor

    if as_json and not once:  # (it was ignored: a live monitor with no JSON and exit 0 at its end)
        raise BadInput("--json prints the fleet once, as JSON: give --once with it")
    retain_s, listen, token = _check_monitor_options(retain, web, token, seconds, metrics)
    tls = {"ca_file": ca_file, "cert_file": cert_file, "key_file": key_file}
    rules = _check_before_store(broker, fleet, group, alerts, tls)

    def log(line: str) -> None:  # through logging, so --quiet, --verbose and --log-json apply
        failed = line.startswith(("error", "warning")) or " failed" in line or "retrying" in line
        _log.log(logging.WARNING if failed else logging.INFO, line)

    st = open_store_retrying(store, log, wait_s=10.0 if once else STORE_WAIT_S)
    hub_notify: list = []
    ha: list = []

    def on_change(changed):
        for n in hub_notify:
            n()
        for bridge in ha:
            bridge(changed)  # records the set; the bridge's own thread reads the store once per interval

    clients: list = []  # the monitor's client, once made: alerts are published through it

    def publish(topic: str, payload: bytes) -> None:
        for c in clients:
            c.publish(topic, payload, qos=1)

    # --once is a read: a clean session of its own, so it never takes over (or drains) the persistent
    # session of a monitor service running on this machine.
    once_id = {"client_id": f"lepton-monitor-once-{os.getpid()}", "persistent": False} if once else {}
    mon = Monitor(broker, st, group=group, fleet=fleet, on_change=on_change, retain_s=retain_s, log=log,
                  alerts=_alerts(st, rules, publish, log), **once_id, **tls)
    clients.append(mon.client)
    server = metrics_server = None
    stop = threading.Event()
    try:
        metrics_server = _serve_metrics(st, metrics, mon, tuple(web_host or ()))
        mon.start()
        _wait_subscribed(mon, broker, once, log)
        if homeassistant:
            ha.append(_homeassistant_bridge(mon.client, st))
        if once:
            mon.wait_idle(timeout=10, quiet=0.5)  # the retained states (and windows arriving meanwhile)
            _print_fleet(st, as_json)
            return
        if listen:
            server = _start_dashboard(st, listen, token, _command_sender(broker, **tls), hub_notify,
                                      tuple(web_host or ()))
        if seconds:
            threading.Timer(seconds, stop.set).start()
        if no_tui or not sys.stdout.isatty():
            _status_lines(st, stop, 60 if seconds is None or seconds > 60 else seconds, log)
        else:
            from lepton_edge.fleet import tui

            tui.run_live(st, stop_event=stop)
    except KeyboardInterrupt:
        if once:  # (a stop before the fleet was printed: exit 0 and nothing on stdout, even with --json)
            raise
    finally:
        stop.set()
        _close_servers(server, metrics_server, ha)
        mon.stop()
        st.close()


MAX_MONITOR_SECONDS = 365 * 86400


def _check_monitor_options(retain: str | None, web: str | None, token: str | None, seconds: float | None,
                           metrics: str | None) -> tuple[float | None, tuple[str, int] | None, str | None]:
    """Every bad option as one line before anything connects: (retain seconds, web address, token)."""
    retain_s = parse_duration(retain, "--retain") if retain else None
    listen = parse_listen(web) if web else None
    if listen:
        from lepton_edge.fleet.web.app import check_bind, new_token

        check_bind(listen[0], token)  # refuse a public address without a token
        token = token or new_token()
    if seconds is not None and not 0 < seconds <= MAX_MONITOR_SECONDS:  # (NaN, inf: a Timer's traceback, or none)
        raise BadInput(f"--seconds must be above 0 and at most {MAX_MONITOR_SECONDS} (a year; leave it out to run "
                       "until stopped)")
    if metrics:
        from lepton_edge.fleet.metrics import parse_listen as parse_metrics_listen

        parse_metrics_listen(metrics)
    return retain_s, listen, token


def _close_servers(server, metrics_server, bridges: list) -> None:
    """Stop the monitor's web server, /metrics server and Home Assistant bridges (whichever started)."""
    if server:
        server.stop()
    if metrics_server:
        metrics_server.stop()
    for bridge in bridges:
        bridge.close()


def _serve_metrics(st, listen: str | None, mon, hosts: tuple[str, ...] = ()):
    """Prometheus /metrics on `listen` (with the monitor's own counters), or None without --metrics."""
    if not listen:
        return None
    from lepton_edge.fleet.metrics import serve_metrics

    return serve_metrics(st, listen, extra=lambda: dict(mon.stats), hosts=hosts)


def _start_dashboard(st, listen: tuple[str, int], token: str | None, sender, hub_notify: list,
                     hosts: tuple[str, ...] = ()):
    """The web dashboard on `listen`; its hub is told of every change the monitor stores."""
    from lepton_edge.fleet.web.app import WebServer, create_app

    app_ = create_app(st, token=token, command_sender=sender)
    hub_notify.append(app_.state.hub.notify)
    server = WebServer(app_, *listen, hosts=hosts).start()
    print(f"dashboard: {server.url}#token={token}", flush=True)
    return server


def _homeassistant_bridge(client, st):
    """Home Assistant MQTT discovery through the monitor's client: every device announced now."""
    from lepton_edge.fleet.homeassistant import HomeAssistantBridge

    bridge = HomeAssistantBridge(client, st).attach()
    bridge.publish_all()
    return bridge


def _print_fleet(st, as_json: bool) -> None:
    """`monitor --once`: the fleet table (or its JSON) from the store."""
    from lepton_edge.fleet import tui

    if as_json:
        _emit(tui.snapshot(st))
    else:
        from rich.console import Console

        Console().print(tui.render(st))


def _status_lines(st, stop: threading.Event, every_s: float, log) -> None:
    """No live table (a service, a log): one summary line every `every_s` until `stop`."""
    from lepton_edge.fleet.store import StoreError

    while not stop.wait(every_s):
        try:
            s = st.summary()
        except StoreError as e:  # the writer retries; this line says so once a minute
            log(f"monitor: {e} (retrying)")
            continue
        print(f"monitor: {s.devices} devices, {s.online} online, {s.offline} offline, "
              f"{s.total_fps:.1f} fps, {s.active_alerts} active alerts", flush=True)


@app.command()
def simulate(
    broker: str = typer.Option(..., help="mqtt://host:1883"),
    devices: int = typer.Option(100, help="How many simulated devices (one MQTT connection each)."),
    window: float = typer.Option(10.0, help="Telemetry window, seconds."),
    seconds: float = typer.Option(60.0, help="Run this long, then stop every device gracefully."),
    seed: int = typer.Option(1, help="Same seed, same fleet and same behaviours."),
    fleet: str = typer.Option("sim", help="Fleet name of the simulated devices."),
    prefix: str = typer.Option("sim", help="Device names: PREFIX-0001, PREFIX-0002, ..."),
    as_json: bool = typer.Option(False, "--json", help="The summary as JSON."),
):
    """A fleet of simulated devices: drifting telemetry, dropouts, restarts, slow and hot devices,
    rollbacks and devices that die (Last Will); answers ping/set/deploy."""
    from lepton_edge.fleet.simulate import Simulator

    sim = Simulator(broker, devices=devices, window_s=window, seconds=seconds, seed=seed, fleet=fleet, prefix=prefix)
    if not as_json:
        print(f"simulating {devices} devices in fleet {fleet!r} on {redacted(broker)} for {seconds:g} s "
              f"(window {window:g} s, seed {seed})", flush=True)
    sim.start()
    try:
        sim.wait()
    except KeyboardInterrupt:
        sim.stop()
    s = sim.summary()
    if as_json:
        _emit(s)
    else:
        print(f"{s['connected']}/{s['devices']} devices connected in {s['connect_s']} s; {s['windows']} windows "
              f"({s['windows_per_s']}/s), {s['skipped']} skipped (seq gaps), {s['restarts']} restarts, "
              f"{s['rollbacks']} rollbacks, {s['died']} died (Last Will), {s['commands']} commands answered, "
              f"{s['reconnects']} reconnects in {s['elapsed_s']} s")
    if s["connected"] == 0:
        raise BadInput(f"no simulated device could connect to {redacted(broker)}")


# ---- `fleet ls | show | history | alerts | top`: read the store only (engineer F3) ------------------
fleet_app = typer.Typer(no_args_is_help=True, help="Read the fleet's store: ls, show, history, alerts, top, forget.")
app.add_typer(fleet_app, name="fleet")
_STORE_HELP = "SQLite path or postgresql://... (default ~/.local/share/lepton-edge/fleet.sqlite)."
MAX_SINCE_S = 400 * 86400


def _read_store(store: str | None):
    """Open the store for reading; a SQLite file that does not exist is an error, not a new empty file."""
    from pathlib import Path

    from lepton_edge.fleet.store import DEFAULT_PATH, StoreError, open_store

    s = store or str(DEFAULT_PATH)
    if s.startswith(("postgresql://", "postgres://")):
        _is_fleet_database(s)
    else:
        path = Path(s.removeprefix("sqlite://")).expanduser()
        if not path.is_file():
            raise BadInput(f"no fleet store at {path} (run `lepton-edge monitor` first, or pass --store)")
        _is_fleet_store(path)
    try:
        return open_store(s)
    except StoreError as e:  # its message already names the store
        raise BadInput(str(e)) from None


def _when(ts: float, fmt: str = "%m-%d %H:%M:%S") -> str:
    """A stored time as local time, or as the number it is when no calendar holds it (a device sent
    1e300 before the monitor timed such messages itself: `fleet show` was a traceback)."""
    try:
        return time.strftime(fmt, time.localtime(ts))
    except (OverflowError, OSError, ValueError):
        return f"ts {ts:.6g}"


def _is_fleet_store(path) -> None:
    """One line unless the SQLite file holds a fleet store, checked read-only before the store opens it.
    Why: opening creates the store's tables, so `fleet ls --store app.db` added ten tables to another
    application's database, and an empty file became a store."""
    import sqlite3

    try:
        with open(path, "rb") as f:
            head = f.read(16)
        if head != b"SQLite format 3\x00":
            raise BadInput(f"{path}: {'empty' if not head else 'not a SQLite file'}, not a fleet store")
        con = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=5)  # ('#', '?' quoted)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            missing = sorted(STORE_TABLES - tables)
            version = None if missing else con.execute("SELECT max(version) FROM schema_version").fetchone()[0]
        finally:
            con.close()
    except (OSError, sqlite3.Error) as e:
        raise BadInput(f"{path}: cannot read it as a fleet store ({str(e).splitlines()[0][:200]})") from None
    _check_store_schema(str(path), "a SQLite database", missing, version)


# the tables every fleet store has had since its first schema; a table named schema_version alone is common
# in other applications' databases (`fleet ls --store app.db` added the store's tables to one such)
STORE_TABLES = frozenset({"schema_version", "devices", "windows"})


def _check_store_schema(where: str, kind: str, missing: list[str], version) -> None:
    if missing:
        raise BadInput(f"{where}: {kind} but not a fleet store (no {', '.join(missing)} table); "
                       "reading commands never write to it")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BadInput(f"{where}: {kind} but not a fleet store (its schema_version holds {str(version)[:40]!r}, "
                       "not a store's version); reading commands never write to it")


def _is_fleet_database(url: str) -> None:
    """The PostgreSQL side of _is_fleet_store: a database without the store's schema_version table is
    refused before the store's migration would create its tables there."""
    try:
        import psycopg
    except ImportError:
        return  # open_store says what to install
    from lepton_edge.fleet.store.postgres import redacted_url

    try:
        with psycopg.connect(url, connect_timeout=5, autocommit=True) as c:
            missing = sorted(t for t in STORE_TABLES if c.execute("SELECT to_regclass(%s)", (t,)).fetchone()[0] is None)
            version = None if missing else c.execute("SELECT max(version) FROM schema_version").fetchone()[0]
    except psycopg.Error as e:  # (never open_store here: its migration would create the tables)
        raise BadInput(f"fleet store {redacted_url(url)}: {str(e).strip().splitlines()[0][:200]}") from None
    _check_store_schema(redacted_url(url), "a database", missing, version)


def parse_since(text: str) -> float:
    """'15m', '1h', '24h', '7d' (also s, w) -> seconds, at most 400 days."""
    seconds = parse_duration(text, "--since")
    if seconds > MAX_SINCE_S:
        raise BadInput(f"--since {text!r}: at most 400d")
    return seconds


def resolve_device(st, name: str) -> tuple[str, str]:
    """'fleet/device', or 'device' when exactly one fleet has it; otherwise one line, exit 2."""
    from lepton_edge.errors import closest

    if len(name) > 129:  # FLEET/DEVICE: two segments of at most 64 (a 100 KB name was echoed whole)
        raise BadInput(f"device {name[:64]!r}…: longer than FLEET/DEVICE can be (129 characters)")
    if name.count("/") > 1 or not name.strip("/"):
        raise BadInput(f"device {name!r}: expected FLEET/DEVICE or DEVICE")
    known = [(d.fleet, d.device) for d in st.devices()]
    if "/" in name:
        fleet, device = name.split("/")
        if (fleet, device) in known:
            return fleet, device
        raise BadInput(f"unknown device {name!r}{closest(name, [f'{f}/{d}' for f, d in known])}")
    hits = [(f, d) for f, d in known if d == name]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise BadInput(f"device {name!r} is in several fleets: {', '.join(f'{f}/{d}' for f, d in hits)}; "
                       "name it as FLEET/DEVICE")
    raise BadInput(f"unknown device {name!r}{closest(name, sorted({d for _, d in known}))}")


def _console():
    from lepton_edge import ui

    return ui.console()


@fleet_app.command("ls")
def fleet_ls(store: str | None = typer.Option(None, help=_STORE_HELP),
             as_json: bool = typer.Option(False, "--json", help="Machine-readable: summary + devices, worst first.")):
    """The fleet table: one line per device, worst first (offline, alerts, warnings)."""
    from lepton_edge.fleet import tui

    with _read_store(store) as st:
        if as_json:
            return _emit(tui.snapshot(st))
        _console().print(tui.render(st))


@fleet_app.command("top")
def fleet_top(store: str | None = typer.Option(None, help=_STORE_HELP),
              refresh: float = typer.Option(1.0, help="Seconds between redraws."),
              once: bool = typer.Option(False, "--once", help="Print the table once and exit."),
              as_json: bool = typer.Option(False, "--json", help="With --once: the table as JSON.")):
    """The live terminal dashboard, read from the store (e.g. in a second shell next to a monitor)."""
    from lepton_edge.fleet import tui

    if not 0.1 <= refresh <= 3600:
        raise BadInput("--refresh must be between 0.1 and 3600 seconds")
    with _read_store(store) as st:
        if once or as_json:
            return _emit(tui.snapshot(st)) if as_json else _console().print(tui.render(st))
        tui.run_live(st, refresh_s=refresh)


@fleet_app.command("show")
def fleet_show(device: str = typer.Argument(..., help="FLEET/DEVICE, or DEVICE when only one fleet has it."),
               store: str | None = typer.Option(None, help=_STORE_HELP),
               events: int = typer.Option(10, min=0, max=1000, help="How many recent events to show."),
               as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """Everything the store knows about one device: state, latency per stage, alerts, recent events."""
    from rich.table import Table

    from lepton_edge.fleet import tui

    with _read_store(store) as st:
        fleet, name = resolve_device(st, device)
        d = st.device(fleet, name)
        if d is None:  # forgotten between the two reads
            raise BadInput(f"unknown device {device!r}")
        alerts = st.alerts(active_only=False, fleet=fleet, device=name, limit=20)
        evs = st.events(fleet=fleet, device=name, limit=events) if events else []
        if as_json:
            return _emit({"device": d.model_dump(), "alerts": [a.model_dump() for a in alerts],
                          "events": [e.model_dump() for e in evs]})
        con = _console()
        t = Table(title=f"{fleet}/{name}", show_header=False)
        for k, v in tui.device_record(d).items():
            if k not in ("fleet", "device"):
                t.add_row(k, "-" if v is None else escape(printable(str(v))))  # (a device's own strings are not markup)
        con.print(t)
        if d.latency:
            lt = Table(title="latency (ms, last window)")
            for col in ("stage", "p50", "p95", "p99", "max"):
                lt.add_column(col, justify="left" if col == "stage" else "right")
            for stage, q in d.latency.items():
                lt.add_row(escape(printable(stage)),
                           *(f"{q.get(k, float('nan')):.2f}" for k in ("p50", "p95", "p99", "max")))
            con.print(lt)
        for a in alerts:
            state = "[bold red]active[/]" if a.resolved is None else "[dim]resolved[/]"
            con.print(f"alert {state} {escape(printable(a.rule))} ({a.severity}): {escape(printable(a.message))}")
        for e in evs:
            con.print(f"[dim]{_when(e.ts, '%Y-%m-%d %H:%M:%S')}[/] {escape(printable(e.kind))} "
                      f"{escape(printable(e.level))}: {escape(printable(e.message))}", markup=True, highlight=False)


@fleet_app.command("history")
def fleet_history(device: str = typer.Argument(..., help="FLEET/DEVICE, or DEVICE when only one fleet has it."),
                  since: str = typer.Option("1h", help="How far back: 15m, 1h, 24h, 7d."),
                  points: int = typer.Option(60, min=1, max=5000, help="At most this many points (bucketed)."),
                  store: str | None = typer.Option(None, help=_STORE_HELP),
                  as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """fps, inference p50/p95/p99, temperature, CPU and RSS over time, bucketed by the store."""
    from rich.table import Table

    window = parse_since(since)
    with _read_store(store) as st:
        fleet, name = resolve_device(st, device)
        now = time.time()
        hist = st.history(fleet, name, since=now - window, until=now, max_points=points)
        if as_json:
            return _emit({"fleet": fleet, "device": name, "since": now - window, "until": now,
                          "points": [p.model_dump() for p in hist]})
        t = Table(title=f"{fleet}/{name}: last {since} ({len(hist)} points)")
        for col in ("time", "fps", "p50 ms", "p95 ms", "p99 ms", "temp", "CPU", "RSS", "dropped", "frames"):
            t.add_column(col, justify="left" if col == "time" else "right", no_wrap=True)

        def f(v, spec=".1f"):
            return "-" if v is None else f"{v:{spec}}"
        for p in hist:
            t.add_row(_when(p.ts), f(p.fps), f(p.inference_p50_ms),
                      f(p.inference_p95_ms), f(p.inference_p99_ms), f(p.temperature_c, ".0f"),
                      f(p.cpu_percent, ".0f"), "-" if p.rss_bytes is None else f"{p.rss_bytes / 2**20:.0f}M",
                      str(p.dropped), str(p.frames))
        _console().print(t)


@fleet_app.command("alerts")
def fleet_alerts(device: str | None = typer.Argument(None, help="Only this device (FLEET/DEVICE or DEVICE)."),
                 active: bool = typer.Option(False, "--active", help="Only alerts still active."),
                 limit: int = typer.Option(50, min=1, max=10000, help="At most this many, newest first."),
                 store: str | None = typer.Option(None, help=_STORE_HELP),
                 as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """Alerts, newest first: rule, severity, since when, resolved or not."""
    from rich.table import Table

    with _read_store(store) as st:
        fleet = name = None
        if device:
            fleet, name = resolve_device(st, device)
        rows = st.alerts(active_only=active, fleet=fleet, device=name, limit=limit)
        if as_json:
            return _emit([a.model_dump() for a in rows])
        t = Table(title=f"{'active ' if active else ''}alerts ({len(rows)})")
        for col in ("started", "device", "rule", "severity", "message", "resolved"):
            t.add_column(col, no_wrap=col != "message")
        for a in rows:
            t.add_row(_when(a.started), f"{a.fleet}/{a.device}",
                      escape(printable(a.rule)), escape(printable(a.severity)), escape(printable(a.message)),
                      "[bold red]active[/]" if a.resolved is None
                      else _when(a.resolved),
                      style="red" if a.resolved is None and a.severity == "critical" else None)
        _console().print(t)


@fleet_app.command("forget")
def fleet_forget(device: str = typer.Argument(..., help="FLEET/DEVICE, or DEVICE when only one fleet has it."),
                 store: str | None = typer.Option(None, help=_STORE_HELP),
                 broker: str | None = typer.Option(None, help="Also clear the device's retained status/meta "
                                                      "and its Home Assistant discovery on this broker."),
                 ca_file: str | None = typer.Option(None, help="CA certificate for TLS to the broker."),
                 cert_file: str | None = typer.Option(None, help="Client certificate (mutual TLS)."),
                 key_file: str | None = typer.Option(None, help="Client key (mutual TLS).")):
    """Remove a retired device: its history, events and alerts, and (with --broker) its retained topics,
    so it leaves Home Assistant and does not come back at the next monitor start."""
    from lepton_edge.fleet.forget import forget_device

    with _read_store(store) as st:
        fleet, name = resolve_device(st, device)
        cleared = forget_device(st, fleet, name, broker=broker, ca_file=ca_file, cert_file=cert_file,
                                key_file=key_file)
    print(f"forgot {fleet}/{name}" + (f"; cleared {len(cleared)} retained topics on {redacted(str(broker))}"
                                      if cleared else
                                      "; its retained topics stay on the broker (pass --broker to clear them)"))


def main() -> None:
    try:
        app()
    except LeptonError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
