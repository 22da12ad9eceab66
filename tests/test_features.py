"""Compact features: an embedding bundle's int8 codes (<= 256 bytes) find the same neighbours as
its fp32 features; the HOG + PCA baseline fits the same budget."""
from __future__ import annotations

import numpy as np
import pytest

import lepton_edge
from lepton_edge.baselines.hog import HogPca
from lepton_edge.datasets import fashion_mnist
from lepton_edge.pipeline import Pipeline
from lepton_edge.runtime import Runtime
from lepton_edge.runtime.postprocess import decode_embedding


def _top1(gallery, gy, queries, qy) -> float:
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return float((gy[(q @ g.T).argmax(1)] == qy).mean())


@pytest.fixture(scope="module")
def train():
    x, y = fashion_mnist("train")
    return x[:5000], y[:5000]


def test_embedding_bundle_codes_keep_nearest_neighbours(tmp_path, train, fashion, fashion_video):
    b = lepton_edge.export("zoo:fashion-cnn-embed", target="x86-cpu", precision="fp32", out=tmp_path).bundle
    assert b.manifest.task == "embed"
    rt = Runtime.load(b.path)
    xq, yq = fashion[0][:1000], fashion[1][:1000]

    def both(images):
        raw = [rt.infer(rt.preprocess(im)) for im in images]
        res = [rt.postprocess(r) for r in raw]
        assert all(r["bytes"] <= 256 for r in res)
        return (np.stack([r[0].reshape(-1) for r in raw]),
                np.stack([decode_embedding(r["int8_b64"]) for r in res]))

    g32, g8 = both(train[0])
    q32, q8 = both(xq)
    acc32, acc8 = _top1(g32, train[1], q32, yq), _top1(g8, train[1], q8, yq)
    assert acc32 > 0.8 and abs(acc32 - acc8) <= 0.01, (acc32, acc8)
    video, _ = fashion_video  # and through the pipeline, as the agent would send them
    results = list(Pipeline(str(video), b.path, max_frames=50))
    assert len(results) == 50 and all(r.output["bytes"] == 128 for r in results)


def test_hog_pca_baseline(tmp_path, train, fashion):
    hog = HogPca().fit(train[0])
    codes = hog.codes(fashion[0][:1000])
    assert codes.dtype == np.int8 and codes.shape[1] <= 256
    acc = _top1(hog.codes(train[0]).astype(np.float32), train[1], codes.astype(np.float32), fashion[1][:1000])
    assert acc > 0.7, acc
    hog.save(tmp_path / "hog.npz")
    assert (HogPca.load(tmp_path / "hog.npz").codes(fashion[0][:10]) == codes[:10]).all()
