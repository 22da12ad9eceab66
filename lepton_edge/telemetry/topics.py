"""The topic tree: one subtree per device, so broker ACLs can confine a device to its own.

    lepton/v1/<fleet>/<device>/{status,meta,telemetry,events}
    lepton/v1/<fleet>/<device>/cmd/<verb>          (and .../cmd/<verb>/reply)
    lepton/v1/_monitor/alerts                      (the fleet monitor's alert changes)

Why one class builds every topic: the agent, the simulator, the monitor and the operator's
commands must agree on the tree to the character, and third parties read it from here and from
docs/schemas/ (each schema names its topic). A subscription pattern is a Topics with wildcard
segments: `Topics(fleet, "+").status` is every device's status in a fleet.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from lepton_edge.errors import BadInput

PREFIX = "lepton/v1"
# The monitor's own subtree: `_monitor` can never be a fleet (segments start with a letter or a
# digit), so the devices' subtrees stay theirs and an ACL can give the monitor this one alone.
MONITOR_ALERTS = f"{PREFIX}/_monitor/alerts"
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def is_segment(value: object) -> bool:
    """Whether `value` is a safe topic segment (as safe_segment requires), without raising."""
    return isinstance(value, str) and _SEGMENT.fullmatch(value) is not None


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
        """A command to this device ('+' subscribes to all; '+' cannot be published to, so a
        fleet-wide command goes to each device the operator found, see fleet.deploy)."""
        return f"{self.base}/cmd/{verb}"

    def reply(self, verb: str) -> str:
        return f"{self.base}/cmd/{verb}/reply"

    @staticmethod
    def parse(topic: str) -> tuple[str, str, str] | None:
        """(fleet, device, rest) of a topic in the tree, or None."""
        parts = topic.split("/")
        if len(parts) < 5 or "/".join(parts[:2]) != PREFIX:
            return None
        return parts[2], parts[3], "/".join(parts[4:])
