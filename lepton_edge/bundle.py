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
import math
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from lepton_edge.errors import BadInput

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "signature"
# Budgets checked before any work: a manifest or a labels file is small text; a bundle on a
# device is at most MAX_BUNDLE_BYTES unless the caller (the agent's config) says otherwise.
MAX_MANIFEST_BYTES = 4 << 20
MAX_LABELS_BYTES = 4 << 20
MAX_BUNDLE_BYTES = 2 << 30
MAX_FILES = 1000
MAX_INPUT_ELEMENTS = 64 << 20  # per input tensor: a 20000x20000 shape must not reach an allocation
MAX_RANK = 8
FLOAT32_MAX = 3.4028234663852886e38  # the input's normalisation is computed in float32
# numpy names of the numeric types a runtime can feed or return (spelled out: a type checker reads Literal's
# arguments as written, not from a tuple)
Dtype = Literal["float16", "float32", "float64", "int8", "int16", "int32", "int64",
                "uint8", "uint16", "uint32", "uint64", "bool"]
DTYPES: tuple[str, ...] = get_args(Dtype)
# a text dimension is a dynamic dimension's name ("batch", "s0", "?"), never "28x"
_DIM_NAME = r"^(?:\?|[A-Za-z_][A-Za-z0-9_.:+*/() -]{0,63})$"
Dim = Annotated[int, Field(strict=True)] | Annotated[str, Field(pattern=_DIM_NAME)]


def onnx_dims(value) -> list[int | str]:
    """An ONNX value's (ValueInfoProto's) shape as a manifest records it: a fixed dimension's size,
    else its name where a manifest can hold one, else "?". Why: exporters name dynamic dimensions by
    their formula (YOLOv8's torch export: "(floor(floor(height/2 - 1/2)/2) + 1)*..." of 300 characters),
    which is no name, and a manifest refuses it."""
    out: list[int | str] = []
    for d in value.type.tensor_type.shape.dim:
        name = d.dim_param if d.dim_param and re.fullmatch(_DIM_NAME, d.dim_param) else "?"
        out.append(int(d.dim_value) if d.dim_value > 0 else name)
    return out


def safe_relpath(rel: str, what: str = "path") -> str:
    """A path inside the bundle: relative, '/'-separated, no '..', '.', empty part, backslash or NUL.

    Why this strict: the manifest comes from outside; any name it gives is joined to the bundle
    directory, so it must not be able to point anywhere else.
    """
    if not isinstance(rel, str) or not rel or len(rel) > 255 or "\\" in rel or "\0" in rel or rel.startswith("/"):
        raise ValueError(f"{what} {rel!r} must be a relative path inside the bundle")
    if any(part in ("", ".", "..") for part in rel.split("/")):
        raise ValueError(f"{what} {rel!r} must be a relative path inside the bundle (no '..', '.' or '//')")
    return rel


def _check_dims(shape: list, cap: int | None) -> list:
    if len(shape) > MAX_RANK:
        raise ValueError(f"shape {shape[:MAX_RANK + 1]}...: more than {MAX_RANK} dimensions")
    ints = [d for d in shape if isinstance(d, int)]
    if any(d < 0 for d in ints):
        raise ValueError(f"shape {shape}: negative dimension")
    if cap is not None and math.prod(ints) > cap:
        raise ValueError(f"shape {shape}: {math.prod(ints)} elements, over the limit of {cap}")
    return shape


FLOAT16_MAX = 65504.0


def normalisation_overflow(scale: float, mean: list[float], std: list[float], dtype: str) -> str | None:
    """Why (pixel * scale - mean) / std overflows for some pixel 0..255 and channel, else None. normalise()
    computes it as pixel * a - b in float32 (a = scale / std, b = mean / std), then casts to the input's
    dtype: each value and result must fit (float16's range for a float16 input). Why: each of mean, std and
    scale fit a float32, yet std=1e-30 with mean=1e10 (or mean=3e38 with std=0.5) made every frame all inf,
    and the model's results garbage, without a word."""
    n = max(len(mean), len(std))
    if n == 0 or len(mean) not in (1, n) or len(std) not in (1, n):
        return None  # (a count that fits no input: check_normalisation's line, with the input's channels)
    limit = FLOAT16_MAX if dtype == "float16" else FLOAT32_MAX
    worst = 0.0
    for m, s in zip(mean * n if len(mean) == 1 else mean, std * n if len(std) == 1 else std):
        a, b = scale / s, m / s
        if max(abs(255 * a), abs(b)) >= FLOAT32_MAX:  # the terms, computed in float32 whatever the input's dtype
            worst = max(worst, abs(255 * a), abs(b))
        worst = max(worst, abs(b), abs(255 * a - b))  # what the input holds: its ends, pixels 0 and 255
    if worst < limit:
        return None
    return (f"mean {mean} and std {std} with scale {scale:g} make input values up to {worst:.3g}, past "
            f"{'float16' if limit == FLOAT16_MAX else 'float32'}'s range ({limit:.3g}): every frame would reach "
            "the model as inf")


class InputSpec(BaseModel):
    """Everything needed to turn a camera frame into the model's input tensor."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=256)
    shape: list[Dim]  # a str is a dynamic dimension, e.g. "batch"
    dtype: Dtype = "float32"
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    color: Literal["RGB", "BGR", "GRAY"] = "RGB"
    resize: Literal["stretch", "letterbox", "center_crop"] = "stretch"
    scale: float = Field(default=1 / 255.0, allow_inf_nan=False)  # multiplies the 0..255 pixel first
    mean: list[Annotated[float, Field(allow_inf_nan=False)]] = Field(default_factory=lambda: [0.0], max_length=4)
    std: list[Annotated[float, Field(allow_inf_nan=False)]] = Field(default_factory=lambda: [1.0], max_length=4)
    quantization: dict[str, float] | None = None  # {"scale":..., "zero_point":...} for integer inputs
    # A non-image input of a multi-input model (inputs[1:]): the constant it is fed, flat in row-major
    # order; the model file carries it as that input's default, so a runtime feeding the frame alone
    # gets it. None for the frame input.
    value: list[Annotated[float, Field(allow_inf_nan=False)]] | None = Field(default=None, max_length=4096)

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: list) -> list:
        if any(d == 0 for d in v if isinstance(d, int)):
            raise ValueError(f"shape {v}: a dimension of 0")
        return _check_dims(v, MAX_INPUT_ELEMENTS)

    @field_validator("std")
    @classmethod
    def _std(cls, v: list) -> list:
        if any(abs(x) < 1e-30 for x in v):  # 0, or as good as (1e-46 is 0 as a float32: every input inf)
            raise ValueError("std must not be 0")
        return v

    @field_validator("mean", "std", "scale")
    @classmethod
    def _fits_float32(cls, v):
        if any(abs(x) > FLOAT32_MAX for x in (v if isinstance(v, list) else [v])):
            raise ValueError("must fit a float32, under 3.4e38")
        return v

    @model_validator(mode="after")
    def _normalised_fits(self) -> InputSpec:
        why = normalisation_overflow(self.scale, self.mean, self.std, self.dtype)
        if why:
            raise ValueError(why)
        return self

    @property
    def channels(self) -> int:
        return 1 if self.color == "GRAY" else 3

    def hw(self) -> tuple[int, int]:
        if len(self.shape) != 4:  # a frame cannot become this input (audio [1,16000], features [1,128])
            raise BadInput(f"input '{self.name}' has shape {self.shape}, not an image's 4 dimensions (NCHW or NHWC): "
                           "images cannot feed it (to export it, give --calib a .npy/.npz of model-shaped inputs)")
        c = self.shape[1] if self.layout == "NCHW" else self.shape[3]
        if c in (1, 3) and c != self.channels:  # the colour contradicts the shape (`run --input-spec color=BGR`
            # on a gray model was told images cannot feed it, and to give --calib, a flag `run` does not have)
            want = "GRAY" if c == 1 else "RGB or BGR"
            raise BadInput(f"input '{self.name}' of shape {self.shape} ({self.layout}) has {c} channel(s), and color "
                           f"{self.color} gives {self.channels}: set the color to {want}")
        if isinstance(c, int) and c != self.channels:  # RGBA [1,4,H,W], feature maps [1,64,32,32]
            other = "NHWC" if self.layout == "NCHW" else "NCHW"
            oc = self.shape[3] if other == "NHWC" else self.shape[1]
            if oc in (1, 3):  # the layout contradicts the shape (`run --input-spec layout=NCHW` on an NHWC
                # .tflite was told its 128 rows were channels, and to give --calib, a flag `run` does not have)
                raise BadInput(f"input '{self.name}' of shape {self.shape} read as {self.layout} has {c} channels, "
                               f"as {other} {oc}: set the layout to {other}")
            raise BadInput(f"input '{self.name}' {self.shape} ({self.layout}) has {c} channels, and a camera frame "
                           f"gives 1 (GRAY) or 3 (RGB/BGR): images cannot feed it (to export it, give --calib a "
                           ".npy/.npz of model-shaped inputs)")
        dims = self.shape[2:4] if self.layout == "NCHW" else self.shape[1:3]
        if not all(isinstance(d, int) for d in dims):
            raise BadInput(f"input '{self.name}' has dynamic spatial size {dims}: pass --input-shape")
        return int(dims[0]), int(dims[1])


class OutputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=256)
    shape: list[Dim]
    dtype: Dtype = "float32"
    quantization: dict[str, float] | None = None  # integer outputs: real = (q - zero_point) * scale

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: list) -> list:
        return _check_dims(v, None)


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int = Field(ge=0, strict=True)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class TargetSpec(BaseModel):
    """The fields of `target` that the device reads, typed; the rest is free-form record.

    Why typed: `threads: "lots"` or `latency_budget_ms: NaN` must be refused with the manifest,
    not crash the runtime later or silently turn a check off.
    """

    model_config = ConfigDict(extra="allow")
    threads: int | None = Field(default=None, ge=1, le=64, strict=True)
    latency_budget_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    execution_providers: list[Annotated[str, Field(max_length=128)]] | None = Field(default=None, max_length=16)
    delegates: list[Annotated[str, Field(max_length=256)]] | None = Field(default=None, max_length=16)
    qdq_fusion: bool | None = Field(default=None, strict=True)  # exporters/kernels.py


class Manifest(BaseModel):
    """Versioned description of one exported model. See DESIGN.md, 'Bundle'."""

    model_config = ConfigDict(extra="allow")
    schema_version: int = SCHEMA_VERSION
    name: str
    version: str = "1"
    created: str
    target: dict[str, Any]  # {"id", "sha256", "arch", "runtime", "execution_providers", "threads"}; see TargetSpec
    format: Literal["onnx", "tflite"]
    precision: Literal["fp32", "fp16", "int8"]
    model_file: str
    task: Literal["classify", "detect", "embed", "raw"] = "raw"
    labels_file: str | None = None
    inputs: list[InputSpec] = Field(min_length=1)  # inputs[0] is the frame's
    outputs: list[OutputSpec] = Field(min_length=1)
    files: dict[str, FileEntry] = Field(default_factory=dict)
    compression: dict[str, Any] = Field(default_factory=dict)
    validation: dict[str, Any] = Field(default_factory=dict)
    latency: dict[str, Any] = Field(default_factory=dict)
    toolchain: dict[str, str] = Field(default_factory=dict)

    @field_validator("schema_version")
    @classmethod
    def _schema_version(cls, v: int) -> int:
        """A manifest of a later schema may mean something this version would misread: refused, not guessed."""
        if not 1 <= v <= SCHEMA_VERSION:
            raise ValueError(f"schema_version {v}: this lepton-edge reads manifests of schema 1..{SCHEMA_VERSION} "
                             "(a bundle made by a newer lepton-edge needs that version)")
        return v

    @field_validator("target")
    @classmethod
    def _target(cls, v: dict) -> dict:
        TargetSpec.model_validate(v)
        return v  # kept as the dict it was: its bytes are what was signed

    @field_validator("files")
    @classmethod
    def _files(cls, v: dict) -> dict:
        if len(v) > MAX_FILES:
            raise ValueError(f"more than {MAX_FILES} files")
        for rel in v:
            safe_relpath(rel, "file")
            if rel in (MANIFEST, SIGNATURE):
                raise ValueError(f"files must not list {rel}")
        return v

    @model_validator(mode="after")
    def _listed(self, info: ValidationInfo) -> Manifest:
        """The model and labels are among `files`, so a signature over the manifest covers them.

        Only a manifest read from a bundle (context {"complete": True}) must be complete: an
        exporter builds one before write_manifest() fills in `files`."""
        for what, rel in (("model_file", self.model_file), ("labels_file", self.labels_file)):
            if rel is None:
                continue
            safe_relpath(rel, what)
            if (info.context or {}).get("complete") and rel not in self.files:
                raise ValueError(f"{what} {rel!r} is not listed in files")
        return self


def guess_layout(dims: list) -> Literal["NCHW", "NHWC"] | None:
    """NHWC when the last of four dims looks like channels (1, 3, 4) and the second does not;
    NCHW when the second does; None when neither tells (not an image, or ambiguous). An image is more
    than one pixel high and wide where its size is known: a [1, 1, 1, 1404] output (a face mesh's
    landmarks) is a vector in a 4-D tensor, not a 1 x 1404 picture."""
    if len(dims) != 4:
        return None

    def sized(h, w) -> bool:
        return all(not isinstance(d, int) or d != 1 for d in (h, w))
    if dims[3] in (1, 3, 4) and dims[1] not in (1, 3, 4):
        return "NHWC" if sized(dims[1], dims[2]) else None
    return "NCHW" if dims[1] in (1, 3, 4) and sized(dims[2], dims[3]) else None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_capped(path: Path, cap: int, what: str) -> bytes:
    """The bytes of a regular file (not a symlink, FIFO or device) of at most `cap` bytes.

    Why: the size is checked on the open file before reading, so a huge, sparse or endless
    file costs one stat, and a symlink cannot make us read something outside the bundle.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise BadInput(f"{path}: {what} not found") from None
    except OSError as e:
        raise BadInput(f"{path}: cannot read {what} ({e.strerror or e})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # (before fdopen, which refuses a directory with its own error)
        os.close(fd)
        raise BadInput(f"{path}: {what} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        if st.st_size > cap:
            raise BadInput(f"{path}: {what} is {st.st_size} bytes, over the limit of {cap}")
        data = f.read(cap + 1)
    if len(data) > cap:
        raise BadInput(f"{path}: {what} grew past the limit of {cap} bytes while being read")
    return data


def parse_json(data: bytes, where: str, what: str) -> Any:
    """JSON from untrusted bytes: bad UTF-8, bad syntax or absurd nesting -> one BadInput line."""
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadInput(f"{where}: invalid {what} (not UTF-8 text)") from None
    except RecursionError:
        raise BadInput(f"{where}: invalid {what} (nested too deeply)") from None
    except ValueError as e:
        raise BadInput(f"{where}: invalid {what} ({str(e).splitlines()[0][:200]})") from None


def first_error(e: ValidationError) -> str:
    """'field.path: message' of a pydantic error, one line and short."""
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or "manifest"
    return f"{loc}: {err['msg'].removeprefix('Value error, ')}"[:300]


def parse_manifest(data: bytes, where: str) -> Manifest:
    """The Manifest in `data` (the exact bytes a signature covers), or one BadInput line."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise BadInput(f"{where}: manifest over the limit of {MAX_MANIFEST_BYTES} bytes")
    raw = parse_json(data, where, "manifest")
    if not isinstance(raw, dict):
        raise BadInput(f"{where}: invalid manifest (not a JSON object)")
    try:
        return Manifest.model_validate(raw, context={"complete": True})
    except RecursionError:
        raise BadInput(f"{where}: invalid manifest (nested too deeply)") from None
    except ValidationError as e:
        raise BadInput(f"{where}: invalid manifest ({first_error(e)})") from None


def read_manifest_bytes(bundle_dir: Path) -> bytes:
    """manifest.json's bytes, size-capped; "not a bundle" for a directory without one."""
    p = Path(bundle_dir)
    mf = p / MANIFEST
    if not os.path.lexists(mf):
        raise BadInput(f"{p}: not a bundle (no {MANIFEST})")
    return read_capped(mf, MAX_MANIFEST_BYTES, MANIFEST)


def open_inside(root: Path, rel: str) -> int:
    """A read-only fd for `rel` under `root`, following no symlink on the way (each directory
    is opened with O_NOFOLLOW relative to the previous one), and only for a regular file."""
    safe_relpath(rel)
    parts = rel.split("/")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
        out = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(out).st_mode):
        os.close(out)
        raise OSError(f"{rel} is not a regular file")
    return out


def check_sizes(manifest: Manifest, max_bytes: int, where: str) -> int:
    """Each declared size and their total within the budget; the total. No file is touched."""
    total = 0
    for rel, entry in manifest.files.items():
        if entry.size > max_bytes:
            raise BadInput(f"bundle {where}: {rel} declares {entry.size} bytes, over the bundle limit of {max_bytes}")
        total += entry.size
    if total > max_bytes:
        raise BadInput(f"bundle {where}: files total {total} bytes, over the bundle limit of {max_bytes}")
    return total


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
        f = self.path / self.manifest.labels_file
        try:
            return read_capped(f, MAX_LABELS_BYTES, "labels file").decode("utf-8").splitlines()
        except UnicodeDecodeError:
            raise BadInput(f"{f}: labels file is not UTF-8 text") from None

    def __repr__(self) -> str:
        m = self.manifest
        return f"Bundle({str(self.path)!r}, {m.format}/{m.precision}, target={m.target.get('id')})"

    @classmethod
    def load(cls, path: str | Path, verify: bool = True, max_bytes: int = MAX_BUNDLE_BYTES) -> Bundle:
        """Read a bundle; with verify, refuse it when a file is missing, unlisted, of another
        size than declared, or its sha256 differs."""
        p = Path(path)
        return cls.from_bytes(p, read_manifest_bytes(p), verify, max_bytes)

    @classmethod
    def from_bytes(cls, path: Path, data: bytes, verify: bool = True, max_bytes: int = MAX_BUNDLE_BYTES) -> Bundle:
        """A bundle whose manifest is `data` (bytes already read, e.g. the ones a signature was
        checked over, so the file cannot change in between)."""
        b = cls(Path(path), parse_manifest(data, str(Path(path) / MANIFEST)))
        if verify:
            b.verify(max_bytes)
        return b

    def verify(self, max_bytes: int = MAX_BUNDLE_BYTES) -> None:
        """Sizes first (declared vs the budget, then vs the file: one stat each), then unlisted
        files, then the sha256 of each: nothing is hashed before everything cheap passed."""
        check_sizes(self.manifest, max_bytes, str(self.path))
        fds = {}
        try:
            for rel, entry in self.manifest.files.items():
                try:
                    fds[rel] = open_inside(self.path, rel)
                except OSError:
                    raise BadInput(f"bundle {self.path}: file {rel} listed in the manifest is missing "
                                   "(or not a regular file inside the bundle)") from None
                size = os.fstat(fds[rel]).st_size
                if size != entry.size:
                    raise BadInput(f"bundle {self.path}: checksum mismatch for {rel} (size {size}, the manifest "
                                   f"says {entry.size}); refusing to use it")
            self._no_unlisted()
            for rel, entry in self.manifest.files.items():
                if _sha256_fd(fds[rel], entry.size) != entry.sha256:
                    raise BadInput(f"bundle {self.path}: checksum mismatch for {rel}; refusing to use it")
        finally:
            for fd in fds.values():
                os.close(fd)

    def _no_unlisted(self) -> None:
        """A bundle lists every file it holds (but manifest.json and signature): an extra file
        is something no signature covers."""
        listed = set(self.manifest.files) | {MANIFEST, SIGNATURE}
        seen = 0
        for top, dirs, names in os.walk(self.path):
            for name in names + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
                seen += 1
                rel = Path(top, name).relative_to(self.path).as_posix()
                if rel not in listed:
                    raise BadInput(f"bundle {self.path}: {rel} is not listed in the manifest; refusing to use it")
            if seen > MAX_FILES + 2:
                raise BadInput(f"bundle {self.path}: more than {MAX_FILES} files")


def _sha256_fd(fd: int, size: int) -> str:
    h = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    left = size + 1  # one byte past the declared size: a file that grew does not match
    while left > 0 and (block := os.read(fd, min(1 << 20, left))):
        h.update(block)
        left -= len(block)
    return h.hexdigest()


@contextmanager
def staging(final: Path) -> Iterator[Path]:
    """Write a bundle in a temporary sibling directory; move it into place only on success.

    Why: a failed export (validation or budget) must leave nothing behind that a user or a
    deploy could mistake for a good bundle. The folder gets the mode a new folder would (mkdtemp
    makes it 0700: a service user or a web server could not read the bundle).
    """
    final = Path(final)
    check_replaceable(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        check_replaceable(final)  # (again: the export took minutes)
    except OSError as e:  # a full disk, a quota, a mount gone read-only: one line (it was a traceback, exit 1)
        shutil.rmtree(tmp, ignore_errors=True)
        raise BadInput(f"cannot write the bundle in {final.parent}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def check_replaceable(final: Path) -> None:
    """A bundle may be written at `final`: nothing is there, an empty folder, or a bundle (a folder
    with a manifest.json), which it replaces. Anything else is one line, before any work.

    Why: the bundle's folder is replaced whole, and its name comes from the model's file name and
    --name: a folder of the user's that happened to have that name was deleted without a word, and
    a file or a symlink there failed only after the export, with a traceback."""
    final = Path(final)
    if final.is_symlink():
        raise BadInput(f"{final} is a symbolic link: a bundle is written as a folder of its own; remove the link "
                       "or choose another --out or --name")
    if final.exists() and not final.is_dir():
        raise BadInput(f"{final} exists and is not a folder: choose another --out or --name")
    if final.is_dir() and not (final / MANIFEST).is_file() and any(final.iterdir()):
        raise BadInput(f"{final} exists and is not a bundle (no {MANIFEST}); lepton-edge replaces only a bundle: "
                       "move it away or choose another --out or --name")


def _umask() -> int:
    """This process's umask, read without setting it (os.umask sets it, for every thread at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


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
