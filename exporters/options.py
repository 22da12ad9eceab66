"""`ExportOptions`: every setting of one export, typed and validated once.

Why one model: the CLI (`lepton-edge export`), the Python API (`lepton_edge.export`) and
`--compare` used to write the same ~30 parameters out three times, and only the CLI checked them
(`color="rgb"` or a 2-value mean for 3 channels reached numpy as a broadcast error). Here each
setting is declared once, with its range; all three callers build this model, so a bad value is
one BadInput line naming the argument (or the flag, for the CLI) before any work starts.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from lepton_edge.errors import BadInput

Task = Literal["classify", "detect", "segment", "embed", "raw"]  # exporters/validation.TASKS, without numpy
TASKS: tuple[str, ...] = get_args(Task)
SIZE_UNITS = {"": 1, "B": 1, "KB": 1000, "K": 1000, "KIB": 1024, "MB": 1000**2, "M": 1000**2, "MIB": 1024**2,
              "GB": 1000**3, "G": 1000**3, "GIB": 1024**3}
MIN_MEMORY = 64 << 20
# 1 EiB: any real size or memory limit is far under it; '1e300GB' would be an OverflowError in int()
MAX_SIZE = 1 << 60
# the schema's bound for a profile's calibration_samples; a count past it only makes an export run for days
MAX_SAMPLES = 100_000
MAX_FINETUNE_EPOCHS = 10_000

Fraction = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False, strict=True)]
Count = Annotated[int, Field(ge=1, strict=True)]
Samples = Annotated[int, Field(ge=1, le=MAX_SAMPLES, strict=True)]
Number = Annotated[float, Field(allow_inf_nan=False, strict=True)]
PathLike = str | Path


def parse_size(text: str | int | None, flag: str = "--max-size") -> int | None:
    """'1MB' -> 1_000_000, '512KiB' -> 524288, 1234 -> 1234.

    Bytes given as an int are held to what the text form allows: 0 would read as "no limit" and a
    negative count failed every export on its size check, neither what was asked for."""
    if text is None:
        return None
    if isinstance(text, int) and not isinstance(text, bool):
        if not 1 <= text <= MAX_SIZE:
            raise BadInput(f"{flag} must be a positive number of bytes up to 1 EiB (or like 1MB, 800KB), got {text!r}")
        return text
    if not isinstance(text, str):
        raise BadInput(f"{flag} must look like 1MB, 800KB or 1048576, got {text!r}")
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("ABGIKMB")  # noqa: B005 - strips the unit letters, a set of characters
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1
    product = value * SIZE_UNITS[unit] if unit in SIZE_UNITS and math.isfinite(value) else 0.0
    if product > MAX_SIZE:  # ('1e300GB' is inf bytes: int() of it was an OverflowError)
        raise BadInput(f"{flag} must be at most 1 EiB, got {text!r}")
    n = int(product)
    if n < 1:  # '0.5B' too: 0 would read as "no limit"
        raise BadInput(f"{flag} must look like 1MB, 800KB or 1048576, got {text!r}")
    return n


def parse_input_values(given: Any) -> dict[str, list[float]]:
    """--input-value NAME=V1,V2,... (repeatable) or the Python API's {name: values} -> {name: [floats]}.

    Only the form is checked here (a name, numbers, each name once); whether the model has that
    input and how many values it takes is the model loader's check (model_source), which knows
    the model."""
    items: list[tuple[Any, Any]]
    if isinstance(given, dict):
        items = list(given.items())
    elif isinstance(given, (list, tuple)) and all(isinstance(x, str) for x in given):
        items = []
        for text in given:
            name, eq, values = text.partition("=")
            if not eq or not name.strip():
                raise ValueError(f"must look like NAME=V1,V2,... (e.g. scale_factor=1,1), got {text!r}")
            items.append((name.strip(), values))
    else:
        raise ValueError(f"must be a dict of input -> values or NAME=V1,V2,... strings, got {type(given).__name__}")
    out: dict[str, list[float]] = {}
    for name, values in items:
        if not isinstance(name, str) or not name:
            raise ValueError(f"input names must be non-empty strings, got {name!r}")
        if name in out:
            raise ValueError(f"{name!r} is given twice")
        raw = [x for x in values.replace(" ", "").split(",") if x] if isinstance(values, str) else values
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            raw = [raw]
        if not isinstance(raw, (list, tuple)) or not raw:
            raise ValueError(f"{name}: give one or more numbers, got {values!r}")
        try:
            nums = [float(x) if not isinstance(x, bool) else math.nan for x in raw]
        except (TypeError, ValueError):
            nums = [math.nan]
        if not all(math.isfinite(x) for x in nums):
            raise ValueError(f"{name}: values must be finite numbers, got {values!r}")
        out[name] = nums
    return out


def parse_memory(value: str | int | None) -> int | None:
    """--max-memory: '4GB', '512MiB' or bytes; None keeps the default (available memory less a margin)."""
    try:
        n = parse_size(value, "--max-memory")
    except BadInput as e:
        if "at most" in str(e):  # in the form asked for, only too large
            raise
        raise BadInput(f"--max-memory must look like 4GB, 512MiB or 1073741824, got {value!r}") from None
    if n is not None and n < MIN_MEMORY:
        raise BadInput(f"--max-memory must be at least 64MiB, got {value!r}")
    return n


class ExportOptions(BaseModel):
    """What to export and how: the fields are the keyword arguments of `lepton_edge.export` and,
    dashes for underscores, the flags of `lepton-edge export` (`eval` is `--eval`, `format` is
    `--format`, `out` is `--out`, `input_values` the repeatable `--input-value`; `holdout` and
    `measure_latency` are the Python API's only). None means "the target profile's default" where a
    profile has one.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    target: str = "x86-cpu"  # profile id or a .toml path
    out: Path = Path("out")  # parent directory of the bundle
    # the bundle folder's name stem (writer.bundle_name makes it a safe folder name): no path, no leading '.'
    name: str | None = Field(default=None, min_length=1, max_length=128)
    format: str | None = None  # a registered exporter (onnx, tflite, or one added through an entry point)
    precision: Literal["fp32", "fp16", "int8"] | None = None
    layout: Literal["NCHW", "NHWC"] | None = None
    int8_io: bool = False
    # the model and its input
    input_shape: list[Annotated[int, Field(ge=1, strict=True)]] | None = Field(default=None, min_length=2,
                                                                                max_length=8)
    weights: PathLike | None = None
    labels: list[Annotated[str, Field(strict=True)]] | None = None
    color: Literal["RGB", "BGR", "GRAY"] | None = None
    # how a frame of another shape becomes the input (calibration, validation and the device alike);
    # letterbox keeps the aspect ratio, which a detector of wide images (captchas, documents) needs
    resize: Literal["stretch", "letterbox", "center_crop"] | None = None
    mean: list[Number] | None = None
    std: list[Number] | None = None
    # the constants fed to a multi-input model's non-image inputs (else a rule by name, datasets.constant_value);
    # input name -> its values flat in row-major order; the CLI's repeatable --input-value NAME=V1,V2
    input_values: dict[str, list[float]] | None = None
    # data
    calib: PathLike | None = None
    calib_samples: Samples | None = None
    eval: PathLike | None = None
    eval_limit: Count | None = None
    train: PathLike | None = None
    holdout: Samples = 64
    allow_synthetic_calibration: bool = False
    # compression
    prune: Annotated[float, Field(ge=0.0, le=0.99, allow_inf_nan=False, strict=True)] | None = None
    finetune_epochs: Annotated[int, Field(ge=0, le=MAX_FINETUNE_EPOCHS, strict=True)] = 0
    # percentage points of labelled accuracy that pruning (and fine-tuning) may cost, against the unpruned model
    max_prune_drop: Annotated[float, Field(ge=0.0, le=100.0, allow_inf_nan=False, strict=True)] = 2.0
    recipes: list[Annotated[str, Field(strict=True)]] | None = None
    search_time: Annotated[float, Field(gt=0.0, le=86400.0, allow_inf_nan=False, strict=True)] = 180.0
    max_memory: str | Annotated[int, Field(strict=True)] | None = None
    max_size: str | Annotated[int, Field(strict=True)] | None = None
    # validation (validation.Thresholds)
    task: Task | None = None
    min_agreement: Fraction | None = None
    max_accuracy_drop: Annotated[float, Field(ge=0.0, le=100.0, allow_inf_nan=False, strict=True)] = 0.5
    min_confident_kept: Fraction = 0.99
    min_top5: Fraction = 0.98
    min_sqnr: Annotated[float, Field(ge=-200.0, le=200.0, allow_inf_nan=False, strict=True)] = 12.0
    min_cosine: Fraction = 0.97
    min_f1: Fraction = 0.9
    min_mask_iou: Fraction = 0.8
    min_correlation: Fraction = 0.5
    measure_latency: bool = True

    @field_validator("max_size")
    @classmethod
    def _max_size(cls, v):
        _as_value_error(parse_size, v)
        return v

    @field_validator("max_memory")
    @classmethod
    def _max_memory(cls, v):
        _as_value_error(parse_memory, v)
        return v

    @field_validator("recipes")
    @classmethod
    def _recipes(cls, v):
        if v is not None and not v:  # (an empty list once meant the target's recipes, silently)
            raise ValueError("recipes is empty: name at least one recipe, or leave it out (None) for the target's")
        if v:
            from lepton_edge import targets

            try:
                targets.QuantizationSettings(recipes=v)
            except ValidationError as e:  # one line naming the unknown recipe
                raise ValueError(e.errors()[0]["msg"].removeprefix("Value error, ")) from None
        return list(dict.fromkeys(v)) if v else None  # (a recipe named twice is tried once)

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        if v is not None and ("/" in v or "\\" in v or "\0" in v or v.startswith(".")):
            raise ValueError(f"a bundle name, not a path: no '/', '\\' or leading '.', got {v!r}")
        # the name reaches the manifest, the fleet's views and terminals as it is: an escape sequence or a
        # line break there would repaint a terminal or forge a line
        if v is not None and not v.isprintable():
            raise ValueError(f"printable characters only (no control characters or line breaks), got {v!r}"[:200])
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v):
        """What the CLI's labels file gives: one class a line. labels.txt is written one label a line and
        read back with splitlines(), so a label holding any line break (\\n, \\r, U+0085, U+2028...) would
        shift every class after it, a blank one would be a class named '', and a file over the bundle's
        labels limit is one no device loads."""
        if v is None:
            return v
        from lepton_edge.bundle import MAX_LABELS_BYTES

        total = 0
        for i, label in enumerate(v):
            if not label.strip():
                raise ValueError(f"label {i} is blank; give each class a name")
            if label.splitlines() != [label] or "\0" in label:
                raise ValueError(f"label {i} holds a line break or NUL ({label[:40]!r}); one class name a label")
            try:
                total += len(label.encode("utf-8")) + 1
            except UnicodeEncodeError:  # a lone surrogate: labels.txt is UTF-8
                raise ValueError(f"label {i} is not valid Unicode text ({label[:40]!r})") from None
        if total > MAX_LABELS_BYTES:
            raise ValueError(f"labels take {total} bytes as labels.txt, over the {MAX_LABELS_BYTES >> 20} MiB a "
                             "bundle may hold")
        return v

    @field_validator("target", mode="before")
    @classmethod
    def _target_path(cls, v):
        return str(v) if isinstance(v, Path) else v  # a .toml path given as a Path

    @field_validator("out", mode="after")
    @classmethod
    def _out_home(cls, v: Path) -> Path:
        try:
            return v.expanduser()  # out="~/bundles" from Python (a shell expands it for the CLI)
        except RuntimeError:  # '~nosuchuser/x', or no home directory: pathlib raises RuntimeError
            raise ValueError(f"cannot expand '~' in {str(v)!r}: no such user or home directory") from None

    @field_validator("input_values", mode="before")
    @classmethod
    def _input_values(cls, v):
        return parse_input_values(v) if v else None

    @field_validator("std")
    @classmethod
    def _std(cls, v):
        # a standard deviation is positive: 0 divides by zero, a negative one flips the input the model was
        # trained on (and broke the normalisation range checks); 1e-46 is 0 as the float32 it is used as
        if v is not None and any(not np.float32(x) > 0 for x in v):
            raise ValueError(f"values must be positive (must not contain 0 or a negative value), got {v}"[:200])
        return v

    @field_validator("mean", "std")
    @classmethod
    def _float32(cls, v):
        if v is not None and any(abs(x) > float(np.finfo(np.float32).max) for x in v):
            raise ValueError("values must fit a float32 (the input's type), under 3.4e38")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ExportOptions:
        channels = {"GRAY": (1,), None: (1, 3)}.get(self.color, (1, 3))
        for what in ("mean", "std"):
            v = getattr(self, what)
            if v is not None and len(v) not in channels:
                have = f"{self.color} input" if self.color else "an input of 1 or 3 channels"
                raise ValueError(f"{what} has {len(v)} value(s); {have} takes "
                                 f"{' or '.join(map(str, channels))} (one per channel)")
        if self.finetune_epochs and not self.prune:
            raise ValueError("finetune_epochs applies after prune; give prune RATIO")
        if self.int8_io and self.format not in (None, "tflite"):
            raise ValueError("int8_io applies to TFLite int8 (ONNX QDQ models keep float input and output)")
        return self

    # ---- derived values ------------------------------------------------------------------------

    @property
    def max_size_bytes(self) -> int | None:
        return parse_size(self.max_size)

    @property
    def max_memory_bytes(self) -> int | None:
        return parse_memory(self.max_memory)

    def thresholds(self):
        """validation.Thresholds: the gate the validator holds every artifact to."""
        from lepton_edge.exporters import validation as val

        return val.Thresholds(min_agreement=self.min_agreement, max_accuracy_drop=self.max_accuracy_drop,
                              min_confident_kept=self.min_confident_kept, min_top5=self.min_top5,
                              min_sqnr=self.min_sqnr, min_cosine=self.min_cosine, min_f1=self.min_f1,
                              min_mask_iou=self.min_mask_iou, min_correlation=self.min_correlation)

    # ---- building one --------------------------------------------------------------------------

    @classmethod
    def of(cls, base: ExportOptions | None = None, *, flags: bool = False, **values: Any) -> ExportOptions:
        """Options from keyword arguments (over `base` when given), or one BadInput line.

        `flags` names the CLI flag (`--calib-samples`) in the message instead of the argument."""
        if base is not None and not isinstance(base, ExportOptions):
            raise BadInput(f"options must be an ExportOptions, got {type(base).__name__}")
        unknown = sorted(set(values) - set(cls.model_fields))
        if unknown:
            from lepton_edge.errors import closest

            raise BadInput(f"unknown export option {unknown[0]!r}{closest(unknown[0], list(cls.model_fields))}")
        data = {**(base.model_dump(exclude_unset=True) if base is not None else {}), **values}
        try:
            return cls(**data)
        except ValidationError as e:
            raise BadInput(describe_error(e, flags)) from None

    def varied(self, **changes: Any) -> ExportOptions:
        """A copy with `changes`, validated (`--compare` makes one per format and precision)."""
        return ExportOptions.of(self, **changes)


def _as_value_error(fn, v) -> None:
    """parse_size/parse_memory's BadInput as the ValueError pydantic reports, less the flag name
    (the error line puts the argument or the flag in front)."""
    try:
        fn(v)
    except BadInput as e:
        raise ValueError(str(e).split(" ", 1)[1]) from None


FLAGS = {"input_values": "--input-value"}  # a repeatable flag, one value each: named in the singular


def flag_name(field: str) -> str:
    return FLAGS.get(field, "--" + field.replace("_", "-"))


def describe_error(e: ValidationError, flags: bool = False) -> str:
    """One line: the argument (or flag), what is wrong, and the value given."""
    err = e.errors()[0]
    loc = [str(x) for x in err["loc"]]
    field = loc[0] if loc else ""
    where = (flag_name(field) if flags else field) if field else ""
    if len(loc) > 1 and loc[1].isdigit():
        where += f"[{loc[1]}]"
    msg = err["msg"].removeprefix("Value error, ")
    if flags and err["type"] == "value_error":  # our messages name arguments; the CLI user typed flags
        names = "|".join(sorted(ExportOptions.model_fields, key=len, reverse=True))
        msg = re.sub(rf"\b({names})\b(?=[\s;:,)]|$)", lambda m: flag_name(m.group(1)), msg)
    got = "" if err["type"] in ("value_error", "missing") or not field else f", got {err.get('input')!r}"[:80]
    return f"{where + ': ' if where else ''}{msg}{got}"[:300]
