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
"""
from __future__ import annotations

import random
import threading
import time
from typing import Callable

from lepton_edge.telemetry.broker import make_client, parse_broker
from lepton_edge.telemetry.outbox import Outbox


class Publisher:
    def __init__(self, broker: str, client_id: str, outbox: Outbox, *, will: tuple[str, bytes] | None = None,
                 username: str | None = None, password: str | None = None, ca_file: str | None = None,
                 cert_file: str | None = None, key_file: str | None = None, keepalive: int = 30,
                 max_inflight: int = 20, on_connect: Callable[["Publisher"], None] | None = None,
                 on_message: Callable[[str, bytes], None] | None = None, subscriptions: list[str] | None = None,
                 max_backoff: float = 10.0):
        self.addr = parse_broker(broker)
        self.outbox, self.max_inflight = outbox, max_inflight
        self._on_connect_cb, self._on_message_cb = on_connect, on_message
        self.subscriptions = subscriptions or []
        c = make_client(self.addr, client_id, clean_session=False, username=username, password=password,
                        ca_file=ca_file, cert_file=cert_file, key_file=key_file)
        if will:
            c.will_set(will[0], will[1], qos=1, retain=True)
        jitter = random.uniform(0.8, 1.2)  # per device: a fleet must not reconnect in lockstep
        c.reconnect_delay_set(min_delay=max(1, round(jitter)), max_delay=max(2, int(max_backoff * jitter)))
        c.max_inflight_messages_set(max_inflight)
        c.on_connect, c.on_disconnect = self._handle_connect, self._handle_disconnect
        c.on_publish, c.on_message = self._handle_publish, self._handle_message
        self.client = c
        self.connected = threading.Event()
        self.connects = 0
        self.last_error: str | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._mlock = threading.Lock()  # guards the two dicts below; never held around publish()
        self._inflight: dict[int, int] = {}  # mid -> outbox row id
        self._early: dict[int, float] = {}  # PUBACKs that arrived before publish() returned the mid
        self._sent_upto = 0
        self._sender = threading.Thread(target=self._send_loop, name="telemetry:sender", daemon=True)

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background: a broker that is down at start is retried, never waited for."""
        self.client.connect_async(self.addr.host, self.addr.port, keepalive=30)
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

    # ---- paho callbacks (paho's thread) -------------------------------------------------------
    def _handle_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            self.last_error = str(reason_code)
            return
        self.connects += 1
        self.last_error = None
        for topic in self.subscriptions:
            client.subscribe(topic, qos=1)
        with self._mlock:
            self._inflight.clear()
            self._early.clear()
            self._sent_upto = 0  # send everything still in the outbox again
        self.connected.set()
        if self._on_connect_cb:
            try:
                self._on_connect_cb(self)
            except Exception as e:  # a bad status callback must not kill paho's thread
                self.last_error = f"on_connect: {e}"
        self._wake.set()

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties=None) -> None:
        self.connected.clear()
        if reason_code is not None and getattr(reason_code, "is_failure", False):
            self.last_error = str(reason_code)

    def _handle_publish(self, client, userdata, mid, reason_code=None, properties=None) -> None:
        with self._mlock:
            rid = self._inflight.pop(mid, None)
            if rid is None:
                self._early[mid] = time.monotonic()
        if rid is not None:
            self.outbox.delete(rid)
            self._wake.set()

    def _handle_message(self, client, userdata, msg) -> None:
        if self._on_message_cb:
            self._on_message_cb(msg.topic, bytes(msg.payload))

    # ---- the sender thread --------------------------------------------------------------------
    def _send_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(5.0)  # woken by puts, PUBACKs and connects; the timeout is only a safety net
            self._wake.clear()
            while self.connected.is_set() and not self._stop.is_set():
                with self._mlock:
                    room = self.max_inflight - len(self._inflight)
                    after = self._sent_upto
                    now = time.monotonic()
                    for mid in [m for m, t in self._early.items() if now - t > 5]:
                        del self._early[mid]
                if room <= 0:
                    break  # wait for PUBACKs (they wake us)
                batch = self.outbox.pending(limit=room, after=after)
                if not batch:
                    break
                for m in batch:
                    info = self.client.publish(m.topic, m.payload, qos=m.qos, retain=m.retain)
                    if info.rc != 0:  # disconnected meanwhile: the row stays for the next connection
                        break
                    with self._mlock:
                        early = self._early.pop(info.mid, None) is not None
                        if not early:
                            self._inflight[info.mid] = m.id
                        self._sent_upto = max(self._sent_upto, m.id)
                    if early:
                        self.outbox.delete(m.id)
                else:
                    continue
                break
