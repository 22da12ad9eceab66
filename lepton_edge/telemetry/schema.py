"""Versioned payloads (JSON): what the agent sends and the commands it accepts.

Why pydantic models on both sides: a monitor written later, a stock MQTT tool or a third-party
dashboard reads these; the version field `v` lets the schema grow without breaking them, and
commands are validated field by field so a malformed one gets a precise error reply.
"""
from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

V = 1
MAX_COMMAND_BYTES = 64 * 1024
MAX_COMMAND_DEPTH = 16  # JSON nesting a command may have: ours are flat; deep nesting only costs recursion


def now() -> float:
    return round(time.time(), 3)


class Status(BaseModel):
    v: int = V
    online: bool
    boot_id: str
    ts: float = Field(default_factory=now)
    version: str | None = None


class StageLatency(BaseModel):
    p50: float
    p95: float
    p99: float
    max: float


class Telemetry(BaseModel):
    """One window: never one message per frame."""

    v: int = V
    ts: float = Field(default_factory=now)
    boot_id: str
    seq: int  # per boot: a gap is loss, a repeat a duplicate
    window_s: float
    frames: int
    fps: float | None
    dropped: int = 0  # frames the live source dropped (newest-frame policy) in this window
    corrupt: int = 0
    latency_ms: dict[str, StageLatency] = Field(default_factory=dict)
    cpu_percent: float | None = None  # this process, % of one core
    system_cpu_percent: float | None = None
    rss_bytes: int | None = None
    temperature_c: float | None = None
    throttled: str | None = None  # Raspberry Pi `vcgencmd get_throttled` flags
    bundle: dict[str, Any] = Field(default_factory=dict)
    outbox_dropped: int = 0  # windows the bounded outbox had to discard since the last window
    source: dict[str, Any] = Field(default_factory=dict)


class Event(BaseModel):
    v: int = V
    ts: float = Field(default_factory=now)
    boot_id: str
    kind: str  # deploy, rollback, error, command_error, throttled, started, stopped
    level: Literal["info", "warning", "error"] = "info"
    message: str
    data: dict[str, Any] = Field(default_factory=dict)


class Reply(BaseModel):
    v: int = V
    ts: float = Field(default_factory=now)
    id: str | None = None
    ok: bool
    error: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str | None = Field(default=None, max_length=128)


class PingCommand(_Command):
    pass


class SetCommand(_Command):
    # strict: `true` is not 1 thread and `"no"` is not false; a command that means something else is refused
    window_s: float | None = Field(default=None, ge=0.1, le=3600, strict=True)
    sample_every: int | None = Field(default=None, ge=1, le=1000, strict=True)  # run the model on every Nth frame
    threads: int | None = Field(default=None, ge=1, le=64, strict=True)
    telemetry: bool | None = Field(default=None, strict=True)  # pause (false) or resume telemetry windows


class DeployCommand(_Command):
    url: str | None = Field(default=None, max_length=2048)  # http(s):// to a .tar.gz bundle
    path: str | None = Field(default=None, max_length=4096)  # a bundle directory or .tar.gz on the device
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")  # of the downloaded archive
    health_frames: int | None = Field(default=None, ge=1, le=10000, strict=True)

    @model_validator(mode="after")
    def _one_source(self):
        if bool(self.url) == bool(self.path):
            raise ValueError("deploy needs exactly one of 'url' or 'path'")
        return self


COMMANDS: dict[str, type[_Command]] = {"ping": PingCommand, "set": SetCommand, "deploy": DeployCommand}
