"""The terminal dashboard: one line per device, worst first, redrawn from the store.

Why rich's Live + Table rather than a full-screen TUI framework: it needs nothing but a plain
terminal (works over SSH, in tmux, with no mouse), it degrades to plain text when piped, and the
same `render()` serves the live view, `--once` and the tests. Every frame is read from the store,
so a second shell (`lepton-edge fleet top`) shows what the monitor process shows.

`snapshot()` is the JSON form of the same table (`--once --json`, `fleet ls --json`).
"""
from __future__ import annotations

import threading
import time
from typing import Any

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from lepton_edge.fleet.store.base import ALERT, OFFLINE, WARNING, DeviceState
from lepton_edge.ui import printable

_SEVERITY_NAMES = {0: "ok", WARNING: "warning", ALERT: "alert", OFFLINE: "offline"}
_ROW_STYLE = {OFFLINE: "red", ALERT: "bold red", WARNING: "yellow"}


def sort_key(d: DeviceState) -> tuple:
    """Worst first: offline, then alerts, then warnings; then by name."""
    offline = d.online is False
    return (-(OFFLINE if offline else d.severity), -d.active_alerts, d.fleet, d.device)


def _p95(d: DeviceState) -> float | None:
    return (d.latency.get("inference") or {}).get("p95")


def device_record(d: DeviceState, now: float | None = None) -> dict[str, Any]:
    """The JSON form of one table line (stable keys, numbers as numbers)."""
    now = time.time() if now is None else now
    return {
        "fleet": d.fleet, "device": d.device, "online": d.online, "severity": _SEVERITY_NAMES.get(d.severity, "ok"),
        "fps": d.fps, "inference_p95_ms": _p95(d), "latency_budget_ms": d.latency_budget_ms,
        "cpu_percent": d.cpu_percent, "rss_bytes": d.rss_bytes, "temperature_c": d.temperature_c,
        "throttled": d.throttled, "dropped": d.dropped, "corrupt": d.corrupt, "seq_gaps": d.seq_gaps,
        "duplicates": d.duplicates, "bad_messages": d.bad_messages, "bundle": d.bundle_name,
        "bundle_sha256": d.bundle_sha256, "precision": d.precision, "backend": d.backend,
        "software": d.software, "last_seen": d.last_seen,
        "last_seen_age_s": None if d.last_seen is None else round(max(0.0, now - d.last_seen), 1),
        "active_alerts": d.active_alerts, "last_event": d.last_event,
    }


def snapshot(store, now: float | None = None) -> dict[str, Any]:
    """{"summary": FleetSummary, "devices": [record, ...] worst first} for scripts."""
    now = time.time() if now is None else now
    devices = sorted(store.devices(), key=sort_key)
    return {"ts": round(now, 3), "summary": store.summary().model_dump(),
            "devices": [device_record(d, now) for d in devices]}


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s ago"
    if s < 3600:
        return f"{s // 60}m ago"
    if s < 86400:
        return f"{s // 3600}h ago"
    return f"{s // 86400}d ago"


def _mib(n: int | float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}M"


def _fmt(v: float | None, spec: str = ".1f", unit: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{unit}"


def _online(d: DeviceState) -> Text:
    if d.online is None:
        return Text("?", style="dim")
    return Text("●  on", style="green") if d.online else Text("○ OFF", style="bold red")


def _latency(d: DeviceState) -> Text:
    p95, budget = _p95(d), d.latency_budget_ms
    if p95 is None:
        return Text("-")
    text = f"{p95:.1f}" + (f"/{budget:g}" if budget else "") + " ms"
    return Text(text, style="bold red" if budget and p95 > budget else "")


def header(summary) -> Text:
    t = Text()
    t.append("lepton fleet  ", style="bold")
    t.append(f"{summary.devices} devices  ")
    t.append(f"{summary.online} online  ", style="green")
    t.append(f"{summary.offline} offline  ", style="bold red" if summary.offline else "dim")
    t.append(f"{summary.total_fps:.1f} fps  ")
    t.append(f"worst p95 {_fmt(summary.worst_p95_ms, '.1f', ' ms')}  ")
    t.append(f"{summary.active_alerts} alerts", style="bold red" if summary.active_alerts else "dim")
    return t


MAX_ALERT_LINES = 5


def alert_lines(alerts: list, total: int, now: float) -> list[Text]:
    """The active alerts under the table, critical first, then newest: the alerts the web page lists."""
    out = []
    for a in alerts:
        t = Text("▲ ", style="bold red" if a.severity == "critical" else "yellow")
        t.append(f"{a.severity:<8} ", style="bold red" if a.severity == "critical" else "yellow")
        if not a.message.startswith(f"{a.fleet}/{a.device}"):
            t.append(f"{a.fleet}/{a.device}  ", style="bold")
        t.append(f"{printable(a.message)}  ")
        t.append(f"since {_age(now - a.started)}", style="dim")
        out.append(t)
    if total > len(alerts):
        out.append(Text(f"… and {total - len(alerts)} more active alerts (lepton-edge fleet alerts --active)",
                        style="dim"))
    return out


def render(store, now: float | None = None, max_rows: int | None = None, max_alerts: int = MAX_ALERT_LINES):
    """A rich renderable of the whole fleet (header + table + active alerts); max_rows keeps the worst
    lines only."""
    now = time.time() if now is None else now
    devices = sorted(store.devices(), key=sort_key)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, expand=False)
    for col, justify in [("fleet/device", "left"), ("online", "left"), ("fps", "right"),
                         ("inference p95", "right"), ("CPU", "right"), ("RSS", "right"), ("temp", "right"),
                         ("dropped", "right"), ("gaps", "right"), ("bundle", "left"), ("last seen", "right"),
                         ("alerts", "right")]:
        table.add_column(col, justify=justify, no_wrap=True, overflow="ellipsis",
                         max_width=32 if col in ("fleet/device", "bundle") else None,
                         min_width=16 if col == "fleet/device" else None)  # the name is what a narrow terminal keeps
    shown = devices if max_rows is None else devices[:max(0, max_rows)]
    for d in shown:
        sev = OFFLINE if d.online is False else d.severity
        temp = _fmt(d.temperature_c, ".0f", "°C") + (" T" if d.throttled and d.throttled not in ("0x0", "0") else "")
        alerts = Text(str(d.active_alerts), style="bold red") if d.active_alerts else Text("0", style="dim")
        # Text, not str: a cell string is Rich markup, and a device names its own bundle (`[/bold]` raised
        # MarkupError and ended the dashboard; `[blink red]x[/]` styled it)
        table.add_row(Text(f"{d.fleet}/{d.device}"), _online(d), _fmt(d.fps), _latency(d),
                      _fmt(d.cpu_percent, ".0f", "%"), _mib(d.rss_bytes), temp, str(d.dropped),
                      Text(str(d.seq_gaps), style="yellow" if d.seq_gaps else ""),
                      Text(printable(d.bundle_name or "-")),
                      _age(None if d.last_seen is None else now - d.last_seen), alerts,
                      style=_ROW_STYLE.get(sev))
    summary = store.summary()
    parts: list = [header(summary), table]
    if len(shown) < len(devices):
        parts.append(Text(f"… and {len(devices) - len(shown)} more devices (all ok or less severe)", style="dim"))
    if not devices:
        parts.append(Text("no devices yet: waiting for telemetry", style="dim"))
    if summary.active_alerts and max_alerts > 0:
        active = sorted(store.alerts(active_only=True, limit=1000),
                        key=lambda a: (a.severity != "critical", -a.started))
        parts.extend(alert_lines(active[:max_alerts], summary.active_alerts, now))
    return Group(*parts)


def _safe_render(store, max_rows: int | None):
    """A frame, or one line when the store cannot be read right now (the next refresh retries)."""
    from lepton_edge.fleet.store.base import StoreError

    try:
        return render(store, max_rows=max_rows)
    except StoreError as e:
        return Text(f"fleet store unavailable: {e} (retrying)", style="bold red")


def run_live(store, refresh_s: float = 1.0, stop_event: threading.Event | None = None, console=None) -> None:
    """Redraw the table every refresh_s until stop_event is set (or Ctrl-C). Plain terminal, no mouse,
    no alternate screen: what was last shown stays in the scrollback when it ends."""
    from rich.console import Console
    from rich.live import Live

    console = console or Console(highlight=False)
    stop = stop_event or threading.Event()
    refresh_s = max(0.1, float(refresh_s))

    def rows() -> int:
        return max(3, console.size.height - 7 - MAX_ALERT_LINES)  # header, table head, "more" lines, alerts

    try:
        with Live(_safe_render(store, rows()), console=console, auto_refresh=False,
                  vertical_overflow="crop", transient=False) as live:
            live.refresh()
            while not stop.wait(refresh_s):
                live.update(_safe_render(store, rows()), refresh=True)
    except KeyboardInterrupt:
        pass
