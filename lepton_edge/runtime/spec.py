"""Input spec and task for a plain .onnx/.tflite file that is not a bundle.

Why: third-party models arrive without a manifest. Defaults come from the model itself (shape,
dtype, layout, the input's quantization, Ultralytics-style metadata), and `--input-spec` fills
in or overrides what a file cannot say (colour order, normalisation, size of dynamic inputs).
"""
from __future__ import annotations

import ast
import json
import math
from collections.abc import Set as AbstractSet
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from lepton_edge import frame_input
from lepton_edge.bundle import DTYPES, InputSpec, first_error, guess_layout
from lepton_edge.errors import BadInput
from lepton_edge.runtime.backend import Backend

DEFAULT_SIZE = 224
_KEYS = ("layout", "color", "resize", "scale", "mean", "std", "size", "dtype", "name")


def _number(text, key: str) -> float:
    """A finite number from 0.5, '1/255' or a JSON number; one line for anything else (1/0, nan, 'x')."""
    try:
        if isinstance(text, bool):
            raise ValueError
        if isinstance(text, str) and "/" in text:
            a, b = text.split("/", 1)
            v = float(a) / float(b)
        else:
            v = float(text)
    except (ValueError, TypeError, ZeroDivisionError, OverflowError):
        raise BadInput(f"--input-spec: bad value for {key}: {str(text)[:40]!r} (a number, e.g. 0.5 or 1/255)") \
            from None
    if not math.isfinite(v):
        raise BadInput(f"--input-spec: bad value for {key}: {str(text)[:40]!r} (must be finite)")
    return v


_CHOICES = {"layout": ("NCHW", "NHWC"), "color": ("RGB", "BGR", "GRAY"),
            "resize": ("stretch", "letterbox", "center_crop")}
_DTYPES = ("float32", "float16", "uint8", "int8")
MAX_SIDE = 8192
MAX_SPEC_BYTES = 64 * 1024


def _value(key: str, val):
    """One override, from a 'key=value' string or a JSON value, checked: BadInput names the key."""
    if key in ("mean", "std"):
        items = val.split(",") if isinstance(val, str) else val if isinstance(val, list) else [val]
        if not 1 <= len(items) <= 4:
            raise BadInput(f"--input-spec: {key} must be 1 to 4 numbers, got {str(val)[:60]!r}")
        out = [_number(v, key) for v in items]
        if key == "std" and any(v == 0 for v in out):
            raise BadInput("--input-spec: std must not be 0")
        return out
    if key == "scale":
        v = _number(val, key)
        if v == 0:
            raise BadInput("--input-spec: scale must not be 0")
        return v
    if key == "size":
        return _size(val)
    if not isinstance(val, str):
        raise BadInput(f"--input-spec: {key} must be text, got {str(val)[:60]!r}")
    val = val.strip()
    if key in ("layout", "color"):
        val = val.upper()
    if key in _CHOICES and val not in _CHOICES[key]:
        raise BadInput(f"--input-spec: {key} must be one of {', '.join(_CHOICES[key])}, got {val[:40]!r}")
    if key == "dtype" and val not in _DTYPES:
        raise BadInput(f"--input-spec: dtype must be one of {', '.join(_DTYPES)}, got {val[:40]!r}")
    if key == "name" and not 0 < len(val) <= 256:
        raise BadInput("--input-spec: name must be 1 to 256 characters")
    return val


def _size(val) -> tuple[int, ...]:
    """'HxW', 'N', [H, W], [N] or N -> (H, W), each side a whole number from 1 to MAX_SIDE."""
    dims: list
    if isinstance(val, str):
        h, _, w = val.lower().partition("x")
        dims = [h, w or h]
    elif isinstance(val, list) and len(val) in (1, 2):
        dims = [val[0], val[-1]]
    elif isinstance(val, int) and not isinstance(val, bool):
        dims = [val, val]
    else:
        raise BadInput(f"--input-spec: size must be HxW or [H, W], got {str(val)[:60]!r}")
    try:
        hw = tuple(int(d) for d in dims if not isinstance(d, (bool, float)))
    except (ValueError, TypeError):
        hw = ()
    if len(hw) != 2 or not all(1 <= d <= MAX_SIDE for d in hw):
        raise BadInput(f"--input-spec: size must be two whole numbers from 1 to {MAX_SIDE}, got {str(val)[:60]!r}")
    return hw


def _checked(raw: dict) -> dict:
    out = {}
    for key, val in raw.items():
        k = str(key).strip().lower()
        if k not in _KEYS:
            raise BadInput(f"--input-spec: unknown key {str(key)[:40]!r}; keys are {', '.join(_KEYS)}")
        out[k] = _value(k, val)
    return out


def parse_overrides(text: str | dict | None) -> dict:
    """`--input-spec`: a JSON file, a JSON object, or 'key=value;key=value' with keys
    layout, color, resize, scale (e.g. 1/255), mean, std (comma lists), size (HxW), dtype, name.
    Every value is checked here, so a bad one is one line, not an error deep in preprocessing."""
    if text is None:
        return {}
    if isinstance(text, dict):
        return _checked(text)
    if not isinstance(text, str):
        raise BadInput(f"--input-spec must be text or a dict, got {type(text).__name__}")
    raw = text.strip()
    if raw.endswith(".json") and Path(raw).is_file():
        try:
            with open(raw, "rb") as f:
                data = f.read(MAX_SPEC_BYTES + 1)
            raw = data.decode("utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise BadInput(f"--input-spec: cannot read {text.strip()} as UTF-8 text ({e})") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise BadInput(f"--input-spec: longer than {MAX_SPEC_BYTES // 1024} KB")
    if raw.startswith(("{", "[")):
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise BadInput(f"--input-spec: invalid JSON ({e})") from None
        except RecursionError:
            raise BadInput("--input-spec: JSON nested too deeply") from None
        if not isinstance(obj, dict):
            raise BadInput(f"--input-spec: expected a JSON object, got {type(obj).__name__}")
        return _checked(obj)
    out: dict = {}
    for part in filter(None, (p.strip() for p in raw.replace("\n", ";").split(";"))):
        key, sep, val = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in _KEYS:
            raise BadInput(f"--input-spec: expected key=value with key one of {', '.join(_KEYS)}, got {part[:60]!r}")
        out[key] = val.strip()
    return _checked(out)


def apply_overrides(spec: InputSpec, overrides: dict) -> InputSpec:
    """A copy of spec with the user's fields; size= rewrites the spatial dims of the shape."""
    fields = {k: v for k, v in overrides.items() if k != "size"}
    data = spec.model_dump() | fields
    if "size" in overrides:
        h, w = overrides["size"]
        shape = list(data["shape"])
        if data["layout"] == "NCHW":
            shape[2:4] = [h, w]
        else:
            shape[1:3] = [h, w]
        data["shape"] = shape
    try:
        return InputSpec.model_validate(data)
    except ValidationError as e:  # (a whole-spec error has no field: 'mean [..] and std [..] make ...')
        err = e.errors()[0]
        loc = ".".join(map(str, err["loc"]))
        raise BadInput(f"--input-spec: {loc + ': ' if loc else ''}{err['msg'].removeprefix('Value error, ')}") from None


MAX_META_CHARS = 1 << 20  # a metadata value parsed at most (Ultralytics' names for 1,000 classes are ~20 KB)


def _meta_value(text: str):
    """A literal from a metadata string, or None where it is none (too long, not a literal, nested past the
    parser's depth: RecursionError, MemoryError)."""
    if not isinstance(text, str) or len(text) > MAX_META_CHARS:
        return None
    try:
        return ast.literal_eval(text)
    except Exception:
        return None


def _meta_size(sz) -> tuple[int, int] | None:
    """imgsz as (H, W): one side or [H, W] (or [N]), each a whole number from 1 to MAX_SIDE; else None.
    Why so strict: "1e400" was int(inf), an OverflowError traceback, and "[]" an IndexError."""
    sides = list(sz) if isinstance(sz, (list, tuple)) else [sz]
    if len(sides) not in (1, 2):
        return None
    out = []
    for v in sides:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v != int(v):
            return None
        if not 1 <= int(v) <= MAX_SIDE:
            return None
        out.append(int(v))
    return (out[0], out[-1])


def model_metadata(backend: Backend) -> dict:
    """Ultralytics-style metadata (imgsz, names, task) where the model carries it. A value that is not
    what it should be is left out (the metadata is a hint; the model's own shapes and the user's flags
    still apply), never a traceback."""
    sess = getattr(backend, "session", None)
    if sess is None:
        return {}
    meta = dict(sess.get_modelmeta().custom_metadata_map)
    out: dict = {}
    if "imgsz" in meta and (size := _meta_size(_meta_value(meta["imgsz"]))) is not None:
        out["size"] = size
    if "names" in meta:
        names = _meta_value(meta["names"])
        try:
            labels = [names[k] for k in sorted(names)] if isinstance(names, dict) else \
                list(names) if isinstance(names, (list, tuple)) else None
        except TypeError:  # keys that do not sort (1 and 'a')
            labels = None
        if labels and all(isinstance(n, str) for n in labels):
            out["labels"] = labels
    if meta.get("task") in ("classify", "detect"):
        out["task"] = meta["task"]
    return out


def is_image(spec: InputSpec) -> bool:
    """Whether a camera frame can become this input: 4-D with 1 or 3 channels where either layout puts them
    (or a channel dim left open). Either: a layout given wrong (`--input-spec layout=NCHW` on a [1,16,16,3]
    model) is the user's to correct, and hw() says how. Anything else (audio [1,16000], features [1,128], a
    feature map [1,64,8,8]) takes arrays of its own shape: `export --calib x.npy`, `run --source x.npy`."""
    if len(spec.shape) != 4:
        return False
    return any(not isinstance(c, int) or c in (1, 3) for c in (spec.shape[1], spec.shape[3]))


def spec_from_model(backend: Backend, overrides: dict, meta: dict) -> InputSpec:
    """An InputSpec for the first input of a plain model: what it says, then the user's overrides."""
    if len(backend.inputs) != 1:
        names = ", ".join(i.name for i in backend.inputs)
        raise BadInput(f"the model has {len(backend.inputs)} inputs ({names}); `run` feeds one image input")
    inp = backend.inputs[0]
    shape = list(inp.shape)
    if len(shape) == 3:  # [N,H,W] gray, [C,H,W] or [H,W,C]: the frame's 4-D tensor, fed without one dim
        shape = frame_input.frame_dims(shape)
    if not isinstance(shape[0], int):
        shape[0] = 1
    if len(shape) != 4:  # audio, features, a table's row: fed arrays of its shape (`run --source x.npy`)
        return _array_spec(inp, shape, overrides)
    layout = overrides.get("layout") or guess_layout(shape)
    if layout is None:
        raise BadInput(f"cannot tell the layout of input '{inp.name}' {inp.shape}: pass --input-spec layout=NCHW "
                       "or layout=NHWC")
    c = shape[1] if layout == "NCHW" else shape[3]
    hw = [1, 2] if layout == "NHWC" else [2, 3]
    size = overrides.get("size") or meta.get("size")
    for j, i in enumerate(hw):
        if not isinstance(shape[i], int):
            shape[i] = size[j] if size else DEFAULT_SIZE
    if not isinstance(c, int):
        c = 3
        shape[1 if layout == "NCHW" else 3] = c
    if inp.dtype not in DTYPES or inp.dtype == "bool":
        raise BadInput(f"input '{inp.name}' is of type {inp.dtype}: `run` feeds images as float or integer tensors")
    try:
        spec = InputSpec(name=inp.name, shape=shape, dtype=inp.dtype, layout=layout,
                         color="GRAY" if c == 1 else "RGB", quantization=inp.quantization,
                         **pixel_encoding(inp.dtype, inp.quantization, set(overrides)))
    except ValidationError as e:  # a shape over the input size limit, say
        raise BadInput(f"input '{inp.name}': {first_error(e)}") from None
    return apply_overrides(spec, overrides)


def _array_spec(inp, shape: list, overrides: dict) -> InputSpec:
    """The spec of an input that is not an image: its own shape (a dynamic batch taken as 1), every other
    dim fixed, since nothing says how long an open one is; no pixel settings apply to it."""
    if any(not isinstance(d, int) for d in shape):
        raise BadInput(f"input '{inp.name}' has shape {inp.shape}: not an image, and `run` feeds such an input "
                       "arrays of one fixed shape: export it (`lepton-edge export --input-shape`) to fix its dims")
    if overrides:
        raise BadInput(f"input '{inp.name}' has shape {inp.shape}: not an image, so --input-spec "
                       f"({', '.join(overrides)}) does not apply: its arrays are fed as they are")
    if inp.dtype not in DTYPES or inp.dtype == "bool":
        raise BadInput(f"input '{inp.name}' is of type {inp.dtype}: `run` feeds float or integer arrays")
    try:
        return InputSpec(name=inp.name, shape=shape, dtype=inp.dtype)
    except ValidationError as e:
        raise BadInput(f"input '{inp.name}': {first_error(e)}") from None


def pixel_encoding(dtype: str, quantization: dict | None, given: AbstractSet[str] = frozenset()) -> dict:
    """The scale and mean that feed an input of `dtype` a frame the way such a file expects, when
    nothing (no manifest, no --input-spec) says how it was trained.

    Float inputs take pixels / 255. An integer input takes the pixel bytes themselves: a uint8 input
    the raw 0..255 values, an int8 one the pixel - 128, whatever the input's quantization (TFLite's
    convention, as Coral's and TensorFlow's label_image feed them: the quantization parameters then
    say what those codes mean to the model, so the normalisation is in the model). In the spec's
    terms, with real = scale * (q - zero_point), the codes q come out of normalise() as
    round(x / scale + zero_point) with x = pixel * scale - mean: so scale = the input's scale and
    mean = scale * (offset + zero_point).

    A quantized input wider than 8 bits (TFLite's 16x8 int16) has no such convention: it takes pixels / 255
    like a float input, quantized with its scale and zero point.

    `given`: the --input-spec keys. A quantized input given mean, std or scale is normalised as a
    float input would be (pixel / 255, then mean and std: the real values it was trained on), and its
    quantization encodes those."""
    if not np.issubdtype(np.dtype(dtype), np.integer) or (quantization and given & {"mean", "std", "scale"}):
        return {"scale": 1 / 255.0}
    if quantization and np.dtype(dtype).itemsize > 1:
        # pixel codes are an 8-bit convention: a 16x8 model's int16 input (scale ~1/32768, zero point 0) given
        # the codes 0..255 saw 0.008 for a white pixel, every frame nearly black. Its quantization encodes the
        # float model's input: pixels / 255, as a float input takes them
        return {"scale": 1 / 255.0}
    offset = 128.0 if dtype == "int8" else 0.0
    s, z = (float(quantization["scale"]), float(quantization["zero_point"])) if quantization else (1.0, 0.0)
    return {"scale": s, "mean": [s * (offset + z)]}


# Words in an output's name that say it holds positions, not class scores: a one-vector output named so
# (mediapipe's hand_recrop: `output_crop` [1, 1, 1, 4], two points of a crop) is raw, not a classifier
COORDINATE_NAMES = ("crop", "box", "coord", "landmark", "keypoint", "kpt", "regress", "offset", "roi", "rect")


def named_as_coordinates(name: str) -> bool:
    n = name.lower()
    return any(k in n for k in COORDINATE_NAMES)


def guess_task(backend: Backend, labels: list[str] | None) -> str:
    """classify for one [1, K] output (unless its name says positions: COORDINATE_NAMES); detect for SSD-
    or YOLO-shaped outputs; else raw."""
    outs = backend.outputs
    # a dynamic leading dim is the batch when the input's is too (one frame a run): [N, 1000] is then a
    # classifier's output as [1, 1000] is; with a fixed input batch it counts something (['num_dets', 6])
    batch = bool(backend.inputs) and bool(backend.inputs[0].shape) and not isinstance(backend.inputs[0].shape[0], int)
    dims = [[1, *o.shape[1:]] if batch and o.shape and not isinstance(o.shape[0], int) else list(o.shape)
            for o in outs]
    if len(outs) == 1:
        d = [v for v in dims[0] if v != 1]
        if len(d) == 1:
            return "raw" if named_as_coordinates(outs[0].name) and not labels else "classify"
        sides = [v for v in dims[0][1:] if isinstance(v, int)]
        if len(dims[0]) == 3 and len(sides) == 2:
            small, big = sorted(sides)
            if small >= 5 and big >= 100 and big > 4 * small:
                return "detect"
        return "raw"
    for i, s in enumerate(dims):  # SSD-style: boxes [.., N, 4] beside per-box vectors [.., N]
        if len(s) >= 2 and s[-1] == 4 and isinstance(s[-2], int) and s[-2] > 1:
            n = s[-2]
            if sum(1 for j, o in enumerate(dims) if j != i and [v for v in o if v != 1] == [n]) >= 2:
                return "detect"
    return "raw"
