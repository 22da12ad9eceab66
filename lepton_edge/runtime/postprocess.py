"""Raw model outputs -> results: classification, detection, compact embeddings.

Why these three: they are what edge devices report upstream. A classifier's top-k with labels;
a detector's boxes in the *frame's* coordinates (undoing the resize the preprocessing did), from
the heads exported detectors end with (runtime/detect_heads.py: SSD-style post-processed boxes;
YOLO decoded candidates, YOLOX grids and PicoDet distributions that need NMS); and embeddings compact enough to
send over MQTT for every frame (at most 256 bytes, int8).
"""
from __future__ import annotations

import base64
import math
from functools import lru_cache

import numpy as np

from lepton_edge.bundle import InputSpec
from lepton_edge.runtime import detect_heads as heads

MAX_EMBED_BYTES = 256


# ---- classification ---------------------------------------------------------------------------

def classify(outputs: list[np.ndarray], labels: list[str] | None = None, k: int = 5) -> list[dict]:
    """Top-k of the first output: [{"index", "label", "score"}]; logits are turned into probabilities.

    Small heads (up to 256 classes) are done in plain Python: for a 10-class model that is a
    third of numpy's cost, and it is paid on every frame."""
    out = np.asarray(outputs[0])
    if out.size == 0:
        return []
    if out.size <= 256:
        v = out.ravel().tolist()
        hi = max(v)
        if min(v) < 0 or hi > 1 or abs(sum(v) - 1) > 1e-2:  # logits: softmax
            e = [math.exp(a - hi) for a in v]
            s = sum(e)
            v = [a / s for a in e]
        top = sorted(range(len(v)), key=v.__getitem__, reverse=True)[:k]
        scores = [v[i] for i in top]
    else:
        f = out.astype(np.float32).ravel()
        if f.min() < 0 or f.max() > 1 or abs(float(f.sum()) - 1) > 1e-2:
            e = np.exp(f - f.max())
            f = e / e.sum()
        k = min(k, f.size)
        # ties (an int8 softmax dequantizes to a few distinct values) go to the lowest index, so the same
        # scores give the same top-k on every CPU: argpartition's order among equals is SIMD-dependent
        kth = np.partition(f, f.size - k)[f.size - k]
        cand = np.flatnonzero(f >= kth)
        idx = cand[np.argsort(-f[cand], kind="stable")][:k]
        top, scores = idx.tolist(), f[idx].tolist()
    names = labels or []
    return [{"index": i, "label": names[i] if i < len(names) else str(i), "score": s} for i, s in zip(top, scores)]


# ---- detection --------------------------------------------------------------------------------

def frame_transform(spec: InputSpec, frame_hw: tuple[int, int]) -> tuple[float, float, float, float]:
    """(sx, sy, dx, dy) with frame = (input - d) / s, for the spec's resize mode."""
    h, w = spec.hw()
    fh, fw = frame_hw
    if spec.resize == "stretch":
        return w / fw, h / fh, 0.0, 0.0
    if spec.resize == "letterbox":
        s = min(h / fh, w / fw)
        return s, s, (w - round(fw * s)) // 2, (h - round(fh * s)) // 2
    s = max(h / fh, w / fw)  # center_crop
    return s, s, -((max(w, round(fw * s)) - w) // 2), -((max(h, round(fh * s)) - h) // 2)


def _nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float, limit: int) -> np.ndarray:
    import cv2

    if len(boxes) == 0:
        return np.zeros(0, dtype=int)
    xywh = np.stack([boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], 1)
    keep = cv2.dnn.NMSBoxesBatched(xywh.tolist(), scores.tolist(), classes.astype(int).tolist(), 0.0, iou, top_k=limit)
    return np.asarray(keep, dtype=int).reshape(-1)


def manifest_head(manifest) -> str | None:
    """The detector head a bundle's export validated with (manifest `postprocess.head`), or None:
    an older bundle, or a head this version does not know (the outputs then pick one)."""
    section = (getattr(manifest, "model_extra", None) or {}).get("postprocess") or {}
    head = section.get("head") if isinstance(section, dict) else None
    return head if head in heads.HEADS else None


def detect(outputs: list[np.ndarray], spec: InputSpec, frame_hw: tuple[int, int], labels: list[str] | None = None,
           conf: float = 0.25, iou: float = 0.45, limit: int = 100, head: str | None = None) -> list[dict]:
    """[{"box": [x1, y1, x2, y2] in frame pixels, "score", "class", "label"}], best first.

    head: a detector head by name (runtime/detect_heads.py: what the export validated with); None
    lets the outputs' shapes pick it. A ValueError when the outputs are no head's layout."""
    _, got = heads.decode(outputs, spec.hw(), len(labels) if labels else None, head)
    ok = got.scores >= conf
    boxes, scores, classes = got.boxes[ok], got.scores[ok], got.classes[ok]
    if got.nms:
        keep = _nms(boxes, scores, classes, iou, limit)
        boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
    sx, sy, dx, dy = frame_transform(spec, frame_hw)
    fh, fw = frame_hw
    out = []
    for b, s, c in sorted(zip(boxes, scores, classes), key=lambda t: -t[1])[:limit]:
        x1, y1, x2, y2 = (b[0] - dx) / sx, (b[1] - dy) / sy, (b[2] - dx) / sx, (b[3] - dy) / sy
        box = [float(np.clip(x1, 0, fw)), float(np.clip(y1, 0, fh)),
               float(np.clip(x2, 0, fw)), float(np.clip(y2, 0, fh))]
        ci = int(c)
        out.append({"box": [round(v, 1) for v in box], "score": float(s), "class": ci,
                    "label": labels[ci] if labels and 0 <= ci < len(labels) else str(ci)})
    return out


# ---- embeddings -------------------------------------------------------------------------------

@lru_cache(maxsize=8)
def _projection(dim: int, out: int) -> np.ndarray:
    """A fixed orthonormal random projection dim -> out (Johnson-Lindenstrauss): the same on every
    device, so codes from different devices compare; seeded, so nothing has to be shipped."""
    rng = np.random.default_rng(20261129)
    q, _ = np.linalg.qr(rng.standard_normal((dim, out)))
    return q.astype(np.float32)


# Above this many values the dense projection is not built: a dim x 256 matrix (and numpy's QR of it,
# in float64) took 758 MB for a 65k-value segmentation map and 2 GB for 196k, more than a Pi has.
DENSE_PROJECTION_MAX = 16384


@lru_cache(maxsize=8)
def _sketch(dim: int, out: int) -> tuple[np.ndarray, np.ndarray]:
    """A count sketch dim -> out (each value added, with a random sign, to one of `out` buckets): a
    sparse random projection that keeps inner products in expectation as the dense one does, in
    O(dim) memory and time. Seeded like _projection, so it is the same on every device."""
    rng = np.random.default_rng(20261201)
    return rng.integers(0, out, dim).astype(np.intp), rng.choice(np.array([-1.0, 1.0], np.float32), dim)


def embed_codes(v: np.ndarray, max_bytes: int = MAX_EMBED_BYTES) -> np.ndarray:
    """An L2-normalised feature vector as at most `max_bytes` int8 codes.

    Why no scale is stored: codes are compared by cosine similarity, which ignores each vector's
    own scale, so the vector is scaled to use the full int8 range and the scale dropped. Vectors
    longer than max_bytes are first projected (see _projection; past DENSE_PROJECTION_MAX values, _sketch).
    """
    v = np.asarray(v, dtype=np.float32).reshape(-1)
    if v.size > DENSE_PROJECTION_MAX:
        bucket, sign = _sketch(v.size, max_bytes)
        v = np.bincount(bucket, weights=v * sign, minlength=max_bytes).astype(np.float32)
    elif v.size > max_bytes:
        v = v @ _projection(v.size, max_bytes)
    n = float(np.linalg.norm(v))
    if n == 0:
        return np.zeros(v.size, np.int8)
    v = v / n
    m = float(np.abs(v).max())
    return np.clip(np.round(v * (127.0 / m)), -127, 127).astype(np.int8)


def embed(outputs: list[np.ndarray], max_bytes: int = MAX_EMBED_BYTES) -> dict:
    codes = embed_codes(outputs[0], max_bytes)
    out = {"dims": int(codes.size), "bytes": int(codes.nbytes), "int8_b64": base64.b64encode(codes.tobytes()).decode()}
    size = int(np.asarray(outputs[0]).size)
    if size > max_bytes:  # which projection made the codes: codes compare only with codes made the same way
        out["projection"] = "count-sketch" if size > DENSE_PROJECTION_MAX else "dense"
    return out


def decode_embedding(b64: str) -> np.ndarray:
    """The int8 codes of an `embed` result, L2-normalised as float32 (for nearest-neighbour search)."""
    v = np.frombuffer(base64.b64decode(b64), dtype=np.int8).astype(np.float32)
    n = np.linalg.norm(v)
    return v / n if n else v
