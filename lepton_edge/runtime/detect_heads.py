"""Detector heads: raw model outputs -> candidate boxes in input pixels, one decoder per layout.

Why a module of its own: exported detectors end at different places. Some end after NMS (SSD's
TFLite_Detection_PostProcess, torchvision), some after decoding boxes (Ultralytics YOLO), and
some before it: YOLOX emits grid offsets and log sizes, PicoDet/GFL emits per-side distance
distributions. Reading undecoded outputs as boxes gives garbage boxes that still look like
detections, and an int8 gate that compares garbage. Each head here is named, recognises its own
layout from the output shapes and the input size, and decodes with numpy alone (device side:
no torch). The export records which head it validated with (manifest `postprocess.head`), so
the device decodes the same way; without that record `recognise` picks the first head whose
rule accepts, in the order of HEADS.

Rules (first sample of each output; H, W the model's input size):
- picodet-gfl: 2k outputs (k >= 2), each [1, N_i, C]: k score maps [1, N_i, nc] (probabilities:
  PaddleDetection's export applies the sigmoid), then k box maps [1, N_i, 4 (R + 1)] (R >= 1),
  with N_i = ceil(H / s_i) * ceil(W / s_i) for s_i = 8, 16, 32, ... (the same N_i in both halves).
  Decoding as PaddleDetection's PicoHead: softmax over the R + 1 bins, the expectation is the
  distance (in strides) from the anchor centre ((col + 0.5) s, (row + 0.5) s) to each side.
- yolox-grid: one output [1, N, 5 + nc] with N = sum over s of (H / s) * (W / s) for the strides
  8, 16, 32 (or 8 .. 64: the P6 models), and every centre |x|, |y| under 8, the smallest stride:
  grid offsets, not pixel positions (a decoded head's centres spread over the whole input, so the
  same shape decoded, as YOLOv6 and YOLOX with decode_in_inference emit it, goes to yolo).
  Decoding as YOLOX's own demo_postprocess: (xy + grid) * stride, exp(wh) * stride; score is
  objectness x class probability.
- yolo: one output of decoded candidates, centre x, centre y, width, height in input pixels:
  [1, 4 + nc, N] (v8 and later), [1, N, 5 + nc] (v5, objectness) or [1, N, 4 + nc].
- ssd: post-processed boxes [.., N, 4] with scores [.., N] and classes [.., N] (maybe a count).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

YOLOX_STRIDES = ((8, 16, 32), (8, 16, 32, 64))
PICODET_FIRST_STRIDE = 8


@dataclass
class Candidates:
    """What a head decodes to: boxes [N, 4] x1, y1, x2, y2 in input pixels, scores, classes;
    `nms` when they are raw candidates that still need a score threshold and NMS (False: the
    model did that itself)."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    nms: bool = True


Decoder = Callable[[list[np.ndarray], tuple[int, int], "int | None"], "Candidates | None"]


def _sample(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    return a[0] if a.ndim == 3 else a


# ---- picodet-gfl -------------------------------------------------------------------------------

def _picodet_layout(outputs: list[np.ndarray], hw: tuple[int, int]) -> list[int] | None:
    """The strides of a PicoDet/GFL output set, or None when the outputs are not one."""
    if len(outputs) < 4 or len(outputs) % 2:
        return None
    shapes = [np.shape(o) for o in outputs]
    if any(len(s) != 3 or s[0] != 1 for s in shapes):
        return None
    k = len(outputs) // 2
    nc, bins = shapes[0][2], shapes[k][2]
    if nc < 1 or bins % 4 or bins < 8:
        return None
    h, w = hw
    strides = [PICODET_FIRST_STRIDE << i for i in range(k)]
    for i, s in enumerate(strides):
        n = math.ceil(h / s) * math.ceil(w / s)
        if shapes[i] != (1, n, nc) or shapes[k + i] != (1, n, bins):
            return None
    return strides


def picodet_gfl(outputs: list[np.ndarray], hw: tuple[int, int], num_labels: int | None = None) -> Candidates | None:
    strides = _picodet_layout(outputs, hw)
    if strides is None:
        return None
    k, w = len(strides), hw[1]
    boxes, scores = [], []
    for s, sc, dist in zip(strides, outputs[:k], outputs[k:]):
        sc, dist = _sample(sc).astype(np.float32), _sample(dist).astype(np.float32)
        bins = dist.shape[1] // 4
        d = dist.reshape(-1, 4, bins)
        e = np.exp(d - d.max(-1, keepdims=True))
        dist_px = (e / e.sum(-1, keepdims=True)) @ np.arange(bins, dtype=np.float32) * s  # [N, 4]: l, t, r, b
        rows, cols = np.divmod(np.arange(len(sc)), math.ceil(w / s))
        cx, cy = (cols + 0.5) * s, (rows + 0.5) * s
        boxes.append(np.stack([cx - dist_px[:, 0], cy - dist_px[:, 1], cx + dist_px[:, 2], cy + dist_px[:, 3]], 1))
        scores.append(sc)
    sc = np.concatenate(scores)
    classes = sc.argmax(1)
    return Candidates(np.concatenate(boxes).astype(np.float32), sc[np.arange(len(sc)), classes].astype(np.float32),
                      classes.astype(np.float32))


# ---- yolox-grid --------------------------------------------------------------------------------

@lru_cache(maxsize=8)
def _yolox_grids(n: int, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray] | None:
    """(grid [N, 2] of cell x, y; stride [N, 1]) when N anchors are YOLOX's at this input size (made
    once per size: the device decodes every frame with them; read-only)."""
    h, w = hw
    for strides in YOLOX_STRIDES:
        for div in ((lambda a, s: a // s), (lambda a, s: -(-a // s))):  # floor (YOLOX's demo), ceil (the convs)
            sizes = [(div(h, s), div(w, s)) for s in strides]
            # every stride has cells (an 8x8 input has no 16- or 32-pixel grid: a [1, 144] output there is no YOLOX)
            if min(a * b for a, b in sizes) == 0 or sum(a * b for a, b in sizes) != n:
                continue
            grids, strd = [], []
            for (gh, gw), s in zip(sizes, strides):
                yv, xv = np.divmod(np.arange(gh * gw), gw)
                grids.append(np.stack([xv, yv], 1))
                strd.append(np.full((gh * gw, 1), s))
            grid, stride = np.concatenate(grids).astype(np.float32), np.concatenate(strd).astype(np.float32)
            grid.flags.writeable = stride.flags.writeable = False
            return grid, stride
    return None


def yolox_grid(outputs: list[np.ndarray], hw: tuple[int, int], num_labels: int | None = None) -> Candidates | None:
    if len(outputs) != 1 or np.ndim(outputs[0]) != 3:  # [1, N, 5 + nc], as the rule says
        return None
    a = _sample(outputs[0]).astype(np.float32)
    if a.shape[1] < 6 or (num_labels is not None and a.shape[1] != 5 + num_labels):
        return None
    got = _yolox_grids(len(a), (int(hw[0]), int(hw[1])))
    if got is None:
        return None
    grid, stride = got
    xy = (a[:, :2] + grid) * stride
    wh = np.exp(np.minimum(a[:, 2:4], 20.0)) * stride  # (a broken model's huge log size stays finite)
    cls = a[:, 5:]
    classes = cls.argmax(1)
    scores = a[:, 4] * cls[np.arange(len(cls)), classes]
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], 1)
    return Candidates(boxes, scores.astype(np.float32), classes.astype(np.float32))


def _grid_offsets(outputs: list[np.ndarray]) -> bool:
    """Whether a [1, N, 5 + nc] output's centres are grid offsets (every |x|, |y| under the smallest
    stride) rather than pixel positions spread over the input: what tells YOLOX's raw head from the
    same shape decoded. Asked only when recognising; a head named by the manifest is not second-guessed."""
    a = _sample(outputs[0])
    return bool(len(a)) and float(np.abs(a[:, :2]).max()) < min(YOLOX_STRIDES[0])


# ---- yolo (decoded) ----------------------------------------------------------------------------

def yolo(outputs: list[np.ndarray], hw: tuple[int, int], num_labels: int | None = None) -> Candidates | None:
    """Decoded YOLO candidates: [1, 4+nc, N] (v8 and later), or [1, N, 5+nc] (v5: with objectness)
    or [1, N, 4+nc]. Boxes are centre x, centre y, width, height in input pixels."""
    if len(outputs) != 1:
        return None
    a = np.asarray(outputs[0], dtype=np.float32)
    if a.ndim == 3:
        a = a[0]
    if a.ndim != 2 or min(a.shape) < 5:
        return None
    if (num_labels is not None and a.shape[0] == 4 + num_labels) or a.shape[0] < a.shape[1]:  # [4+nc, N]
        a, objectness = a.T, False
    else:  # [N, C]: v5 has objectness unless the labels say 4+nc
        objectness = not (num_labels is not None and a.shape[1] - 4 == num_labels)
    cls = a[:, 5:] if objectness else a[:, 4:]
    if cls.shape[1] == 0:
        return None
    classes = cls.argmax(1)
    scores = cls[np.arange(len(cls)), classes] * (a[:, 4] if objectness else 1.0)
    cx, cy, w, h = a[:, 0], a[:, 1], a[:, 2], a[:, 3]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    return Candidates(boxes, scores.astype(np.float32), classes.astype(np.float32))


# ---- ssd (post-processed) ----------------------------------------------------------------------

def ssd(outputs: list[np.ndarray], hw: tuple[int, int], num_labels: int | None = None) -> Candidates | None:
    """Post-processed outputs (TFLite_Detection_PostProcess, torchvision-style ONNX): boxes [.., N, 4]
    plus scores [.., N] and classes [.., N] (and maybe a count). TFLite's emits normalised
    [ymin, xmin, ymax, xmax] (four outputs); normalised boxes are scaled to the input."""
    arrs = [np.asarray(o) for o in outputs]
    box_i = next((i for i, a in enumerate(arrs) if a.ndim >= 2 and a.shape[-1] == 4), None)
    if box_i is None:
        return None
    boxes = arrs[box_i].reshape(-1, 4).astype(np.float32)
    n = len(boxes)
    vecs = [(i, a.reshape(-1)) for i, a in enumerate(arrs) if i != box_i and a.size == n]
    if len(vecs) < 2:
        return None
    vs = [v for _, v in vecs]
    typed = [v for v in vs if np.issubdtype(v.dtype, np.integer)]
    integral = [v for v in vs if np.all(np.mod(v, 1) == 0)]
    if typed:
        classes = typed[0]
    elif len(integral) == 1:
        classes = integral[0]
    else:  # both look alike: TFLite's order is boxes, classes, scores, count
        classes = vs[0]
    scores = next(v for v in vs if v is not classes)
    # the count: a one-value output that is none of the others. (With one detection a slot, N = 1, the classes
    # and scores are one value each too: the count was read from the classes, and a class-0 box was dropped)
    used = {box_i} | {i for i, v in vecs if v is classes or v is scores}
    counts = [a.reshape(-1) for i, a in enumerate(arrs) if a.size == 1 and i not in used]
    if counts:
        m = int(counts[0][0])
        boxes, scores, classes = boxes[:m], scores[:m], classes[:m]
    h, w = hw
    normalised = bool(boxes.size) and float(np.abs(boxes).max()) <= 1.5
    if len(outputs) == 4 and normalised:  # TFLite's [ymin, xmin, ymax, xmax]
        boxes = boxes[:, [1, 0, 3, 2]] * np.array([w, h, w, h], np.float32)
    elif normalised:
        boxes = boxes * np.array([w, h, w, h], np.float32)
    return Candidates(boxes, scores.astype(np.float32), classes.astype(np.float32), nms=False)


# ---- registry ----------------------------------------------------------------------------------

# in the order `recognise` tries them: the strict rules (shapes tied to the input size) first
HEADS: dict[str, Decoder] = {"picodet-gfl": picodet_gfl, "yolox-grid": yolox_grid, "yolo": yolo, "ssd": ssd}
# what recognising a head asks beyond its decoder's shape rule
RECOGNISE_ALSO: dict[str, Callable[[list[np.ndarray]], bool]] = {"yolox-grid": _grid_offsets}
# heads whose rule ties the output shapes to the input size: no other kind of model matches them
SIZE_BOUND = ("picodet-gfl", "yolox-grid")


def recognise(outputs: list[np.ndarray], hw: tuple[int, int], num_labels: int | None = None) -> str | None:
    """The name of the first head (HEADS' order) that reads these outputs, or None."""
    try:
        return decode(outputs, hw, num_labels)[0]
    except ValueError:
        return None


def decode(outputs: list[np.ndarray], hw: tuple[int, int], num_labels: int | None = None,
           head: str | None = None) -> tuple[str, Candidates]:
    """(head name, candidates): with `head` that head's decoding (ValueError when the outputs are not
    its layout), else the first head that reads them (ValueError when none does)."""
    if head is not None:
        if head not in HEADS:
            raise ValueError(f"unknown detector head {head!r}; known: {', '.join(HEADS)}")
        got = HEADS[head](outputs, hw, num_labels)
        if got is None:
            raise ValueError(f"the outputs {[list(np.shape(o)) for o in outputs]} are not the {head} head's layout "
                             f"at input {hw[0]}x{hw[1]}")
        return head, got
    for name, fn in HEADS.items():
        got = fn(outputs, hw, num_labels)
        if got is not None and (name not in RECOGNISE_ALSO or RECOGNISE_ALSO[name](outputs)):
            return name, got
    raise ValueError("outputs match no detector head (SSD boxes [N,4] + scores + classes; YOLO [1,4+nc,N] or "
                     "[1,N,5+nc]; YOLOX grid [1,N,5+nc]; PicoDet scores + box distributions); run with --task raw")
