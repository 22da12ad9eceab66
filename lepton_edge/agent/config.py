"""Agent configuration: an `agent.toml` file and matching command-line flags (flags win).

Why pydantic with extra="forbid": a typo in a config file on a device nobody is looking at must
fail loudly at start, naming the field, not be silently ignored for months.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError, field_validator

from lepton_edge import tomlfile
from lepton_edge.errors import BadInput, closest
from lepton_edge.runtime.delegates import parse_allowlist
from lepton_edge.telemetry.topics import safe_segment, sanitize


def default_device_id() -> str:
    """The hostname when it makes a readable topic segment, else the machine id."""
    host = sanitize(socket.gethostname())
    if host not in ("device", "localhost"):
        return host
    try:
        return sanitize(Path("/etc/machine-id").read_text().strip()[:12])
    except OSError:
        return host


class AgentConfig(BaseModel):
    # Strict numbers and booleans: `threads = true` was 1 thread, `loop = 1` true and `window_s = "10"` ten
    # seconds; a TOML file gives these their own types, so a value of another type is a mistake to name.
    model_config = ConfigDict(extra="forbid")

    broker: str = "mqtt://localhost:1883"  # mqtt://, mqtts://, ws://, wss://
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    fleet: str = "default"
    device_id: str = Field(default_factory=default_device_id)
    bundle: Path | None = None  # the bundle to start with (a deployed one, kept in state_dir, wins)
    source: str = "0"
    loop: StrictBool = False  # video files: start again at the end
    # live sources: "newest-frame" (default: no lag, frames the model has no time for are dropped undecoded)
    # or "every-frame" (decode and queue every frame; lag grows while the model is slower than the camera)
    source_policy: str | None = Field(default=None, pattern=r"^(newest-frame|every-frame)$")
    threads: StrictInt | None = Field(default=None, ge=1, le=64)
    # one inference's time limit in seconds (onnxruntime; default 120): a model whose run never ends (a hostile
    # Loop) is stopped there and its bundle refused, not left holding the pipeline
    max_run_s: StrictFloat | None = Field(default=None, gt=0, le=86400, allow_inf_nan=False)
    # how far the agent may grow while one inference runs (bytes; default max(2 GiB, 12x the model's files)):
    # past it the process ends with one line and the service manager restarts it with the last good bundle
    max_run_bytes: StrictInt | None = Field(default=None, gt=0)
    window_s: StrictFloat = Field(default=10.0, ge=0.1, le=3600, allow_inf_nan=False)
    sample_every: StrictInt = Field(default=1, ge=1, le=1000)
    state_dir: Path = Path("/var/lib/lepton-edge")  # outbox.sqlite, bundles/, current
    outbox_max: StrictInt = Field(default=100_000, ge=10, le=100_000_000)
    outbox_fsync: StrictBool = False  # true: windows survive a power cut too (an fsync per message)
    trusted_keys: list[Path] = Field(default_factory=list)  # when set, unsigned bundles are refused
    # the directories a deploy command's `path` may name a bundle (or .tar.gz) in; default: state_dir/incoming.
    # A command naming any other path is refused, unread: it made the agent say whether a file existed and
    # hash it against the command's sha256 (a guess of a file's content confirmed)
    deploy_paths: list[Path] | None = Field(default=None, max_length=64)
    health_frames: StrictInt = Field(default=30, ge=1, le=10000)
    # finite: `inf` made a deploy's health check wait forever on a stalled camera
    health_timeout_s: StrictFloat = Field(default=30.0, gt=0, le=86400, allow_inf_nan=False)
    max_download_bytes: StrictInt = Field(default=512 * 1024 * 1024, ge=1024, le=1 << 40)
    # 0 (default): MQTT 3.1.1; every command payload is read, and one over 64 KiB refused before it is
    # queued. N >= 131072: MQTT 5 with N as the largest packet the broker may send, so it discards bigger
    # commands unsent. Off by default: mosquitto 2.0.11 (Debian 12) stops delivering to such a client after
    # about 100 discarded QoS 1 messages. Cap payloads at the broker instead (max_packet_size, see
    # examples/raspberry_pi/mosquitto/lepton.conf).
    mqtt_max_packet_bytes: StrictInt = Field(default=0, ge=0, le=256 * 1024 * 1024)
    # a deployed bundle's files, unpacked
    max_bundle_bytes: StrictInt = Field(default=1024 * 1024 * 1024, ge=1024, le=1 << 40)
    keep_bundles: StrictInt = Field(default=2, ge=0, le=20)  # previous good bundles kept to fall back to
    # the whole download, not per read
    download_timeout_s: StrictFloat = Field(default=300.0, gt=0, le=86400, allow_inf_nan=False)
    max_backoff_s: StrictFloat = Field(default=10.0, ge=1, le=300, allow_inf_nan=False)
    # the LiteRT delegates this device allows, name -> absolute library path ([delegates] edgetpu = "/usr/lib/
    # libedgetpu.so.1"); a bundle may only name one of these, never a path (runtime/delegates.py)
    delegates: dict[str, str] = Field(default_factory=dict)

    @property
    def deploy_dirs(self) -> list[Path]:
        from lepton_edge.agent.deploy import INCOMING

        return list(self.deploy_paths) if self.deploy_paths is not None else [self.state_dir / INCOMING]

    @field_validator("bundle", "state_dir", "ca_file", "cert_file", "key_file", "trusted_keys", "deploy_paths")
    @classmethod
    def _no_nul(cls, v):
        """A TOML string may hold a NUL (\\u0000), a path never: the first file call on it raised ValueError,
        a traceback at start."""
        for p in v if isinstance(v, list) else [v]:
            if p is not None and "\0" in str(p):
                raise ValueError(f"{str(p)!r}: a path cannot hold a NUL byte")
        return v

    @field_validator("deploy_paths")
    @classmethod
    def _deploy_paths(cls, v: list[Path] | None) -> list[Path] | None:
        for p in v or []:
            if not p.is_absolute() or os.path.realpath(p) == "/":  # ("//" and "/tmp/.." are "/" too)
                raise ValueError(f"{str(p)!r}: an absolute directory other than / (a deploy may read any "
                                 "file under it)")
        return v

    @field_validator("delegates")
    @classmethod
    def _delegates(cls, v: dict[str, str]) -> dict[str, str]:
        try:
            return parse_allowlist(v, "delegates")
        except BadInput as e:
            raise ValueError(str(e)) from None

    @field_validator("mqtt_max_packet_bytes")
    @classmethod
    def _packet_limit(cls, v: int) -> int:
        if 0 < v < 128 * 1024:  # below that the broker would silently drop commands the agent must answer
            raise ValueError("must be 0 (MQTT 3.1.1) or at least 131072 bytes (a command may be 64 KiB)")
        return v

    @field_validator("fleet", "device_id")
    @classmethod
    def _segment(cls, v: str, info) -> str:
        try:
            return safe_segment(v, info.field_name)
        except BadInput as e:
            raise ValueError(str(e)) from None


FIELDS = list(AgentConfig.model_fields)
MAX_TOML_BYTES = tomlfile.MAX_TOML_BYTES


def read_toml(path: Path, what: str) -> dict:
    """A TOML file as a dict, or one line: missing, unreadable, too big, not UTF-8, not TOML,
    nested past what the parser's recursion takes."""
    return tomlfile.read(path, what)


# the file paths of agent.toml that may be relative (deploy_paths must be absolute: a deploy reads under them)
RELATIVE_PATHS = ("bundle", "state_dir", "ca_file", "cert_file", "key_file", "trusted_keys")


def _beside(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The file's relative paths read from its own folder. Why: they were read from the working directory,
    which is / under systemd, and install.sh's upgrade check (run from the kit's folder) read them from
    there: a relative trusted_keys passed the check and failed in the agent. Flags stay the shell's."""
    out = dict(data)
    for k in RELATIVE_PATHS:
        v = out.get(k)
        if isinstance(v, str) and v and "\0" not in v:
            out[k] = v if Path(v).is_absolute() else str(folder / v)
        elif k == "trusted_keys" and isinstance(v, list):
            out[k] = [str(folder / x) if isinstance(x, str) and x and "\0" not in x and not Path(x).is_absolute()
                      else x for x in v]
    return out


def load(path: Path | None, overrides: dict[str, Any]) -> AgentConfig:
    """The file's fields, then the flags that were given; one line naming a bad field."""
    data: dict[str, Any] = {}
    where = "flags"
    if path is not None:
        where = str(path)
        data = read_toml(Path(path), "config file")
        if isinstance(data.get("agent"), dict):  # an [agent] table is accepted too (beside a [delegates] one)
            beside = sorted(k for k in data if k not in ("agent", "delegates"))
            if beside:  # they were dropped without a word: a field at the top and another in [agent] is a typo
                raise BadInput(f"{where}: '{beside[0]}' is outside the [agent] table; put every field inside "
                               "it, or use no [agent] table at all")
            data = data["agent"] | ({"delegates": data["delegates"]} if "delegates" in data else {})
        data = _beside(data, Path(path).absolute().parent)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "?"
        if err["type"] == "extra_forbidden":
            raise BadInput(f"{where}: unknown field '{field}'{closest(field, FIELDS)}") from None
        msg = err["msg"].removeprefix("Value error, ")
        raise BadInput(f"{where}: field '{field}': {msg}") from None
