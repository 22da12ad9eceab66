"""The topic tree: one subtree per device, so broker ACLs can confine a device to its own.

    lepton/v1/<fleet>/<device>/{status,meta,telemetry,events}
    lepton/v1/<fleet>/<device>/cmd/<verb>          (and .../cmd/<verb>/reply)
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from lepton_edge.errors import BadInput

PREFIX = "lepton/v1"
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def safe_segment(value: str, what: str) -> str:
    """A topic segment: letters, digits, '_', '-', '.'; no '/', '+', '#', spaces; at most 64 chars."""
    if not _SEGMENT.fullmatch(value or ""):
        raise BadInput(f"{what} {value!r} is not a safe MQTT topic segment (letters, digits, '_', '-', '.', "
                       "starting with a letter or digit, at most 64 characters)")
    return value


def sanitize(value: str) -> str:
    """Turn a hostname or machine id into a safe segment (for defaults, not for user input)."""
    s = re.sub(r"[^A-Za-z0-9_.-]+", "-", value).strip("-._")[:64]
    return s or "device"


@dataclass(frozen=True)
class Topics:
    fleet: str
    device: str

    @property
    def base(self) -> str:
        return f"{PREFIX}/{self.fleet}/{self.device}"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def meta(self) -> str:
        return f"{self.base}/meta"

    @property
    def telemetry(self) -> str:
        return f"{self.base}/telemetry"

    @property
    def events(self) -> str:
        return f"{self.base}/events"

    def cmd(self, verb: str = "+") -> str:
        return f"{self.base}/cmd/{verb}"

    def reply(self, verb: str) -> str:
        return f"{self.base}/cmd/{verb}/reply"

    @staticmethod
    def fleet_cmd(fleet: str, device: str | None, verb: str) -> str:
        """Operator side: a command to one device, or to every device of a fleet ('+' cannot be
        published to, so fleet-wide commands go to each device the caller knows; see deploy)."""
        return f"{PREFIX}/{fleet}/{device}/cmd/{verb}"

    @staticmethod
    def parse(topic: str) -> tuple[str, str, str] | None:
        """(fleet, device, rest) of a topic in the tree, or None."""
        parts = topic.split("/")
        if len(parts) < 5 or "/".join(parts[:2]) != PREFIX:
            return None
        return parts[2], parts[3], "/".join(parts[4:])
