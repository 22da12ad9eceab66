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
