"""The store contract: what the monitor writes and what every view (terminal, web, CLI, alerts) reads.

Why a contract of its own: three parts of the fleet side are built against it at once, and two
databases implement it. Views never read process memory, so a second monitor worker, a CLI run
on another shell or a web page served by another process all see the same fleet.

Time is always Unix seconds (float). Identity of a window is (fleet, device, boot_id, seq); the
database enforces its uniqueness, so several workers cannot store one window twice.
"""
from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, Field

from lepton_edge.errors import BadInput, LeptonError

SCHEMA_VERSION = 4  # the newest migration in sql.py

# Severity of a device, used to sort dashboards (worst last-seen state first).
OK, WARNING, ALERT, OFFLINE = 0, 1, 2, 3


class StoreError(LeptonError):
    """The database cannot be used right now (locked, gone, corrupt): one line, then retry.

    A LeptonError so that one escaping a CLI verb is the one line it already is (exit 1), never a
    traceback; the long-running parts (writer, alerts, views) catch it and retry."""


class StoreUnusable(StoreError, BadInput):
    """The store cannot be opened and waiting will not change that: its path is a directory or a device
    (/dev/null), the SQLite file is corrupt, not a database or cannot be created, the schema is another
    application's or a newer lepton-edge's, psycopg is not installed. Raised only while opening, so `monitor`
    gives up at once with its one line and exit 2 (a BadInput) instead of retrying for a minute (it retried
    /dev/null for 58 s); a locked file or an unreachable PostgreSQL (still starting) stays a StoreError, retried."""


class ValueRefused(StoreError):
    """The database refused a value (out of a column's range, a NUL in text, a NOT NULL column given
    nothing): the data's fault, not the database's state, so retrying the same write cannot help. The
    monitor's writer catches it before StoreError and stores such a batch message by message, counting
    the one refused (a plain StoreError had it retry that batch for ever); every reader that retries on
    StoreError (the dashboard, /metrics, the web hub) still sees a StoreError."""


class DeviceState(BaseModel):
    fleet: str
    device: str
    online: bool | None = None
    last_seen: float | None = None  # newest received time of any message from the device
    boot_id: str | None = None
    software: str | None = None
    bundle_name: str | None = None
    bundle_sha256: str | None = None
    precision: str | None = None
    backend: str | None = None
    fps: float | None = None
    latency: dict[str, dict[str, float]] = Field(default_factory=dict)  # stage -> {p50,p95,p99,max} (ms)
    dropped: int = 0  # of the last window
    corrupt: int = 0  # of the last window
    cpu_percent: float | None = None
    rss_bytes: int | None = None
    temperature_c: float | None = None
    throttled: str | None = None
    outbox_dropped: int = 0  # total over every stored window
    windows: int = 0  # windows stored
    seq_gaps: int = 0  # windows lost: sum over boots of (max_seq - min_seq + 1) - count
    duplicates: int = 0  # repeats refused by the unique key
    bad_messages: int = 0
    last_event: str | None = None  # "kind: message" of the newest event
    deploys: int = 0
    rollbacks: int = 0
    active_alerts: int = 0
    severity: int = OK  # 0 ok, 1 warning, 2 alert/critical, 3 offline
    latency_budget_ms: float | None = None  # from meta (bundle.latency_budget_ms or target) when present


class HistoryPoint(BaseModel):
    """One bucket of windows (averages; frames/dropped/corrupt are sums)."""

    ts: float
    fps: float | None = None
    inference_p50_ms: float | None = None
    inference_p95_ms: float | None = None
    inference_p99_ms: float | None = None
    temperature_c: float | None = None
    cpu_percent: float | None = None
    rss_bytes: float | None = None
    dropped: int = 0
    corrupt: int = 0
    frames: int = 0


class EventRecord(BaseModel):
    fleet: str
    device: str
    ts: float  # the device's timestamp
    received: float
    boot_id: str
    kind: str
    level: str = "info"
    message: str = ""
    data: dict[str, Any] = Field(default_factory=dict)


class Alert(BaseModel):
    id: int | None = None  # assigned by the store
    fleet: str
    device: str
    rule: str  # offline, latency, fps, temperature, throttled, seq_gaps, rollback, error
    severity: Literal["warning", "critical"] = "warning"
    message: str
    started: float
    resolved: float | None = None
    value: float | None = None
    threshold: float | None = None


class FleetSummary(BaseModel):
    devices: int = 0
    online: int = 0
    offline: int = 0
    total_fps: float = 0.0
    worst_p95_ms: float | None = None  # worst inference p95 over the online devices
    active_alerts: int = 0


class Store(abc.ABC):
    """Both backends implement every method; all are thread-safe (one connection per thread or a lock).

    Errors: an unusable database raises StoreError (one line, no traceback); callers retry."""

    url: str = ""

    # ---- writes (the monitor) ---------------------------------------------------------------
    @abc.abstractmethod
    def add_window(self, fleet: str, device: str, payload: dict, received: float) -> bool:
        """Store one validated Telemetry payload (model_dump()). False: a duplicate (counted)."""

    def add_windows(self, rows: list[tuple[str, str, dict, float]]) -> list[bool]:
        """Many windows in one transaction (the writer thread's batch). Same result as add_window each."""
        return [self.add_window(*r) for r in rows]

    @abc.abstractmethod
    def add_event(self, fleet: str, device: str, payload: dict, received: float) -> bool:
        """Store one validated Event payload. False: a duplicate (same device, boot_id, ts, kind, message)."""

    @abc.abstractmethod
    def set_status(self, fleet: str, device: str, payload: dict, received: float) -> None:
        """Retained status / Last Will: online flag, boot_id, software version."""

    @abc.abstractmethod
    def set_meta(self, fleet: str, device: str, payload: dict, received: float) -> None:
        """Retained meta (raw dict from the agent): bundle, software, hardware, latency budget."""

    @abc.abstractmethod
    def count_bad(self, fleet: str | None, device: str | None, reason: str, received: float,
                  known: bool = False) -> None:
        """A message that was refused (fleet/device None when the topic itself was bad), counted against its
        device when the store knows the device or `known` (the message was valid, the store refused a value);
        else against no device, so made-up names never become devices."""

    @abc.abstractmethod
    def forget(self, fleet: str, device: str) -> None:
        """Remove a device and everything stored about it."""

    @abc.abstractmethod
    def upsert_alert(self, alert: Alert) -> Alert | None:
        """Open an alert for (fleet, device, rule) unless one is already active.
        Returns the stored alert (with id) when newly opened, None when one was already active."""

    @abc.abstractmethod
    def resolve_alert(self, fleet: str, device: str, rule: str, resolved: float) -> Alert | None:
        """Close the active alert of (fleet, device, rule). Returns it, or None when none was active."""

    @abc.abstractmethod
    def retain(self, older_than_s: float, now: float | None = None) -> int:
        """Delete windows, downsampled rows, events and resolved alerts older than now - older_than_s.
        Returns the number of rows deleted."""

    @abc.abstractmethod
    def downsample(self, older_than_s: float = 86400.0, bucket_s: float = 60.0, now: float | None = None) -> int:
        """Delete windows older than now - older_than_s from `windows`: their 1-minute rows (table
        `windows_ds`, kept by the writer and read by `history`) stay; with bucket_s above a minute those
        old minute rows are also merged into bucket_s rows. Returns the number of windows folded."""

    # ---- reads (every view) -----------------------------------------------------------------
    @abc.abstractmethod
    def devices(self) -> list[DeviceState]:
        """Every known device, sorted by (fleet, device)."""

    @abc.abstractmethod
    def device(self, fleet: str, device: str) -> DeviceState | None: ...

    @abc.abstractmethod
    def history(self, fleet: str, device: str, since: float, until: float | None = None,
                max_points: int = 1000) -> list[HistoryPoint]:
        """Windows (and downsampled rows) in [since, until], bucketed in the database to <= max_points.
        Buckets of a minute or more are whole minutes (the bucket width is rounded up to one)."""

    @abc.abstractmethod
    def events(self, fleet: str | None = None, device: str | None = None, since: float = 0.0,
               limit: int = 200) -> list[EventRecord]:
        """Newest first."""

    def newest_events(self, kinds: list[str], since: float = 0.0, errors: bool = False) -> list[EventRecord]:
        """The newest event (by the time the monitor received it) of each (fleet, device, rule) whose device
        time is >= since: the rule is the event's kind where it is in `kinds`, else 'error' for an event of
        level 'error' when `errors`. What the alert engine's event rules read.

        Why per (device, rule), not the fleet's newest N: one device's flood (10,000 events stamped minutes
        ahead, so sorted first by device time) pushed another device's rollback out of a read of the newest
        10,000, and its alert never fired. This default reads each device on its own (a device can still hide
        only its own events); SqlStore does it in one query with no limit."""
        out = []
        for d in self.devices():
            seen: dict[str, EventRecord] = {}
            for e in self.events(d.fleet, d.device, since=since, limit=10000):
                rule = e.kind if e.kind in kinds else "error" if errors and e.level == "error" else None
                if rule and (rule not in seen or e.received > seen[rule].received):
                    seen[rule] = e
            out += seen.values()
        return out

    @abc.abstractmethod
    def alerts(self, active_only: bool = False, fleet: str | None = None, device: str | None = None,
               limit: int = 200) -> list[Alert]:
        """Newest first."""

    @abc.abstractmethod
    def alerts_by_id(self, ids: list[int]) -> list[Alert]:
        """The alerts of these ids that are still stored (any order). Why: the live page's poller learns that an
        alert it saw open has left the open ones (resolved behind newer alerts, or retained away) and needs its
        row as it is now, which no window of the newest alerts holds."""

    @abc.abstractmethod
    def open_alert_ids(self) -> set[int]:
        """The ids of every open alert (the poller's check that the ones it follows past its window are open)."""

    @abc.abstractmethod
    def summary(self) -> FleetSummary: ...

    # ---- coordination -----------------------------------------------------------------------
    @contextlib.contextmanager
    def exclusive(self, name: str = "alerts") -> Iterator[bool]:
        """Yields True in at most one worker at a time (PostgreSQL: advisory lock); False elsewhere.
        SQLite: one process writes the file, so always True."""
        yield True

    def seq_gaps(self) -> dict[tuple[str, str], int]:
        """(fleet, device) -> lost windows, computed from stored windows (so right with N workers)."""
        return {(d.fleet, d.device): d.seq_gaps for d in self.devices()}

    def close(self) -> None:  # noqa: B027 - optional
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
