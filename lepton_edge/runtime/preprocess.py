"""Frame -> input tensor, driven only by the manifest's InputSpec.

Why here (device side) and used by the exporter too: calibration and evaluation images must go
through exactly the preprocessing the device will apply, or the int8 ranges and the accuracy
figures describe a different model.
"""
from __future__ import annotations

import numpy as np

from lepton_edge.bundle import InputSpec


def _resize(img: np.ndarray, hw: tuple[int, int], mode: str) -> np.ndarray:
    import cv2

    h, w = hw
    if img.shape[:2] == (h, w):
        return img
    if mode == "stretch":
        return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    ih, iw = img.shape[:2]
    if mode == "center_crop":
        s = max(h / ih, w / iw)
        r = cv2.resize(img, (max(w, round(iw * s)), max(h, round(ih * s))), interpolation=cv2.INTER_AREA)
        y0, x0 = (r.shape[0] - h) // 2, (r.shape[1] - w) // 2
        return r[y0:y0 + h, x0:x0 + w]
    s = min(h / ih, w / iw)  # letterbox
    nh, nw = max(1, round(ih * s)), max(1, round(iw * s))
    r = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
    out = np.full((h, w) + img.shape[2:], 114, dtype=img.dtype)
    y0, x0 = (h - nh) // 2, (w - nw) // 2
    out[y0:y0 + nh, x0:x0 + nw] = r
    return out


def _to_color(img: np.ndarray, color: str) -> np.ndarray:
    """OpenCV frames are BGR (or gray); convert to what the model wants. Returns HxWxC."""
    import cv2

    if img.ndim == 2:
        img = img[:, :, None]
    c = img.shape[2]
    if color == "GRAY":
        if c == 1:
            return img
        code = cv2.COLOR_BGRA2GRAY if c == 4 else cv2.COLOR_BGR2GRAY
        return cv2.cvtColor(img, code)[:, :, None]
    if c == 1:
        img = np.repeat(img, 3, axis=2)
    elif c == 4:
        img = img[:, :, :3]
    return img[:, :, ::-1] if color == "RGB" else img


def to_pixels(img: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Colour order and size only: HxWxC uint8, ready for normalise()."""
    return _resize(_to_color(img, spec.color), spec.hw(), spec.resize).reshape(*spec.hw(), spec.channels)


def normalise(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """[N,H,W,C] uint8 -> the model's input tensor (layout, scale/mean/std, integer quantization)."""
    x = pixels.astype(np.float32) * np.float32(spec.scale)
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    if spec.layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    if spec.quantization:
        q = np.round(x / spec.quantization["scale"] + spec.quantization["zero_point"])
        info = np.iinfo(np.dtype(spec.dtype))
        return np.clip(q, info.min, info.max).astype(spec.dtype)
    return np.ascontiguousarray(x.astype(spec.dtype))


def preprocess(img: np.ndarray, spec: InputSpec) -> np.ndarray:
    """One OpenCV frame (BGR, BGRA or gray, any size) -> input tensor with batch 1."""
    return normalise(to_pixels(img, spec)[None], spec)


def preprocess_batch(images: np.ndarray | list[np.ndarray], spec: InputSpec) -> np.ndarray:
    """Many frames -> one batched tensor. Images already at the right size skip the resize."""
    return normalise(np.stack([to_pixels(im, spec) for im in images]), spec)
