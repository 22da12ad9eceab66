"""MQTT publisher: drains the outbox at QoS 1, deletes on PUBACK, owns status, Last Will and commands.

Why it is built this way (paho-mqtt 2.x, CallbackAPIVersion.VERSION2):
- The network loop runs in paho's thread (loop_start), which also reconnects with a capped
  exponential backoff; the bounds are jittered per device so a fleet does not reconnect in step.
- A persistent session (clean_session=False) lets the broker keep commands sent while the
  device was away.
- Messages leave from the outbox only; a row is deleted when its PUBACK arrives. After a
  reconnect everything still in the outbox is sent again, so delivery is at-least-once and the
  monitor de-duplicates on (boot_id, seq).
- No lock of ours is held around publish(): on_publish can run in paho's thread before
  publish() returns (a PUBACK from a local broker is that fast), and a shared lock would deadlock.
- Nothing raised by our callbacks or the outbox (a full disk, a corrupt database) may reach
  paho's loop or end the sender thread: either would silence the device for good. Each is caught,
  kept in `last_error`, handed to `on_error`, and the work goes on at the next wake-up.
"""
from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

from lepton_edge.telemetry.broker import connect_properties, make_client, parse_broker
from lepton_edge.telemetry.outbox import Outbox


class Publisher:
    def __init__(self, broker: str, client_id: str, outbox: Outbox, *, will: tuple[str, bytes] | None = None,
                 username: str | None = None, password: str | None = None, ca_file: str | None = None,
                 cert_file: str | None = None, key_file: str | None = None, keepalive: int = 30,
                 max_inflight: int = 20, on_connect: Callable[[Publisher], None] | None = None,
                 on_message: Callable[[str, bytes, bool], None] | None = None, subscriptions: list[str] | None = None,
                 max_backoff: float = 10.0, on_error: Callable[[str], None] | None = None,
                 max_packet_bytes: int | None = None):
        self.addr = parse_broker(broker)
        self.outbox, self.max_inflight, self.keepalive = outbox, max_inflight, keepalive
        self._on_connect_cb, self._on_message_cb, self._on_error_cb = on_connect, on_message, on_error
        self.subscriptions = subscriptions or []
        # max_packet_bytes: MQTT 5 with a persistent session and a packet-size limit the broker enforces;
        # None: MQTT 3.1.1 (clean_session=False), for brokers without MQTT 5
        self.max_packet_bytes = max_packet_bytes
        c = make_client(self.addr, client_id, clean_session=False, username=username, password=password,
                        ca_file=ca_file, cert_file=cert_file, key_file=key_file, mqtt5=max_packet_bytes is not None)
        if will:
            c.will_set(will[0], will[1], qos=1, retain=True)
        jitter = random.uniform(0.8, 1.2)  # per device: a fleet must not reconnect in lockstep
        c.reconnect_delay_set(min_delay=max(1, round(jitter)), max_delay=max(2, int(max_backoff * jitter)))
        c.max_inflight_messages_set(max_inflight)
        c.on_connect, c.on_disconnect = self._handle_connect, self._handle_disconnect
        c.on_publish, c.on_message = self._handle_publish, self._handle_message
        c.on_subscribe = self._handle_subscribe
        self.client = c
        self.connected = threading.Event()
        self.subscribed = threading.Event()  # set on the SUBACK of `subscriptions` (at once without any)
        self._sub_mid = -1
        self.connects = 0
        self.last_error: str | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._mlock = threading.Lock()  # guards the two dicts below; never held around publish()
        self._inflight: dict[int, tuple[int, int]] = {}  # mid -> (outbox row id, the outbox generation it is of)
        self._early: dict[int, float] = {}  # PUBACKs that arrived before publish() returned the mid
        self._sent_upto = 0
        # connections so far: a batch read before a reconnect must not move `_sent_upto` past the rows the
        # reconnect said to send again (under load the sender, mid-batch when the connection dropped and came
        # back, sent the next new row and set `_sent_upto` to it: the unacknowledged rows before it waited
        # for the next reconnect, maybe days)
        self._epoch = 0
        self._generation = outbox.generation  # the outbox's store the ids above refer to
        self._sender = threading.Thread(target=self._send_loop, name="telemetry:sender", daemon=True)

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background: a broker that is down at start is retried, never waited for."""
        if self.max_packet_bytes is None:
            self.client.connect_async(self.addr.host, self.addr.port, keepalive=self.keepalive)
        else:
            self.client.connect_async(self.addr.host, self.addr.port, keepalive=self.keepalive, clean_start=False,
                                      properties=connect_properties(self.max_packet_bytes))
        self.client.loop_start()
        self._sender.start()

    def wake(self) -> None:
        self._wake.set()

    def publish_now(self, topic: str, payload: bytes, retain: bool = False, timeout: float = 0.0) -> bool:
        """Publish outside the outbox (status, replies); True when acknowledged within timeout."""
        if not self.connected.is_set():
            return False
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if timeout > 0:
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                return False
            return info.is_published()
        return info.rc == 0

    def flush(self, timeout: float) -> bool:
        """Wait until the outbox is empty (True) or timeout passes (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.outbox) == 0:
                return True
            self._wake.set()
            time.sleep(0.05)
        return len(self.outbox) == 0

    def stop(self) -> None:
        """Disconnect cleanly (the broker then does not publish the Last Will)."""
        self._stop.set()
        self._wake.set()
        if self._sender.is_alive():
            self._sender.join(timeout=5)
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    def _error(self, where: str, e: BaseException) -> None:
        """Keep and report an error from a callback or the sender; never raises."""
        self._report(f"{where}: {type(e).__name__}: {e}")

    def _report(self, message: str) -> None:
        self.last_error = message
        if self._on_error_cb:
            try:
                self._on_error_cb(self.last_error)
            except Exception:
                pass

    # ---- paho callbacks (paho's thread) -------------------------------------------------------
    def _handle_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        try:
            self._connected(client, reason_code)
        except Exception as e:
            self._error("on_connect", e)

    def _connected(self, client, reason_code) -> None:
        if reason_code.is_failure:  # a wrong password or ACL: said (it looked like a device with nothing to send)
            self._report(f"the broker refused the connection: {reason_code}")
            return
        self.connects += 1
        self.last_error = None
        if self.subscriptions:
            self._sub_mid = client.subscribe([(t, 1) for t in self.subscriptions])[1]
        else:
            self.subscribed.set()
        with self._mlock:
            self._inflight.clear()
            self._early.clear()
            self._sent_upto = 0  # send everything still in the outbox again
            self._epoch += 1
        self.connected.set()
        if self._on_connect_cb:
            try:
                self._on_connect_cb(self)
            except Exception as e:  # a bad status callback must not kill paho's thread
                self._error("on_connect", e)
        self._wake.set()

    def _handle_subscribe(self, client, userdata, mid, reason_codes=None, properties=None) -> None:
        """`subscribed`: the broker's SUBACK for this connection's subscriptions (commands sent before it
        are lost: a clean first session holds nothing for this client yet), set when it granted at least
        one. A subscription it refused (its ACL) is an error, kept and reported like the others: the
        device would otherwise look ready for commands that can never reach it. Only what the SUBACK
        says: a broker that grants the subscription and filters at delivery (mosquitto 2 with an
        acl_file that denies reading) is not detected here."""
        if mid != self._sub_mid:
            return
        codes = list(reason_codes or [])
        refused = [f"{t} ({rc})" for t, rc in zip(self.subscriptions, codes) if getattr(rc, "is_failure", False)]
        if refused:
            self._report(f"on_subscribe: the broker refused the subscription to {', '.join(refused)} "
                         "(its ACL?): those messages are not received")
        if len(refused) < len(codes):
            self.subscribed.set()

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties=None) -> None:
        self.connected.clear()
        self.subscribed.clear()
        if reason_code is not None and getattr(reason_code, "is_failure", False) and not self._stop.is_set():
            self._report(f"connection lost: {reason_code}")

    def _handle_publish(self, client, userdata, mid, reason_code=None, properties=None) -> None:
        with self._mlock:
            row = self._inflight.pop(mid, None)
            if row is None:
                self._early[mid] = time.monotonic()
        if row is not None:
            try:  # (a failed delete, or one of an older generation, means the row is sent again: at-least-once)
                self.outbox.delete(row[0], generation=row[1])
            except Exception as e:
                self._error("on_publish", e)
            self._wake.set()

    def _handle_message(self, client, userdata, msg) -> None:
        """Hand the payload over as paho made it (no copy: the receiver checks its size first) with
        the retain flag, so a retained command can be told from a fresh one."""
        if self._on_message_cb:
            try:
                self._on_message_cb(msg.topic, msg.payload, bool(msg.retain))
            except Exception as e:
                self._error("on_message", e)

    # ---- the sender thread --------------------------------------------------------------------
    def _send_loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            self._wake.wait(5.0)  # woken by puts, PUBACKs and connects; the timeout is only a safety net
            self._wake.clear()
            try:
                self._send_pending()
                failures = 0
            except Exception as e:  # the outbox failed (full disk, corrupt file): try again later
                failures += 1
                self._error("sender", e)
                self._stop.wait(min(10.0, 0.2 * 2 ** min(failures, 6)))
                self._wake.set()

    def _send_pending(self) -> None:
        """Send what the outbox holds beyond what is in flight, up to max_inflight."""
        while self.connected.is_set() and not self._stop.is_set():
            with self._mlock:
                if self.outbox.generation != self._generation:  # the rows moved to another store: from the first
                    self._generation = self.outbox.generation  # row again (those in flight may come twice)
                    self._inflight.clear()
                    self._early.clear()
                    self._sent_upto = 0
                room = self.max_inflight - len(self._inflight)
                after, epoch = self._sent_upto, self._epoch
                now = time.monotonic()
                for mid in [m for m, t in self._early.items() if now - t > 5]:
                    del self._early[mid]
            if room <= 0:
                break  # wait for PUBACKs (they wake us)
            batch = self.outbox.pending(limit=room, after=after)
            if not batch:
                break
            reconnected = False
            for m in batch:
                info = self.client.publish(m.topic, m.payload, qos=m.qos, retain=m.retain)
                if info.rc != 0:  # disconnected meanwhile: the row stays for the next connection
                    break
                with self._mlock:
                    early = self._early.pop(info.mid, None) is not None
                    if not early:
                        self._inflight[info.mid] = (m.id, m.generation)
                    reconnected = epoch != self._epoch
                    if not reconnected:
                        self._sent_upto = max(self._sent_upto, m.id)
                if early:
                    self.outbox.delete(m.id, generation=m.generation)
                if reconnected:  # this batch began before the reconnect: from `_sent_upto` (0) again
                    break
            else:
                continue  # the whole batch went: more may wait
            if not reconnected:
                break  # disconnected mid-batch: the rest waits for the next connection
