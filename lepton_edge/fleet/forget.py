"""Forget a device: the operator retired a camera, and it must leave every view and Home Assistant.

Why the broker is cleared first and the store second: a device lives on in three places, the store,
its retained `status`/`meta` on the broker (which a monitor ingests again at its next start, so the
device would come back), and its retained Home Assistant discovery config. Clearing a retained
message is publishing an empty retained payload on its topic; Home Assistant deletes a device whose
config becomes empty. If the broker cannot be reached nothing is deleted, so a retry finds
everything where it was (never a device gone from the store but still announced).
"""
from __future__ import annotations

from lepton_edge.errors import BadInput
from lepton_edge.fleet.commands import connect
from lepton_edge.fleet.homeassistant import ha_id, legacy_id_to_clear
from lepton_edge.fleet.store.base import Store
from lepton_edge.telemetry.broker import redacted
from lepton_edge.telemetry.topics import Topics, safe_segment

PUBLISH_TIMEOUT_S = 10.0


def retained_topics(fleet: str, device: str, ha_prefix: str | None = "homeassistant") -> list[str]:
    """The retained topics that would bring the device back: its status and meta, its HA config."""
    t = Topics(fleet, device)
    out = [t.status, t.meta]
    if ha_prefix:
        out.append(f"{ha_prefix}/device/{ha_id(fleet, device)}/config")
        if (old := legacy_id_to_clear(fleet, device)) is not None:  # the id used before names with "_" were hashed
            out.append(f"{ha_prefix}/device/{old}/config")
    return out


def clear_retained(broker: str, topics: list[str], *, username=None, password=None, ca_file=None,
                   cert_file=None, key_file=None) -> None:
    """An empty retained message (QoS 1) on each topic, each acknowledged by the broker."""
    client, _ = connect(broker, username, password, ca_file, cert_file, key_file)
    client.loop_start()
    try:
        for topic in topics:
            info = client.publish(topic, b"", qos=1, retain=True)
            info.wait_for_publish(PUBLISH_TIMEOUT_S)
            if not info.is_published():
                raise BadInput(f"the broker {redacted(broker)} did not acknowledge clearing {topic} "
                               f"within {PUBLISH_TIMEOUT_S:g} s; nothing was deleted from the store")
    finally:
        client.loop_stop()
        client.disconnect()


def forget_device(store: Store, fleet: str, device: str, *, broker: str | None = None,
                  ha_prefix: str | None = "homeassistant", **tls) -> list[str]:
    """Clear the device's retained topics (with a broker), then delete it from the store.
    Returns the topics cleared."""
    safe_segment(fleet, "fleet")
    safe_segment(device, "device")
    topics = retained_topics(fleet, device, ha_prefix) if broker else []
    if broker:
        clear_retained(broker, topics, **tls)
    store.forget(fleet, device)
    return topics
