"""A classic feature extractor as a baseline for learned embeddings: HOG + PCA, int8.

Why keep it: on a device with no model at all, or to check that a learned embedding earns its
bytes, histogram-of-oriented-gradients features reduced by PCA to the same 256-byte budget are
the honest comparison. OpenCV 5 moved `HOGDescriptor` out of its main modules (the pip wheels
lack it), so the Dalal-Triggs descriptor (centred [-1, 0, 1] gradients, unsigned orientation
bins with linear interpolation, 2x2-cell blocks, L2-Hys) is computed here with numpy over a
whole batch; PCA is OpenCV's (`cv2.PCACompute`), so the device needs no scikit-learn. The PCA
basis is fitted once on a gallery and saved as a small .npz beside it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lepton_edge.runtime.postprocess import MAX_EMBED_BYTES, embed_codes


class HogPca:
    def __init__(self, size: tuple[int, int] = (28, 28), cell: int = 7, bins: int = 9):
        self.size, self.cell, self.bins = size, cell, bins
        self.mean: np.ndarray | None = None
        self.basis: np.ndarray | None = None

    @property
    def descriptor_size(self) -> int:
        ch, cw = self.size[0] // self.cell, self.size[1] // self.cell
        return (ch - 1) * (cw - 1) * 4 * self.bins

    def _gray(self, images) -> np.ndarray:
        import cv2

        h, w = self.size
        out = np.empty((len(images), h, w), np.float32)
        for i, img in enumerate(images):
            g = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
            out[i] = g if g.shape == (h, w) else cv2.resize(g, (w, h), interpolation=cv2.INTER_AREA)
        return out

    def hog_features(self, images, batch: int = 4096) -> np.ndarray:
        """[N, descriptor_size] float32 HOG descriptors."""
        return np.concatenate([self._hog(self._gray(images[i:i + batch])) for i in range(0, len(images), batch)])

    def _hog(self, g: np.ndarray) -> np.ndarray:
        n, h, w = g.shape
        c, nb = self.cell, self.bins
        gx = np.zeros_like(g)
        gy = np.zeros_like(g)
        gx[:, :, 1:-1] = g[:, :, 2:] - g[:, :, :-2]
        gy[:, 1:-1, :] = g[:, 2:, :] - g[:, :-2, :]
        mag = np.hypot(gx, gy)
        pos = (np.arctan2(gy, gx) % np.pi) / (np.pi / nb) - 0.5  # bin centres at 10, 30, ... degrees
        lo = np.floor(pos).astype(np.int64)
        frac = (pos - lo).astype(np.float32)
        ch, cw = h // c, w // c
        hist = np.zeros((n, ch, cw, nb), np.float32)

        def cells(a):
            return a[:, :ch * c, :cw * c].reshape(n, ch, c, cw, c).transpose(0, 1, 3, 2, 4).reshape(n, ch, cw, -1)

        m, lo_c, fr = cells(mag), cells(lo % nb), cells(frac)
        hi_c = (lo_c + 1) % nb
        for b in range(nb):  # linear interpolation between the two nearest orientation bins
            hist[..., b] = (m * (1 - fr) * (lo_c == b)).sum(-1) + (m * fr * (hi_c == b)).sum(-1)
        blocks = np.concatenate([hist[:, :-1, :-1], hist[:, :-1, 1:], hist[:, 1:, :-1], hist[:, 1:, 1:]], -1)
        v = blocks / np.sqrt((blocks ** 2).sum(-1, keepdims=True) + 1e-6)  # L2-Hys
        v = np.minimum(v, 0.2)
        v = v / np.sqrt((v ** 2).sum(-1, keepdims=True) + 1e-6)
        return v.reshape(n, -1)

    def fit(self, images, dims: int = MAX_EMBED_BYTES) -> HogPca:
        import cv2

        f = self.hog_features(images)
        mean, basis = cv2.PCACompute(f, mean=None, maxComponents=min(dims, f.shape[1]))
        self.mean, self.basis = mean.astype(np.float32), basis.astype(np.float32)
        return self

    def codes(self, images) -> np.ndarray:
        """[N, dims] int8 codes (at most 256 bytes each), compared by cosine like `embed` results."""
        if self.basis is None:
            raise RuntimeError("HogPca.fit() first (or load())")
        f = (self.hog_features(images) - self.mean) @ self.basis.T
        return np.stack([embed_codes(v) for v in f])

    def save(self, path: str | Path) -> None:
        np.savez(path, mean=self.mean, basis=self.basis, size=np.array(self.size), cell=self.cell, bins=self.bins)

    @classmethod
    def load(cls, path: str | Path) -> HogPca:
        d = np.load(path)
        obj = cls(tuple(int(v) for v in d["size"]), int(d["cell"]), int(d["bins"]))
        obj.mean, obj.basis = d["mean"], d["basis"]
        return obj
