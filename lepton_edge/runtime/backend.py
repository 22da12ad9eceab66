"""The backend registry: one small module per inference engine, chosen from the bundle's format.

Why a registry (after Frigate's detector plugins): a new engine is one new file that subclasses
`Backend` and calls `register`; nothing else changes. Backends are imported only when a model
of their format is loaded, so a device with only LiteRT installed never imports onnxruntime.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lepton_edge.errors import BadInput

# format -> module that registers its backend on import
_MODULES = {"onnx": "lepton_edge.runtime.onnx", "tflite": "lepton_edge.runtime.litert"}
_REGISTRY: dict[str, type["Backend"]] = {}


@dataclass
class TensorInfo:
    """One model input or output as the engine reports it; str dims are dynamic."""

    name: str
    shape: list[int | str]
    dtype: str
    quantization: dict[str, float] | None = None  # integer tensors: real = (q - zero_point) * scale
    extra: dict = field(default_factory=dict)


class Backend:
    """Runs one model file. `run` takes the input tensor and returns every output as float32
    (integer outputs dequantized), in the model's output order."""

    format: str = ""
    suffixes: tuple[str, ...] = ()
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]

    def __init__(self, path: Path, threads: int, providers: list[str] | None = None,
                 delegates: list[str] | None = None):
        raise NotImplementedError

    def resize_input(self, shape: list[int]) -> None:
        """Fix a dynamic input shape before the first run (engines that need it)."""

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError

    def describe(self) -> dict:
        """What `run`'s summary and telemetry `meta` say about the engine."""
        return {"backend": self.format}


def register(cls: type[Backend]) -> type[Backend]:
    _REGISTRY[cls.format] = cls
    return cls


def format_of(path: Path) -> str:
    """The format of a model file, from its suffix or (for odd names) its first bytes."""
    suffix = path.suffix.lower()
    for fmt, mod in _MODULES.items():
        if suffix == f".{fmt}":
            return fmt
    head = path.read_bytes()[:8] if path.is_file() else b""
    if head[4:8] == b"TFL3":
        return "tflite"
    if suffix in (".ort", ".pb"):
        raise BadInput(f"{path}: {suffix} models are not supported; export to .onnx or .tflite")
    raise BadInput(f"{path}: not a model this runtime knows (expected a bundle directory, .onnx or .tflite)")


def get_backend(fmt: str) -> type[Backend]:
    if fmt not in _REGISTRY:
        if fmt not in _MODULES:
            raise BadInput(f"no runtime backend for format {fmt!r}; known: {', '.join(_MODULES)}")
        importlib.import_module(_MODULES[fmt])
    return _REGISTRY[fmt]
