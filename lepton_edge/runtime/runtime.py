"""`Runtime.load(bundle).predict(frame)`: one model, its preprocessing and its postprocessing.

Why one object: the device needs the manifest's input spec, the labels, the task and an engine
together; a user's code should not have to know which engine a bundle was made for. A bundle is
checked (sha256 of every file) before anything of it runs.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from lepton_edge.bundle import MANIFEST, Bundle, InputSpec
from lepton_edge.errors import BadInput
from lepton_edge.runtime import postprocess as post
from lepton_edge.runtime.backend import MAX_THREADS, Backend, backend_for, format_of
from lepton_edge.runtime.delegates import resolve as resolve_delegates
from lepton_edge.runtime.preprocess import preprocess
from lepton_edge.runtime.spec import (
    apply_overrides,
    guess_task,
    is_image,
    model_metadata,
    parse_overrides,
    spec_from_model,
)

TASKS = ("classify", "detect", "embed", "raw")
# Values of one raw output a JSON line carries whole; a larger one is summarised. Why: a CRNN's [32, 1, 8210]
# logits made 5 MB lines (a 30 fps stream: 500 GB an hour of --jsonl), a text detector's map 0.4 MB.
RAW_JSON_VALUES = 4096


def raw_summary(o) -> dict:
    """A raw output too large for a JSON line: its shape, type and value range, and where its largest
    value is (a map's peak, a sequence's strongest step)."""
    a = np.asarray(o)
    d: dict = {"shape": list(a.shape), "dtype": str(a.dtype), "values_omitted": int(a.size)}
    if a.size and np.issubdtype(a.dtype, np.number):
        f = a.astype(np.float64, copy=False)
        with np.errstate(invalid="ignore"):
            d.update(min=float(np.nanmin(f)), max=float(np.nanmax(f)), mean=float(np.nanmean(f)))
        if np.isfinite(f).any():
            d["argmax"] = [int(i) for i in np.unravel_index(int(np.nanargmax(f)), a.shape)]
    return d
MAX_SIDE = 8192  # pixels per spatial dimension of a model input
MAX_INPUT_VALUES = 1 << 26  # 64 M values, 256 MB as float32: a 20000x20000 spec is refused, not allocated
MAX_RANK = 8  # dimensions of an input that is not an image (an image's are 4)


def check_threads(threads, what: str = "threads") -> None:
    """One line (exit 2) unless None or an int in 1..MAX_THREADS."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise BadInput(f"{what} must be a whole number from 1 to {MAX_THREADS}, got {threads!r}")


def _manifest_threads(v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_THREADS:
        raise BadInput(f"manifest target.threads must be a whole number from 1 to {MAX_THREADS}, got {str(v)[:40]!r}")
    return v


def _manifest_runtime(v) -> str | None:
    """target.runtime names a backend of this installation (it selects, never loads): a short name."""
    if v is None or (isinstance(v, str) and 0 < len(v) <= 64 and v.isprintable()):
        return v
    raise BadInput(f"manifest target.runtime must be a backend's name, got {str(v)[:40]!r}")


def check_input_size(spec: InputSpec) -> None:
    """The input tensor's shape: whole positive dims, at most MAX_RANK of them, no side past MAX_SIDE (of an
    image; MAX_INPUT_VALUES for another input's), no more than MAX_INPUT_VALUES values, checked before an
    engine or a frame buffer is sized by it."""
    dims = list(spec.shape)
    if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
        raise BadInput(f"input {spec.name!r}: shape {dims} must be whole positive numbers")
    shape = [int(d) for d in dims]  # every one a whole number now
    if len(shape) > MAX_RANK:
        raise BadInput(f"input {spec.name!r}: shape {shape} has more than {MAX_RANK} dimensions")
    if (is_image(spec) and max(shape) > MAX_SIDE) or int(np.prod(shape, dtype=np.int64)) > MAX_INPUT_VALUES:
        raise BadInput(f"input {spec.name!r}: shape {shape} is too large (at most {MAX_SIDE} per dimension and "
                       f"{MAX_INPUT_VALUES:,} values)")


def _unlimited_runs(backend: Backend, max_run_s: float | None) -> list[str]:
    """A warning when a run time limit was asked for and the backend has none to apply. Why: the
    limit is only a setting its `Options` may declare (onnxruntime's does; LiteRT cannot stop an
    invoke once started), and a setting a backend does not declare is not passed, so `run --max-run-s`
    or an agent.toml `max_run_s` on a .tflite model was dropped without a word."""
    if max_run_s is None or "max_run_s" in type(backend).Options.model_fields:
        return []
    return [f"max_run_s {max_run_s:g} s: the {type(backend).name} backend cannot stop a run once it has started, "
            "so this model runs without a time limit"]


def _label_mismatch(rt) -> list[str]:
    """A warning when a classifier's labels are not one per class: results then mixed names and numbers
    (`8 0.93, c 0.03`) without a word."""
    if rt.task != "classify" or not rt.labels or not rt.backend.outputs:
        return []
    dims = rt.backend.outputs[0].shape[1:]
    if not dims or not all(isinstance(d, int) for d in dims):
        return []
    n = int(np.prod(dims))
    if n == len(rt.labels):
        return []
    return [f"{rt.name}: {len(rt.labels)} labels for {n} classes; classes past the labels show their index"]


def _positive_f32(v: float) -> bool:
    """v > 0 and still a finite number above 0 as a float32."""
    return math.isfinite(v) and v > 0 and 0 < float(np.float32(v)) < float("inf")


def check_normalisation(spec: InputSpec, where) -> None:
    """mean/std of one value or one per channel, finite, std and scale not 0; the quantization of an
    integer input a finite positive scale and a whole zero point, none on a float input. Why: ImageNet's
    3 means on a GRAY model, or `quantization` on a float32 input, were numpy tracebacks at the first frame."""
    c = spec.shape[1] if spec.layout == "NCHW" else spec.shape[-1]
    for key in ("mean", "std"):
        vals = list(getattr(spec, key) or [])
        if len(vals) not in ((1, c) if isinstance(c, int) else (1, 3)):
            raise BadInput(f"{where}: {key} has {len(vals)} values for an input of {c} channel(s) ({spec.color}); "
                           f"give {'1' if c == 1 else f'1 or {c}'}")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals) or \
                (key == "std" and any(v == 0 for v in vals)):
            raise BadInput(f"{where}: {key} {vals} must be finite numbers" + (", none 0" if key == "std" else ""))
    if not (isinstance(spec.scale, (int, float)) and _positive_f32(spec.scale)):
        # (a float32 one: frames are scaled in float32, where 1e-300 is 0; a negative scale inverts every
        # pixel: both made every frame's result the same, without a word)
        raise BadInput(f"{where}: scale {spec.scale!r} must be a number above 0 (and within float32's range)")
    q = spec.quantization
    if q is None:
        return
    if not np.issubdtype(np.dtype(spec.dtype), np.integer):
        raise BadInput(f"{where}: input quantization {q!r} given for a {spec.dtype} input (only integer inputs "
                       "are quantized)")
    s, z = q.get("scale") if isinstance(q, dict) else None, q.get("zero_point") if isinstance(q, dict) else None
    if not (isinstance(s, (int, float)) and _positive_f32(s) and isinstance(z, (int, float))
            and math.isfinite(z) and float(z).is_integer() and abs(z) <= 2 ** 31):
        raise BadInput(f"{where}: input quantization {str(q)[:100]} must be {{'scale': a positive number, "
                       "'zero_point': a whole number}")


def _reshaped(run: Callable, shape: tuple, x: np.ndarray) -> list[np.ndarray]:
    """The engine call for a 3-D input: the frame's 4-D tensor fed without its batch dim of 1."""
    return run(x.reshape(shape))


def check_against_engine(spec: InputSpec, engine_inputs: list, where: str, claimed: str = "the manifest's") -> None:
    """The manifest's input (name aside) must be what the model takes: same rank and dtype, every
    static dimension equal (a dynamic one takes any size). A bad deploy then fails at load time,
    with one line, not in the pipeline at the first frame. `claimed`: whose spec it is (a plain model file's
    comes from the model and --input-spec: there is no manifest to blame)."""
    if not engine_inputs:
        raise BadInput(f"{where}: the model has no inputs")
    eng = engine_inputs[0]
    shape = list(spec.shape)
    if len(eng.shape) == 3 and len(shape) == 4 and shape[0] == 1:  # a 3-D input: the frame without its batch
        shape = shape[1:]
    if len(shape) != len(eng.shape) or any(isinstance(e, int) and e != d for d, e in zip(shape, eng.shape)):
        fixed = "; the model's size is fixed: leave size out" if claimed != "the manifest's" else ""
        raise BadInput(f"{where}: {claimed} input shape {shape} does not match the model's "
                       f"{list(eng.shape)} (input {eng.name!r}){fixed}")
    if str(spec.dtype) != str(eng.dtype):
        raise BadInput(f"{where}: {claimed} input dtype {spec.dtype} does not match the model's {eng.dtype}")
    mq, eq = spec.quantization, getattr(eng, "quantization", None)
    if isinstance(mq, dict) and eq and not _same_quantization(mq, eq):
        # frames are quantized with the manifest's figures: other than the model's, every result was wrong
        # (a scale of 1e300 made every frame the same input), and nothing said so
        raise BadInput(f"{where}: {claimed} input quantization {str(mq)[:100]} does not match the model's "
                       f"{eq} (input {eng.name!r})")


def _same_quantization(a: dict, b: dict) -> bool:
    try:
        sa, sb, za, zb = float(a["scale"]), float(b["scale"]), float(a["zero_point"]), float(b["zero_point"])
    except (KeyError, TypeError, ValueError):
        return False
    return za == zb and math.isfinite(sa) and abs(sa - sb) <= 1e-6 * max(abs(sb), 1e-30)


def check_outputs(claimed: list, engine_outputs: list, where: str) -> None:
    """The manifest's outputs must be the model's: as many, and every static dimension equal where both
    say one. Why: a hand-edited (or mismatched) manifest's outputs were never compared, and a model with
    no outputs at all ran, giving an empty result for every frame."""
    if not engine_outputs:
        raise BadInput(f"{where}: the model has no outputs")
    if len(claimed) != len(engine_outputs):
        raise BadInput(f"{where}: the manifest lists {len(claimed)} output(s), the model has {len(engine_outputs)}")
    for c, e in zip(claimed, engine_outputs):
        cs, es = list(c.shape), list(e.shape)
        if len(cs) == len(es) and any(isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(cs, es)):
            raise BadInput(f"{where}: the manifest's output shape {cs} does not match the model's {es} "
                           f"(output {e.name!r})")


@dataclass
class Result:
    """One frame's output. `output` is task-shaped: top-k list, detections, embedding, or raw arrays."""

    task: str
    output: Any
    index: int = 0
    timestamp: float = 0.0  # wall clock when the frame was captured
    ms: dict[str, float] = field(default_factory=dict)  # per-stage milliseconds
    frame: np.ndarray | None = field(default=None, repr=False)  # the source frame (for drawing), not serialised
    path: str | None = None  # the image file the frame came from, for image folders

    def to_dict(self, raw_limit: int = RAW_JSON_VALUES) -> dict:
        """JSON-ready. A raw output of more than `raw_limit` values is its summary (raw_summary)."""
        out = self.output
        if self.task == "raw":
            out = [np.asarray(o).tolist() if np.size(o) <= raw_limit else raw_summary(o) for o in out]
        d = {"index": self.index, "ts": round(self.timestamp, 3), "task": self.task, "result": out,
             "ms": {k: round(v, 3) for k, v in self.ms.items()}}
        if self.path:
            d["path"] = self.path
        return d

    def summary(self) -> str:
        """A short human line: 'T-shirt/top 0.97', '3 objects: person 0.91, ...', 'embedding 128 B'."""
        if self.task == "classify":
            return ", ".join(f"{c['label']} {c['score']:.2f}" for c in self.output[:3])
        if self.task == "detect":
            head = ", ".join(f"{d['label']} {d['score']:.2f}" for d in self.output[:3])
            return f"{len(self.output)} object(s)" + (f": {head}" if head else "")
        if self.task == "embed":
            return f"embedding {self.output['dims']} dims, {self.output['bytes']} B"
        return "raw " + " ".join(str(list(np.shape(o))) for o in self.output)


class Runtime:
    """A loaded model: `predict(frame)` = preprocess -> infer -> postprocess."""

    def __init__(self, backend: Backend, spec: InputSpec, task: str, labels: list[str] | None,
                 bundle: Bundle | None = None, path: Path | None = None, top_k: int = 5,
                 conf: float = 0.25, iou: float = 0.45):
        self.backend, self.spec, self.task, self.labels, self.bundle = backend, spec, task, labels, bundle
        self.path = path
        self.top_k, self.conf, self.iou = top_k, conf, iou
        self.head = post.manifest_head(bundle.manifest) if bundle else None  # the detector head the export used
        self.infer = backend.run  # the bare engine call: nothing between the user and the engine
        self._shape = tuple(int(d) for d in spec.shape)
        self._engine_shape = list(self._shape)
        # a frame can become the input; else it takes arrays of its shape (a .npy's rows: capture/arrays.py)
        self.takes_images = is_image(spec)
        if self.takes_images and len(backend.inputs[0].shape) == len(self._shape) - 1:
            # a 3-D input ([1,28,28], [3,64,64]): the frame's tensor without its batch dim of 1
            self._engine_shape = self._engine_shape[1:]
            self.infer = partial(_reshaped, backend.run, tuple(self._engine_shape))
        self._dtype = np.dtype(spec.dtype)
        self.warnings: list[str] = []  # what load() chose to ignore (a manifest's unknown delegate), for the log

    @classmethod
    def load(cls, path: str | Path, *, threads: int | None = None, input_spec: str | dict | None = None,
             task: str | None = None, labels: list[str] | None = None, verify: bool = True,
             providers: list[str] | None = None, leave_cores: int = 0, delegates: dict[str, str] | None = None,
             runtime: str | None = None, max_run_s: float | None = None, max_run_bytes: int | None = None,
             **post_options) -> Runtime:
        """A bundle directory (checked against its manifest), or a plain .onnx/.tflite file.

        threads: default the target profile's, capped at this machine's cores less `leave_cores`
        (the pipeline leaves one to capture and preprocessing: an engine that wants every core
        and a decoder that needs one only slow each other down); 1..64 when given.
        delegates: the LOCAL allow-list {name: library path} (agent config, `run --delegate`); a
        manifest may only name one of these (runtime/delegates.py). For a plain model file every
        listed delegate is used: the user named them on this machine.
        runtime: a registered backend by name (runtime/backend.py), over the manifest's
        `target.runtime`; either only selects among what this installation registered. The
        backend receives only the settings its `Options` declare (threads, providers, delegates).
        max_run_s: one run's time limit where the backend has one (onnxruntime: 120 s unless given).
        max_run_bytes: how far this process may grow while one run is in progress (default max(2 GiB, 12x
        the model's files)); past it the process ends with one line (runtime/hard_stop.py)."""
        p = Path(path)
        check_threads(threads, "threads")
        for key in ("conf", "iou"):  # (--iou -1 failed in OpenCV's NMS at every frame; --conf nan kept nothing)
            v = post_options.get(key)
            if v is not None and not (isinstance(v, (int, float)) and 0 <= v <= 1):
                raise BadInput(f"--{key} must be between 0 and 1, got {v!r}")
        if task is not None and task not in TASKS:
            raise BadInput(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        overrides = parse_overrides(input_spec)
        warnings: list[str] = []
        if p.is_dir() or p.name == MANIFEST:
            bundle = Bundle.load(p.parent if p.name == MANIFEST else p, verify=verify)
            m = bundle.manifest
            wanted = _manifest_threads(m.target.get("threads", 1))
            n = threads or max(1, min(wanted, (os.cpu_count() or 1) - leave_cores))
            libs, warnings = resolve_delegates(m.target.get("delegates"), delegates)
            spec = apply_overrides(m.inputs[0], overrides) if overrides else m.inputs[0]
            check_input_size(spec)  # before the engine exists: nothing of a 20000x20000 input is allocated
            engine = backend_for(m.format, runtime or _manifest_runtime(m.target.get("runtime")))
            backend = engine.open(bundle.model_path, threads=n,
                                  providers=providers or m.target.get("execution_providers"), delegates=libs,
                                  qdq_fusion=m.target.get("qdq_fusion"),  # (a backend without it ignores it)
                                  max_run_s=max_run_s, max_run_bytes=max_run_bytes)
            check_against_engine(spec, backend.inputs, str(bundle.path))
            check_outputs(m.outputs, backend.outputs, str(bundle.path))
            rt = cls(backend, spec, task or m.task, labels or bundle.labels, bundle, bundle.path, **post_options)
        elif p.is_file():
            libs = list((delegates or {}).values())
            backend = backend_for(format_of(p), runtime).open(p, threads=threads or 1, providers=providers,
                                                              delegates=libs, max_run_s=max_run_s,
                                                              max_run_bytes=max_run_bytes)
            meta = model_metadata(backend)
            spec = spec_from_model(backend, overrides, meta)
            check_input_size(spec)
            # --input-spec size=1 on a static 28x28 model
            check_against_engine(spec, backend.inputs, str(p), claimed="--input-spec's")
            labels = labels or meta.get("labels")
            guessed = guess_task(backend, labels)
            if guessed == "detect" and not is_image(spec):  # (boxes are placed on a frame: this input has none)
                guessed = "raw"
            rt = cls(backend, spec, task or meta.get("task") or guessed, labels, None, p, **post_options)
        else:
            raise BadInput(f"{p}: not a regular file (a bundle is a directory, a model a file)" if p.exists()
                           else f"not found: {p}")
        rt.warnings = warnings + _label_mismatch(rt) + _unlimited_runs(backend, max_run_s)
        if any(not isinstance(d, int) for d in backend.inputs[0].shape):
            backend.resize_input(rt._engine_shape)
        rt._check_preprocess()
        return rt

    def _check_preprocess(self) -> None:
        """One blank frame through preprocessing: the tensor must be the shape the spec and the engine
        agree on. Why: `--input-spec layout=NHWC` on an NCHW model (or a manifest whose layout or
        colour contradicts its shape) passes every field check and then fails in the engine at the
        first frame, with a traceback; here it is one line before any frame is read."""
        if not self.takes_images:  # arrays are fed as they are: no frame, no normalisation
            return
        check_normalisation(self.spec, self.path)
        dims = self.spec.shape[2:4] if self.spec.layout == "NCHW" else self.spec.shape[1:3]
        if not all(isinstance(d, int) for d in dims):
            return
        try:
            got = self.preprocess(np.zeros((int(dims[0]), int(dims[1]), 3), np.uint8)).shape
        except (ValueError, TypeError, KeyError, OverflowError) as e:  # whatever else a spec can contradict
            raise BadInput(f"{self.path}: preprocessing cannot make this input from a frame "
                           f"({str(e).splitlines()[0][:200]})") from None
        if tuple(got) != self._shape:
            raise BadInput(f"{self.path}: the input spec ({self.spec.layout}, {self.spec.color}) makes tensors of "
                           f"shape {list(got)}, but the input's shape is {list(self._shape)}: check layout and color")

    @property
    def name(self) -> str:
        return self.bundle.manifest.name if self.bundle else (self.path.stem if self.path else "model")

    def preprocess(self, frame: np.ndarray) -> np.ndarray:
        """A frame -> the input tensor; for an input that is not an image, an array of the input's values
        (its shape, or with the batch dim left out) -> that array in the input's shape and type, as the
        export took the rows of a .npy (its values as they are: no pixel scaling)."""
        if self.takes_images:
            return preprocess(frame, self.spec)
        return self.from_array(frame)

    def input_shaped(self, shape) -> bool:
        """Whether an array of `shape` is one input as it is: the input's shape, its dims of 1 aside ([400] or
        [1,400] for [1,400]; [100,40] for a 3-D input's [1,1,100,40])."""
        return [d for d in shape if d != 1] == [d for d in self._shape if d != 1]

    def from_array(self, row: np.ndarray) -> np.ndarray:
        """A row of a .npy/.npz -> the input tensor, by the export's rule for the same file's rows
        (compress/calibration.py): a row of the input's shape is the input as it is (no pixel scaling); for
        an image input, a uint8 row, or one of another shape, is a frame ([H,W] or [H,W,C], BGR)."""
        x = np.asarray(row)
        if x.dtype.kind not in "biuf":
            raise ValueError(f"an array of {x.dtype}, not numbers")
        if self.takes_images and (x.dtype == np.uint8 or not self.input_shaped(x.shape)):
            return preprocess(x, self.spec)
        if not self.input_shaped(x.shape):
            raise ValueError(f"an array of shape {list(x.shape)} is not one input of shape {list(self._shape)}")
        return np.ascontiguousarray(x.reshape(self._shape), dtype=self._dtype)

    def blank_input(self) -> np.ndarray:
        """What a probe runs: a black frame of the input's size, or zeros of the input's shape."""
        if not self.takes_images:
            return np.zeros(self._shape, self._dtype)
        h, w = self.spec.hw()
        return np.zeros((h, w, 3), np.uint8)

    def postprocess(self, outputs: list[np.ndarray], frame_hw: tuple[int, int] | None = None) -> Any:
        if self.task == "classify":
            return post.classify(outputs, self.labels, self.top_k)
        if self.task == "detect":
            return post.detect(outputs, self.spec, frame_hw or self.spec.hw(), self.labels, self.conf, self.iou,
                               head=self.head)
        if self.task == "embed":
            return post.embed(outputs)
        return outputs

    def failure(self, stage: str, e: Exception, where: str = "on a frame") -> str:
        """One line for an engine or postprocessing error: the model, the stage, the error's first line,
        and what to try (another input size for a dynamic input; the raw outputs for a task that does
        not fit them)."""
        why = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:300]
        hint = ""
        if stage == "inference" and any(not isinstance(d, int) for d in self.backend.inputs[0].shape[1:]):
            hint = f"; the model may need another input size than {self.spec.hw()} (--input-spec size=HxW)"
        elif stage == "postprocessing" and self.task != "raw" and "--task raw" not in why:
            hint = "; --task raw gives the outputs as they are"
        return f"{self.name}: {stage} failed {where}: {why}{hint}"

    def predict(self, frame: np.ndarray) -> Any:
        """A frame (HxW, HxWxC, any size, BGR as OpenCV reads it) or an already preprocessed
        input tensor (4-D, the model's shape and dtype), or an input that is not an image's array
        -> the task's result."""
        if frame.ndim == 4 and self.takes_images:
            return self.postprocess(self.infer(frame))
        return self.postprocess(self.infer(self.preprocess(frame)), frame.shape[:2])

    def timed(self, frame: np.ndarray, index: int = 0, timestamp: float | None = None) -> Result:
        """predict() with per-stage milliseconds, as the pipeline records them."""
        t0 = time.perf_counter()
        x = self.preprocess(frame)
        t1 = time.perf_counter()
        y = self.infer(x)
        t2 = time.perf_counter()
        out = self.postprocess(y, frame.shape[:2])
        t3 = time.perf_counter()
        return Result(self.task, out, index, time.time() if timestamp is None else timestamp,
                      {"preprocess": (t1 - t0) * 1e3, "inference": (t2 - t1) * 1e3, "postprocess": (t3 - t2) * 1e3},
                      frame)

    def describe(self) -> dict:
        """For summaries and the agent's retained `meta` message."""
        d = {"name": self.name, "task": self.task, "input": self.spec.model_dump(), **self.backend.describe()}
        if self.bundle:
            m = self.bundle.manifest
            d.update(format=m.format, precision=m.precision, target=m.target.get("id"), version=m.version,
                     sha256=m.files[m.model_file].sha256 if m.model_file in m.files else None)
        return d
