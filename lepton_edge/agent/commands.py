"""Commands on `.../cmd/<verb>`: size, JSON and field checks before anything runs.

Why a module of its own: a malformed command must cost the agent nothing but an error reply and
an event; keeping parsing apart from execution makes that easy to see and to test. parse() turns
every failure of decoding into CommandError, whatever its type: 60 KB of `[` makes json.loads raise
RecursionError, and an exception that escapes here would end the thread that answers commands.
"""
from __future__ import annotations

import json

from pydantic import ValidationError

from lepton_edge.telemetry.schema import COMMANDS, MAX_COMMAND_BYTES, MAX_COMMAND_DEPTH


class CommandError(Exception):
    def __init__(self, message: str, command_id: str | None = None):
        super().__init__(message)
        self.command_id = command_id


def nesting(text: str) -> int:
    """Deepest nesting of arrays/objects in JSON text, brackets inside strings not counted.
    Cheap (one pass, no recursion), so it runs before json.loads gets a chance to recurse."""
    depth = deepest = 0
    in_str = escaped = False
    for ch in text:
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def parse(verb: str, payload: bytes):
    """The validated command model, or CommandError saying what is wrong (never anything else)."""
    if len(payload) > MAX_COMMAND_BYTES:
        raise CommandError(f"payload of {len(payload)} bytes exceeds {MAX_COMMAND_BYTES}")
    if verb not in COMMANDS:
        raise CommandError(f"unknown verb {verb[:64]!r}; known: {', '.join(COMMANDS)}")
    try:
        text = bytes(payload).decode("utf-8")
        if text.count("[") + text.count("{") > MAX_COMMAND_DEPTH and nesting(text) > MAX_COMMAND_DEPTH:
            raise CommandError(f"payload nests deeper than {MAX_COMMAND_DEPTH} levels")
        data = json.loads(text) if text.strip() else {}
    except CommandError:
        raise
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise CommandError(f"payload is not JSON ({str(e)[:200]})") from None
    except Exception as e:  # RecursionError, MemoryError-like, anything: one error reply, never the thread
        raise CommandError(f"payload is not usable JSON ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise CommandError("payload must be a JSON object")
    cid = data.get("id") if isinstance(data.get("id"), str) and len(data["id"]) <= 128 else None
    try:
        return COMMANDS[verb].model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "payload"
        raise CommandError(f"field '{field}': {err['msg']}", cid) from None
    except Exception as e:
        raise CommandError(f"payload is not a valid {verb} command ({type(e).__name__})", cid) from None
