"""Publisher details tests/unit/test_publisher.py leaves open: how far apart reconnects may grow,
that flush() returns as soon as the outbox is empty (an agent's stop waits on it), what the device
keeps when the broker drops it or a callback fails, and that a PUBACK for an unknown message is
forgotten after its 5 s grace. Against the fake client (the broker is not the point)."""
from __future__ import annotations

import time

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from lepton_edge.telemetry import publisher as publisher_mod
from lepton_edge.telemetry.outbox import Outbox
from lepton_edge.telemetry.publisher import Publisher

from .fake_mqtt import FakeClient, wait_until

TOPIC = "lepton/v1/f/d/telemetry"


class _Recording(FakeClient):
    def reconnect_delay_set(self, min_delay=1, max_delay=120):
        self.delays = (min_delay, max_delay)


@pytest.fixture
def make(monkeypatch, tmp_path):
    made: list[tuple[Publisher, _Recording]] = []

    def make_client(addr, client_id, **kw):
        return _Recording()

    monkeypatch.setattr(publisher_mod, "make_client", make_client)

    def _make(**kw):
        errors: list[str] = []
        pub = Publisher("mqtt://broker.invalid", "dev1", Outbox(tmp_path / f"o{len(made)}.sqlite"),
                        on_error=errors.append, **kw)
        pub.start()
        made.append((pub, pub.client))
        return pub, pub.client, errors

    yield _make
    for pub, _ in made:
        pub.stop()
        pub.outbox.close()


@pytest.mark.parametrize("jitter, max_backoff, delays", [(0.8, 10.0, (1, 8)), (1.2, 10.0, (1, 12)),
                                                          (1.2, 60.0, (1, 72)), (1.0, 1.0, (1, 2))])
def test_reconnect_delay_is_the_configured_backoff_times_the_device_jitter(make, monkeypatch, jitter, max_backoff,
                                                                          delays):
    monkeypatch.setattr(publisher_mod.random, "uniform", lambda a, b: jitter)
    _, c, _ = make(max_backoff=max_backoff)
    assert c.delays == delays


def test_flush_returns_as_soon_as_the_outbox_is_empty(make):
    pub, c, _ = make()
    c.ack_inline = True
    c.connack()
    pub.outbox.put(TOPIC, b"w")
    t = time.monotonic()
    assert pub.flush(5.0)
    assert time.monotonic() - t < 0.9 and len(pub.outbox) == 0


def test_a_failed_disconnect_is_kept_as_the_last_error_and_a_clean_one_is_not(make):
    pub, c, errors = make()
    c.connack()
    pub._handle_disconnect(c, None, None, ReasonCode(PacketTypes.DISCONNECT, "Normal disconnection"))
    assert pub.last_error is None and not pub.connected.is_set() and errors == []
    c.connack()
    c.drop()
    assert pub.last_error == "connection lost: Unspecified error" and not pub.connected.is_set()
    assert errors == ["connection lost: Unspecified error"]  # told (the agent rate-limits the lines)


def test_a_broker_that_refuses_the_connection_is_reported_not_silent(make):
    """A wrong password or an ACL: CONNACK "Not authorized" again and again, and the device logged nothing,
    looking like a healthy one with nothing to send while its windows piled up in the outbox."""
    pub, c, errors = make()
    pub.outbox.put(TOPIC, b"w")
    c.connack("Not authorized")
    assert errors == ["the broker refused the connection: Not authorized"] and not pub.connected.is_set()
    assert len(pub.outbox) == 1 and c.sent == []


def test_rows_in_another_store_are_sent_from_the_first_again(make, tmp_path):
    """The outbox moved (to memory and back, to a fresh file): ids the publisher had sent up to refer to the old
    store. It kept its cursor, so the file's backlog (ids below it) waited for the next reconnect: days."""
    pub, c, _ = make()
    c.connack()
    for i in range(3):
        pub.outbox.put(TOPIC, f"w{i}".encode())
    pub.wake()  # (as Agent.send does after a put: else the sender sleeps its 5 s safety net)
    assert wait_until(lambda: len(c.sent) == 3)
    with pub.outbox._lock:  # what _to_memory/_retry_file/_recover do: another store, a new generation
        pub.outbox.generation += 1
    pub.wake()
    assert wait_until(lambda: len(c.sent) == 6), c.sent  # the same rows again (at-least-once)
    assert [m.payload for m in c.sent[3:]] == [b"w0", b"w1", b"w2"]


def test_a_failing_on_connect_callback_is_reported_by_name_and_the_rows_still_go(make):
    def boom(_pub):
        raise RuntimeError("status failed")

    pub, c, errors = make(on_connect=boom)
    pub.outbox.put(TOPIC, b"w")
    c.connack()
    assert errors == ["on_connect: RuntimeError: status failed"]
    wait_until(lambda: c.payloads() == [b"w"], what="the row sent after the failed callback")


def test_an_early_puback_is_forgotten_after_its_grace(make):
    pub, c, _ = make()
    c.connack()
    now = time.monotonic()
    with pub._mlock:
        pub._early.update({901: now - 5.5, 902: now - 1.0})  # PUBACKs of mids no publish() returned
    pub.outbox.put(TOPIC, b"w")  # the sender runs its pass
    pub.wake()
    wait_until(lambda: c.payloads() == [b"w"], what="a send pass")
    wait_until(lambda: 901 not in pub._early, what="the stale early PUBACK dropped")
    assert 902 in pub._early
