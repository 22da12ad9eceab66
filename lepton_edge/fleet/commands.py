"""Commands to devices, and their replies: what `lepton-edge deploy` and the web page's buttons
(ping, set, deploy) call.

Why validate here: the agent validates too, but a bad field from the page or the CLI should be a
4xx or one line with the field's name before anything goes on the wire. Every command is a model
of `telemetry.schema` and every topic comes from `telemetry.topics.Topics`, like the agent's. A
reply is matched by a fresh command id on the device's own reply topic, subscribed (SUBACK seen)
before the command is published, QoS 1 both ways; retained replies are old news and ignored.
"""
from __future__ import annotations

import threading
import time
import uuid

from pydantic import ValidationError

from lepton_edge.errors import BadInput
from lepton_edge.telemetry.broker import make_client, parse_broker, redacted
from lepton_edge.telemetry.schema import COMMANDS, MAX_COMMAND_BYTES, Reply
from lepton_edge.telemetry.topics import Topics, safe_segment

SUBACK_WAIT_S = 5.0  # at most this long for the broker to confirm the reply subscriptions
# a reply larger than this is ignored (as silence): a device answering a deploy with 10 MB of error text
# took 14.5 s to print and filled the operator's terminal with 83,340 lines
MAX_REPLY_BYTES = 64 * 1024


def connect(broker: str, username=None, password=None, ca_file=None, cert_file=None, key_file=None):
    """An operator's MQTT client, connected (its loop not started), and the broker's address.
    A broker that cannot be reached is one line (BadInput), not a traceback."""
    addr = parse_broker(broker)
    c = make_client(addr, f"lepton-operator-{uuid.uuid4().hex[:8]}", username=username, password=password,
                    ca_file=ca_file, cert_file=cert_file, key_file=key_file)
    try:
        c.connect(addr.host, addr.port, keepalive=30)
    except (OSError, ValueError) as e:
        raise BadInput(f"cannot reach the broker {redacted(broker)}: {e}") from None
    return c, addr


def make_command(verb: str, fields: dict | None = None):
    """The command model for `verb` with a fresh id, or BadInput naming the field that is wrong."""
    if verb not in COMMANDS:
        raise BadInput(f"unknown command {verb!r}: one of {', '.join(sorted(COMMANDS))}")
    try:
        cmd = COMMANDS[verb].model_validate({**(fields or {}), "id": uuid.uuid4().hex[:12]})
    except ValidationError as e:
        err = e.errors()[0]
        raise BadInput(f"{verb}: {'.'.join(map(str, err['loc'])) or 'payload'}: {err['msg']}") from None
    if len(_body(cmd)) > MAX_COMMAND_BYTES:
        raise BadInput(f"{verb}: command larger than {MAX_COMMAND_BYTES} bytes")
    return cmd


def _body(cmd) -> bytes:
    return cmd.model_dump_json(exclude_none=True).encode()


def ask(client, fleet: str, verb: str, orders: dict, timeout: float) -> dict[str, Reply]:
    """Send each device of `orders` (device -> command model) its command and wait, up to `timeout`
    seconds, for the replies carrying each command's id. Devices that stay silent are absent from
    the result. The client's network loop must be running (loop_start)."""
    topics = {d: Topics(fleet, d) for d in orders}
    replies: dict[str, Reply] = {}  # written by paho's thread, read here under the lock
    lock, all_in, subscribed = threading.Lock(), threading.Event(), threading.Event()

    def on_message(c, u, msg):
        parsed = Topics.parse(msg.topic)
        if msg.retain or parsed is None or parsed[1] not in orders or len(msg.payload) > MAX_REPLY_BYTES:
            return
        try:
            r = Reply.model_validate_json(msg.payload)
        except ValidationError:
            return
        if r.id == orders[parsed[1]].id:
            with lock:
                replies[parsed[1]] = r
                if len(replies) == len(orders):
                    all_in.set()

    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    deadline = time.monotonic() + timeout
    client.subscribe([(t.reply(verb), 1) for t in topics.values()])
    subscribed.wait(min(timeout, SUBACK_WAIT_S))
    for d, cmd in orders.items():
        client.publish(topics[d].cmd(verb), _body(cmd), qos=1)
    all_in.wait(max(0.0, deadline - time.monotonic()))
    with lock:
        return dict(replies)


def outcome(reply: Reply | None, timeout: float) -> dict:
    """A reply as the CLI and the web page show it: {"ok", "error", "data"}; silence is a failure."""
    if reply is None:
        return {"ok": False, "error": f"no reply within {timeout:g} s", "data": {}}
    return {"ok": reply.ok, "error": reply.error, "data": reply.data}


def send_command(broker: str, fleet: str, device: str, verb: str, payload: dict | None = None,
                 timeout: float = 10.0, *, username=None, password=None, ca_file=None, cert_file=None,
                 key_file=None) -> dict:
    """-> {"ok", "error", "data", "id"}; ok False with "no reply within N s" when the device is silent."""
    safe_segment(fleet, "fleet")
    safe_segment(device, "device")
    cmd = make_command(verb, payload)
    if not 0 < timeout <= 600:
        raise BadInput("timeout must be in (0, 600] seconds")
    client, _ = connect(broker, username, password, ca_file, cert_file, key_file)
    client.loop_start()
    try:
        replies = ask(client, fleet, verb, {device: cmd}, timeout)
    finally:
        client.loop_stop()
        client.disconnect()
    return {"id": cmd.id, **outcome(replies.get(device), timeout)}
