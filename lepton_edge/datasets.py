"""Real data sets the project trains, calibrates and evaluates on, from packages, never a hub.

Fashion-MNIST comes from Debian's `dataset-fashion-mnist` (IDX files under
/usr/share/datasets/fashion-mnist/); LEPTON_FASHION_MNIST_DIR points elsewhere.
"""
from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from lepton_edge.errors import BadInput

FASHION_LABELS = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"


def fashion_dir() -> Path:
    return Path(os.environ.get("LEPTON_FASHION_MNIST_DIR", _DEFAULT_DIR))


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(d: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (d / name).is_file():
            return d / name
    raise BadInput(
        f"Fashion-MNIST not found in {d} (missing {stem}): install Debian's dataset-fashion-mnist "
        "(apt-get install dataset-fashion-mnist) or set LEPTON_FASHION_MNIST_DIR"
    )


@lru_cache(maxsize=2)
def fashion_mnist(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N,28,28], labels int64 [N]) for split 'train' (60,000) or 'test' (10,000)."""
    prefix = {"train": "train", "test": "t10k"}[split]
    d = fashion_dir()
    x = _read_idx(_find(d, f"{prefix}-images-idx3-ubyte"))
    y = _read_idx(_find(d, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    return x, y


def photo_crops(n: int, size: int = 224, seed: int = 0) -> np.ndarray:
    """n real-photo crops [N,size,size,3] uint8 BGR (OpenCV order) from scikit-learn's sample photos.

    Why: MobileNetV2-class models need natural-image statistics to calibrate int8; random data
    ruins the ranges. scikit-learn ships two photographs (no download); random crops, scales and
    flips of them are the calibration and held-out sets of zoo:mobilenetv2.
    """
    import cv2

    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        raise BadInput("zoo:mobilenetv2's sample photos need scikit-learn (pip install scikit-learn)") from None
    rng = np.random.default_rng(seed)
    imgs = load_sample_images().images
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        im = imgs[i % len(imgs)]
        s = int(rng.integers(min(im.shape[:2]) // 3, min(im.shape[:2])))
        y, x = int(rng.integers(0, im.shape[0] - s + 1)), int(rng.integers(0, im.shape[1] - s + 1))
        crop = cv2.resize(im[y:y + s, x:x + s], (size, size), interpolation=cv2.INTER_AREA)
        out[i] = (crop[:, ::-1] if rng.random() < 0.5 else crop)[:, :, ::-1]  # flip; RGB -> BGR
    return out
