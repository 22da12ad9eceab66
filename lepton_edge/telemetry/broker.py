"""Broker URLs (mqtt://, mqtts://, ws://, wss://, user:password@host:port/path) and a paho client
set up for one: transport, WebSocket path, credentials, TLS.

Why one place: the device's publisher and the operator's `deploy` both connect to brokers, and
they must accept the same URLs and TLS files the same way.
"""
from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlparse

from lepton_edge.errors import BadInput

Transport = Literal["tcp", "websockets"]  # paho's names
SCHEMES: dict[str, tuple[int, bool, Transport]] = {
    "mqtt": (1883, False, "tcp"), "mqtts": (8883, True, "tcp"), "ws": (80, False, "websockets"),
    "wss": (443, True, "websockets")}


@dataclass
class BrokerAddress:
    host: str
    port: int
    tls: bool
    transport: Transport
    path: str
    username: str | None
    password: str | None


def parse_broker(url: str) -> BrokerAddress:
    try:
        u = urlparse(url if "://" in url else f"mqtt://{url}")
    except ValueError:  # "mqtt://[bad": an unclosed IPv6 bracket
        raise BadInput(f"broker URL {url!r} is not a URL") from None
    if u.scheme not in SCHEMES:
        raise BadInput(f"broker URL {url!r}: scheme must be one of {', '.join(s + '://' for s in SCHEMES)}")
    port, tls, transport = SCHEMES[u.scheme]
    if not u.hostname:
        raise BadInput(f"broker URL {url!r} has no host")
    try:
        port = u.port or port
    except ValueError:
        raise BadInput(f"broker URL {url!r} has a bad port") from None
    return BrokerAddress(u.hostname, port, tls, transport, u.path or "/mqtt",
                         unquote(u.username) if u.username else None, unquote(u.password) if u.password else None)


def make_client(addr: BrokerAddress, client_id: str, *, clean_session: bool = True, username: str | None = None,
                password: str | None = None, ca_file: str | None = None, cert_file: str | None = None,
                key_file: str | None = None, mqtt5: bool = False):
    """A paho-mqtt 2.x client (VERSION2 callbacks; MQTT 3.1.1, or 5 with `mqtt5`) for this broker, not
    yet connected. Flags win over credentials in the URL; a TLS file that cannot be read is bad input.
    An MQTT 5 client's session is chosen at connect time (`connect_properties`), not here."""
    import paho.mqtt.client as mqtt

    if mqtt5:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, transport=addr.transport,
                        protocol=mqtt.MQTTv5)
    else:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session,
                        transport=addr.transport, protocol=mqtt.MQTTv311)
    if addr.transport == "websockets":
        c.ws_set_options(path=addr.path)
    user, pw = username or addr.username, password or addr.password
    if user:
        c.username_pw_set(user, pw)
    if addr.tls or ca_file:
        try:
            c.tls_set(ca_certs=ca_file, certfile=cert_file, keyfile=key_file, cert_reqs=ssl.CERT_REQUIRED)
        except (OSError, ssl.SSLError, ValueError) as e:
            raise BadInput(f"TLS files: {e}") from None
    return c


def connect_properties(max_packet_bytes: int, session_expiry_s: int = 7 * 86400):
    """MQTT 5 CONNECT properties for a device: the session outlives a disconnect (commands and
    unacknowledged messages wait for it, as clean_session=False does in 3.1.1), and the broker is told
    the largest packet this client accepts, so it discards a bigger one instead of sending it: a flood
    of huge command payloads then costs the device nothing, not even the reading (MQTT 5, 3.1.2.11.4)."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry_s
    props.MaximumPacketSize = max_packet_bytes
    return props
