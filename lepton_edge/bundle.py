"""The bundle: a directory with `manifest.json`, the model file and `labels.txt`.

Why a manifest and not conventions: a device (or a third party) must be able to run the
model from the manifest alone (input layout, colour order, resize, normalisation, quantization
of the input) and must be able to tell whether the files are the ones that were validated
(sha256 of each). This module is shared by the workstation and the device, so it imports
neither torch nor onnx.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lepton_edge.errors import BadInput

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class InputSpec(BaseModel):
    """Everything needed to turn a camera frame into the model's input tensor."""

    model_config = ConfigDict(extra="forbid")
    name: str
    shape: list[int | str]  # a str is a dynamic dimension, e.g. "batch"
    dtype: str = "float32"
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    color: Literal["RGB", "BGR", "GRAY"] = "RGB"
    resize: Literal["stretch", "letterbox", "center_crop"] = "stretch"
    scale: float = 1 / 255.0  # multiplies the 0..255 pixel first
    mean: list[float] = Field(default_factory=lambda: [0.0])
    std: list[float] = Field(default_factory=lambda: [1.0])
    quantization: dict[str, float] | None = None  # {"scale":..., "zero_point":...} for integer inputs

    @property
    def channels(self) -> int:
        return 1 if self.color == "GRAY" else 3

    def hw(self) -> tuple[int, int]:
        dims = self.shape[2:4] if self.layout == "NCHW" else self.shape[1:3]
        if not all(isinstance(d, int) for d in dims):
            raise BadInput(f"input '{self.name}' has dynamic spatial size {dims}: pass --input-shape")
        return int(dims[0]), int(dims[1])


class OutputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    shape: list[int | str]
    dtype: str = "float32"
    quantization: dict[str, float] | None = None  # integer outputs: real = (q - zero_point) * scale


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int
    sha256: str


class Manifest(BaseModel):
    """Versioned description of one exported model. See DESIGN.md, 'Bundle'."""

    model_config = ConfigDict(extra="allow")
    schema_version: int = SCHEMA_VERSION
    name: str
    version: str = "1"
    created: str
    target: dict[str, Any]  # {"id", "sha256", "arch", "runtime", "execution_providers", "threads"}
    format: Literal["onnx", "tflite"]
    precision: Literal["fp32", "fp16", "int8"]
    model_file: str
    task: Literal["classify", "detect", "embed", "raw"] = "raw"
    labels_file: str | None = None
    inputs: list[InputSpec]
    outputs: list[OutputSpec]
    files: dict[str, FileEntry] = Field(default_factory=dict)
    compression: dict[str, Any] = Field(default_factory=dict)
    validation: dict[str, Any] = Field(default_factory=dict)
    latency: dict[str, Any] = Field(default_factory=dict)
    toolchain: dict[str, str] = Field(default_factory=dict)


def guess_layout(dims: list) -> str | None:
    """NHWC when the last of four dims looks like channels (1, 3, 4) and the second does not;
    NCHW when the second does; None when neither tells (not an image, or ambiguous)."""
    if len(dims) != 4:
        return None
    if dims[3] in (1, 3, 4) and dims[1] not in (1, 3, 4):
        return "NHWC"
    return "NCHW" if dims[1] in (1, 3, 4) else None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Bundle:
    """A bundle directory on disk and its parsed manifest."""

    def __init__(self, path: Path, manifest: Manifest):
        self.path = Path(path)
        self.manifest = manifest

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.model_file

    @property
    def labels(self) -> list[str] | None:
        if not self.manifest.labels_file:
            return None
        return (self.path / self.manifest.labels_file).read_text().splitlines()

    def __repr__(self) -> str:
        m = self.manifest
        return f"Bundle({str(self.path)!r}, {m.format}/{m.precision}, target={m.target.get('id')})"

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> "Bundle":
        """Read a bundle; with verify, refuse it when a file is missing or its sha256 differs."""
        p = Path(path)
        mf = p / MANIFEST
        if not mf.is_file():
            raise BadInput(f"{p}: not a bundle (no {MANIFEST})")
        try:
            manifest = Manifest.model_validate(json.loads(mf.read_text()))
        except (json.JSONDecodeError, ValidationError) as e:
            raise BadInput(f"{mf}: invalid manifest ({str(e).splitlines()[0]})") from None
        b = cls(p, manifest)
        if verify:
            b.verify()
        return b

    def verify(self) -> None:
        for rel, entry in self.manifest.files.items():
            f = self.path / rel
            if not f.is_file():
                raise BadInput(f"bundle {self.path}: file {rel} listed in the manifest is missing")
            if sha256_file(f) != entry.sha256:
                raise BadInput(f"bundle {self.path}: checksum mismatch for {rel}; refusing to use it")


@contextmanager
def staging(final: Path) -> Iterator[Path]:
    """Write a bundle in a temporary sibling directory; move it into place only on success.

    Why: a failed export (validation or budget) must leave nothing behind that a user or a
    deploy could mistake for a good bundle.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    """Checksum every file in the directory into the manifest, then write manifest.json."""
    files = {}
    for f in sorted(directory.rglob("*")):
        if f.is_file() and f.name not in (MANIFEST, "signature"):
            rel = f.relative_to(directory).as_posix()
            files[rel] = FileEntry(size=f.stat().st_size, sha256=sha256_file(f))
    manifest.files = files
    out = directory / MANIFEST
    out.write_text(manifest.model_dump_json(indent=2) + "\n")
    return out
