"""Commands on `.../cmd/<verb>`: size, JSON and field checks before anything runs.

Why a module of its own: a malformed command must cost the agent nothing but an error reply and
an event; keeping parsing apart from execution makes that easy to see and to test.
"""
from __future__ import annotations

import json

from pydantic import ValidationError

from lepton_edge.telemetry.schema import COMMANDS, MAX_COMMAND_BYTES


class CommandError(Exception):
    def __init__(self, message: str, command_id: str | None = None):
        super().__init__(message)
        self.command_id = command_id


def parse(verb: str, payload: bytes):
    """The validated command model, or CommandError saying what is wrong."""
    if len(payload) > MAX_COMMAND_BYTES:
        raise CommandError(f"payload of {len(payload)} bytes exceeds {MAX_COMMAND_BYTES}")
    if verb not in COMMANDS:
        raise CommandError(f"unknown verb {verb!r}; known: {', '.join(COMMANDS)}")
    try:
        data = json.loads(payload.decode("utf-8")) if payload.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CommandError(f"payload is not JSON ({e})") from None
    if not isinstance(data, dict):
        raise CommandError("payload must be a JSON object")
    cid = data.get("id") if isinstance(data.get("id"), str) else None
    try:
        return COMMANDS[verb].model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "payload"
        raise CommandError(f"field '{field}': {err['msg']}", cid) from None
