"""Target profiles: what a device can run, and the budgets an export must meet.

Why plain TOML files: a user adds a device by copying one file, not by writing code.
Each profile is validated by a pydantic schema so a typo names the field and the file.
"""
from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lepton_edge import tomlfile
from lepton_edge.errors import BadInput, closest

_RECIPE_ACTS = {"u8", "s8"}
MIN_OPSET, MAX_OPSET = 7, 28  # the default-domain opsets onnx knows (onnx 1.23: 28; raise it with onnx)
MAX_PROFILE_BYTES = 1 << 20
_RECIPE_CALIB = {"minmax", "percentile", "entropy"}


class QuantizationSettings(BaseModel):
    """How int8 is done on this target, fastest recipe first.

    A recipe name reads `<act>-<calibration>[-ends][-sensitive][-litert]`: `u8`/`s8` is the
    activation type (weights are always int8, per channel), `ends` keeps the first and last layer
    in float, `sensitive` keeps the layers a sensitivity pass finds worst in float, `litert` (TFLite
    only) quantizes with the LiteRT quantizer instead of PT2E. Each format tries the recipes it can do.
    """

    model_config = ConfigDict(extra="forbid")
    recipes: list[str] = Field(min_length=1)
    per_channel: bool = True
    calibration_samples: int = Field(default=100, ge=1, le=100_000)

    @field_validator("recipes")
    @classmethod
    def _known(cls, recipes: list[str]) -> list[str]:
        for r in recipes:
            parts = r.split("-")
            if parts[0] == "nncf":  # NNCF's post-training quantization (ONNX): nncf-<default|mixed>[-sq][-ends][-sensitive]
                if len(parts) < 2 or parts[1] not in ("default", "mixed") or any(
                        p not in {"sq", "ends", "sensitive"} for p in parts[2:]):
                    raise ValueError(f"unknown recipe {r!r}: expected nncf-<default|mixed>[-sq][-ends][-sensitive]")
                continue
            if (
                len(parts) < 2
                or parts[0] not in _RECIPE_ACTS
                or parts[1] not in _RECIPE_CALIB
                or any(p not in {"ends", "sensitive", "litert"} for p in parts[2:])
            ):
                raise ValueError(
                    f"unknown recipe {r!r}: expected <u8|s8>-<minmax|percentile|entropy>[-ends][-sensitive][-litert]"
                )
        return recipes


class Profile(BaseModel):
    """One device class. Field names are the TOML keys."""

    model_config = ConfigDict(extra="forbid")
    id: str
    description: str
    arch: Literal["aarch64", "x86_64"]
    runtime: Literal["onnxruntime", "litert"]
    execution_providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])
    delegates: list[str] = Field(default_factory=list)
    format: Literal["onnx", "tflite"]
    precision: Literal["fp32", "fp16", "int8"]
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    # bounded and finite: `inf` would reach the manifest as null and switch off the deploy health check
    threads: int = Field(ge=1, le=64)
    max_model_bytes: int = Field(gt=0, le=1 << 40)
    ram_budget_bytes: int = Field(gt=0, le=1 << 44)
    latency_budget_ms: float = Field(gt=0, le=3_600_000, allow_inf_nan=False)
    max_opset: int = Field(ge=MIN_OPSET, le=MAX_OPSET)
    input_size: tuple[Annotated[int, Field(ge=1, le=8192)], Annotated[int, Field(ge=1, le=8192)]] = (224, 224)
    quantization: QuantizationSettings
    device_packages: dict[str, str] = Field(default_factory=dict)

    source: str = Field(default="", exclude=True)

    def content_hash(self) -> str:
        """sha256 of the profile's content, recorded in manifests to tell which budgets applied."""
        return hashlib.sha256(self.model_dump_json(exclude={"source"}).encode()).hexdigest()


def _builtin_dir():
    return resources.files(__name__)


def builtin_ids() -> list[str]:
    return sorted(p.name[:-5] for p in _builtin_dir().iterdir() if p.name.endswith(".toml"))


def _parse(text: str | bytes, source: str) -> Profile:
    data = tomlfile.loads(text, source, "target profile", MAX_PROFILE_BYTES)
    try:
        prof = Profile.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise BadInput(f"{source}: field '{field}': {err['msg']}") from None
    prof.source = source
    return prof


def load(name_or_path: str | Path) -> Profile:
    """A built-in profile by id, or a user's profile from a .toml path."""
    s = str(name_or_path)
    p = Path(s)
    if s.endswith(".toml") or p.exists() or "/" in s:
        if not p.is_file():
            raise BadInput(f"target profile file not found: {s}")
        try:
            with open(p, "rb") as f:
                text = f.read(MAX_PROFILE_BYTES + 1)
        except OSError as e:
            raise BadInput(f"cannot read target profile {s}: {e.strerror}") from None
        return _parse(text, s)
    ids = builtin_ids()
    if s not in ids:
        raise BadInput(f"unknown target '{s}'{closest(s, ids)}; `lepton-edge targets` lists them")
    return _parse((_builtin_dir() / f"{s}.toml").read_text(), f"targets/{s}.toml")


def all_profiles() -> list[Profile]:
    return [load(i) for i in builtin_ids()]
