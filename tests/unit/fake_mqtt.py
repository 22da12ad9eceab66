"""A stand-in for paho's Client where the broker is not the point: it records what the code under
test publishes and lets the test play the broker (CONNACK, PUBACK, a dropped connection).

Why not mosquitto here: the Publisher's contract is about *when* it deletes a row and *what* it
sends again, and a real broker acknowledges in microseconds, in its own order, and paho's own
in-memory resend would hide a lost row. Here every acknowledgement is the test's decision.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode


@dataclass
class Sent:
    mid: int
    topic: str
    payload: bytes
    qos: int
    retain: bool


class FakeInfo:
    """What publish() returns: the message id and the result code (MQTT_ERR_NO_CONN when offline)."""

    def __init__(self, mid: int, rc: int, client: FakeClient):
        self.mid, self.rc, self._client = mid, rc, client

    def is_published(self) -> bool:
        return self.mid in self._client.acked

    def wait_for_publish(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or 0)
        while not self.is_published() and time.monotonic() < deadline:
            time.sleep(0.01)


class FakeClient:
    """Records publish()/subscribe(); the test fires the callbacks paho would fire (VERSION2 signatures).

    `ack_inline`: PUBACK arrives inside publish(), before it returns the mid (a local broker is that
    fast, and paho's network thread can win the race)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.sent: list[Sent] = []
        self.acked: set[int] = set()
        self.subscribed: list[tuple[str, int]] = []
        self.sub_mids: list[int] = []  # each subscribe()'s mid, for suback()
        self.will: tuple | None = None
        self.up = False  # a connection is established: publish() succeeds
        self.ack_inline = False
        self.max_outstanding = 0  # most messages sent and not yet acknowledged at once
        self.loop_started = self.disconnected = False
        self._mid = 0
        self.on_connect = self.on_disconnect = self.on_publish = self.on_message = self.on_subscribe = None

    # ---- the part of paho's API the code uses ---------------------------------------------------
    def will_set(self, topic, payload=None, qos=0, retain=False):
        self.will = (topic, payload, qos, retain)

    def reconnect_delay_set(self, min_delay=1, max_delay=120):
        pass

    def max_inflight_messages_set(self, n):
        self.max_inflight = n

    def connect_async(self, host, port, keepalive=60, **kw):
        self.address, self.keepalive, self.connect_kw = (host, port), keepalive, kw

    def loop_start(self):
        self.loop_started = True

    def loop_stop(self):
        self.loop_started = False

    def disconnect(self, *a, **kw):
        self.disconnected = True
        self.up = False

    def subscribe(self, topic, qos=0) -> tuple[int, int]:
        """paho's forms: one topic and its qos, or a list of (topic, qos); (result, mid) back."""
        with self.lock:
            self.subscribed.extend(topic if isinstance(topic, list) else [(topic, qos)])
            self._mid += 1
            self.sub_mids.append(self._mid)
            return mqtt.MQTT_ERR_SUCCESS, self._mid

    def publish(self, topic, payload=None, qos=0, retain=False) -> FakeInfo:
        with self.lock:
            self._mid += 1
            mid = self._mid
            if not self.up:
                return FakeInfo(mid, mqtt.MQTT_ERR_NO_CONN, self)
            self.sent.append(Sent(mid, topic, bytes(payload), qos, retain))
            self.max_outstanding = max(self.max_outstanding, len(self.unacked()))
        if self.ack_inline:
            self.puback(mid)
        return FakeInfo(mid, mqtt.MQTT_ERR_SUCCESS, self)

    # ---- the broker's side, played by the test --------------------------------------------------
    def connack(self, reason: str = "Success") -> None:
        self.up = reason == "Success"
        self.on_connect(self, None, mqtt.ConnectFlags(session_present=False),
                        ReasonCode(PacketTypes.CONNACK, reason), None)

    def suback(self, mid: int | None = None, codes: list[str] | None = None) -> None:
        """The broker took the last (or `mid`'s) subscriptions: one reason code each ("Granted QoS 1"
        unless `codes` says otherwise, e.g. "Not authorized" for one its ACL refuses)."""
        self.on_subscribe(self, None, self.sub_mids[-1] if mid is None else mid,
                          [ReasonCode(PacketTypes.SUBACK, c) for c in (codes or ["Granted QoS 1"])], None)

    def drop(self) -> None:
        """The connection is lost (the broker went away)."""
        self.up = False
        self.on_disconnect(self, None, mqtt.DisconnectFlags(is_disconnect_packet_from_server=False),
                           ReasonCode(PacketTypes.DISCONNECT, "Unspecified error"), None)

    def puback(self, mid: int) -> None:
        with self.lock:
            self.acked.add(mid)
        self.on_publish(self, None, mid, ReasonCode(PacketTypes.PUBACK, "Success"), None)

    def unacked(self) -> list[Sent]:
        return [s for s in self.sent if s.mid not in self.acked]

    def payloads(self) -> list[bytes]:
        with self.lock:
            return [s.payload for s in self.sent]


def wait_until(cond, timeout: float = 5.0, what: str = "condition"):
    """Poll `cond` until it returns something truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.005)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
