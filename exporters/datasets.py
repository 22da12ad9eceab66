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
    check_x: np.ndarray  # inputs the agreement with the reference is measured on
    check_kind: str
    eval_x: np.ndarray | None = None  # labelled evaluation set (accuracy before/after)
    eval_y: np.ndarray | None = None
    eval_src: str | None = None
    calib_x: np.ndarray | None = None
    calib_info: dict[str, Any] = field(default_factory=dict)


def _zoo_data(src, split: str):
    return src.zoo.data(split) if src.zoo is not None and src.zoo.dataset else None


def calibration(src, calib, samples: int, holdout: int, allow_synthetic: bool, seed: int = 0):
    """(calibration inputs, held-out inputs or None, description)."""
    spec = src.input_spec
    if calib is not None:
        s = cal.load_inputs(str(calib), spec, limit=samples + holdout)
        if len(s.x) >= samples + 16:  # enough left over: check agreement on inputs calibration never saw
            return s.x[:samples], s.x[samples:], {"source": s.source, "kind": s.kind, "samples": samples}
        return s.x, None, {"source": s.source, "kind": s.kind, "samples": len(s.x)}
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
    s = cal.synthetic(spec, samples + holdout, seed)
    return s.x[:samples], s.x[samples:], {"source": "synthetic", "kind": "synthetic", "samples": samples}


def evaluation(src, eval_set, eval_limit: int | None):
    """(inputs, labels or None, source): the user's set, else the zoo model's test split."""
    if eval_set is not None:
        s = cal.load_labelled(str(eval_set), src.input_spec, src.labels, eval_limit)
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
           allow_synthetic: bool) -> ExportData:
    """Everything the export measures on. Agreement inputs, best first: the labelled evaluation
    set, inputs held out from calibration, the zoo's unlabelled test split, the calibration
    inputs themselves, random inputs (fp32/fp16 with no data at all)."""
    from lepton_edge import ui

    ev_x = ev_y = ev_src = None
    # A zoo's unlabelled photos only serve agreement: skip them when the user brought data.
    if eval_set is not None or (src.zoo is not None and (src.zoo.labelled or calib is None)):
        with ui.stage("load evaluation set"):
            ev_x, ev_y, ev_src = evaluation(src, eval_set, eval_limit)
    calib_x = held = None
    info: dict[str, Any] = {}
    if precision == "int8":
        with ui.stage("load calibration data"):
            calib_x, held, info = calibration(src, calib, samples, holdout, allow_synthetic)
    elif calib is not None:
        ui.info(f"[dim]--calib ignored: {precision} needs no calibration[/]")
    if ev_x is not None and ev_y is not None:
        return ExportData(ev_x, "evaluation set", ev_x, ev_y, ev_src, calib_x, info)
    if held is not None:
        check, kind = held, "held-out calibration data"
    elif ev_x is not None:
        check, kind = ev_x, f"{ev_src} (unlabelled)"
    elif calib_x is not None:
        check, kind = calib_x[:32], "calibration data (too few inputs to hold some out)"
    else:
        check, kind = cal.synthetic(src.input_spec, holdout, seed=1).x, "synthetic"
    return ExportData(check, kind, calib_x=calib_x, calib_info=info)


def training(src, train, limit: int | None = None):
    """Labelled data for fine-tuning after pruning: --train, else the zoo's train split."""
    if train is not None:
        s = cal.load_labelled(str(train), src.input_spec, src.labels, limit)
        return s.x, s.y
    data = _zoo_data(src, "train")
    if data is not None and data[1] is not None:
        x, y = data
        return normalise(x[..., None] if x.ndim == 3 else x, src.input_spec), y
    raise BadInput("--finetune-epochs needs labelled training data: pass --train DIR (class folders) or .npz")
