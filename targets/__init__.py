"""Target profiles: what a device can run, and the budgets an export must meet.

Why plain TOML files: a user adds a device by copying one file, not by writing code.
Each profile is validated by a pydantic schema so a typo names the field and the file.
"""
from __future__ import annotations

import hashlib
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from lepton_edge import tomlfile
from lepton_edge.errors import BadInput, closest

MIN_OPSET, MAX_OPSET = 7, 28  # the default-domain opsets onnx knows (onnx 1.23: 28; raise it with onnx)
MAX_PROFILE_BYTES = 1 << 20

# What each runtime runs, and what it is configured with: a profile that mixes them describes no device.
RUNTIME_FORMAT = {"onnxruntime": "onnx", "litert": "tflite"}
CPU_PROVIDER = "CPUExecutionProvider"  # also what an ONNX export of a LiteRT target runs with (--format onnx)
# Providers the plain `onnxruntime` wheel lacks, and the wheel that has them: the kit installs the
# runtime named in device_packages, so naming the provider without the wheel would silently run on the CPU.
PROVIDER_PACKAGE = {"CUDAExecutionProvider": "onnxruntime-gpu", "TensorrtExecutionProvider": "onnxruntime-gpu",
                    "OpenVINOExecutionProvider": "onnxruntime-openvino", "DmlExecutionProvider": "onnxruntime-directml",
                    "QNNExecutionProvider": "onnxruntime-qnn"}
_PROVIDER_NAME = r"^[A-Za-z][A-Za-z0-9]{0,63}ExecutionProvider$"
_DELEGATE_NAME = r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$"  # a symbolic name, as runtime.delegates accepts: never a path
# device_packages become pip requirement lines in a kit (`name==version`), which `kit` downloads and
# the device installs as root: a name is a PyPI project name and a version a PEP 440 version, never a
# path, a URL, an option or a second line (pip would run a local folder's setup.py).
_PACKAGE_NAME = r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,98}[A-Za-z0-9])?$"
_PACKAGE_VERSION = r"^[0-9][0-9A-Za-z.+!_-]{0,63}$"
_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # it names bundle directories: no '/', no leading '.'


def package_key(name: str) -> str:
    """A package name as pip compares it (PEP 503): `NumPy`, `numpy` and `ruamel_yaml`/`ruamel.yaml` alike."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _conflict(message: str) -> PydanticCustomError:
    """A contradiction between fields, reported on the field that contradicts (no 'Value error,' prefix)."""
    return PydanticCustomError("profile_conflict", message)


def _human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:g} {unit}"
    return f"{n} bytes"


class QuantizationSettings(BaseModel):
    """How int8 is done on this target, fastest recipe first.

    A recipe name reads `<act>-<calibration>[-ends][-sensitive][-litert|-w7]`: `u8`/`s8` is the
    activation type (weights are always int8, per channel), `ends` keeps the first and last layer
    in float, `sensitive` keeps the layers a sensitivity pass finds worst in float, `litert` (TFLite
    only) quantizes with the LiteRT quantizer instead of PT2E, `w7` keeps the weights in 7 bits (what
    x86 CPUs without AVX-512 VNNI need: lepton_edge/compress/quantize.Recipe). Each format tries the
    recipes it can do.
    """

    # strict: `per_channel = "yes"` or `calibration_samples = 1.5e2` is a typo to name, not a value to convert
    model_config = ConfigDict(extra="forbid", strict=True)
    recipes: list[str] = Field(min_length=1)
    per_channel: bool = True
    calibration_samples: int = Field(default=100, ge=1, le=100_000)

    @field_validator("recipes")
    @classmethod
    def _known(cls, recipes: list[str]) -> list[str]:
        from lepton_edge.compress.quantize import Recipe  # (the one grammar: Recipe.parse's ValueError names it)

        for r in recipes:
            Recipe.parse(r)
        return recipes


class Profile(BaseModel):
    """One device class. Field names are the TOML keys.

    Why the cross-field checks: a profile is a promise about a device, and one that contradicts
    itself (`runtime = "litert"` with `format = "onnx"`, CUDA without the GPU wheel) would only fail
    on the device, after an export that looked fine. Each check is a field validator that reads the
    fields declared before it, so the error names the field that contradicts them.
    """

    # strict: TOML has types, so `threads = true` (read as 1), `threads = "4"` or `max_model_bytes = 1.5e6`
    # is a mistake in the file, not a value to convert silently (an int where a float is due still reads)
    model_config = ConfigDict(extra="forbid", strict=True)
    id: str = Field(pattern=_ID)
    description: str
    arch: Literal["aarch64", "x86_64"]
    runtime: Literal["onnxruntime", "litert"]
    # onnxruntime only; a LiteRT target may list the CPU provider alone (what its ONNX export runs with)
    execution_providers: list[Annotated[str, Field(pattern=_PROVIDER_NAME)]] = Field(
        default_factory=lambda: [CPU_PROVIDER], min_length=1, max_length=16)
    delegates: list[Annotated[str, Field(pattern=_DELEGATE_NAME)]] = Field(default_factory=list, max_length=16)
    format: Literal["onnx", "tflite"]
    precision: Literal["fp32", "fp16", "int8"]
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    # bounded and finite: `inf` would reach the manifest as null and switch off the deploy health check
    threads: int = Field(ge=1, le=64)
    max_model_bytes: int = Field(gt=0, le=1 << 40)
    ram_budget_bytes: int = Field(gt=0, le=1 << 44)
    latency_budget_ms: float = Field(gt=0, le=3_600_000, allow_inf_nan=False)
    max_opset: int = Field(ge=MIN_OPSET, le=MAX_OPSET)
    # (TOML has no tuple: the array reads as one, its items still strict ints)
    input_size: tuple[Annotated[int, Field(ge=1, le=8192, strict=True)],
                      Annotated[int, Field(ge=1, le=8192, strict=True)]] = Field(default=(224, 224), strict=False)
    quantization: QuantizationSettings
    device_packages: dict[Annotated[str, Field(pattern=_PACKAGE_NAME)],
                          Annotated[str, Field(pattern=_PACKAGE_VERSION)]] = Field(default_factory=dict, max_length=64)

    source: str = Field(default="", exclude=True)

    @field_validator("execution_providers")
    @classmethod
    def _providers_fit_runtime(cls, providers: list[str], info: ValidationInfo) -> list[str]:
        if len(set(providers)) != len(providers):
            raise _conflict(f"{providers} names a provider twice")
        if info.data.get("runtime") == "litert" and providers != [CPU_PROVIDER]:
            raise _conflict(f"{providers} are onnxruntime providers; runtime 'litert' takes `delegates` "
                            f"(an ONNX export of a LiteRT target runs on [{CPU_PROVIDER!r}] only)")
        return providers

    @field_validator("delegates")
    @classmethod
    def _delegates_fit_runtime(cls, delegates: list[str], info: ValidationInfo) -> list[str]:
        if delegates and info.data.get("runtime") == "onnxruntime":
            raise _conflict(f"{delegates} are LiteRT delegates; runtime 'onnxruntime' takes `execution_providers`")
        return delegates

    @field_validator("format")
    @classmethod
    def _format_fits_runtime(cls, fmt: str, info: ValidationInfo) -> str:
        runtime = info.data.get("runtime")
        if runtime and RUNTIME_FORMAT[runtime] != fmt:
            raise _conflict(f"{fmt!r} cannot run on runtime {runtime!r} ({runtime} runs {RUNTIME_FORMAT[runtime]})")
        return fmt

    @field_validator("ram_budget_bytes")
    @classmethod
    def _model_fits_in_ram(cls, ram: int, info: ValidationInfo) -> int:
        model = info.data.get("max_model_bytes")
        if model and model > ram:
            raise _conflict(f"{_human(ram)} is less than max_model_bytes ({_human(model)}): "
                            "a model has to fit in memory to run")
        return ram

    @field_validator("device_packages")
    @classmethod
    def _packages_have_the_providers(cls, packages: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        names: dict[str, str] = {}
        for k in packages:  # numpy and NUMPY: one project to pip, and which pin the kit took was arbitrary
            if package_key(k) in names:
                raise _conflict(f"{k!r} is {names[package_key(k)]!r} again (pip compares package names "
                                "ignoring case and '.', '_', '-'); list each package once")
            names[package_key(k)] = k
        for provider in info.data.get("execution_providers") or []:
            wheel = PROVIDER_PACKAGE.get(provider)
            if wheel and wheel not in names:
                raise _conflict(f"execution provider {provider!r} needs {wheel!r} here (the plain onnxruntime "
                                "wheel has no such provider; the device would silently run on the CPU)")
        return packages

    def content_hash(self) -> str:
        """sha256 of the profile's content, recorded in manifests to tell which budgets applied."""
        return hashlib.sha256(self.model_dump_json(exclude={"source"}).encode()).hexdigest()


def _builtin_dir():
    return resources.files(__name__)


def builtin_ids() -> list[str]:
    return sorted(p.name[:-5] for p in _builtin_dir().iterdir() if p.name.endswith(".toml"))


def _parse(text: str | bytes, source: str) -> Profile:
    return _validated(tomlfile.loads(text, source, "target profile", MAX_PROFILE_BYTES), source)


def _validated(data: dict, source: str) -> Profile:
    try:
        prof = Profile.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise BadInput(f"{source}: field '{field}': {err['msg'].removeprefix('Value error, ')}") from None
    prof.source = source
    return prof


def load(name_or_path: str | Path) -> Profile:
    """A built-in profile by id, or a user's profile from a path (one ending in .toml or naming a folder).

    A bare word is always a built-in id: a file or folder that happens to be called `rpi4` in the
    current directory never stands in for the built-in profile (a user's own file is `./rpi4`)."""
    s = str(name_or_path)
    p = Path(s)
    if isinstance(name_or_path, Path) or s.lower().endswith(".toml") or "/" in s or "\\" in s:
        return _validated(tomlfile.read(p, "target profile file", MAX_PROFILE_BYTES), s)
    ids = builtin_ids()
    if s not in ids:
        raise BadInput(f"unknown target '{s}'{closest(s, ids)}; `lepton-edge targets` lists them")
    return _parse((_builtin_dir() / f"{s}.toml").read_text(), f"targets/{s}.toml")


def all_profiles() -> list[Profile]:
    return [load(i) for i in builtin_ids()]
