"""Alert rules over the stored fleet state: evaluated every few seconds by one worker at a time.

Why it is shaped this way:
- Rules read the store (DeviceState, events), never the ingest's memory, so any worker can take
  over; `store.exclusive("alerts")` (a PostgreSQL advisory lock) lets exactly one evaluate.
- An alert fires once and resolves once: the store keeps at most one open alert per (device,
  rule) (a unique index), and thresholds resolve with hysteresis (fire above X, resolve below
  X minus a margin), so a value hovering at the line does not make a storm.
- Each change is stored, published on `lepton/v1/_monitor/alerts` (QoS 1, not retained; `_monitor`
  can never be a fleet name, since segments start with a letter or digit, so the devices' subtrees
  stay theirs), and optionally POSTed as JSON to a webhook from a background thread with a
  bounded queue and a timeout, so a slow webhook never delays evaluation.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lepton_edge import tomlfile
from lepton_edge.errors import BadInput
from lepton_edge.fleet.store.base import Alert, DeviceState, Store
from lepton_edge.telemetry.schema import AlertChange
from lepton_edge.telemetry.topics import MONITOR_ALERTS, PREFIX
from lepton_edge.ui import printable

ALERT_TOPIC = MONITOR_ALERTS


class AlertRules(BaseModel):
    """The `[alerts]` table of a TOML file; every field has a default. 0 turns a threshold rule off."""

    model_config = ConfigDict(extra="forbid")
    offline_after_s: float = Field(60.0, ge=0)  # offline (status or Last Will) longer than this
    default_latency_budget_ms: float = Field(100.0, ge=0)  # when meta names no budget for the bundle
    fps_floor: float = Field(1.0, ge=0)
    temperature_c: float = Field(80.0, ge=0)
    throttled: bool = True  # Raspberry Pi throttling flags other than 0x0
    seq_gaps: bool = True  # new lost windows
    gap_quiet_s: float = Field(300.0, ge=0)  # a seq_gaps alert resolves after this long without new losses
    events: list[str] = Field(default_factory=lambda: ["rollback", "error"])  # kinds (or level 'error')
    event_hold_s: float = Field(600.0, ge=0)  # an event alert resolves after this long without a new one
    hysteresis: float = Field(0.1, ge=0, le=0.9)  # resolve 10% inside the threshold
    # (no whitespace or control character: a URL holding a newline loaded and then failed every POST)
    webhook: str | None = Field(None, pattern=r"^https?://[^\s\x00-\x1f\x7f]+$", max_length=2048)
    webhook_timeout_s: float = Field(5.0, gt=0, le=60)
    topic: str = Field(ALERT_TOPIC, min_length=1, max_length=256)

    @field_validator("events")
    @classmethod
    def _event_kinds(cls, kinds: list[str]) -> list[str]:
        """Event kinds only: a threshold rule's name here made its alert flap for ever (the event pass
        resolved an offline device's alert after event_hold_s, the threshold pass fired it again)."""
        for k in kinds:
            if k in THRESHOLD_RULES:
                raise ValueError(f"{k!r} is a threshold rule (set it with its own field), not an event kind")
            if not k or len(k) > 64:
                raise ValueError("an event kind is 1 to 64 characters")
        return kinds

    @field_validator("topic")
    @classmethod
    def _own_topic(cls, topic: str) -> str:
        """A topic alerts can be published on and no device owns. Why: '+' or '#' loaded and then failed
        each publish, and a topic in a device's subtree (lepton/v1/lab/cam-1/cmd/deploy) broke the
        promise above that the devices' subtrees stay theirs."""
        if any(c in topic for c in "+#\0") or topic.startswith("$"):
            raise ValueError("a topic to publish on: no '+', '#' or NUL, not starting with '$'")
        if (topic == PREFIX or topic.startswith(PREFIX + "/")) and not topic.startswith(f"{PREFIX}/_monitor/"):
            raise ValueError(f"under {PREFIX}/ only {PREFIX}/_monitor/... is the monitor's; the rest is the devices'")
        return topic


# the threshold rules (AlertEngine._conditions), which `events` must not name
THRESHOLD_RULES = frozenset({"offline", "latency", "fps", "temperature", "throttled", "seq_gaps"})


def load_rules(path: str | Path | None) -> AlertRules:
    if path is None:
        return AlertRules()
    p = Path(path)
    data = tomlfile.read(p, "alert rules", 256 * 1024)  # (one line for a FIFO, /dev/zero, deep nesting)
    try:
        return AlertRules.model_validate(data.get("alerts", data))
    except ValidationError as e:
        err = e.errors()[0]
        raise BadInput(f"alert rules {p}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


class _Webhook:
    """POSTs alerts from one daemon thread; a full queue drops (and counts) rather than blocks."""

    def __init__(self, url: str, timeout: float, log: Callable[[str], None]):
        self.url, self.timeout, self.log = url, timeout, log
        self.q: queue.Queue = queue.Queue(maxsize=1000)
        self.dropped = self.failed = self.sent = 0
        threading.Thread(target=self._run, name="alerts-webhook", daemon=True).start()

    def post(self, body: dict) -> None:
        try:
            self.q.put_nowait(body)
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        while True:
            body = self.q.get()
            req = urllib.request.Request(self.url, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    r.read(65536)
                self.sent += 1
            except Exception as e:  # noqa: BLE001 - a webhook's failure is a line, never the monitor's
                self.failed += 1
                self.log(f"alerts: webhook {self.url} failed: {e}")


class AlertEngine:
    def __init__(self, store: Store, rules: AlertRules | None = None, *,
                 publish: Callable[[str, bytes], None] | None = None, log: Callable[[str], None] | None = None):
        self.store = store
        self.rules = rules or AlertRules()
        self.publish = publish
        self.log = log or logging.getLogger(__name__).info  # the entry point decides how lines look
        self.webhook = _Webhook(self.rules.webhook, self.rules.webhook_timeout_s, self.log) if self.rules.webhook \
            else None
        self._gaps: dict[tuple[str, str], tuple[int, float]] = {}  # device -> (gaps seen, when they last grew)

    # ---- one pass ------------------------------------------------------------------------------
    def evaluate(self, now: float | None = None) -> list[tuple[str, Alert]]:
        """Open and resolve alerts; returns [("fired"|"resolved", alert)]. A no-op where another worker
        holds the lock."""
        now = time.time() if now is None else now
        with self.store.exclusive("alerts") as mine:
            if not mine:
                return []
            changes: list[tuple[str, Alert]] = []
            active = {(a.fleet, a.device, a.rule): a for a in self.store.alerts(active_only=True, limit=100000)}
            for d in self.store.devices():
                for rule, cond in self._conditions(d, now).items():
                    self._apply(d, rule, cond, active, now, changes)
            self._event_rules(active, now, changes)
        for change in changes:
            self._announce(*change)
        return changes

    def _conditions(self, d: DeviceState, now: float) -> dict[str, tuple | None]:
        """rule -> (firing?, resolved?, severity, message, value, threshold) or None (no data: keep as is)."""
        r, h = self.rules, self.rules.hysteresis
        out: dict[str, tuple | None] = {}
        if r.offline_after_s:
            gone = now - (d.last_seen or now)
            out["offline"] = (d.online is False and gone >= r.offline_after_s, d.online is True, "critical",
                              f"{d.fleet}/{d.device} offline for {gone:.0f} s", gone, r.offline_after_s)
        live = d.online is not False
        p95 = (d.latency.get("inference") or {}).get("p95")
        budget = d.latency_budget_ms or r.default_latency_budget_ms
        if budget and p95 is not None:
            out["latency"] = (live and p95 > budget, p95 <= budget * (1 - h) or not live, "warning",
                              f"{d.fleet}/{d.device} inference p95 {p95:.1f} ms above the {budget:g} ms budget",
                              p95, budget)
        if r.fps_floor and d.fps is not None:
            out["fps"] = (live and d.fps < r.fps_floor, d.fps >= r.fps_floor * (1 + h) or not live, "warning",
                          f"{d.fleet}/{d.device} at {d.fps:.2f} fps, below {r.fps_floor:g}", d.fps, r.fps_floor)
        if r.temperature_c and d.temperature_c is not None:
            t = d.temperature_c
            out["temperature"] = (t > r.temperature_c, t <= r.temperature_c * (1 - h / 2), "critical",
                                  f"{d.fleet}/{d.device} at {t:.1f} °C, above {r.temperature_c:g} °C", t,
                                  r.temperature_c)
        if r.throttled and d.throttled is not None:
            bad = d.throttled.strip().lower() not in ("", "0", "0x0")
            out["throttled"] = (bad, not bad, "warning", f"{d.fleet}/{d.device} throttled ({d.throttled})", None,
                                None)
        if r.seq_gaps:
            key = (d.fleet, d.device)
            seen, grew = self._gaps.get(key, (None, 0.0))
            if seen is None:  # a fresh evaluator: start from the last alert's count
                last = self.store.alerts(fleet=d.fleet, device=d.device, limit=50)
                prev = [a for a in last if a.rule == "seq_gaps"]
                seen = int(prev[0].value or 0) if prev else 0
            if d.seq_gaps > seen:
                grew = now
            new = d.seq_gaps - seen
            self._gaps[key] = (max(seen, d.seq_gaps), grew)
            out["seq_gaps"] = (new > 0, grew and now - grew >= r.gap_quiet_s, "warning",
                               f"{d.fleet}/{d.device} lost {max(new, 0)} telemetry windows ({d.seq_gaps} in all)",
                               float(d.seq_gaps), None)
        return out

    def _apply(self, d: DeviceState, rule: str, cond: tuple | None, active: dict, now: float,
               changes: list) -> None:
        if cond is None:
            return
        firing, clear, severity, message, value, threshold = cond
        key = (d.fleet, d.device, rule)
        if key not in active and firing:
            a = self.store.upsert_alert(Alert(fleet=d.fleet, device=d.device, rule=rule, severity=severity,
                                              message=message, started=now, value=value, threshold=threshold))
            if a:
                active[key] = a
                changes.append(("fired", a))
        elif key in active and clear and not firing:
            a = self.store.resolve_alert(d.fleet, d.device, rule, now)
            if a:
                del active[key]
                changes.append(("resolved", a))

    def _event_rules(self, active: dict, now: float, changes: list) -> None:
        kinds = set(self.rules.events)
        if not kinds:
            return
        # the query filters on the device's clock (with an hour of slack for skew); the hold uses the
        # time the monitor received the event, and an open alert refuses a repeat. One event per device and
        # rule, not the fleet's newest N: a device's flood stamped minutes ahead hid another's rollback
        since = now - 2 * max(self.rules.event_hold_s, 60) - 3600
        newest = {(e.fleet, e.device, e.kind if e.kind in kinds else "error"): e
                  for e in self.store.newest_events(sorted(kinds), since, errors="error" in kinds)}
        for (f, dv, rule), e in newest.items():
            if (f, dv, rule) not in active and now - e.received < self.rules.event_hold_s:
                a = self.store.upsert_alert(Alert(fleet=f, device=dv, rule=rule,
                                                  severity="critical" if rule == "rollback" else "warning",
                                                  message=f"{f}/{dv} {e.kind}: {e.message}"[:500], started=now,
                                                  value=e.received))
                if a:
                    active[(f, dv, rule)] = a
                    changes.append(("fired", a))
        for (f, dv, rule), a in list(active.items()):
            if rule not in kinds:
                continue
            e = newest.get((f, dv, rule))
            last = max(a.started, e.received if e else (a.value or 0.0))
            if now - last >= self.rules.event_hold_s:
                r = self.store.resolve_alert(f, dv, rule, now)
                if r:
                    del active[(f, dv, rule)]
                    changes.append(("resolved", r))

    def _announce(self, what: str, alert: Alert) -> None:
        body = AlertChange(event=what, **alert.model_dump()).model_dump(mode="json")
        self.log(f"alert {what}: [{alert.severity}] {printable(alert.message)}")  # (a log read on a terminal)
        if self.publish:
            try:
                self.publish(self.rules.topic, json.dumps(body).encode())
            except Exception as e:  # noqa: BLE001 - the store has it; MQTT is a copy
                self.log(f"alerts: publish failed: {e}")
        if self.webhook:
            self.webhook.post(body)
