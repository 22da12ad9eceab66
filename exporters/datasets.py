"""The data an export uses: calibration inputs, the evaluation set, the agreement-check inputs
and fine-tuning data, all passed through the bundle's own preprocessing.

Why one place: which inputs the accuracy and agreement figures were measured on is part of the
result (recorded in the manifest), so the choice is made once, explicitly, best source first.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lepton_edge.compress import calibration as cal
from lepton_edge.errors import BadInput
from lepton_edge.runtime.preprocess import normalise, preprocess_batch


@dataclass
class ExportData:
    check_x: np.ndarray  # inputs the artifact is validated on: never the calibration inputs
    check_kind: str
    eval_x: np.ndarray | None = None  # labelled evaluation set (accuracy before/after)
    eval_y: np.ndarray | None = None
    eval_src: str | None = None
    calib_x: np.ndarray | None = None
    calib_info: dict[str, Any] = field(default_factory=dict)
    split: dict[str, Any] = field(default_factory=dict)  # which loaded inputs calibrated, which validated

    def inputs_record(self) -> dict[str, Any]:
        """For the manifest: which inputs calibrated the model and which validated it."""
        rec: dict[str, Any] = {"validation": {"kind": self.check_kind, "samples": int(len(self.check_x))}}
        if self.calib_x is not None:
            rec["calibration"] = {"source": self.calib_info.get("source"), "samples": int(len(self.calib_x))}
        if self.eval_src:
            rec["evaluation"] = {"source": self.eval_src,
                                 "samples": int(len(self.eval_x)) if self.eval_x is not None else 0}
        rec.update(self.split)
        return rec


VIEWS = ("mirrored", "zoomed 1.15x", "brighter 1.15x")


def _zoom_index(n: int) -> np.ndarray:
    """Rows (or columns) of a 1.15x centre zoom over `n` of them, nearest neighbour."""
    c = max(1, round(n / 1.15))
    return np.round(np.linspace((n - c) / 2, (n + c) / 2 - 1, n)).astype(int)


def _pixel_views(x: cal.PixelInputs) -> cal.PixelInputs:
    """`views` of inputs held as pixels, still pixels: the same mirror and zoom; the brighter view
    rounded to whole pixel values, as a brighter photo would be."""
    p = x.pixels  # [N, H, W, C] uint8
    zoomed = np.take(np.take(p, _zoom_index(p.shape[1]), axis=1), _zoom_index(p.shape[2]), axis=2)
    brighter = np.clip(np.rint(p * np.float32(1.15)), 0, 255).astype(np.uint8)
    return cal.PixelInputs(np.concatenate([np.flip(p, axis=2), zoomed, brighter]), x.spec)


def views(x, spec):
    """Other views of the same inputs (mirror, centre zoom, brightness): more validation inputs
    from a few held-out images, none of them an input calibration saw. Inputs are in the
    model's layout and normalisation (or PixelInputs); images (4-D float) only, else no inputs."""
    if isinstance(x, cal.PixelInputs):
        return _pixel_views(x) if len(x) else x
    w_axis, h_axis, c_axis = (3, 2, 1) if spec.layout == "NCHW" else (2, 1, 3)
    if x.ndim != 4 or not np.issubdtype(x.dtype, np.floating) or not len(x) \
            or x.shape[c_axis] != len(spec.mean):  # (a 64-channel feature map is no picture to brighten)
        return x[:0]
    mirrored = np.flip(x, axis=w_axis)
    zoomed = np.take(np.take(x, _zoom_index(x.shape[h_axis]), axis=h_axis), _zoom_index(x.shape[w_axis]),
                     axis=w_axis)
    shape = [1, 1, 1, 1]
    shape[c_axis] = -1
    std = np.asarray(spec.std, np.float32).reshape(shape)
    mean = np.asarray(spec.mean, np.float32).reshape(shape)
    top = np.float32(255.0 * spec.scale)
    brighter = (np.clip((x * std + mean) * np.float32(1.15), 0, top) - mean) / std
    return np.concatenate([mirrored, zoomed, brighter.astype(x.dtype)])


FEW_CALIBRATION = 20  # int8 calibrated on fewer inputs than this is warned about


def held_few(n: int) -> int:
    """Inputs held out of `n` too few to calibrate and validate on separate sets (`_split_few`): a fifth,
    at most 16, at least one."""
    return max(1, min(16, n // 5)) if n >= 10 else 1


def inputs_held(loaded: int, samples: int) -> int:
    """How many inputs `calibration` holds for the export once `loaded` were read: them all, plus the
    other views of the few held out when there are too few to split (`_split_few`)."""
    return loaded if loaded >= samples + 16 else loaded + len(VIEWS) * held_few(loaded)


def _split_few(x, spec, samples: int, pictures: bool = True) -> tuple[Any, Any, dict[str, Any]]:
    """Too few inputs for `samples` plus a held-out set: hold out a fifth (at most 16, at least
    one) and validate on them and on other views of them; one input only: its views. An input that
    is not an image (audio [1,16000], features [1,16,96]) has no views: validated on the held-out
    inputs alone, and one such input is one line (there was nothing to validate on: a traceback).
    `pictures` False: the inputs are not pictures whatever their shape (see `arrays_are_pictures`)."""
    n = len(x)
    if n < 2:
        v = views(x, spec) if pictures else x[:0]
        if not len(v):
            what = (f"an input of shape {list(spec.shape)} (not an image)" if pictures else
                    "a 3-D input's own tensor from a .npy/.npz (a picture or not: its shape cannot tell)")
            raise BadInput(f"the calibration data holds one input, and {what} has no mirrored or zoomed views to "
                           "validate on: give at least 2 inputs "
                           "(50-300 for int8)")
        return x, v, {"validation_inputs": f"views of the only input ({', '.join(VIEWS)})",
                      "calibration_inputs": "input 0"}
    hold = held_few(n)
    cal_x, held = cal.subset(x, None, n - hold), cal.subset(x, n - hold)
    v = views(held, spec) if pictures else held[:0]
    check = cal.PixelInputs.concat([held, v]) if isinstance(held, cal.PixelInputs) else np.concatenate([held, v])
    seen = f"inputs {n - hold}-{n - 1} held out" if hold > 1 else f"input {n - 1} held out"
    return cal_x, check, {
        "calibration_inputs": f"inputs 0-{n - hold - 1} of the {n} loaded",
        "validation_inputs": f"{seen}, and their views ({', '.join(VIEWS)})" if len(v) else seen}


# --- non-image inputs of a multi-input model ------------------------------------------------------
# PaddleDetection-style detectors take `image` beside `im_shape` ([N,2]: the input's height and width)
# and `scale_factor` ([N,2]: resized / original size, by which boxes are divided back); Faster R-CNN
# style ones an `im_info` [N,3] (height, width, scale). On a device the frame is resized to the input,
# and the runtime maps boxes back to the frame itself, so the right values are the input's own size
# and a scale of 1: one constant per input, the same in calibration, validation and on the device.
SCALE_WORDS = ("scale", "factor", "ratio")
SIZE_WORDS = ("shape", "size", "info", "hw")
MAX_CONSTANT_VALUES = 4096  # a non-image input larger than this is not a constant a name can explain


def constant_value(name: str, shape: list[int], dtype, hw: tuple[int, int]) -> tuple[np.ndarray, str]:
    """(value, the rule that chose it) for a non-image input `name` of `shape` (batch 1, no dynamic
    dims) and numpy `dtype`, beside an image input of height/width `hw`."""
    low = name.lower()
    n = int(np.prod(shape)) if shape else 1
    if n > MAX_CONSTANT_VALUES:
        raise BadInput(f"input {name!r} {shape} is not an image and too large to be given a constant value "
                       f"(at most {MAX_CONSTANT_VALUES} values)")
    last = shape[-1] if shape else None
    if any(w in low for w in SIZE_WORDS) and last in (2, 3, 4):
        row = {2: [hw[0], hw[1]], 3: [hw[0], hw[1], 1], 4: [hw[0], hw[1], hw[0], hw[1]]}[last]
        rule = {2: "the image input's [height, width]", 3: "[height, width, 1]: the input's size, no rescale",
                4: "[height, width, height, width] of the image input"}[last]
        value = np.broadcast_to(np.asarray(row, dtype=np.float64), shape)
    elif any(w in low for w in SCALE_WORDS) or "mask" in low:
        value, rule = np.ones(shape), ("ones: frames are resized to the input, so no rescale"
                                       if "mask" not in low else "ones: nothing masked")
    else:
        value, rule = np.zeros(shape), "zeros: no rule for this name (check the model's documentation)"
    return value.astype(dtype, order="C"), rule  # (np.ascontiguousarray makes a 0-d input's value shape (1,))


def _zoo_data(src, split: str):
    return src.zoo.data(split) if src.zoo is not None and src.zoo.dataset else None


def arrays_are_pictures(src, kind: str | None) -> bool:
    """Whether inputs of this `kind` ("array": a .npy/.npz) may be given mirrored and zoomed views. Not the
    arrays of a model whose input was 3-D (src.frame_from): its own tensors, audio features [1,16,96] as
    often as a gray [1,28,28] picture, which the shape the frame gave it ([1,1,16,96]) cannot tell apart."""
    return not (kind == "array" and getattr(src, "frame_from", None))


def calibration(src, calib, samples: int, holdout: int, allow_synthetic: bool, seed: int = 0,
                max_bytes: int | None = None):
    """(calibration inputs, held-out inputs or None, description). Inputs loaded from --calib are
    split: the validation inputs are never calibration inputs. `max_bytes`: the most the inputs may take."""
    spec = src.input_spec
    if calib is not None:
        s = cal.load_inputs(str(calib), spec, limit=samples + holdout, max_bytes=max_bytes)
        n = len(s.x)
        if n >= samples + 16:  # enough left over: validate on inputs calibration never saw
            return cal.subset(s.x, None, samples), cal.subset(s.x, samples), {
                "source": s.source, "kind": s.kind, "samples": samples,
                "calibration_inputs": f"inputs 0-{samples - 1} of the {n} loaded",
                "validation_inputs": f"inputs {samples}-{n - 1} held out"}
        cal_x, check, split = _split_few(s.x, spec, samples, arrays_are_pictures(src, s.kind))
        return cal_x, check, {"source": s.source, "kind": s.kind, "samples": len(cal_x), **split}
    data = _zoo_data(src, "train")
    if data is not None:
        x = data[0]
        idx = np.random.default_rng(seed).choice(len(x), size=min(samples, len(x)), replace=False)
        return (preprocess_batch(list(x[idx]), spec), None,
                {"source": f"zoo:{src.zoo.name} {src.zoo.dataset} (train split)", "kind": "zoo", "samples": len(idx)})
    if not allow_synthetic:
        raise BadInput(
            "int8 needs calibration data: pass --calib with an image folder, a .npy/.npz or a video "
            "(or --precision fp16/fp32; --allow-synthetic-calibration forces random data, which ruins accuracy)"
        )
    s = cal.synthetic(spec, samples + holdout, seed, max_bytes)
    return s.x[:samples], s.x[samples:], {"source": "synthetic", "kind": "synthetic", "samples": samples,
                                          "calibration_inputs": f"random inputs 0-{samples - 1}",
                                          "validation_inputs": f"random inputs {samples}-{samples + holdout - 1}"}


def evaluation(src, eval_set, eval_limit: int | None, max_bytes: int | None = None):
    """(inputs, labels or None, source): the user's set, else the zoo model's test split."""
    if eval_set is not None:
        s = cal.load_labelled(str(eval_set), src.input_spec, src.labels, eval_limit, max_bytes)
        return s.x, s.y, s.source
    data = _zoo_data(src, "test")
    if data is None:
        return None, None, None
    x, y = data
    if not src.zoo.labelled:  # features, not classes: the labels say nothing about the outputs
        y = None
    if eval_limit:
        x, y = x[:eval_limit], (y[:eval_limit] if y is not None else None)
    return preprocess_batch(list(x), src.input_spec), y, f"zoo:{src.zoo.name} test split"


def gather(src, *, precision: str, calib, samples: int, eval_set, eval_limit, holdout: int,
           allow_synthetic: bool, max_bytes: int | None = None) -> ExportData:
    """Everything the export measures on. Agreement inputs, best first: the labelled evaluation
    set, inputs held out from calibration, the zoo's unlabelled test split, the calibration
    inputs themselves, random inputs (fp32/fp16 with no data at all). `max_bytes`: the most an array file's
    or random inputs may take (half the export's memory budget)."""
    from lepton_edge import ui

    ev_x = ev_y = ev_src = None
    # A zoo's unlabelled photos only serve agreement: skip them when the user brought data.
    if eval_set is not None or (src.zoo is not None and (src.zoo.labelled or calib is None)):
        with ui.stage("load evaluation set"):
            ev_x, ev_y, ev_src = evaluation(src, eval_set, eval_limit, max_bytes)
    notes = list(getattr(src, "notes", []))
    for note in notes:  # what the non-image inputs of a multi-input model are fed, open dims taken: said once
        ui.info(f"[dim]{note}[/]")
    fed = {i.name for i in getattr(src, "extra_inputs", None) or []}  # (the manifest records those alone)
    constants = [n for n in notes if n.startswith("input ") and n.split(" ", 2)[1] in fed]
    calib_x = held = None
    info: dict[str, Any] = {}
    # fp16 takes ranges from --calib (compress/fp16.py); fp32 needs none, but its data still validates
    # (with none it was random inputs, even with real photos given)
    if precision == "int8" or calib is not None:
        with ui.stage("load calibration data" if precision != "fp32" else "load --calib data (to validate on)"):
            calib_x, held, info = calibration(src, calib, samples, holdout, allow_synthetic, max_bytes=max_bytes)
        if precision == "int8" and calib is not None and len(calib_x) < FEW_CALIBRATION:
            import logging

            logging.getLogger(__name__).warning(
                f"only {len(calib_x)} input(s) calibrate int8 (and {len(held) if held is not None else 0} validate "
                "it): ranges from so few are a guess, and a gate on so few decides little; give --calib 50-300 "
                "images like those the device will see")
    split = {k: info.pop(k) for k in ("calibration_inputs", "validation_inputs") if k in info}
    if precision == "fp32":  # its --calib data validates only: nothing was calibrated on the rest
        split.pop("calibration_inputs", None)
    if constants:
        split["constant_inputs"] = constants
    if ev_x is not None and ev_y is not None:
        split["validation_inputs"] = f"{ev_src} (labelled)"
        return ExportData(ev_x, "evaluation set", ev_x, ev_y, ev_src, calib_x if precision != "fp32" else None,
                          info, split)
    if held is not None:
        with_views = "views" in split.get("validation_inputs", "")
        check, kind = held, "held-out calibration data" + (" and other views of it" if with_views else "")
    elif ev_x is not None:
        check, kind = ev_x, f"{ev_src} (unlabelled)"
        split["validation_inputs"] = kind
    elif calib_x is not None and arrays_are_pictures(src, info.get("kind")) \
            and len(v := views(calib_x[:32], src.input_spec)):
        check, kind = v, "other views of calibration inputs (nothing held out)"
        split["validation_inputs"] = kind
    else:
        check, kind = cal.synthetic(src.input_spec, holdout, 1, max_bytes).x, "synthetic"
        split["validation_inputs"] = f"{len(check)} random inputs"
    return ExportData(check, kind, calib_x=calib_x if precision != "fp32" else None, calib_info=info, split=split)


def synthetic_inputs(src, *, precision: str, calib, eval_set, samples: int, holdout: int,
                     allow_synthetic: bool) -> int:
    """How many random inputs `gather` draws with these settings (0 when real data is there): the int8
    calibration's and held-out ones with no data at all, else fp32/fp16's agreement inputs when nothing else
    validates. Why: the export checks their size against its memory budget before drawing them."""
    if calib is not None or eval_set is not None or (src.zoo is not None and src.zoo.dataset):
        return 0
    if precision == "int8":
        return samples + holdout if allow_synthetic else 0
    return holdout


def training(src, train, limit: int | None = None, max_bytes: int | None = None):
    """Labelled data for fine-tuning after pruning: --train, else the zoo's train split."""
    if train is not None:
        s = cal.load_labelled(str(train), src.input_spec, src.labels, limit, max_bytes)
        return np.asarray(s.x), s.y  # (fine-tuning takes the whole float array)
    data = _zoo_data(src, "train")
    if data is not None and data[1] is not None:
        x, y = data
        return normalise(x[..., None] if x.ndim == 3 else x, src.input_spec), y
    raise BadInput("--finetune-epochs needs labelled training data: pass --train DIR (class folders) or .npz")
