"""Broker URLs (mqtt://, mqtts://, ws://, wss://, user:password@host:port/path) and a paho client
set up for one: transport, WebSocket path, credentials, TLS.

Why one place: the device's publisher and the operator's `deploy` both connect to brokers, and
they must accept the same URLs and TLS files the same way.
"""
from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlparse

from lepton_edge.errors import BadInput

Transport = Literal["tcp", "websockets"]  # paho's names
MAX_CREDENTIAL_BYTES = 65535  # MQTT's two-byte length: paho's thread died packing a longer one, the client offline
MAX_CA_BYTES = 1 << 20  # a CA bundle (Debian's whole ca-certificates.crt is ~220 KB)
MAX_PEM_BYTES = 64 * 1024  # a client certificate or key
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
        raise BadInput(f"broker URL {redacted(url)!r} is not a URL") from None
    if u.scheme not in SCHEMES:
        raise BadInput(f"broker URL {redacted(url)!r}: scheme must be one of {', '.join(s + '://' for s in SCHEMES)}")
    port, tls, transport = SCHEMES[u.scheme]
    if not u.hostname:
        raise BadInput(f"broker URL {redacted(url)!r} has no host")
    if any(c.isspace() or not c.isprintable() for c in u.hostname):  # ("\0h" ran, never connecting, silent)
        raise BadInput(f"broker URL {redacted(url)!r}: the host holds a space or a control character")
    try:
        given = u.port
    except ValueError:
        raise BadInput(f"broker URL {redacted(url)!r} has a bad port") from None
    if given == 0:  # (`u.port or default` read :0 as no port: the agent went to 1883 instead, without a word)
        raise BadInput(f"broker URL {redacted(url)!r} has a bad port")
    port = given or port
    user, pw = unquote(u.username) if u.username else None, unquote(u.password) if u.password else None
    _check_credentials(user, pw, "broker URL")
    return BrokerAddress(u.hostname, port, tls, transport, u.path or "/mqtt", user, pw)


def redacted(url: str) -> str:
    """The URL without its password, for logs and messages: `mqtt://user:***@host:1883`. Why: the agent
    logged its broker URL at every start, and a password in it went to the journal, which more users
    read (the `adm` group) than the 0640 agent.toml it came from."""
    try:
        u = urlparse(url if "://" in url else f"mqtt://{url}")
    except ValueError:
        return url if "@" not in url else "<a broker URL with credentials>"
    if u.password is None:
        return url
    host = u.netloc.rpartition("@")[2]
    return u._replace(netloc=f"{u.username}:***@{host}").geturl()


def _check_credentials(user: str | None, pw: str | None, where: str) -> None:
    """MQTT's limits on the CONNECT's credentials, before paho packs them. Why: a user name with U+0000 (which
    MQTT forbids in a string) was refused by the broker at each connect, and the agent reconnected forever
    without a word; one that is not UTF-8 (`--username $'\\xff'` arrives as a lone surrogate) was paho's
    UnicodeEncodeError traceback. A password is binary data in MQTT: NUL is allowed there."""
    for what, v in (("user name", user), ("password", pw)):
        if v is None:
            continue
        try:
            n = len(v.encode("utf-8"))
        except UnicodeEncodeError:
            raise BadInput(f"{where}: the broker {what} is not valid UTF-8") from None
        if n > MAX_CREDENTIAL_BYTES:
            raise BadInput(f"{where}: the broker {what} is over MQTT's {MAX_CREDENTIAL_BYTES} bytes")
    if user is not None and "\0" in user:
        raise BadInput(f"{where}: the broker user name holds U+0000, which MQTT forbids in a string")


def _check_tls_files(ca_file: str | None, cert_file: str | None, key_file: str | None) -> None:
    """Each TLS file a regular file of a PEM's size, before OpenSSL opens it: a FIFO held the agent's
    start until a signal came, and /dev/zero as a certificate read on."""
    from lepton_edge.paths import read_small

    for what, path, cap in (("ca_file", ca_file, MAX_CA_BYTES), ("cert_file", cert_file, MAX_PEM_BYTES),
                            ("key_file", key_file, MAX_PEM_BYTES)):
        if path is not None:
            read_small(path, cap, f"TLS {what}")


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
    _check_credentials(user, pw, "broker credentials")
    if user:
        c.username_pw_set(user, pw)
    if (cert_file or key_file) and not (addr.tls or ca_file):  # said, not refused: such a config ran before
        logging.getLogger(__name__).warning(
            "cert_file/key_file are set but the broker URL has no TLS (mqtt:// or ws://), so they are not used: "
            "use mqtts:// or wss://, or set ca_file")
    if addr.tls or ca_file:
        _check_tls_files(ca_file, cert_file, key_file)
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
