"""The backend registry: one small module per inference engine, each declaring what it runs and the
options it takes.

Why a registry (after Frigate's detector plugins): a new engine is one class that subclasses
`Backend`; defining it registers it under its `name`, the name a manifest's `target.runtime` or a
profile's `runtime` uses. Built-ins are entries of `REGISTRY` like a third-party package's
`lepton_edge.backends` entry points (lepton_edge/plugins.py), imported on first use: importing
this module imports no engine, and a backend module imports its engine only when a model is opened,
so a device with only LiteRT installed never imports onnxruntime.

Why each backend declares its options (a pydantic model): the runtime knows a few settings
(`threads`, ONNX `providers`, delegate libraries) and hands a backend only the ones its `Options`
declares, validated; an engine never receives, and silently ignores, another engine's settings.

A bundle only *selects* among the backends this installation registered (by name); it never names
code to import, so a manifest cannot load anything the machine's owner did not install.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lepton_edge.errors import BadInput
from lepton_edge.plugins import Registry

MAX_THREADS = 64  # past this an engine only grows memory (onnxruntime) or crashes (LiteRT at 100000)

REGISTRY: Registry[type[Backend]] = Registry("lepton_edge.backends", "runtime backend", {
    "onnxruntime": "lepton_edge.runtime.onnx:OnnxBackend",
    "litert": "lepton_edge.runtime.litert:LiteRTBackend",
})


@dataclass
class TensorInfo:
    """One model input or output as the engine reports it; str dims are dynamic."""

    name: str
    shape: list[int | str]
    dtype: str
    quantization: dict[str, float] | None = None  # integer tensors: real = (q - zero_point) * scale
    extra: dict = field(default_factory=dict)


class BackendOptions(BaseModel):
    """The settings every engine takes. A backend subclasses this with the fields its engine uses;
    `Backend.open` fills each declared field the caller knows by name and leaves the rest at their
    defaults (so a third-party option can exist before the runtime knows how to set it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    threads: int = Field(1, ge=1, le=MAX_THREADS, strict=True)


class Backend(abc.ABC):
    """Runs one model file. `run` takes the input tensor and returns every output as float32
    (integer outputs dequantized), in the model's output order.

    A concrete subclass sets `name` (its registry key), `format` (the model format it runs,
    a bundle's `format`), `suffixes` (plain model files it recognises) and `Options`."""

    name: ClassVar[str]
    format: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type[BackendOptions]] = BackendOptions
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:  # an intermediate class without its own name is not an engine
            if not getattr(cls, "format", None):
                raise TypeError(f"backend {cls.__qualname__} names no model format")
            REGISTRY.add(cls.name, cls)

    @abc.abstractmethod
    def __init__(self, path: Path, options: BackendOptions):
        """Load the model; raise BadInput (one line) when the engine is missing or cannot load it."""

    @abc.abstractmethod
    def run(self, x: np.ndarray) -> list[np.ndarray]:
        """Every output for one input tensor, as float32."""

    def resize_input(self, shape: list[int]) -> None:  # noqa: B027 - a hook: a no-op unless the engine needs it
        """Fix a dynamic input shape before the first run (engines that need it)."""

    def describe(self) -> dict:
        """What `run`'s summary and telemetry `meta` say about the engine."""
        return {"backend": self.name}

    @classmethod
    def sniff(cls, head: bytes) -> bool:
        """Whether a file starting with these bytes is this backend's format (for odd file names)."""
        return False

    @classmethod
    def options(cls, **settings: Any) -> BackendOptions:
        """`Options` from the settings it declares (None = its default); the others are not passed."""
        fields = cls.Options.model_fields
        try:
            return cls.Options(**{k: v for k, v in settings.items() if k in fields and v is not None})
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "options"
            raise BadInput(f"{cls.name} backend: {where}: {err['msg']}") from None

    @classmethod
    def open(cls, path: Path, **settings: Any) -> Backend:
        """The backend on `path`, given whatever settings the caller has (threads, providers, delegates)."""
        return cls(Path(path), cls.options(**settings))


def backends() -> dict[str, type[Backend]]:
    """Every backend this installation registered, built-ins first."""
    return REGISTRY.all()


def _names(regs: dict[str, type[Backend]]) -> str:
    return ", ".join(f"{n} ({c.format})" for n, c in regs.items()) or "none"


def backend_for(fmt: str, runtime: str | None = None) -> type[Backend]:
    """The backend for a model of format `fmt`: the registered one named `runtime` when given and it
    runs `fmt`, else the first registered for `fmt` (built-ins first). A runtime name this installation
    does not know is one line. A known runtime of another format yields to the format: a profile's
    runtime is a preference (an rpi4 bundle exported `--format onnx` records runtime "litert")."""
    regs = backends()
    if runtime is not None:
        if not isinstance(runtime, str) or runtime not in regs:
            raise BadInput(f"runtime {str(runtime)[:64]!r} has no backend in this installation; installed: "
                           f"{_names(regs)}")
        if regs[runtime].format == fmt:
            return regs[runtime]
    for cls in regs.values():
        if cls.format == fmt:
            return cls
    raise BadInput(f"no runtime backend for format {fmt!r}; installed: {_names(regs)}")


def format_of(path: Path) -> str:
    """The format of a model file, from its suffix or (for odd names) its first bytes."""
    suffix = path.suffix.lower()
    regs = backends().values()
    for cls in regs:
        if suffix in cls.suffixes:
            return cls.format
    head = b""
    if path.is_file():
        with open(path, "rb") as f:
            head = f.read(16)
    for cls in regs:
        if cls.sniff(head):
            return cls.format
    if suffix in (".ort", ".pb"):
        raise BadInput(f"{path}: {suffix} models are not supported; export to .onnx or .tflite")
    known = " or ".join(dict.fromkeys(s for c in regs for s in c.suffixes))
    raise BadInput(f"{path}: not a model this runtime knows (expected a bundle directory, {known})")
