"""Frame -> input tensor, driven only by the manifest's InputSpec.

Why here (device side) and used by the exporter too: calibration and evaluation images must go
through exactly the preprocessing the device will apply, or the int8 ranges and the accuracy
figures describe a different model.
"""
from __future__ import annotations

import numpy as np

from lepton_edge.bundle import InputSpec


def _shrink(img: np.ndarray, w: int, h: int) -> np.ndarray:
    """Resize to (w, h). Why not plain INTER_AREA: at a non-integer ratio (640x480 -> 224x224) it
    costs over a millisecond, more than the model on a small input. Block-averaging by the largest
    whole factor first (INTER_AREA's fast path) and finishing with bilinear (a ratio under 2, so
    little aliasing) is ~7x cheaper and looks the same to the model; whole ratios stay exact."""
    import cv2

    ih, iw = img.shape[:2]
    kmax = min(iw // w, ih // h)
    if kmax < 2:
        return cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR if kmax == 0 else cv2.INTER_AREA)
    if iw == kmax * w and ih == kmax * h:
        return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    k = next((k for k in range(kmax, 1, -1) if iw % k == 0 and ih % k == 0), 1)
    if k == 1:  # no whole factor divides the frame: exact but slow
        return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    img = cv2.resize(img, (iw // k, ih // k), interpolation=cv2.INTER_AREA)
    return img if img.shape[:2] == (h, w) else cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)


def _resize(img: np.ndarray, hw: tuple[int, int], mode: str) -> np.ndarray:
    h, w = hw
    if img.shape[:2] == (h, w):
        return img
    if mode == "stretch":
        return _shrink(img, w, h)
    ih, iw = img.shape[:2]
    if mode == "center_crop":
        s = max(h / ih, w / iw)
        r = _shrink(img, max(w, round(iw * s)), max(h, round(ih * s)))
        y0, x0 = (r.shape[0] - h) // 2, (r.shape[1] - w) // 2
        return r[y0:y0 + h, x0:x0 + w]
    s = min(h / ih, w / iw)  # letterbox
    nh, nw = max(1, round(ih * s)), max(1, round(iw * s))
    r = _shrink(img, nw, nh)
    out = np.full((h, w) + img.shape[2:], 114, dtype=img.dtype)
    y0, x0 = (h - nh) // 2, (w - nw) // 2
    out[y0:y0 + nh, x0:x0 + nw] = r.reshape(out[y0:y0 + nh, x0:x0 + nw].shape)
    return out


def _to_color(img: np.ndarray, color: str) -> np.ndarray:
    """OpenCV frames are BGR (or gray, or BGRA); convert to what the model wants. Returns HxWxC.
    cv2.cvtColor, not a reversed numpy view: a view makes every later step copy the whole frame."""
    import cv2

    if img.ndim == 2:
        img = img[:, :, None]
    c = img.shape[2]
    if color == "GRAY":
        if c == 1:
            return img
        return cv2.cvtColor(img, cv2.COLOR_BGRA2GRAY if c == 4 else cv2.COLOR_BGR2GRAY)[:, :, None]
    if c == 1:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB if color == "RGB" else cv2.COLOR_GRAY2BGR)
    if c == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB if color == "RGB" else cv2.COLOR_BGRA2BGR)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if color == "RGB" else img


def to_pixels(img: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Colour order and size only: HxWxC uint8, ready for normalise(). A frame larger than the
    input is resized first (fewer pixels to convert), a smaller one converted first."""
    hw = spec.hw()
    if img.dtype != np.uint8:  # 16-bit or float frames: scale to 8 bits like the training images
        img = cv2_to_uint8(img)
    if img.shape[0] * img.shape[1] > hw[0] * hw[1] and (img.ndim == 2 or img.shape[2] in (1, 3)):
        out = _to_color(_resize(img, hw, spec.resize), spec.color)
    else:
        out = _resize(_to_color(img, spec.color), hw, spec.resize)
    return out.reshape(*hw, spec.channels)


def cv2_to_uint8(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint16:
        return (img >> 8).astype(np.uint8)
    if np.issubdtype(img.dtype, np.floating):
        return np.clip(img * (255.0 if img.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return np.clip(img, 0, 255).astype(np.uint8)


def normalise(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """[N,H,W,C] uint8 -> the model's input tensor (layout, scale/mean/std, integer quantization).
    (p * scale - mean) / std is computed as p * a - b straight from the uint8 pixels into one
    float array in the model's layout: two passes over the tensor, one allocation."""
    std = np.asarray(spec.std, np.float32)
    a = np.float32(spec.scale) / std
    b = np.asarray(spec.mean, np.float32) / std
    if spec.layout == "NCHW":
        pixels = pixels.transpose(0, 3, 1, 2)
        a, b = a.reshape(-1, 1, 1), b.reshape(-1, 1, 1)
    x = np.empty(pixels.shape, np.float32)
    if spec.layout == "NHWC" and a.size > 1:  # rows of W*C values, so numpy's inner loop is long, not 3
        n, h, w, c = pixels.shape
        rows, flat = np.ascontiguousarray(pixels).reshape(n * h, w * c), x.reshape(n * h, w * c)
        np.multiply(rows, np.tile(a, w), out=flat)
        flat -= np.tile(b, w)
    else:
        np.multiply(pixels, a, out=x)
        x -= b
    if spec.quantization:
        return quantize(x, spec.quantization, spec.dtype)
    if spec.dtype == "float32":
        return x
    if np.issubdtype(np.dtype(spec.dtype), np.integer):  # rounded and clipped to the type, never wrapped around
        info = np.iinfo(np.dtype(spec.dtype))
        return np.clip(np.rint(x, out=x), info.min, info.max, out=x).astype(spec.dtype)
    return x.astype(spec.dtype)


def quantize(x: np.ndarray, quantization: dict, dtype: str) -> np.ndarray:
    """Real values -> an integer input tensor with its scale and zero point, clipped to the type."""
    q = np.round(x / quantization["scale"] + quantization["zero_point"])
    info = np.iinfo(np.dtype(dtype))
    return np.clip(q, info.min, info.max).astype(dtype)


def preprocess(img: np.ndarray, spec: InputSpec) -> np.ndarray:
    """One OpenCV frame (BGR, BGRA or gray, any size) -> input tensor with batch 1."""
    return normalise(to_pixels(img, spec)[None], spec)


def preprocess_batch(images: np.ndarray | list[np.ndarray], spec: InputSpec) -> np.ndarray:
    """Many frames -> one batched tensor. Images already at the right size skip the resize."""
    return normalise(np.stack([to_pixels(im, spec) for im in images]), spec)
