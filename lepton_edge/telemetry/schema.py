"""Versioned payloads (JSON): what the agent sends and the commands it accepts.

Why pydantic models on both sides: a monitor written later, a stock MQTT tool or a third-party
dashboard reads these; the version field `v` lets the schema grow without breaking them, and
commands are validated field by field so a malformed one gets a precise error reply.

This module is the one definition of the wire format: every payload the agent, the simulator
and the operator side put on the broker is one of these models (topics come from `topics.Topics`).
`PAYLOADS` lists them; `python -m lepton_edge.telemetry.schema_export` writes each one's JSON
Schema to docs/schemas/ for third-party consumers, and a test keeps those files equal to the models.
"""
from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

V = 1
MAX_COMMAND_BYTES = 64 * 1024
MAX_COMMAND_DEPTH = 16  # JSON nesting a command may have: ours are flat; deep nesting only costs recursion


# Strings a device sends, bounded: a 60 KB boot_id cost 160 KB of store per window (the key and the boots table),
# and a 60 KB version a 60 KB label on every /metrics scrape. The agent's own are far inside these.
BootId = Annotated[str, Field(min_length=1, max_length=64)]
MAX_EVENT_MESSAGE = 4096


def now() -> float:
    return round(time.time(), 3)


class Status(BaseModel):
    """Retained on `.../status`: online at connect; the Last Will (and a graceful stop) says online false."""

    v: int = V
    online: bool
    boot_id: BootId
    ts: float = Field(default_factory=now)
    version: str | None = Field(default=None, max_length=64)


MAX_LATENCY_MS = 1e12  # a stage's time in a window (31 years): bounded, so sums over a fleet's history stay finite


class StageLatency(BaseModel):
    """A stage's latency in one window, in ms. Bounded: two windows of 1.7e308 ms summed to Infinity in the
    store's minute rows, which `fleet history --json` printed as invalid JSON and the dashboard lost."""
    p50: float = Field(ge=0, le=MAX_LATENCY_MS)
    p95: float = Field(ge=0, le=MAX_LATENCY_MS)
    p99: float = Field(ge=0, le=MAX_LATENCY_MS)
    max: float = Field(ge=0, le=MAX_LATENCY_MS)


MAX_RATE = 1e6  # frames per second or CPU percent a window may report (a sum over a fleet stays finite)


class Telemetry(BaseModel):
    """One window: never one message per frame."""

    v: int = V
    ts: float = Field(default_factory=now)
    boot_id: BootId
    # counters bounded (2^53: exact in a double, summed in BIGINT columns without overflow): a seq of
    # 2^63-1 beside 0 made every device listing of a PostgreSQL store fail on `bigint out of range`
    seq: int = Field(ge=0, le=2**53)  # per boot: a gap is loss, a repeat a duplicate
    window_s: float
    frames: int = Field(ge=0, le=2**40)
    # bounded, far above any device: two devices' fps 1e308 made the fleet summary's SUM infinite (Infinity in
    # /api/summary and `fleet ls --json`, not JSON) or a PostgreSQL overflow error for every summary reader
    fps: float | None = Field(ge=0, le=MAX_RATE)
    dropped: int = Field(default=0, ge=0, le=2**40)  # frames the live source dropped (newest-frame policy)
    corrupt: int = Field(default=0, ge=0, le=2**40)
    latency_ms: dict[Annotated[str, Field(max_length=32)], StageLatency] = Field(default_factory=dict, max_length=16)
    cpu_percent: float | None = Field(default=None, ge=0, le=MAX_RATE)  # this process, % of one core
    system_cpu_percent: float | None = Field(default=None, ge=0, le=MAX_RATE)
    rss_bytes: int | None = Field(default=None, ge=0, le=2**50)
    temperature_c: float | None = Field(default=None, ge=-273.15, le=1000)
    throttled: str | None = Field(default=None, max_length=32)  # Raspberry Pi `vcgencmd get_throttled` flags
    bundle: dict[str, Any] = Field(default_factory=dict)
    outbox_dropped: int = Field(default=0, ge=0, le=2**40)  # windows the bounded outbox discarded since the last
    source: dict[str, Any] = Field(default_factory=dict)


class BundleInfo(BaseModel):
    """The bundle a device runs, as its retained `meta` describes it (None where the model is a bare file)."""

    name: str | None = None
    version: str | None = None
    format: str | None = None
    precision: str | None = None
    target: str | None = None  # the target profile id the bundle was exported for
    sha256: str | None = None  # of the model file
    backend: str | None = None  # onnxruntime, litert, ...
    threads: int | None = None
    path: str | None = None
    latency_budget_ms: float | None = None  # the target's budget, where the sender knows it (the monitor's default)


class Hardware(BaseModel):
    """What the device is (from `platform`): the monitor shows it, an operator filters by it."""

    machine: str  # platform.machine(): aarch64, x86_64
    system: str
    python: str
    node: str
    simulated: bool = False  # a `lepton-edge simulate` device, not a real one


class Meta(BaseModel):
    """Retained on `.../meta`: what the device runs and on what; republished after every deploy or change."""

    v: int = V
    ts: float = Field(default_factory=now)
    boot_id: BootId
    software: str  # lepton-edge version
    bundle: BundleInfo
    source: str  # the frame source's spec (a camera URL, a device, a file)
    window_s: float
    telemetry: bool  # false while telemetry windows are paused (`set telemetry=false`)
    hardware: Hardware


class Event(BaseModel):
    """On `.../events`: something happened once (a deploy, a rollback, an error, a reconnect)."""

    v: int = V
    ts: float = Field(default_factory=now)
    boot_id: BootId
    # deploy, rollback, error, command_error, throttled, started, stopped; from the source:
    # source_state (reconnecting, failed), source_reconnected, frames_dropped (see capture.StatusUpdate)
    kind: str = Field(max_length=64)
    level: Literal["info", "warning", "error"] = "info"
    message: str = Field(max_length=MAX_EVENT_MESSAGE)
    data: dict[str, Any] = Field(default_factory=dict)


class Reply(BaseModel):
    """On `.../cmd/<verb>/reply`: the answer to the command whose `id` it carries."""

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
    """On `.../cmd/ping`: the reply's data says what the device runs and how it is doing."""


class SetCommand(_Command):
    """On `.../cmd/set`: change a running setting; only the fields given change."""

    # strict: `true` is not 1 thread and `"no"` is not false; a command that means something else is refused
    window_s: float | None = Field(default=None, ge=0.1, le=3600, strict=True, allow_inf_nan=False)
    sample_every: int | None = Field(default=None, ge=1, le=1000, strict=True)  # run the model on every Nth frame
    threads: int | None = Field(default=None, ge=1, le=64, strict=True)
    telemetry: bool | None = Field(default=None, strict=True)  # pause (false) or resume telemetry windows


class DeployCommand(_Command):
    """On `.../cmd/deploy`: switch to another bundle (verified, health-checked, rolled back on failure)."""

    # the JSON Schema says what _one_source checks, so a third party's validator agrees with the agent
    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": [k], "properties": {k: {"type": "string", "minLength": 1}}} for k in ("url", "path")]})
    url: str | None = Field(default=None, max_length=2048)  # http(s):// to a .tar.gz bundle
    path: str | None = Field(default=None, max_length=4096)  # a bundle directory or .tar.gz on the device
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")  # of the downloaded archive
    health_frames: int | None = Field(default=None, ge=1, le=10000, strict=True)

    @model_validator(mode="after")
    def _one_source(self):
        if bool(self.url) == bool(self.path):
            raise ValueError("deploy needs exactly one of 'url' or 'path'")
        return self


class AlertChange(BaseModel):
    """On `lepton/v1/_monitor/alerts` (QoS 1, not retained): the fleet monitor fired or resolved an
    alert. Sent by the monitor, not by a device; the same body goes to the alert webhook."""

    v: int = V
    event: Literal["fired", "resolved"]
    id: int | None = None  # the store's id of the alert
    fleet: str
    device: str
    rule: str  # offline, latency, fps, temperature, throttled, seq_gaps, rollback, error
    severity: Literal["warning", "critical"] = "warning"
    message: str
    started: float  # unix seconds
    resolved: float | None = None
    value: float | None = None  # the value that crossed the threshold (or the event's time)
    threshold: float | None = None


COMMANDS: dict[str, type[_Command]] = {"ping": PingCommand, "set": SetCommand, "deploy": DeployCommand}

# Every payload on the wire, by the name its JSON Schema file carries (docs/schemas/<name>.schema.json).
PAYLOADS: dict[str, type[BaseModel]] = {"status": Status, "meta": Meta, "telemetry": Telemetry, "event": Event,
                                        "reply": Reply, **{f"command-{verb}": m for verb, m in COMMANDS.items()},
                                        "alert": AlertChange}
