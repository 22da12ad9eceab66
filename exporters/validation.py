"""Validation of an exported artifact against the reference model, by task, on every output.

Why its own module: every exporter (ONNX, TFLite) and every precision is checked the same way,
following Optimum's `validate_model_outputs`: the artifact and the reference run on the same
inputs, which calibration never saw, and a `Verdict` decides whether the export may be written.

Why by task: a check means something only for what the output is. Plain top-1 agreement on
ambiguous photos cannot reach 0.99 even for fp32 under noise of sd 0.01, and argmax agreement on
a dense probability map is meaningless. So the task (classify, detect, segment, embed, raw)
picks the metrics (exporters/task_metrics.py computes them), each with a named threshold; the
classification agreement is judged against the fp32 model's own agreement under tiny input
noise (its *ceiling*), measured in the same export.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from lepton_edge.errors import BadInput, CheckFailed
from lepton_edge.memory import rss_bytes

CEILING_SAMPLES = 2000  # inputs the fp32 ceiling is measured on (the first of the validation inputs)
BATCH_BYTES = 4 << 20  # validation inputs per engine call, in bytes (see Validator)
COUNTS = ("samples", "eval_samples", "confident_samples", "boxes_reference", "boxes_artifact", "box_inputs",
          "mask_samples")
Outputs = list[np.ndarray]  # one array per model output, batch first
Predict = Callable[[np.ndarray], Outputs]
TASKS = ("classify", "detect", "segment", "embed", "raw")
RELAX_FLAGS = {  # what to relax when no candidate passes, by task (named in the failure line)
    "classify": "--min-agreement/--min-confident-kept/--min-top5/--max-accuracy-drop",
    "detect": "--min-f1", "embed": "--min-cosine/--min-agreement",
    "segment": "--min-mask-iou (or --task raw: --min-sqnr/--min-cosine)",
    "raw": "--min-sqnr/--min-cosine"}


@dataclass
class Thresholds:
    """The gate, one named number each (CLI flags of `export`; defaults pass a good int8 model of
    each task and fail a broken one: tests/test_validation_by_task.py shows both sides)."""

    min_agreement: float | None = None  # top-1 agreement wanted; None: the fp32 ceiling minus ...
    agreement_margin: float = 0.05  # ... this (also for the nearest-neighbour agreement of embed)
    min_confident_kept: float = 0.99  # fp32 top-1 kept where fp32 is confident (softmax max >= 0.5)
    min_top5: float = 0.98  # fp32 top-1 within the artifact's top-5 (more than 5 classes)
    max_accuracy_drop: float = 0.5  # percentage points, with a labelled evaluation set: the main gate
    min_sqnr: float = 12.0  # dB, each dense output (signal over quantization noise)
    min_cosine: float = 0.97  # each dense output and embeddings, mean over samples
    # thresholded (>= 0.5) probability maps, pooled over samples; for task segment the gate of such a
    # map (SQNR and cosine reported), judged once enough inputs show fp32's mask (task_metrics.dense)
    min_mask_iou: float = 0.8
    min_f1: float = 0.9  # detections matched to fp32's at IoU >= 0.5
    # each dense output gated by SQNR: how far its values still follow fp32's about their means (Pearson's r;
    # a floor, not a quality bar: 0 where int8 flattened an output whose offset kept its SQNR high)
    min_correlation: float = 0.5

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class Verdict:
    """What validation found for one artifact: the gate decision, every metric by name, the
    thresholds it was held to, and `score` (higher is better) that the int8 search ranks by."""

    passed: bool
    why: str | None
    task: str
    metrics: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    score: tuple = ()
    per_output: list[dict] = field(default_factory=list)

    # Names the rest of the code base (and older manifests) read directly.
    @property
    def top1_agreement(self) -> float:
        return self.metrics.get("top1_agreement", float("nan"))

    @property
    def accuracy_artifact(self) -> float | None:
        return self.metrics.get("accuracy_artifact")

    @property
    def accuracy_drop_pp(self) -> float | None:
        return self.metrics.get("accuracy_drop_pp")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: metrics also flat at the top level (manifest readers use `top1_agreement`,
        `samples`, `accuracy_drop_pp`...); no NaN (not JSON)."""
        clean = {k: int(v) if k in COUNTS else _json_num(v) for k, v in self.metrics.items()}
        d: dict[str, Any] = dict(clean)
        d.update(passed=self.passed, why=self.why, task=self.task, metrics=clean,
                 thresholds=dict(self.thresholds), score=[_json_num(s) for s in self.score],
                 per_output=[{k: _json_num(v) for k, v in o.items()} for o in self.per_output])
        return d


def _json_num(v):
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return v if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


def gate(v: Verdict, *_ignored) -> str | None:
    """Why the artifact fails (None when it passes); kept for callers of the former API."""
    return None if v.passed else v.why


def as_outputs(out) -> Outputs:
    """A model's return value as a list of float arrays (a single tensor is one output)."""
    if isinstance(out, (list, tuple)):
        return [np.asarray(o) for o in out]
    return [np.asarray(out)]


def batched(fn: Predict, x: np.ndarray, batch: int, description: str = "validating", watch=None,
            stop: Callable[[Outputs, int, int], str | None] | None = None) -> Outputs:
    """Every output of `fn` over `x`, `batch` inputs a call, written into arrays sized for all of `x`
    after the first call (outputs of another shape from call to call are joined by `stack_outputs`).
    Why: the calls' parts and their concatenation were held together, twice the outputs at the peak.
    `watch` (a MemoryWatch) is checked after every call: its MemoryExceeded stops the work there.
    `stop(outputs, start, end)`, told of each call's rows as they are written, may end the work early
    with a reason (exporters/certain_fail.py): the outputs then hold the rows done so far."""
    from lepton_edge import ui

    n = len(x)
    whole: Outputs | None = None  # one array per output, rows 0..done filled
    parts: list[Outputs] = []  # the calls' outputs, when they cannot be written into `whole`
    inputs: list[int] = []  # the inputs of each of `parts`
    done = 0
    major: list[bool | None] | None = None  # per output: time-major (batch_first), once a call has shown it
    with ui.progress(description, n) as advance:
        for i in range(0, n, batch):
            k = len(x[i:i + batch])
            raw = as_outputs(fn(x[i:i + batch]))
            major = time_major(raw, k, major)
            raw = batch_first(raw, k, major)
            got = [np.atleast_1d(o) for o in raw]
            if whole is None and not parts and all(g.shape[0] == k for g in got):
                whole = [np.empty((n,) + g.shape[1:], g.dtype) for g in got]
            if whole is not None and _rows_fit(got, whole, k):
                for g, w in zip(got, whole):
                    w[done:done + k] = g
                if stop is not None and done + k < n and stop(whole, done, done + k):
                    advance(n - done)
                    return [w[:done + k] for w in whole]
            else:
                if whole is not None:  # the shapes changed: what was written so far becomes one part
                    parts, inputs, whole = [[w[:done] for w in whole]], [done], None
                parts.append(raw)  # (0-d outputs kept 0-d: one value a call, not a row an input)
                inputs.append(k)
            done += k
            advance(k)
            if watch is not None:
                watch.check()
    return whole if whole is not None else stack_outputs(parts, inputs)


def time_major(outputs: Outputs, k: int, known: list[bool | None] | None = None) -> list[bool | None]:
    """Per output of a call on `k` inputs: whether its inputs' axis is the second (time-major [T, N, C]),
    as `known` (an earlier call's) says, else as this call shows: None while it cannot (T == N == k).
    Three axes at least: a [K, 4] output without a batch axis (NonZero's boxes) whose 4 is the call's
    inputs by chance is not time-major."""
    def one(o, was: bool | None) -> bool | None:
        if was is not None:
            return was
        if not isinstance(o, np.ndarray) or o.ndim < 3:
            return False
        if o.shape[0] == k and o.shape[1] == k:
            return None  # (T == N: this call cannot tell)
        return o.shape[0] != k and o.shape[1] == k
    known = known or [None] * len(outputs)
    return [one(o, was) for o, was in zip(outputs, known + [None] * (len(outputs) - len(known)))]


def batch_first(outputs: Outputs, k: int, major: list[bool | None] | None = None) -> Outputs:
    """Each output of a call on `k` inputs with its inputs' axis first: a sequence model's time-major
    [T, N, C] (ddddocr's CRNN: [32, 1, 8210] for one input) becomes [N, T, C]. Why: the rows of the
    first axis are the validation's samples, and 24 inputs read "768 inputs", each time step judged
    as one. `major`: time_major's decision, kept from the first call that showed it (a last call of
    32 inputs of a [32, N, C] model cannot show it)."""
    major = time_major(outputs, k) if major is None else major
    return [np.moveaxis(o, 1, 0) if m else o for o, m in zip(outputs, major)]


def _rows_fit(got: Outputs, whole: Outputs, k: int) -> bool:
    return len(got) == len(whole) and all(g.shape == (k,) + w.shape[1:] and g.dtype == w.dtype
                                          for g, w in zip(got, whole))


def stack_outputs(parts: list[Outputs], inputs: list[int] | None = None) -> Outputs:
    """The outputs of several calls, joined along the first axis (a 0-d output: one value a call).
    An output whose shape past the first axis changes from input to input (a detector with NMS inside:
    [1, K, 4] with K the boxes found) cannot be lined up with fp32's to be judged: one line, not
    numpy's traceback. `inputs`, the inputs each call was given, when known: an output without a batch
    axis whose rows follow the data ([K, 4], NonZero's boxes) is that line too; joined, its rows looked
    like a batch, and each candidate then failed on numpy's broadcast error, fp16 with a traceback."""
    out = []
    for k in range(len(parts[0])):
        pieces = [np.atleast_1d(p[k]) for p in parts]
        shapes = {a.shape[1:] for a in pieces}
        if len(shapes) > 1:
            a, b = sorted(shapes, key=str)[:2]
            raise BadInput(f"output {k}'s shape depends on the input ([N, {', '.join(map(str, a))}] on one, "
                           f"[N, {', '.join(map(str, b))}] on another): {_NOT_JUDGED}")
        types = sorted({str(a.dtype) for a in pieces})
        if len(types) > 1:  # (its shape was the same: saying it was not sent a reader looking for the wrong thing)
            raise BadInput(f"output {k}'s type depends on the input ({types[0]} on one call, {types[1]} on another): "
                           "it cannot be compared with fp32's")
        if inputs is not None and all(np.ndim(p[k]) for p in parts):
            calls = [(len(a), n) for a, n in zip(pieces, inputs)]
            odd = next((c for c in calls if c[0] * calls[0][1] != calls[0][0] * c[1]), None)
            if odd is not None:
                raise BadInput(f"output {k}'s size depends on the input ({calls[0][0]} rows from {calls[0][1]} "
                               f"input(s) on one call, {odd[0]} from {odd[1]} on another): {_NOT_JUDGED}")
        out.append(np.concatenate(pieces))
    return out


_NOT_JUDGED = ("an output whose size follows the data (a detector with NMS in the graph) cannot be compared with "
               "fp32's; export the model without that step (the runtime decodes boxes from a detector's raw head)")


@dataclass
class Reference:
    """The fp32 reference, computed once per export: its outputs on the validation inputs, on a
    noisy copy of them (for the ceiling) and on the labelled evaluation set."""

    outputs: Outputs
    specs: list[dict]  # [{name, shape, dtype}] of the reference graph's outputs
    noisy: Outputs | None = None
    eval_outputs: Outputs | None = None
    eval_y: np.ndarray | None = None


def _finite_reference(outs: Outputs, specs: list[dict], constants: str = "") -> None:
    """One line when the fp32 model gives NaN, or nothing but infinities: nothing can be judged against it
    (NaN compares as equal to nothing, and argmax of NaN is 0 for every model: an export passed with
    agreement 1.0; an output of +Inf ran all 8 int8 recipes and then blamed int8). With non-image inputs fed
    constants (`constants`: which, and how chosen), those come first in what to check: a temperature fed 0
    divided by it."""
    check = (f"check the values its other inputs are fed ({constants}: --input-value), its weights, --mean/--std "
             "and the calibration data") if constants else "check its weights, --mean/--std and the calibration data"
    for i, o in enumerate(outs):
        o = np.asarray(o)
        if o.dtype.kind == "f" and np.isnan(o).any():
            bad = int(np.isnan(o.reshape(len(o), -1)).any(1).sum()) if o.ndim else 1
            name = specs[i]["name"] if i < len(specs) else str(i)
            raise BadInput(f"the fp32 model's output {name!r} is NaN on {bad} of {len(o) if o.ndim else 1} validation "
                           f"inputs: {check}")
        if o.dtype.kind == "f" and o.size and not np.isfinite(o).any():  # (one -inf, a log of 0, can be right)
            name = specs[i]["name"] if i < len(specs) else str(i)
            raise BadInput(f"the fp32 model's output {name!r} is infinite everywhere on every validation input: "
                           f"{check}")


def _repeatable_reference(reference: Predict, x, outs: Outputs, batch: int, specs: list[dict], watch=None) -> None:
    """One line when the fp32 model does not give the same outputs twice for the same inputs (its first
    batch run again). Why: a model exported with Dropout in training mode gave other scores at every call;
    its fp16 export passed against a ceiling that the randomness had lowered (0.30), and its int8 failed every
    recipe with advice to try fp16: nothing about the model itself. Float outputs within 1e-4 of their scale
    (a runtime may sum in another order from call to call), their infinities in the same places; others equal."""
    k = min(len(x), batch)
    again = batched(reference, x[:k], batch, "reference (again)", watch=watch)
    for i, (a, b) in enumerate(zip(outs, again)):
        a, b = np.asarray(a), np.asarray(b)
        if a.ndim == 0 or len(b) != k or b.shape[1:] != a.shape[1:]:
            continue  # (an output whose first axis is not the inputs': no row to line up)
        moved = None
        for r in range(k):  # row by row: a map's batch in float64 was several times the outputs
            ra, rb = a[r], b[r]
            if ra.dtype.kind != "f" or rb.dtype.kind != "f":
                if not np.array_equal(ra, rb):
                    moved = (float("nan"), float("nan"))
                    break
                continue
            fin = np.isfinite(ra)
            if not np.array_equal(fin, np.isfinite(rb)) or not np.array_equal(ra[~fin], rb[~fin]):
                moved = (float("inf"), float("inf"))
                break
            if fin.any():
                da = ra[fin].astype(np.float64)
                diff, scale = float(np.max(np.abs(da - rb[fin]))), float(np.max(np.abs(da)))
                if diff > 1e-4 * scale + 1e-6:
                    moved = (diff, scale)
                    break
        if moved is not None:
            name = specs[i]["name"] if i < len(specs) else str(i)
            size = f" by up to {moved[0]:.3g}, on values up to {moved[1]:.3g}" if np.isfinite(moved[0]) else ""
            raise BadInput(f"the fp32 model gives other outputs each time it runs on the same input (output {name!r} "
                           f"moved{size}): a Dropout or a random op left in training mode? export it in eval mode "
                           "(model.eval()); nothing can be validated against a moving reference")


def _reference_follows_inputs(outs: Outputs, x, specs: list[dict], constants: str = "", task: str | None = None
                              ) -> None:
    """One line when every output of the fp32 model is the same for all the validation inputs, which differ,
    and the model has non-image inputs fed constants (`constants`: which, and how chosen: those constants
    switch the image off) or its task is classify or embed (a classifier with all-zero weights). Why: a model
    that multiplies its image by a second input fed zeros (a name no rule knew) gave the same scores for every
    frame, and its int8 export passed at top-1 agreement 1.0, which any two constant models reach; so did a
    classifier whose weights were zeros. Other tasks' outputs alike for every input are a model that finds
    nothing in them (a detector on random inputs), which the task's metrics judge as such: no line."""
    n = len(x)
    if n < 2 or not (constants or task in ("classify", "embed")):
        return
    pixels = getattr(x, "pixels", x)  # (PixelInputs: the pixels they come from differ where the inputs do)
    if all(np.array_equal(pixels[0], pixels[i]) for i in range(1, n)):
        return  # (the same input every time: nothing shows whether the outputs follow it)
    for o in outs:
        o = np.asarray(o)
        if o.ndim == 0 or len(o) != n:
            return  # (an output without a row an input: whether it follows them cannot be told here)
        if any(not np.array_equal(o[0], o[i]) for i in range(1, n)):
            return
    if not constants and all(_saturated(np.asarray(o)) for o in outs):
        return  # (probabilities saturated at 0 and 1, a sigmoid sure of every input: a model that tells them apart)
    names = ", ".join(repr(s["name"]) for s in specs[:4]) or "every output"
    if not constants:
        raise BadInput(f"the fp32 model gives the same outputs ({names}) for all {n} validation inputs, which differ: "
                       f"it ignores its image (untrained or zeroed weights?), so its {task} gate could not fail and "
                       "nothing can be validated: export a trained model (or, as it is, with --task raw)")
    raise BadInput(f"the fp32 model gives the same outputs ({names}) for all {n} validation inputs, which differ: it "
                   f"ignores its image, so nothing can be validated; its other inputs are fed {constants}: give the "
                   "values it needs with --input-value")


# A classifier's or embedder's output 0 that moves across the validation inputs by at most this share of its
# size (probabilities: of their logarithm's, so a classifier sure of every photo moves its small scores by
# orders of magnitude) barely sees them: their pixels fed in a range it does not expect. Measured: such a
# model's log-scores moved by 0.0007 of their size; fed as it expects, untrained, by 0.17; an untrained
# classifier's logits on random inputs by 0.009
BARELY_FOLLOWS = 3e-3


def _barely_follows(o, x, specs: list[dict], task: str | None) -> None:
    """One line when a classifier's or embedder's output 0 differs across the validation inputs `x` by no more
    than BARELY_FOLLOWS of its size, but does differ (one alike for every input is `_reference_follows_inputs`'s
    or `task_metrics.constant_first`'s). Why: a TorchScript model that takes 0..255 pixels (x.float() / 127.5 - 1
    inside) was fed 0..1, so every photo reached it as nearly black: its log-scores moved by 0.0007 of their
    size across 56 photos, and its int8 export passed at top-1 agreement 1.0 against a reference that
    saw the same frames."""
    n = len(x)
    if task not in ("classify", "embed") or n < 2:
        return
    o = np.asarray(o)
    if o.ndim == 0 or len(o) != n or not o.size or o.dtype.kind != "f":
        return
    flat = o.reshape(n, -1).astype(np.float64)
    if not np.isfinite(flat).all():
        return
    if flat.min() >= 0 and flat.max() <= 1 and np.allclose(flat.sum(1), 1.0, atol=1e-3):
        flat = np.log(np.maximum(flat, 1e-12))  # (probabilities)
    size, moved = float(np.abs(flat).max()), float((flat.max(0) - flat.min(0)).max())
    if size <= 0 or moved == 0 or moved > BARELY_FOLLOWS * size:
        return
    name = repr(specs[0]["name"]) if specs else "0"
    raise BadInput(f"the fp32 model's output {name} hardly changes across the {n} validation inputs, which differ "
                   f"(by at most {moved:.3g}, {moved / size:.2g} of its size): it barely sees its image, so its {task} "
                   "gate could not fail; if it takes 0..255 pixel values (it normalises inside), feed them with "
                   f"--std {1 / 255!r}, else check --mean/--std/--color (or export it as it is with --task raw)")


def _saturated(o: np.ndarray) -> bool:
    """Whether `o` holds probabilities saturated at 0 and 1, each input's row sure of something (a 1 in it):
    all-zero logits (a classifier whose weights and biases are zeros) are not."""
    if not np.isin(o, (0, 1)).all():
        return False
    rows = o.reshape(len(o), -1) if o.ndim else o.reshape(1, -1)
    return bool(rows.size) and bool((rows == 1).any(axis=1).all())


def noise_unit(x) -> float | None:
    """What `perturb`'s sd is a share of, for inputs `x` that are not pictures (fewer than 4 axes: features,
    a waveform, token ids): the data's own spread (its standard deviation), 0 for integers (ids, which no
    noise leaves meaning the same); None for pictures (0..1 pixel units, from the input spec). Why: 0.01 in
    pixel units put on token ids (rounded: other tokens) or on features of size 1e-3 took fp32's own agreement
    to 0.33 and 0.42, and an int8 model passed at 0.30 top-1 agreement on 2 classes, under chance."""
    a = np.asarray(getattr(x, "pixels", x))
    if a.ndim >= 4:
        return None
    if not np.issubdtype(a.dtype, np.floating):
        return 0.0
    spread = float(np.std(a, dtype=np.float64)) if a.size else 0.0
    return spread if np.isfinite(spread) and spread > 0 else 1.0


def perturb(x: np.ndarray, spec, sd: float = 0.01, seed: int = 0, rng: np.random.Generator | None = None,
            unit: float | None = None) -> np.ndarray:
    """Gaussian noise of sd `sd` in 0..1 pixel units (sd/std in the normalised input): a change
    no camera frame is free of, so fp32's answers under it are its own agreement ceiling. With `rng`
    (a generator shared by successive batches) the noise continues its stream: batch by batch, the
    same values as one call on the whole array. `unit` (`noise_unit`, for inputs that are not pictures):
    sd is a share of it instead; 0 leaves `x` as it is."""
    rng = rng if rng is not None else np.random.default_rng(seed)
    if unit is not None:
        if unit == 0:
            return x
        noisy = x + rng.normal(0.0, sd * unit, size=x.shape)
        return noisy.astype(x.dtype)
    std = np.asarray(getattr(spec, "std", None) or [1.0], dtype=np.float64)
    unit = 255.0 * float(getattr(spec, "scale", 1 / 255.0))  # the 0..1 pixel range in the model's units
    noisy = x + rng.normal(0.0, sd * unit / float(std.mean()), size=x.shape)
    if np.issubdtype(x.dtype, np.integer):  # raw pixels (a uint8 input): rounded and clipped, never wrapped
        info = np.iinfo(x.dtype)
        return np.clip(np.rint(noisy), info.min, info.max).astype(x.dtype)
    return noisy.astype(x.dtype)


def judge(task: str, ref: Reference, out: Outputs, art_specs: list[dict], th: Thresholds, *,
          eval_out: Outputs | None = None, input_spec=None, labels=None, strict_names: bool = True,
          enforce: bool = True) -> Verdict:
    """The verdict on an artifact's outputs `out` (and `eval_out` on the evaluation set)."""
    from lepton_edge.exporters import task_metrics as tm

    metrics: dict[str, float] = {"samples": float(len(out[0])) if out else 0.0}
    per_output = tm.structure(ref.outputs, out, ref.specs, art_specs, strict_names)
    metrics.update(tm.closeness(ref.outputs, out))
    reasons = [o["why"] for o in per_output if o.get("why")]
    dense_from = 0
    if not reasons:
        if task == "classify":
            reasons += tm.classify(ref, out, eval_out, th, metrics)
            dense_from = 1
        elif task == "detect":
            got = tm.detect(ref.outputs, out, input_spec, labels, th, metrics, per_output)
            if got is None:  # a layout postprocess does not know: compare the raw outputs
                metrics["detect_layout_known"] = 0.0
            else:
                reasons += got
                dense_from = len(out)
        elif task == "embed":
            reasons += tm.embed(ref, out, th, metrics)
            dense_from = 1
        reasons += tm.dense(ref.outputs, out, per_output, th, metrics, start=dense_from, masks=task == "segment")
    passed = not reasons or not enforce
    why = "; ".join(reasons) if reasons else None
    return Verdict(passed, why if not passed else None, task, metrics, th.as_dict(),
                   tm.score(task, passed, metrics), per_output)


def infer_task(ref: Reference, input_spec, labels=None) -> str:
    """The task from the reference's outputs, when neither --task nor the model says it."""
    from lepton_edge.exporters import task_metrics as tm

    return tm.infer_task(ref.outputs, ref.specs, input_spec, labels)


class Validator:
    """`validate(path) -> (Verdict, predict, ram_bytes)`: runs a candidate artifact on the
    validation (and evaluation) inputs and judges it against the fp32 reference by task.

    The reference runs once, here: on the validation inputs, on a noisy copy of them (the ceiling,
    for classify and embed) and on the labelled evaluation set."""

    def __init__(self, exporter, threads: int, reference: Predict, reference_path, data, *, task: str | None,
                 thresholds: Thresholds, input_spec, labels=None, enforce: bool = True, batch: int = 64,
                 memory_budget: int | None = None, constants: str = ""):
        from lepton_edge import ui
        from lepton_edge.compress.calibration import MemoryExceeded, MemoryWatch

        # Inputs per call: at most `batch`, and at most BATCH_BYTES of them. onnxruntime's arena keeps
        # the largest batch's intermediate tensors for the session's life: 64 inputs of 224x224 made a
        # classifier's export peak at 1.6 GB, 64 of 800x608 several GB; throughput hardly changes.
        # The inputs' bytes alone are no bound for a model whose activations dwarf its input (PP-OCR's
        # recogniser: 184 KB in, 196 MB of intermediate tensors per input): the activations alive at once,
        # estimated by shape inference on an ONNX reference (13 MB there), bound the batch too.
        per_input = int(np.prod(data.check_x.shape[1:])) * data.check_x.itemsize if data.check_x.ndim else 1
        batch = max(1, min(batch, BATCH_BYTES // max(1, per_input)))
        from lepton_edge.compress import quantize as q

        activations = q.estimate_activation_bytes(reference_path, data.check_x[:1], live=True)
        if activations:
            batch = max(1, min(batch, q.ACTIVATION_BATCH_BYTES // activations))
        self.exporter, self.threads, self.data, self.batch = exporter, threads, data, batch
        self.reference = reference  # fp32's predictor: the recipe search times candidates against it
        self._gated: tuple[list[int], dict[int, float]] | None = None  # (certain_fail: outputs, fp32's power)
        # engine settings every artifact is judged with unless the call names its own (base.exact_int8)
        self.settings: dict[str, Any] = {}
        self.th, self.spec, self.labels, self.enforce = thresholds, input_spec, labels, enforce
        specs = exporter.describe(reference_path).get("outputs", [])
        if memory_budget:
            fit_outputs(reference, data, memory_budget)
        with ui.stage(f"reference outputs on {len(data.check_x)} inputs"), \
                MemoryWatch(memory_budget, what="the fp32 reference outputs") as watch:
            try:
                outs = batched(reference, data.check_x, batch, "reference", watch=watch)
            except MemoryExceeded as e:
                raise CheckFailed(f"{e}: give the export more memory, or a model with smaller outputs") from None
            _finite_reference(outs, specs, constants)
            _repeatable_reference(reference, data.check_x, outs, batch, specs, watch=watch)
            self.ref = Reference(outs, specs)
            self.task = task or infer_task(self.ref, input_spec, labels)
            self.task_inferred = task is None
            _reference_follows_inputs(outs, data.check_x, specs, constants, self.task)
            if enforce and outs:  # (trained weights: the gate decides)
                _barely_follows(outs[0], data.check_x, specs, self.task)
            # ([1,1000,1,1] is SqueezeNet's 1000 classes: every value of a sample is one class's score)
            classes = int(np.prod(np.asarray(outs[0]).shape[1:])) if np.asarray(outs[0]).ndim >= 2 else None
            if self.task == "classify" and labels and classes and len(labels) != classes:
                raise BadInput(f"{len(labels)} labels for a classifier of {classes} classes: give one name a class, "
                               "in the model's order (--labels)")
            from lepton_edge.exporters import task_metrics as tm

            if self.task in ("classify", "embed") and tm.constant_first([np.asarray(o) for o in outs]):
                first = repr(specs[0]["name"]) if specs else "0"
                raise BadInput(f"output 0 ({first}) is the same for every validation input while the others vary: "
                               f"a constant (anchors, a prior), where a {self.task} gate and the runtime read the "
                               "model's scores; export the model with its scores as output 0, or with --task raw "
                               "(every output compared by SQNR and cosine)")
            if self.task == "classify" and (classes or 1) < 2:  # ([N] or [N,1]: a wake word's score, a regression)
                raise BadInput("classify (--task classify or --labels): output 0 holds one value an input, no "
                               "class scores: its top-1 is always class 0, so the classify gate would pass whatever "
                               "the artifact computes; use --task raw (SQNR and cosine on every output)")
            if task == "detect":
                from lepton_edge.exporters import task_metrics as tm

                if tm.detect_head(outs, input_spec, labels) is None:  # the device could not decode a box either
                    raise BadInput("--task detect: the model's outputs match no detector head the runtime reads (SSD "
                                   "boxes/scores/classes, YOLO, YOLOX, PicoDet): a bundle for it could not give boxes; "
                                   "use --task segment, embed or raw")
            if self.task in ("classify", "embed"):  # the ceiling: a few thousand inputs estimate it well
                # batch by batch: the noisy copy of every input at once, in float64, was 8x the inputs'
                # float bytes (22 GB for 56 inputs of 3x4096x4096)
                from lepton_edge.compress.calibration import subset

                some, rng = subset(data.check_x, None, CEILING_SAMPLES), np.random.default_rng(0)
                unit = noise_unit(some)
                self.ref.noisy = batched(lambda xb: reference(perturb(np.asarray(xb), input_spec, rng=rng, unit=unit)),
                                         some, batch, "reference (noise)")
            if data.eval_x is not None and data.eval_y is not None and self.task == "classify":
                self.ref.eval_outputs = outs if data.eval_x is data.check_x else batched(
                    reference, data.eval_x, batch, "reference")
                self.ref.eval_y = data.eval_y
                classes = int(np.prod(np.asarray(self.ref.eval_outputs[0]).shape[1:]))
                if len(data.eval_y) and (int(np.min(data.eval_y)) < 0 or int(np.max(data.eval_y)) >= classes):
                    raise BadInput(f"--eval labels run {int(np.min(data.eval_y))}..{int(np.max(data.eval_y))}, and "
                                   f"the model has {classes} classes (0..{classes - 1})")

    def __call__(self, path, *, early_stop: bool = True, **settings) -> tuple[Verdict, Predict, int | None]:
        """The artifact at `path` judged against fp32; `settings`: engine settings (Exporter.predictor).
        `early_stop`: validation may stop once the artifact has certainly failed (exporters/certain_fail.py);
        off where the verdict must rest on every input."""
        d = self.data
        pred, ram = self.ram(path, **settings)
        watch, stopped = self._certain_fail() if early_stop else None, []

        def stop(outputs: Outputs, start: int, end: int) -> str | None:
            why = watch.seen(outputs, start, end)
            if why:
                stopped.append(why)
            return why
        out = batched(pred, d.check_x, self.batch, stop=stop if watch is not None else None)
        eval_out = None
        if self.ref.eval_outputs is not None:
            eval_out = out if d.eval_x is d.check_x else batched(pred, d.eval_x, self.batch)
        specs = self.exporter.describe(path).get("outputs", [])
        ref = self.ref
        if stopped:  # judged on the inputs seen, which fail it by the same metric (certain_fail)
            seen, n = len(out[0]), len(d.check_x)
            ref = Reference([o[:seen] if np.ndim(o) and len(o) == n else o for o in self.ref.outputs], self.ref.specs)
        v = judge(self.task, ref, out, specs, self.th, eval_out=eval_out, input_spec=self.spec,
                  labels=self.labels, strict_names=self.exporter.format == "onnx", enforce=self.enforce)
        if stopped and v.passed:  # (cannot be, by certain_fail's bounds; were it so, every input decides)
            return self(path, early_stop=False, **settings)
        if stopped:
            v.metrics.update(stopped_after=float(len(out[0])), validation_samples=float(len(d.check_x)))
            v.why = f"{v.why} (judged on the first {len(out[0])} of {len(d.check_x)} inputs: then {stopped[0]})"
        return v, pred, ram

    def ram(self, path, **settings) -> tuple[Predict, int | None]:
        """The artifact's predictor and its RAM: what loading it and running one input (twice: onnxruntime
        plans its memory on a first run and allocates that plan from the second) added to this process, as
        the device runs it, one input a call. Why not the growth over the whole validation: its batches hold
        more inputs at once (4 of PP-OCR rec's: 30-50 MB more). Without the verdict where only this is
        wanted (base: the exact-int8 path's fused run, judged already in exact arithmetic). None: not known."""
        before = rss_bytes()
        pred = self.exporter.predictor(path, self.threads, **(settings or self.settings))
        one = self.data.check_x[:1]
        pred(one)
        pred(one)
        after = rss_bytes()
        return pred, (max(0, after - before) if before and after else None)

    def _certain_fail(self):
        """The early stop for this candidate's validation (exporters/certain_fail.py), or None where its gate
        is not one it can call early (other tasks, untrained weights, no output held to SQNR and cosine)."""
        from lepton_edge.exporters import certain_fail

        if not self.enforce or self.ref.eval_outputs is not None:
            return None
        if self._gated is None:
            gated = certain_fail.closeness_gated(self.task, self.ref.outputs, self.ref.specs, len(self.data.check_x))
            self._gated = (gated, certain_fail.powers(self.ref.outputs, gated))
        gated, power = self._gated
        if not gated:
            return None
        return certain_fail.Watch(self.ref.outputs, self.ref.specs, gated, power, self.th.min_sqnr,
                                  self.th.min_cosine, len(self.data.check_x))


# What one input's outputs cost while a candidate is judged, in copies of them: fp32's, its noisy run's and
# the candidate's, held whole, and the float64 copies the metrics make (classify's softmax alone makes four;
# measured: a 16.7 MB-an-input output peaked at 11.5x its held outputs while judged). Fewer than
# MIN_CHECK_INPUTS validation inputs judge nothing.
OUTPUT_COPIES = 12
SEARCH_MARGIN = 512 << 20  # kept out of the budget for what comes after the reference: libraries, sessions
MIN_CHECK_INPUTS = 8


def fit_outputs(reference: Predict, data, budget: int) -> None:
    """Validate on only as many inputs as the outputs of fit in what the memory budget leaves (data.check_x
    cut, and what the manifest records with it), or refuse in one line when not even MIN_CHECK_INPUTS fit.

    Why: the fp32 reference's outputs on every validation input are held for the whole export, and a
    candidate's beside them while it is judged. A model with 64 MB of outputs an input took 23 GB on its 64
    held-out inputs, past --max-memory 3GB, until the kernel's OOM killer ended it: the budget was watched
    only in the int8 search, after the reference."""
    from lepton_edge.compress.calibration import subset
    from lepton_edge.ui import human

    n = len(data.check_x)
    per = max(1, sum(np.atleast_1d(o).nbytes for o in as_outputs(reference(data.check_x[:1]))))
    free = budget - rss_bytes()
    left = max(free - SEARCH_MARGIN, free // 2)
    fit = max(0, left) // (OUTPUT_COPIES * per)
    if fit >= n:
        return
    if fit < min(n, MIN_CHECK_INPUTS):
        raise CheckFailed(f"the model's outputs take {human(per)} an input: validating on {min(n, MIN_CHECK_INPUTS)} "
                          f"inputs needs about {human(OUTPUT_COPIES * per * min(n, MIN_CHECK_INPUTS))} (fp32's and a "
                          f"candidate's outputs and the metrics' working copies: {OUTPUT_COPIES}x), over the "
                          f"{human(max(0, left))} the export's memory budget leaves ({human(budget)}, --max-memory): "
                          "give it more, or export a model with smaller outputs")
    import logging

    logging.getLogger(__name__).warning(f"the model's outputs take {human(per)} an input: validating on {fit} of the "
                                        f"{n} inputs, what the memory budget ({human(budget)}, --max-memory) holds")
    same = data.eval_x is data.check_x
    data.check_x = subset(data.check_x, None, fit)
    if same:
        data.eval_x, data.eval_y = data.check_x, None if data.eval_y is None else data.eval_y[:fit]
    data.split["validation_inputs"] = f"{data.split.get('validation_inputs', data.check_kind)} (the first {fit}: " \
                                      "the outputs of more would not fit the memory budget)"


# int8 over fp32's time by this factor counts as slower than fp32 (a warning line; the recipe search ranks
# such candidates after faster ones): the 25 % is headroom for a shared host's noise
SLOWER_THAN_FP32 = 1.25


def latency_ms(fn: Predict, x1: np.ndarray, runs: int = 30, warmup: int = 3, budget_s: float = 1.0) -> dict:
    """Median/p90/fastest latency of one batch-1 call; stops early after budget_s to keep exports quick."""
    return _latency_stats(_timed_runs([fn], x1, runs, warmup, budget_s)[0])


def paired_latency_ms(fn: Predict, ref: Predict, x1: np.ndarray, runs: int = 30, warmup: int = 3,
                      budget_s: float = 2.0, *, before: tuple[list[float], list[float]] | None = None,
                      kept: list | None = None) -> tuple[dict, dict]:
    """`latency_ms` of `fn` and of `ref` (fp32), their runs interleaved (fn, ref, fn, ref, ...).

    Why: on a shared host a busy spell slows whatever runs in it. Timed one after the other, fp32 and a
    candidate can fall on different sides of one: in a PP-OCR det export, u8-minmax and u8-percentile,
    whose graphs are the same (the same ops, 14.5 and 14.6 ms timed side by side), read 1.16x and 0.80x
    fp32's time. Interleaved, a spell slows both alike and their ratio holds.
    `before`: paired rounds of the same artifact and fp32 timed earlier (the recipe search's, of the
    candidate it chose: base._measure_latency), counted toward `runs` and its share of `budget_s`, so the report's
    timing does not time again what the search just did (10 rounds of PP-OCR rec: 0.4 s). `kept` receives
    the rounds (both lists) the figures came from."""
    a0, b0 = before if before and len(before[0]) == len(before[1]) else ([], [])
    left = max(5, runs - len(a0))
    a, b = _timed_runs([fn, ref], x1, left, warmup, budget_s * left / runs)
    a, b = list(a0) + a, list(b0) + b
    if kept is not None:
        kept[:] = [a, b]
    return _latency_stats(a), _latency_stats(b)


def _timed_runs(fns: list[Predict], x1: np.ndarray, runs: int, warmup: int, budget_s: float) -> list[list[float]]:
    """Milliseconds of each call of each of `fns`, called in turn: at least 5 rounds, at most `runs`,
    no new round past budget_s."""
    for _ in range(warmup):
        for fn in fns:
            fn(x1)
    times: list[list[float]] = [[] for _ in fns]
    t_end = time.perf_counter() + budget_s
    while len(times[0]) < runs and (len(times[0]) < 5 or time.perf_counter() < t_end):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn(x1)
            t.append((time.perf_counter() - t0) * 1e3)
    return times


def _latency_stats(times: list[float]) -> dict:
    a = np.asarray(times)
    return {"p50_ms": float(np.median(a)), "p90_ms": float(np.percentile(a, 90)), "min_ms": float(a.min()),
            "runs": len(a)}
