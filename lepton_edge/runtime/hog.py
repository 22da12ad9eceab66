"""A classic feature extractor as a baseline for learned embeddings: HOG (OpenCV) + PCA, int8.

Why keep it: on a device with no model at all, or to check that a learned embedding earns its
bytes, histogram-of-gradients features reduced by PCA to the same 256-byte budget are the
honest comparison. Both steps are OpenCV (no scikit-learn on the device); the PCA basis is fitted
once on a gallery and saved as a small .npz next to the gallery.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lepton_edge.runtime.postprocess import MAX_EMBED_BYTES, embed_codes


class HogPca:
    def __init__(self, size: tuple[int, int] = (28, 28), cell: int = 7, bins: int = 9):
        import cv2

        h, w = size
        self.size = size
        self.hog = cv2.HOGDescriptor((w, h), (2 * cell, 2 * cell), (cell, cell), (cell, cell), bins)
        self.mean: np.ndarray | None = None
        self.basis: np.ndarray | None = None

    def hog_features(self, images) -> np.ndarray:
        import cv2

        h, w = self.size
        out = []
        for img in images:
            g = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
            if g.shape != (h, w):
                g = cv2.resize(g, (w, h), interpolation=cv2.INTER_AREA)
            out.append(self.hog.compute(g).reshape(-1))
        return np.asarray(out, np.float32)

    def fit(self, images, dims: int = MAX_EMBED_BYTES) -> "HogPca":
        import cv2

        f = self.hog_features(images)
        dims = min(dims, f.shape[1])
        mean, basis = cv2.PCACompute(f, mean=None, maxComponents=dims)
        self.mean, self.basis = mean.astype(np.float32), basis.astype(np.float32)
        return self

    def codes(self, images) -> np.ndarray:
        """[N, dims] int8 codes (at most 256 bytes each), compared by cosine like `embed` results."""
        if self.basis is None:
            raise RuntimeError("HogPca.fit() first (or load())")
        f = (self.hog_features(images) - self.mean) @ self.basis.T
        return np.stack([embed_codes(v) for v in f])

    def save(self, path: str | Path) -> None:
        np.savez(path, mean=self.mean, basis=self.basis, size=np.array(self.size))

    @classmethod
    def load(cls, path: str | Path) -> "HogPca":
        d = np.load(path)
        obj = cls(tuple(int(v) for v in d["size"]))
        obj.mean, obj.basis = d["mean"], d["basis"]
        return obj
