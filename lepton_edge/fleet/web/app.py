"""The web dashboard and its JSON API (Starlette; served by uvicorn inside `lepton-edge monitor --web`).

Why it is built this way:
- Every view reads the store, never the ingest's memory: the page and the API show what a second
  monitor worker, the CLI or Prometheus see. Store calls are blocking, so they run in the thread pool.
- Live updates follow Frigate's shape: the page loads the fleet once (GET /api/devices), then one
  Server-Sent Events stream (/api/stream) carries MQTT-shaped messages ({"topic", "payload"}) that it
  applies. One poller per app diffs the store once a second (or when the monitor says something
  changed) and fans out to every stream, so N open pages cost one store read, not N.
- Commands change devices, so they need a token (Authorization: Bearer); reads are open on the
  address the operator chose, which is 127.0.0.1 unless told otherwise (see `check_bind`).
- Every parameter is validated before the store is touched; a bad one is one 4xx JSON error
  {"error": "..."}; an unusable store is a 503 with one line, never a traceback.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from lepton_edge.errors import BadInput
from lepton_edge.fleet.store.base import DeviceState, HistoryPoint, Store, StoreError
from lepton_edge.telemetry.schema import COMMANDS
from lepton_edge.telemetry.topics import PREFIX, safe_segment

STATIC = Path(__file__).parent / "static"
RANGES = {"15m": 900, "1h": 3600, "24h": 86400, "7d": 7 * 86400}
SORTS = {
    "device": lambda d: (d.fleet, d.device),
    "fleet": lambda d: (d.fleet, d.device),
    "severity": lambda d: (d.severity, d.active_alerts),
    "online": lambda d: (d.online is True,),
    "fps": lambda d: (d.fps if d.fps is not None else -1.0,),
    "p95": lambda d: (_p95(d) if _p95(d) is not None else -1.0,),
    "temperature": lambda d: (d.temperature_c if d.temperature_c is not None else -1e9,),
    "cpu": lambda d: (d.cpu_percent if d.cpu_percent is not None else -1.0,),
    "last_seen": lambda d: (d.last_seen or 0.0,),
    "seq_gaps": lambda d: (d.seq_gaps,),
    "alerts": lambda d: (d.active_alerts,),
    "bundle": lambda d: (d.bundle_name or "",),
}
STATES = {"online", "offline", "alert", "warning", "ok"}
MAX_BODY = 16 * 1024
MAX_STREAMS = 64
EVENT_LOOKBACK_S = 600.0  # events this much older than the newest pushed still reach the live feed
STREAM_QUEUE = 512  # messages a slow page may lag behind before its stream is closed (a poll is never cut)
# Least time between two reads of the fleet by the live streams' poller, however often the monitor says something
# changed. Why: it says so after every stored batch, and one device sending 20 windows a second (within the flood
# limit) had the poller re-read a 1,000-device fleet 16 times a second, 56% of a core, while a page was open.
NOTIFY_GAP_S = 0.25
ALERT_WINDOW = 200  # the newest alerts each poll diffs (and every open one, up to OPEN_ALERTS)
OPEN_ALERTS = 1000  # (as many as a page loads)
EVENT_WINDOW = 200  # (a flood past it loses older events of the poll, which no page list would show: newest first)
# Stream messages that are not MQTT-shaped data: "synced" follows the first poll that began after the stream
# opened (the page reloads then: whatever that poll's diff did not carry was in the store before it); "resync"
# says a poll's diff may have missed changes (more alerts than its window, an open alert deleted, a failed read).
SYNCED = {"topic": "lepton/monitor/synced", "payload": None}
COMMAND_TIMEOUT_S = {"ping": 10.0, "set": 15.0, "deploy": 180.0}
MAX_CONCURRENT_COMMANDS = 8

_DEVICES = TypeAdapter(list[DeviceState])
_POINTS = TypeAdapter(list[HistoryPoint])
CommandSender = Callable[[str, str, str, dict, float], dict]


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _check_token(authorization: str, token: str | None) -> None:
    """Commands reach devices: only with the dashboard's token, compared in constant time."""
    given = authorization[7:] if authorization[:7].lower() == "bearer " else ""
    if not token or not given or not hmac.compare_digest(given.encode(), token.encode()):
        raise ApiError(401, "commands need the dashboard token (Authorization: Bearer TOKEN)")


async def _read_body(request) -> bytes:
    """The request body, refused past MAX_BODY whether or not the client declared its length."""
    size = request.headers.get("content-length")
    if size is not None and (not size.isdigit() or int(size) > MAX_BODY):
        raise ApiError(413, f"the command body is over {MAX_BODY} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise ApiError(413, f"the command body is over {MAX_BODY} bytes")
    return body


def _parse_command(verb: str, body: bytes):
    """The command model for `verb` from a JSON body; the first problem as one 400 line."""
    try:
        payload = json.loads(body or b"{}")
    except ValueError:
        raise ApiError(400, "the command body is not JSON") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "the command body must be a JSON object")
    if verb == "deploy" and ("path" in payload or not str(payload.get("url", "")).startswith(
            ("http://", "https://"))):
        raise ApiError(400, "deploy from the dashboard takes an http(s) 'url' to a bundle .tar.gz "
                            "(and optionally its 'sha256')")
    try:
        return COMMANDS[verb].model_validate(payload)
    except ValidationError as e:  # first problem, one line
        errs = e.errors()
        first = errs[0] if errs else {"loc": (), "msg": str(e)}
    except Exception as e:  # a validator that raised something else
        first = {"loc": (), "msg": str(e)}
    where = ".".join(str(p) for p in first.get("loc", ())) or "body"
    raise ApiError(400, f"{verb}: {where}: {first.get('msg')}") from None


def _p95(d: DeviceState) -> float | None:
    return (d.latency.get("inference") or {}).get("p95")


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond loopback without a token: commands reach devices."""
    from lepton_edge.fleet.web.guards import binds_loopback

    if not binds_loopback(host) and not token:
        raise BadInput(f"refusing to serve the dashboard on {host} without a token (--token); "
                       "only 127.0.0.1 may go without one")


def new_token() -> str:
    return secrets.token_urlsafe(24)


# ---- parameters --------------------------------------------------------------------------------
def _segment(value: str, what: str) -> str:
    try:
        return safe_segment(value, what)
    except BadInput as e:
        raise ApiError(400, str(e)) from None


def _int(q, name: str, default: int, lo: int, hi: int) -> int:
    raw = q.get(name)
    if raw is None or raw == "":
        return default
    if not re.fullmatch(r"-?\d{1,9}", raw) or not lo <= int(raw) <= hi:
        raise ApiError(400, f"{name} must be an integer from {lo} to {hi}")
    return int(raw)


def _float(q, name: str, default: float, lo: float, hi: float) -> float:
    raw = q.get(name)
    if raw is None or raw == "":
        return default
    try:
        v = float(raw)
    except ValueError:
        v = float("nan")
    if not lo <= v <= hi:  # also refuses nan
        raise ApiError(400, f"{name} must be a number from {lo:g} to {hi:g}")
    return v


def _only(q, allowed: set[str]) -> None:
    extra = sorted(set(q.keys()) - allowed)
    if extra:
        raise ApiError(400, f"unknown parameter {extra[0]!r} (allowed: {', '.join(sorted(allowed)) or 'none'})")


def _state_of(d: DeviceState) -> set[str]:
    s = {"online" if d.online else "offline"}
    s.add({0: "ok", 1: "warning"}.get(d.severity, "alert"))
    return s


def select_devices(devices: list[DeviceState], sort: str = "severity", order: str = "desc", text: str = "",
                   state: str = "") -> list[DeviceState]:
    """The table's rows: filtered by text (fleet, device, bundle) and state, then sorted (name breaks ties)."""
    text = text.lower()
    rows = [d for d in devices if (not text or text in f"{d.fleet}/{d.device} {d.bundle_name or ''}".lower())
            and (not state or state in _state_of(d))]
    rows.sort(key=lambda d: (d.fleet, d.device))
    rows.sort(key=SORTS[sort], reverse=order == "desc")
    return rows


# ---- the live stream -----------------------------------------------------------------------------
STREAM_RETRY_LATER_MS = 30_000  # a page that found every stream taken tries again after this


def _client_key(host: str) -> str:
    """Who holds a stream, for fairness: the IPv4 address, or the IPv6 /64 (one host's addresses:
    cycling through its /64, one attacker counted as millions of hosts, each holding one stream)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def _resync(why: str) -> dict:
    return {"topic": "lepton/monitor/resync", "payload": {"why": why}}


class Broadcaster:
    """One poller diffing the store, many SSE streams; a slow stream is closed, never waited for."""

    def __init__(self, store: Store, poll_s: float = 1.0):
        self.store, self.poll_s = store, poll_s
        self.queues: set[asyncio.Queue] = set()
        self._clients: dict[asyncio.Queue, str] = {}  # each open stream's peer address, oldest first
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._devices: dict[tuple[str, str], str] = {}
        self._summary = ""
        self._alerts: dict[int | None, float | None] = {}
        self._event_ts = time.time()
        self._sent_events: dict[tuple, None] = {}  # the events already pushed (insertion-ordered, bounded)
        self._unsynced: set[asyncio.Queue] = set()  # streams no poll begun since they opened has reached yet
        self._alerts_primed = False  # (a first read has nothing to diff against)
        self.queue_limit = STREAM_QUEUE
        self._failed = False  # the last poll's read failed: what it had diffed is lost, the pages are to reload

    def notify(self) -> None:
        """Called from any thread (the monitor's on_change): poll now instead of at the next tick."""
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    def subscribe(self, client: str = "") -> asyncio.Queue | None:
        """A new stream for `client` (the peer's address), or None: the page is to come back later
        (`stream` tells its EventSource to retry in STREAM_RETRY_LATER_MS).

        At MAX_STREAMS open, the oldest stream of the host holding the most is closed to make room, if
        that host holds at least two more than the newcomer's; otherwise the newcomer waits. Why: a
        refusal at the limit let one host's 64 idle connections (they never read, so they never lagged)
        lock every operator out of live updates. Why "two more": displacing any stream of an equal or
        next-to-equal holder went round for ever (65 pages behind one proxy: each reconnect closed the
        next page's stream; two hosts of 32 each displaced each other in turn)."""
        client = _client_key(client)
        if len(self.queues) >= MAX_STREAMS and not self._evict_for(client):
            return None
        q: asyncio.Queue = asyncio.Queue()  # (bounded by _run: whole polls, up to queue_limit behind)
        self.queues.add(q)
        self._clients[q] = client
        self._unsynced.add(q)
        if self._task is None or self._task.done():
            self._loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self._run())
        return q

    def _evict_for(self, client: str) -> bool:
        held: dict[str, list[asyncio.Queue]] = {}
        for q in self._clients:  # (insertion order: each client's oldest stream first)
            if q in self.queues:
                held.setdefault(self._clients[q], []).append(q)
        if not held:
            return False
        victim = max(held, key=lambda c: len(held[c]))
        if len(held[victim]) < len(held.get(client, [])) + 2:
            return False
        self.close(held[victim][0])
        return True

    def close(self, q: asyncio.Queue) -> None:
        """End a stream now: its generator reads the None and returns (the page reconnects)."""
        self.unsubscribe(q)
        while not q.empty():
            q.get_nowait()
        q.put_nowait(None)

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self.queues.discard(q)
        self._clients.pop(q, None)
        self._unsynced.discard(q)

    def _snapshot(self) -> list[dict]:
        """The messages since the last poll (runs in a worker thread: store calls block)."""
        out: list[dict] = []
        devices = self.store.devices()
        seen = set()
        for d in devices:
            key = (d.fleet, d.device)
            seen.add(key)
            body = d.model_dump_json()
            if self._devices.get(key) != body:
                self._devices[key] = body
                out.append({"topic": f"{PREFIX}/{d.fleet}/{d.device}/state", "payload": json.loads(body)})
        for key in set(self._devices) - seen:
            del self._devices[key]
            out.append({"topic": f"{PREFIX}/{key[0]}/{key[1]}/state", "payload": None})
        summary = self.store.summary().model_dump_json()
        if summary != self._summary:
            self._summary = summary
            out.append({"topic": "lepton/summary", "payload": json.loads(summary)})
        out += self._alert_changes()
        # Events by what was already pushed, not by a high-water mark of device time: one device whose clock
        # ran ahead (1e12 then, up to the monitor's 300 s tolerance now) moved the mark past every other
        # device's events, and the live feed dropped them. The floor follows this machine's clock only.
        newest = self._event_ts
        for e in reversed(self.store.events(since=self._event_ts - EVENT_LOOKBACK_S, limit=EVENT_WINDOW)):
            k = (e.fleet, e.device, e.boot_id, e.ts, e.kind, e.message)
            if k in self._sent_events:
                continue
            self._sent_events[k] = None
            newest = max(newest, min(e.ts, time.time()))
            out.append({"topic": f"{PREFIX}/{e.fleet}/{e.device}/events", "payload": e.model_dump()})
        while len(self._sent_events) > 5000:
            del self._sent_events[next(iter(self._sent_events))]
        self._event_ts = newest
        if self._failed:  # (the caches above were half updated by the failed read: its changes were never sent)
            self._failed = False
            out.append(_resync("the store could not be read"))
        return out

    def _alert_changes(self) -> list[dict]:
        """Alerts raised or resolved since the last poll: the newest ALERT_WINDOW and every open one are diffed
        against the last poll's, and one that was open then and is in neither now is read by id.
        Why more than the newest window: an old alert resolved behind 200 newer ones (one device offline for
        a day, then back) stayed open on every live page, and one raised with an older start never showed."""
        recent = self.store.alerts(limit=ALERT_WINDOW)
        now = {a.id: a for a in (*recent, *self.store.alerts(active_only=True, limit=OPEN_ALERTS))}
        out = []
        followed = [i for i, r in self._alerts.items() if r is None and i not in now]  # open, past the window
        still = self.store.open_alert_ids() if followed else set()
        gone = [i for i in followed if i not in still]  # (one still open is unchanged: only `resolved` changes)
        if gone:
            now.update((a.id, a) for a in self.store.alerts_by_id(gone))
        if any(i not in now for i in gone):  # deleted (a device forgotten): only a reload takes it off a page
            out.append(_resync("an open alert was deleted"))
        for a in sorted(now.values(), key=lambda a: (a.started, a.id)):  # oldest first, as events: a page that
            # shows an alert of this poll has every older one of it (they come as a stream's messages, one by one)
            if a.id not in self._alerts or self._alerts[a.id] != a.resolved:
                out.append({"topic": f"lepton/alerts/{a.fleet}/{a.device}/{a.rule}", "payload": a.model_dump()})
        if self._alerts_primed and len(recent) == ALERT_WINDOW and recent[-1].id not in self._alerts:
            out.append(_resync("more alerts than one poll reads"))  # (the whole window is new)
        self._alerts_primed = True
        # (only this poll's: kept across polls, every id ever seen piled up, a slow leak)
        self._alerts = {**{i: None for i in followed if i in still}, **{i: a.resolved for i, a in now.items()}}
        return out

    async def _run(self) -> None:
        import anyio

        first = True
        while self.queues:
            began = time.monotonic()
            reached = self._unsynced & self.queues  # (this poll began after they opened)
            try:
                msgs = await anyio.to_thread.run_sync(self._snapshot)
            except StoreError as e:
                self._failed = True
                msgs = [{"topic": "lepton/monitor/error", "payload": {"error": str(e)}}]
            if first:  # the pages loaded the fleet themselves: the first diff only primes the cache
                msgs, first = [m for m in msgs if m["topic"] == "lepton/summary"], False
            for q in list(self.queues):
                batch = (*msgs, SYNCED) if q in reached else msgs
                if batch and q.qsize() and q.qsize() + len(batch) > max(self.queue_limit, 2 * len(batch)):
                    # a stream that lags ends after what it holds; the page reconnects and reloads. All of a
                    # poll or none: a page given the first part of one showed the newest alerts of a burst
                    # without the ones before (a loaded CI run: r1444-r1499 shown, r1350-r1443 not). One that
                    # keeps up (less than a poll unread) gets the whole poll, however big: closing it whenever
                    # a poll was over the limit (a thousand devices' windows) kept every page reconnecting
                    self.unsubscribe(q)
                    continue
                for m in batch:
                    q.put_nowait(m)
                if q in reached:
                    self._unsynced.discard(q)
            # (a notify during this pause keeps _wake set: the next read follows it at once)
            await asyncio.sleep(max(0.0, min(NOTIFY_GAP_S, self.poll_s) - (time.monotonic() - began)))
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()


# ---- the app -------------------------------------------------------------------------------------
# complexity waived on create_app: the routes are closures over the store, the hub and the token, and ruff
# counts each route's branches into create_app, while each route on its own is well under the limit
def create_app(store: Store, *, token: str | None, command_sender: CommandSender | None = None,  # noqa: C901
               poll_s: float = 1.0, metrics: bool = True):
    """The Starlette app. `command_sender(fleet, device, verb, payload, timeout) -> reply dict`
    (fleet.commands.send_command bound to a broker); None disables commands (501)."""
    import anyio
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.gzip import GZipMiddleware
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    hub = Broadcaster(store, poll_s)
    state: dict[str, Any] = {"sem": None}  # the commands' semaphore, made in the server's event loop

    async def blocking(fn, *a, **kw):
        try:
            return await anyio.to_thread.run_sync(lambda: fn(*a, **kw))
        except StoreError as e:
            raise ApiError(503, f"store unavailable: {e}") from None

    def ok(obj, status: int = 200) -> Response:
        return Response(json.dumps(obj, separators=(",", ":"), default=str), status_code=status,
                        media_type="application/json", headers={"Cache-Control": "no-store"})

    def raw(body: bytes) -> Response:  # JSON already serialized (pydantic's Rust serializer: 1,000 rows fast)
        return Response(body, media_type="application/json", headers={"Cache-Control": "no-store"})

    async def index(request: Request):
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def summary(request: Request):
        _only(request.query_params, set())
        s = await blocking(store.summary)
        return ok(s.model_dump())

    async def devices(request: Request):
        q = request.query_params
        _only(q, {"sort", "order", "filter", "state", "limit"})
        sort = q.get("sort") or "severity"
        if sort not in SORTS:
            raise ApiError(400, f"sort must be one of {', '.join(SORTS)}")
        order = q.get("order") or ("desc" if sort in ("severity", "alerts", "p95", "temperature", "cpu",
                                                      "seq_gaps", "last_seen") else "asc")
        if order not in ("asc", "desc"):
            raise ApiError(400, "order must be asc or desc")
        text = q.get("filter") or ""
        if len(text) > 100:
            raise ApiError(400, "filter is at most 100 characters")
        st = q.get("state") or ""
        if st and st not in STATES:
            raise ApiError(400, f"state must be one of {', '.join(sorted(STATES))}")
        limit = _int(q, "limit", 100000, 1, 100000)
        rows = select_devices(await blocking(store.devices), sort, order, text, st)[:limit]
        head = json.dumps({"count": len(rows), "sort": sort, "order": order, "now": time.time()})[:-1]
        return raw(head.encode() + b',"devices":' + _DEVICES.dump_json(rows) + b"}")

    def _path(request: Request) -> tuple[str, str]:
        return (_segment(request.path_params["fleet"], "fleet"), _segment(request.path_params["device"], "device"))

    async def device(request: Request):
        _only(request.query_params, set())
        fleet, dev = _path(request)
        d = await blocking(store.device, fleet, dev)
        if d is None:
            raise ApiError(404, f"no device {fleet}/{dev}")
        return ok(d.model_dump())

    async def history(request: Request):
        q = request.query_params
        _only(q, {"range", "points"})
        fleet, dev = _path(request)
        rng = q.get("range") or "1h"
        if rng not in RANGES:
            raise ApiError(400, f"range must be one of {', '.join(RANGES)}")
        points = _int(q, "points", 720, 10, 5000)
        now = time.time()
        pts = await blocking(store.history, fleet, dev, now - RANGES[rng], now, points)
        head = json.dumps({"fleet": fleet, "device": dev, "range": rng, "since": now - RANGES[rng], "until": now})
        return raw(head[:-1].encode() + b',"points":' + _POINTS.dump_json(pts) + b"}")

    async def events(request: Request):
        q = request.query_params
        _only(q, {"fleet", "device", "since", "limit"})
        fleet = _segment(q["fleet"], "fleet") if q.get("fleet") else None
        dev = _segment(q["device"], "device") if q.get("device") else None
        since = _float(q, "since", 0.0, 0.0, 1e11)
        limit = _int(q, "limit", 200, 1, 1000)
        rows = await blocking(store.events, fleet, dev, since, limit)
        return ok({"events": [e.model_dump() for e in rows]})

    async def alerts(request: Request):
        q = request.query_params
        _only(q, {"active", "fleet", "device", "limit"})
        active = (q.get("active") or "false").lower()
        if active not in ("true", "false", "1", "0"):
            raise ApiError(400, "active must be true or false")
        fleet = _segment(q["fleet"], "fleet") if q.get("fleet") else None
        dev = _segment(q["device"], "device") if q.get("device") else None
        limit = _int(q, "limit", 200, 1, 1000)
        rows = await blocking(store.alerts, active in ("true", "1"), fleet, dev, limit)
        return ok({"alerts": [a.model_dump() for a in rows]})

    async def stream(request: Request):
        _only(request.query_params, set())
        q = hub.subscribe(request.client.host if request.client else "")
        if q is None:  # (a 503 would end the page's EventSource for good: it reconnects only after a 200)
            async def later():
                yield f"retry: {STREAM_RETRY_LATER_MS}\n\n: every live stream is taken; try again later\n\n"

            return StreamingResponse(later(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

        async def gen():
            try:
                yield "retry: 2000\n\n"
                while True:
                    try:
                        m = await asyncio.wait_for(q.get(), 15.0)
                    except asyncio.TimeoutError:
                        if q not in hub.queues:
                            return  # closed for lagging: the page reconnects and reloads
                        yield ": keep-alive\n\n"
                        continue
                    if m is None:
                        return  # closed to make room for another client's page (Broadcaster.subscribe)
                    yield f"data: {json.dumps(m, separators=(',', ':'), default=str)}\n\n"
                    if q not in hub.queues and q.empty():
                        return
            finally:
                hub.unsubscribe(q)

        return StreamingResponse(gen(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def command(request: Request):
        _check_token(request.headers.get("authorization", ""), token)
        fleet, dev = _path(request)
        verb = request.path_params["verb"]
        if verb not in COMMANDS:
            raise ApiError(404, f"unknown command {verb!r} (one of {', '.join(COMMANDS)})")
        if command_sender is None:
            raise ApiError(501, "this dashboard was started without a broker: commands are off")
        cmd = _parse_command(verb, await _read_body(request))
        if state["sem"] is None:
            state["sem"] = anyio.Semaphore(MAX_CONCURRENT_COMMANDS)
        sem = state["sem"]
        if sem.value == 0:
            raise ApiError(429, f"{MAX_CONCURRENT_COMMANDS} commands already in flight; try again")
        async with sem:
            try:
                reply = await anyio.to_thread.run_sync(
                    lambda: command_sender(fleet, dev, verb, cmd.model_dump(exclude_none=True),
                                           COMMAND_TIMEOUT_S[verb]))
            except BadInput as e:
                raise ApiError(400, str(e)) from None
            except TimeoutError as e:
                raise ApiError(504, str(e) or f"no reply from {fleet}/{dev}") from None
            except OSError as e:
                raise ApiError(502, f"cannot reach the broker: {e}") from None
        hub.notify()
        return ok({"fleet": fleet, "device": dev, "verb": verb, "reply": reply})

    async def not_found(request: Request):
        raise ApiError(404, f"no such API path {request.url.path}")

    async def api_error(request: Request, exc: ApiError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    async def http_error(request: Request, exc):
        return JSONResponse({"error": getattr(exc, "detail", "error")}, status_code=getattr(exc, "status_code", 500))

    routes = [
        Route("/", index),
        Route("/api/summary", summary),
        Route("/api/devices", devices),
        Route("/api/devices/{fleet}/{device}", device),
        Route("/api/devices/{fleet}/{device}/history", history),
        Route("/api/devices/{fleet}/{device}/cmd/{verb}", command, methods=["POST"]),
        Route("/api/events", events),
        Route("/api/alerts", alerts),
        Route("/api/stream", stream),
        Route("/api/{rest:path}", not_found, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    if metrics:
        from lepton_edge.fleet.metrics import metrics_app

        routes.append(Route("/metrics", _Asgi(metrics_app(store))))  # exactly /metrics: no redirect for scrapers
    from starlette.exceptions import HTTPException

    app = Starlette(routes=routes, middleware=[Middleware(GZipMiddleware, minimum_size=2048, compresslevel=1)],
                    exception_handlers={ApiError: api_error, HTTPException: http_error})
    app.state.store = store
    app.state.hub = hub
    app.state.token = token
    return app


class _Asgi:
    """An ASGI callable as a Route endpoint (Starlette treats a plain function as request -> response)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        await self.app(scope, receive, send)


class _HeldErrors:
    """A logging filter that holds back the errors uvicorn logs while its server starts, for start()'s own
    line to give their reason. Why: a port in use printed uvicorn's line ('ERROR: [Errno 98] error while
    attempting to bind on address ...') and then ours; the operator is to read one."""

    def __init__(self):
        self.errors: list = []

    def filter(self, record) -> bool:
        if record.levelno < logging.ERROR:  # the rest is uvicorn's to show or not
            return True
        self.errors.append(record)
        return False

    def reason(self) -> str:
        """The first held error in a few words: an OSError's own text ('address already in use')."""
        if not self.errors:
            return ""
        e = self.errors[0].msg
        if isinstance(e, OSError) and e.errno:
            return os.strerror(e.errno).lower()
        return self.errors[0].getMessage().splitlines()[0][:200]


class WebServer:
    """uvicorn in a thread of its own (the monitor's main thread runs the terminal dashboard)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 8080, hosts: tuple[str, ...] = (),
                 what: str = "the web dashboard"):
        """`hosts`: Host names it answers to beside the loopback ones, when bound to loopback (guards.py);
        `what` names the server in its one-line error."""
        import uvicorn

        from lepton_edge.fleet.web.guards import GuardedH11, HostCheck, allowed_hosts

        self.server = uvicorn.Server(uvicorn.Config(HostCheck(app, allowed_hosts(host, hosts)), host=host, port=port,
                                                    log_level="warning", access_log=False, lifespan="off",
                                                    http=GuardedH11))
        self.host, self.what = host, what
        self._thread = None

    def start(self, timeout: float = 10.0) -> WebServer:
        import threading

        held = _HeldErrors()
        uvicorn_log = logging.getLogger("uvicorn.error")
        uvicorn_log.addFilter(held)
        try:
            self._thread = threading.Thread(target=self._run, name="web", daemon=True)
            self._thread.start()
            deadline = time.monotonic() + timeout
            while not self.server.started:
                if not self._thread.is_alive() or time.monotonic() > deadline:
                    raise BadInput(f"{self.what} could not listen on {self.host}:{self.server.config.port} "
                                   f"({held.reason() or 'address in use?'})")
                time.sleep(0.02)
        finally:
            uvicorn_log.removeFilter(held)
        return self

    def _run(self) -> None:
        """uvicorn's run, ending quietly where it gives up starting (sys.exit in this thread): start() says
        why in its one line, and a threading.excepthook that reports SystemExit (pytest's) would add another."""
        try:
            self.server.run()
        except SystemExit:
            pass

    @property
    def port(self) -> int:
        for s in self.server.servers:
            for sock in s.sockets:
                return sock.getsockname()[1]
        return self.server.config.port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread:
            self._thread.join(timeout=10)
