"""The MQTT ingest: subscribe to the fleet's topic tree, validate, de-duplicate, store.

Why it is shaped this way:
- A persistent session (clean_session false, a fixed client id) and QoS 1 make the broker keep
  what arrives while the monitor is down; messages are acknowledged (manual PUBACK) only after
  the batch holding them is committed, so a monitor killed with a full queue loses nothing: the
  broker redelivers and the store's unique key drops the repeats.
- paho's network thread only checks the size and the topic and enqueues (a queue bounded in messages
  and in payload bytes: when the store is slow the callback blocks, paho stops reading and the broker
  buffers; no message is dropped); one writer thread parses, validates and writes in batches, which
  keeps up with thousands of windows a second.
- `status` and `meta` come by ordinary subscriptions (every worker needs every device's state);
  `telemetry` and `events` may come through `$share/<group>/...` so N workers split the load.
  mosquitto splits message by message and also hands retained messages to shared subscribers:
  nothing here depends on which worker gets which window, and a repeat is a no-op.
- A bad message (too large, not JSON, wrong types, unknown `v`, a topic outside the tree, a device
  that floods) is counted per device in the store and logged at most once a minute per device and
  reason; it never reaches the store's tables and never stops the monitor. The flood limit's burst
  is large (5,000) on purpose: after a restart the broker hands a device's queued backlog at once,
  and that is data, not a flood.
"""
from __future__ import annotations

import json
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable

from pydantic import ValidationError

from lepton_edge.fleet.store.base import Store, StoreError, ValueRefused
from lepton_edge.telemetry.broker import make_client, parse_broker
from lepton_edge.telemetry.schema import MAX_EVENT_MESSAGE, Event, Status, Telemetry, V
from lepton_edge.telemetry.topics import Topics, is_segment, safe_segment, sanitize

MAX_CLOCK_AHEAD_S = 300.0  # a device clock this far ahead of the monitor's is not believed (Monitor._clock)
EPOCH_FLOOR = 1_577_836_800.0  # 2020-01-01: a device time before it is an unset clock
MAX_PAYLOAD = 64 * 1024  # a window is ~1 KB; anything this big is refused before parsing
# Payload bytes the queue may hold (Monitor.queue_bytes). Why beside the count: QoS 0 messages are not held
# back by the broker's in-flight window, so during a store outage 20,000 messages of 30 KB each (devices
# publishing junk events at QoS 0) held 574 MiB in the queue; up to 1.2 GiB at MAX_PAYLOAD.
MAX_QUEUE_BYTES = 64 * 1024 * 1024
# JSON nesting a message may have (ours go three or four deep). Why: an event whose `data` nested 975 deep
# (2 KB) was stored, and every /api/events read of it was a 500 with a RecursionError traceback (the
# encoder ran out of stack in the web server's thread), so the dashboard, which loads the newest 100
# events, could not load at all.
MAX_DEPTH = 32
KINDS = ("status", "meta", "telemetry", "events")
MODELS = {"status": Status, "telemetry": Telemetry, "events": Event}


class OutOfRange(ValueError):
    """A number no store column holds: an integer past 64 bits, a float past double's range."""


def _int(text: str) -> int:
    if len(text.lstrip("-")) > 19 or not -(1 << 63) <= (v := int(text)) < (1 << 63):
        raise OutOfRange(text[:40])
    return v


def _float(text: str) -> float:
    v = float(text)
    if v in (float("inf"), float("-inf")):  # 1e400
        raise OutOfRange(text[:40])
    return v


def _constant(name: str):
    raise ValueError(f"{name} is not JSON")


def strict_json(payload: bytes | str):
    """JSON as RFC 8259 has it: no NaN/Infinity literals (Python's json reads them, and a NaN reached a
    NOT NULL column: the store retried that batch forever), and no number past what SQLite and
    PostgreSQL hold (a 20-digit seq killed the writer thread with OverflowError)."""
    return json.loads(payload, parse_int=_int, parse_float=_float, parse_constant=_constant)


class _Bucket:
    """Per-device token bucket: `rate` messages/s sustained, `burst` at once."""

    __slots__ = ("tokens", "t")

    def __init__(self, burst: float):
        self.tokens, self.t = burst, time.monotonic()


def _has_nul(doc) -> bool:
    """Whether any string of a parsed JSON document (key or value) holds a NUL character; iterative, as a
    document may nest deeper than Python's recursion limit."""
    todo = [doc]
    while todo:
        x = todo.pop()
        if isinstance(x, str):
            if "\x00" in x:
                return True
        elif isinstance(x, dict):
            todo.extend(x.keys())
            todo.extend(x.values())
        elif isinstance(x, list):
            todo.extend(x)
    return False


def _size(item: tuple) -> int:
    """The payload bytes a queued item holds (a refused message is queued without its payload)."""
    return len(item[3]) if item[0] != "bad" else 0


def _too_deep(doc, limit: int = MAX_DEPTH) -> bool:
    """Whether a parsed JSON document nests objects or arrays more than `limit` deep (iterative, as
    _has_nul)."""
    todo = [(doc, 1)]
    while todo:
        x, n = todo.pop()
        if isinstance(x, dict):
            x = list(x.values())
        elif not isinstance(x, list):
            continue
        if n > limit:
            return True
        todo.extend((y, n + 1) for y in x)
    return False


class Monitor:
    def __init__(self, broker_url: str, store: Store, *, group: str | None = None, client_id: str | None = None,
                 fleet: str = "+", on_change: Callable[[set[tuple[str, str]]], None] | None = None,
                 username: str | None = None, password: str | None = None, ca_file: str | None = None,
                 cert_file: str | None = None, key_file: str | None = None, max_payload: int = MAX_PAYLOAD,
                 queue_size: int = 20000, queue_bytes: int = MAX_QUEUE_BYTES, batch: int = 1000,
                 flood_rate: float = 20.0, flood_burst: float = 5000.0,
                 alerts=None, alert_every_s: float = 5.0, retain_s: float | None = None,
                 downsample_after_s: float | None = None, housekeeping_every_s: float = 3600.0,
                 log: Callable[[str], None] | None = None, persistent: bool = True):
        """persistent=False: a clean session (a one-off read such as `monitor --once`, which must not
        take over, or drain, the session a running monitor keeps on the broker)."""
        if fleet != "+":
            safe_segment(fleet, "fleet")
        if group is not None:
            safe_segment(group, "group")
        self.addr = parse_broker(broker_url)
        self.store = store
        self.group, self.fleet = group, fleet
        self.client_id = client_id or f"lepton-monitor-{sanitize(socket.gethostname())}-{group or 'solo'}"[:64]
        self.on_change = on_change
        self.max_payload, self.batch = max_payload, batch
        self.flood_rate, self.flood_burst = flood_rate, flood_burst
        self.alerts, self.alert_every_s = alerts, alert_every_s
        self.retain_s, self.downsample_after_s, self.housekeeping_every_s = retain_s, downsample_after_s, \
            housekeeping_every_s
        self.log = log or logging.getLogger(__name__).info  # the entry point decides how lines look
        self.q: queue.Queue = queue.Queue(maxsize=queue_size)
        self.queue_bytes = queue_bytes
        self._qbytes = 0  # payload bytes in self.q (see MAX_QUEUE_BYTES)
        self._qroom = threading.Condition()
        self.stats = {"received": 0, "stored": 0, "duplicates": 0, "bad": 0, "store_errors": 0}
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._said: dict[tuple, float] = {}
        self._gen = 0  # connection generation: a PUBACK never goes to a later connection
        self._sub_mid = -1
        self.refused: str | None = None  # the subscriptions the broker refused at the last SUBACK
        self.answered = threading.Event()  # a SUBACK came (connected, or every subscription refused)
        self._busy = False
        self._stop = threading.Event()
        self.connected = threading.Event()
        self.client = make_client(self.addr, self.client_id, clean_session=not persistent, username=username,
                                  password=password, ca_file=ca_file, cert_file=cert_file, key_file=key_file)
        self.client.manual_ack_set(True)
        self.client.reconnect_delay_set(0.5, 10)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self._threads: list[threading.Thread] = []

    # ---- topics -------------------------------------------------------------------------------
    def subscriptions(self) -> list[str]:
        every = Topics(self.fleet, "+")  # every device of the fleet (of every fleet when fleet is '+')
        share = f"$share/{self.group}/" if self.group else ""
        return [every.status, every.meta, f"{share}{every.telemetry}", f"{share}{every.events}"]

    # ---- paho's thread: check, enqueue, nothing else -------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self._say(("connect",), f"monitor: broker {self.addr.host}:{self.addr.port} refused: {reason_code}")
            return
        self._gen += 1
        _, self._sub_mid = client.subscribe([(t, 1) for t in self.subscriptions()])

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        """`connected` means subscribed: set on the broker's SUBACK, not on CONNACK. Why: a caller that
        waited for `connected` and then had devices publish lost their first messages to the gap between
        the two (a CI run counted 2 of 4 refused messages), and `monitor --once` read a fleet it had not
        yet subscribed to."""
        if mid != self._sub_mid:
            return
        refused = [t for t, rc in zip(self.subscriptions(), reason_codes) if rc.is_failure]
        self.refused = ", ".join(refused) or None
        if refused and (len(refused) < len(reason_codes) or self.answered.is_set()):
            # (every one refused at the first SUBACK: whoever waits for `answered` says so, in one line)
            self._say(("subscribe",), f"monitor: broker {self.addr.host}:{self.addr.port} refused the "
                      f"subscription to {self.refused} (its ACL?): those messages are not received")
        if len(refused) < len(reason_codes):
            self.connected.set()
        self.answered.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.connected.clear()
        if not self._stop.is_set():
            self._say(("disconnect",), f"monitor: lost the broker ({reason_code}); reconnecting")

    def _on_message(self, client, userdata, msg):
        now = time.time()
        self.stats["received"] += 1
        parsed = Topics.parse(msg.topic)
        ok_topic = parsed is not None and parsed[2] in KINDS and is_segment(parsed[0]) and is_segment(parsed[1])
        fleet, device, kind = parsed if ok_topic else (None, None, None)
        if not ok_topic:
            item = ("bad", None, None, "topic", now)
        elif len(msg.payload) > self.max_payload:
            item = ("bad", fleet, device, "too_large", now)
        elif self._flooding(fleet, device, kind):  # (status and meta too: each one is a transaction)
            item = ("bad", fleet, device, "flood", now)
        else:
            item = (kind, fleet, device, msg.payload, now)
        size = _size(item)
        with self._qroom:  # back-pressure by bytes as well (one message is always let in)
            while self._qbytes and self._qbytes + size > self.queue_bytes and not self._stop.is_set():
                self._qroom.wait(0.5)
            if self._stop.is_set():
                return
            self._qbytes += size
        while not self._stop.is_set():  # back-pressure: paho stops reading, the broker buffers
            try:
                self.q.put((item, msg.mid, msg.qos, self._gen), timeout=0.5)
                return
            except queue.Full:
                continue
        with self._qroom:  # stopped before it was queued: its bytes are not in the queue (a restart's budget)
            self._qbytes -= size

    def _flooding(self, fleet: str, device: str, kind: str = "telemetry") -> bool:
        """Per device and kind: a device whose events flood (one per junk command someone sends it) still
        has its telemetry stored; the two shared one bucket and 7,000 junk commands cost 45 windows."""
        key = (fleet, device, kind)
        b = self._buckets.get(key)
        if b is None:
            if len(self._buckets) > 100_000:  # bounded, whatever device names arrive
                self._buckets.clear()
            b = self._buckets[key] = _Bucket(self.flood_burst)
        t = time.monotonic()
        b.tokens = min(self.flood_burst, b.tokens + (t - b.t) * self.flood_rate)
        b.t = t
        if b.tokens < 1:
            return True
        b.tokens -= 1
        return False

    # ---- the writer thread ------------------------------------------------------------------------
    def _parse(self, kind: str, payload: bytes) -> tuple[dict | None, str | None]:
        try:
            d = strict_json(payload)
        except OutOfRange:
            return None, "out_of_range"
        except (ValueError, UnicodeDecodeError, RecursionError):  # (60 KB of '[' is deep, not big)
            return None, "not_json"
        if b"\\u0000" in payload and _has_nul(d):  # a NUL in a string: PostgreSQL's text refuses it, and that batch
            # was retried forever. (The bytes alone are no proof: `\\u0000`, an escaped backslash, is text.)
            return None, "nul_char"
        if payload.count(b"[") + payload.count(b"{") > MAX_DEPTH and _too_deep(d):  # (fewer brackets: not deep)
            return None, "too_deep"
        if not isinstance(d, dict):
            return None, "not_object"
        if d.get("v") != V:
            return None, "version"
        if kind == "meta":  # kept as sent: descriptive, read field by field (older agents sent fewer fields)
            return d, None
        if kind == "events" and isinstance(d.get("message"), str):  # (older agents do not cut their own)
            d["message"] = d["message"][:MAX_EVENT_MESSAGE]
        try:
            return MODELS[kind].model_validate(d).model_dump(), None
        except ValidationError:
            return None, "schema"

    def _write(self, items: list) -> None:
        windows, other, bad = [], [], {}
        changed: set[tuple[str, str]] = set()
        for (kind, fleet, device, payload, now), *_ in items:
            reason = None
            if kind == "bad":
                reason = payload
            else:
                d, reason = self._parse(kind, payload)
                if d is not None:
                    self._clock(d, fleet, device, now)
                    if kind == "telemetry":
                        windows.append((fleet, device, d, now))
                    else:
                        other.append((kind, fleet, device, d, now))
                    changed.add((fleet, device))
            if reason:
                k = (fleet or "", device or "", reason)
                n, _ = bad.get(k, (0, now))
                bad[k] = (n + 1, now)
                self._say(("bad", reason),  # (per reason, not per device: 200,000 made-up names were as many lines)
                          f"monitor: refused a message from {fleet or '?'}/{device or '?'}: {reason} "
                          "(counted; logged once a minute per reason)")
        st = self.store
        for kind, fleet, device, d, now in other:  # arrival order: status and its Last Will
            if kind == "status":
                st.set_status(fleet, device, d, now)
            elif kind == "meta":
                st.set_meta(fleet, device, d, now)
        stored = st.add_windows(windows) if windows else []
        for kind, fleet, device, d, now in other:
            if kind == "events":
                st.add_event(fleet, device, d, now)
        if bad:
            st.count_bad_many(bad) if hasattr(st, "count_bad_many") else \
                [st.count_bad(f or None, dv or None, r, last) for (f, dv, r), (_, last) in bad.items()]
        self.stats["stored"] += sum(stored)
        self.stats["duplicates"] += len(stored) - sum(stored)
        self.stats["bad"] += sum(n for n, _ in bad.values())
        if self.on_change and changed:
            try:
                self.on_change(changed)
            except Exception as e:  # a view's bug must not stop the ingest
                self._say(("on_change",), f"monitor: on_change failed: {e}")

    def _writer(self) -> None:
        backoff = 0.5
        items: list = []
        while True:
            if not items:
                try:
                    items.append(self.q.get(timeout=0.2))
                except queue.Empty:
                    if self._stop.is_set():
                        return
                    continue
                while len(items) < self.batch:
                    try:
                        items.append(self.q.get_nowait())
                    except queue.Empty:
                        break
                with self._qroom:
                    self._qbytes -= sum(_size(it[0]) for it in items)
                    self._qroom.notify_all()
            self._busy = True
            try:
                try:
                    self._write(items)
                except ValueRefused as e:  # a value the database refuses: that message's fault alone
                    self._write_one_by_one(items, e)
                except StoreError:
                    raise
                except Exception as e:  # a message the store could not take: not the ingest's end
                    self._write_one_by_one(items, e)
            except StoreError as e:
                self.stats["store_errors"] += 1
                self._say(("store",), f"monitor: {e}; retrying in {backoff:g}s (queued messages are kept)",
                          every=10)
                self._busy = False
                if self._stop.wait(backoff):
                    return  # not acknowledged: the broker redelivers them to the next session
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.5
            self._ack(items)
            items = []
            self._busy = False

    def _ack(self, items: list) -> None:
        for _, mid, qos, gen in items:
            if qos and gen == self._gen:
                self.client.ack(mid, qos)

    def _clock(self, d: dict, fleet: str, device: str, now: float) -> None:
        """A device time the store cannot order by becomes the time the message arrived: later than this
        machine's clock plus MAX_CLOCK_AHEAD_S, or before EPOCH_FLOOR (a Pi without a real-time clock
        before NTP, 1970). Why: the store and the live stream keep the newest by device time, so one
        window stamped 1e12 froze that device's state and hid its alerts, and one such event stopped the
        dashboard's live events for every device; 1e300 broke `fleet show`. A backlog (an outbox or a
        broker session sending hours-old windows) keeps its own times: that is history, not a bad clock."""
        ts = d.get("ts")
        if isinstance(ts, (int, float)) and EPOCH_FLOOR <= ts <= now + MAX_CLOCK_AHEAD_S:
            return
        d["ts"], d["sent_ts"] = now, ts  # (sent_ts: what the store de-duplicates an event by, repeats included)
        self._say(("clock", fleet, device), f"monitor: {fleet}/{device}'s clock says {str(ts)[:24]}, not near "
                  "this machine's; its messages are timed when they arrive (logged once a minute)")

    def _write_one_by_one(self, items: list, first: Exception) -> None:
        """After a batch failed with something other than StoreError (a value the database cannot hold):
        each message alone, and the ones that fail again counted as `unstorable` and acknowledged.
        Why: the writer thread died on such a message (an OverflowError), and as it was never
        acknowledged the broker gave it to every restart; the rest of the fleet went unstored.
        A StoreError half way (the database went away) leaves in `items` only the messages not yet
        done, the others acknowledged: the retry stored them again, and counted an unstorable one twice."""
        self._say(("unstorable",), f"monitor: a batch failed ({type(first).__name__}: {str(first)[:200]}); "
                  "storing its messages one by one")
        now = time.time()
        for k, item in enumerate(items):
            try:
                try:
                    self._write([item])
                except ValueRefused as e:
                    self._unstorable(item, e, now)
                except StoreError:
                    raise
                except Exception as e:
                    self._unstorable(item, e, now)
            except StoreError:
                self._ack(items[:k])
                del items[:k]
                raise

    def _unstorable(self, item, e: Exception, now: float) -> None:
        (kind, fleet, device, _payload, _now), *_ = item
        self._say(("unstorable", fleet, device), f"monitor: refused a {kind} message from {fleet}/{device}: "
                  f"unstorable ({type(e).__name__}: {str(e)[:200]})")
        self.store.count_bad(fleet or None, device or None, "unstorable", now, known=True)
        self.stats["bad"] += 1

    def _periodic(self) -> None:
        next_house = time.monotonic() + 60
        while not self._stop.wait(self.alert_every_s):
            try:
                if self.alerts is not None:
                    self.alerts.evaluate()
                if time.monotonic() >= next_house and (self.retain_s or self.downsample_after_s):
                    next_house = time.monotonic() + self.housekeeping_every_s
                    with self.store.exclusive("housekeeping") as mine:
                        if mine and self.downsample_after_s:
                            self.store.downsample(self.downsample_after_s)
                        if mine and self.retain_s:
                            self.store.retain(self.retain_s)
            except StoreError as e:
                self._say(("store-periodic",), f"monitor: {e}; alerts retry in {self.alert_every_s:g}s", every=10)
            except Exception as e:  # noqa: BLE001 - the loop must survive a rule's bug; say it once a minute
                self._say(("periodic", type(e).__name__), f"monitor: alert evaluation failed: {type(e).__name__}: {e}")

    # ---- life -----------------------------------------------------------------------------------
    def _say(self, key: tuple, line: str, every: float = 60.0) -> None:
        t = time.monotonic()
        if t - self._said.get(key, -1e9) >= every:
            if len(self._said) > 10_000:
                self._said.clear()
            self._said[key] = t
            self.log(line)

    def start(self) -> Monitor:
        self._stop.clear()
        if self.alerts is not None and getattr(self.alerts, "publish", 0) is None:
            self.alerts.publish = lambda topic, payload: self.client.publish(topic, payload, qos=1)
        self._threads = [threading.Thread(target=self._writer, name="monitor-writer", daemon=True),
                         threading.Thread(target=self._periodic, name="monitor-alerts", daemon=True)]
        for t in self._threads:
            t.start()
        self.client.connect_async(self.addr.host, self.addr.port, keepalive=30)
        self.client.loop_start()
        return self

    def idle(self) -> bool:
        return self.q.empty() and not self._busy

    def wait_idle(self, timeout: float = 10.0, quiet: float = 0.3) -> bool:
        """Until the queue has been empty and nothing written for `quiet` seconds (tests, bench)."""
        deadline = time.monotonic() + timeout
        since = None
        while time.monotonic() < deadline:
            if self.idle():
                since = since or time.monotonic()
                if time.monotonic() - since >= quiet:
                    return True
            else:
                since = None
            time.sleep(0.02)
        return False

    def stop(self, drain_s: float = 5.0) -> None:
        """Write what is queued (up to drain_s), acknowledge it, then disconnect."""
        self.wait_idle(timeout=drain_s, quiet=0.05)
        self._stop.set()
        for t in self._threads:
            t.join(timeout=drain_s + 5)
        self.client.disconnect()
        self.client.loop_stop()

    def run_forever(self) -> None:
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()
