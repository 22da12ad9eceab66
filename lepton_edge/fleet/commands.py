"""One command to one device, and its reply: what the web page's buttons (ping, set, deploy) call.

Why validate here: the agent validates too, but a bad field from the page should be a 4xx with
the field's name before anything goes on the wire. The reply is matched by a fresh command id on
the device's own reply topic, subscribed before the command is published (QoS 1 both ways).
"""
from __future__ import annotations

import json
import threading
import time
import uuid

from pydantic import ValidationError

from lepton_edge.errors import BadInput
from lepton_edge.fleet.deploy import _client
from lepton_edge.telemetry.schema import COMMANDS, MAX_COMMAND_BYTES
from lepton_edge.telemetry.topics import Topics, safe_segment


def send_command(broker: str, fleet: str, device: str, verb: str, payload: dict | None = None,
                 timeout: float = 10.0, *, username=None, password=None, ca_file=None, cert_file=None,
                 key_file=None) -> dict:
    """-> {"ok", "error", "data", "id"}; ok False with "no reply within N s" when the device is silent."""
    safe_segment(fleet, "fleet")
    safe_segment(device, "device")
    if verb not in COMMANDS:
        raise BadInput(f"unknown command {verb!r}: one of {', '.join(sorted(COMMANDS))}")
    if not 0 < timeout <= 600:
        raise BadInput("timeout must be in (0, 600] seconds")
    cid = uuid.uuid4().hex[:12]
    try:
        cmd = COMMANDS[verb].model_validate({**(payload or {}), "id": cid})
    except ValidationError as e:
        err = e.errors()[0]
        raise BadInput(f"{verb}: {'.'.join(map(str, err['loc'])) or 'payload'}: {err['msg']}") from None
    body = cmd.model_dump_json(exclude_none=True).encode()
    if len(body) > MAX_COMMAND_BYTES:
        raise BadInput(f"{verb}: command larger than {MAX_COMMAND_BYTES} bytes")
    topics = Topics(fleet, device)
    got = threading.Event()
    reply: dict = {}
    subscribed = threading.Event()

    def on_message(c, u, msg):
        try:
            r = json.loads(msg.payload)
        except ValueError:
            return
        if isinstance(r, dict) and r.get("id") == cid and not msg.retain:
            reply.update(r)
            got.set()

    client, _ = _client(broker, username, password, ca_file, cert_file, key_file)
    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    client.loop_start()
    try:
        client.subscribe(topics.reply(verb), qos=1)
        subscribed.wait(min(timeout, 5.0))
        client.publish(topics.cmd(verb), body, qos=1)
        deadline = time.monotonic() + timeout
        if not got.wait(max(0.0, deadline - time.monotonic())):
            return {"id": cid, "ok": False, "error": f"no reply within {timeout:g} s", "data": {}}
        return {"id": cid, "ok": bool(reply.get("ok")), "error": reply.get("error"), "data": reply.get("data") or {}}
    finally:
        client.loop_stop()
        client.disconnect()
