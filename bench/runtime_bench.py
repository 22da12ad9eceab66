"""Runtime benchmarks (issue: on-device runtime): wrapper overhead, pipeline fps, compact features.

Each figure is a ratio against a baseline measured in the same process (bare InferenceSession.run /
bare LiteRT invoke; decode-only and inference-only loops; fp32 features), because this machine is
shared and noisy. Timed ratios go through bench/fair.py (seeded random order per round, per-slot
warm-up, an A/A column), since a fixed order alone moved the overhead ratio by 2-3 %.
"""
from __future__ import annotations

import statistics
import time
from functools import partial
from pathlib import Path

import numpy as np

import fair
import lepton_edge
from lepton_edge.runtime import Runtime


def _bare(rt: Runtime, x: np.ndarray):
    """The call a user would write without lepton-edge, on the same engine object."""
    if rt.backend.format == "onnx":
        sess, name = rt.backend.session, rt.backend.session.get_inputs()[0].name
        return lambda: sess.run(None, {name: x})
    it = rt.backend.interpreter
    i = it.get_input_details()[0]["index"]
    outs = [d["index"] for d in it.get_output_details()]

    def run():
        it.set_tensor(i, x)
        it.invoke()
        return [it.get_tensor(o) for o in outs]

    return run


def _slots(fns: dict, one_ms: float) -> dict:
    """Each function as a timed slot (bench/fair.py). Calls of 0.5 ms or more are timed one at a time
    after one untimed warm-up call; shorter ones in ~5 ms blocks (best of three) after a few warm-up
    calls, since a single call is too short for the clock."""
    if one_ms >= 0.5:
        return {k: fair.timer(f, calls=1, warmup=1) for k, f in fns.items()}
    per_block = max(10, int(5 / max(one_ms, 1e-3)))
    return {k: fair.timer(f, calls=per_block, warmup=max(3, per_block // 10), best_of=3) for k, f in fns.items()}


def overhead(bundles: dict[str, Path], blocks: int) -> tuple[str, list[str], list[list[str]]]:
    """`Runtime.predict` doing what the bare call does (task raw: the outputs, no postprocessing) is
    the gated ratio; predict with top-5 classification is reported beside it, since the bare call
    does no postprocessing at all. The A/A column is the bare call against itself in a second slot:
    the measuring method's own bias on that row."""
    rows = []
    for label, path in bundles.items():
        for threads in (1, 2):
            raw = Runtime.load(path, threads=threads, task="raw")
            cls = Runtime.load(path, threads=threads)
            x = raw.preprocess(np.zeros((480, 640, 3), np.uint8) + 128)
            bare = _bare(raw, x)
            for _ in range(5):
                bare()
            one = min(fair.timer(bare, warmup=0)() for _ in range(5))
            n = blocks if one < 0.5 else 5 * blocks  # long calls: one call per slot per round, so more rounds
            fns = {"bare": bare, "predict": partial(raw.predict, x), "top5": partial(cls.predict, x)}
            figs = fair.rounds(fair.with_aa(_slots(fns, one), "bare"), n, seed=threads)
            ms = {k: statistics.median(v) for k, v in figs.items()}
            r, aa = fair.ratio(figs["predict"], figs["bare"]), fair.aa(figs, "bare")
            rows.append([label, str(threads), f"{ms['bare'] * 1e3:.1f}", f"{ms['predict'] * 1e3:.1f}",
                         f"{r} ({r.interval})", f"{aa} ({aa.interval})", "PASS" if r.median <= 1.05 else "FAIL",
                         f"{ms['top5'] * 1e3:.1f}", f"{(ms['top5'] - ms['predict']) * 1e3:+.1f}"])
    return ("Runtime overhead: `Runtime.predict` on a preprocessed tensor vs the bare engine call "
            "(`InferenceSession.run` / LiteRT `set_tensor`+`invoke`+`get_tensor`) on the same tensor, engine and "
            "threads; µs per call (median); ratios are medians of per-round ratios (bench/fair.py: every round runs "
            "each slot once in a seeded random order, each slot warmed up before it is timed), 95 % bootstrap "
            "interval in brackets; A/A = the bare call against itself in a second slot (the method's own bias)",
            ["model", "threads", "bare call", "Runtime.predict (raw outputs)", "predict / bare",
             "A/A: bare / bare", "<= 1.05x", "Runtime.predict (top-5 + labels)", "top-5 postprocessing"], rows)


def camera_video(path: Path, frames: int = 300, hw: tuple[int, int] = (480, 640)) -> Path:
    """A 640x480 MPEG-4 clip panning over real photographs (what a camera recording looks like)."""
    import cv2
    from sklearn.datasets import load_sample_images

    h, w = hw
    photos = [cv2.cvtColor(im, cv2.COLOR_RGB2BGR) for im in load_sample_images().images]
    photos = [cv2.resize(p, (round(p.shape[1] * h * 1.25 / p.shape[0]), round(h * 1.25))) for p in photos]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30, (w, h))
    for i in range(frames):
        p = photos[(i // 100) % len(photos)]
        x0 = (i * 3) % (p.shape[1] - w)
        writer.write(p[: h, x0:x0 + w])
    writer.release()
    return path


def _pipeline_rounds(rt: Runtime, video: Path, n: int, tensors: list, repeats: int, seed: int) -> dict:
    """fps of decode-only, inference-only and the pipeline, one figure each per round (bench/fair.py),
    decode-only twice (A/A)."""
    import cv2

    from lepton_edge.pipeline import Pipeline

    def decode() -> float:
        t0 = time.perf_counter()
        c = cv2.VideoCapture(str(video))
        while c.read()[0]:
            pass
        return n / (time.perf_counter() - t0)

    def infer() -> float:
        t0 = time.perf_counter()
        for i in range(n):
            rt.infer(tensors[i % len(tensors)])
        return n / (time.perf_counter() - t0)

    def pipeline() -> float:
        t0 = time.perf_counter()
        got = sum(1 for _ in Pipeline(str(video), rt))
        return got / (time.perf_counter() - t0)

    return fair.rounds(fair.with_aa({"decode": decode, "infer": infer, "pipeline": pipeline}, "decode"), repeats, seed)


def pipeline_fps(bundles: dict[str, Path], video: Path, repeats: int,
                 gated: set[str]) -> tuple[str, list[str], list[list[str]]]:
    """Gated: the models in `gated` at the pipeline's default thread count (all cores but one,
    which capture needs); other rows are reported. Two inference threads plus the capture thread
    on a two-core machine are oversubscribed by construction."""
    import os

    import cv2

    rows = []
    for label, path in bundles.items():
        for threads in (1, 2):
            rt = Runtime.load(path, threads=threads)
            cap = cv2.VideoCapture(str(video))
            frames = []
            while True:
                ok, img = cap.read()
                if not ok:
                    break
                frames.append(img)
            tensors = [rt.preprocess(f) for f in frames[:32]]
            n = len(frames)
            figs = _pipeline_rounds(rt, video, n, tensors, repeats, seed=threads)
            dec, inf, e2e = figs["decode"], figs["infer"], figs["pipeline"]
            d, i_, e = statistics.median(dec), statistics.median(inf), statistics.median(e2e)
            r = fair.ratio(e2e, [min(a, b) for a, b in zip(dec, inf)])  # paired: same round
            aa = fair.aa(figs, "decode")
            default = threads == max(1, (os.cpu_count() or 1) - 1)
            gate = ("PASS" if r.median >= 0.9 else "FAIL") if label in gated and default else "reported"
            rows.append([label, f"{threads}{' (default)' if default else ''}", f"{d:.0f}", f"{i_:.0f}", f"{e:.0f}",
                         f"{r}", f"{aa}", gate])
    return (f"Pipeline on a 640x480 MPEG-4 file ({n} frames): end-to-end fps (decode, preprocess, inference, "
            "postprocess) vs decode-only and inference-only fps; fps are medians of rounds that run each in a seeded "
            "random order (bench/fair.py), the ratio is the median of each round's own ratio; A/A = decode-only "
            "against itself in a second slot (the method's own bias)",
            ["model", "threads", "decode-only fps", "inference-only fps", "pipeline fps",
             "pipeline / min(decode, inference)", "A/A: decode / decode", ">= 0.9x"], rows)


def _nn_top1(gallery: np.ndarray, gallery_y: np.ndarray, queries: np.ndarray, y: np.ndarray) -> float:
    """Cosine nearest neighbour (rows L2-normalised first), in chunks."""
    g = gallery / np.maximum(np.linalg.norm(gallery, axis=1, keepdims=True), 1e-12)
    q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    hits = 0
    for i in range(0, len(q), 1000):
        hits += int((gallery_y[(q[i:i + 1000] @ g.T).argmax(1)] == y[i:i + 1000]).sum())
    return hits / len(q)


def compact_features(out: Path, gallery_n: int | None) -> tuple[str, list[str], list[list[str]]]:
    from lepton_edge.baselines.hog import HogPca
    from lepton_edge.datasets import fashion_mnist
    from lepton_edge.runtime.postprocess import decode_embedding

    b = lepton_edge.export("zoo:fashion-cnn-embed", target="x86-cpu", precision="fp32", out=out,
                           measure_latency=False).bundle
    rt = Runtime.load(b.path, threads=1)
    xtr, ytr = fashion_mnist("train")
    xte, yte = fashion_mnist("test")
    if gallery_n:
        xtr, ytr = xtr[:gallery_n], ytr[:gallery_n]

    def feats(images):
        f32, codes = [], []
        for img in images:
            raw = rt.infer(rt.preprocess(img))
            f32.append(np.asarray(raw[0], np.float32).reshape(-1))
            codes.append(decode_embedding(rt.postprocess(raw)["int8_b64"]))
        return np.asarray(f32), np.asarray(codes)

    g32, g8 = feats(xtr)
    q32, q8 = feats(xte)
    size = rt.postprocess(rt.infer(rt.preprocess(xte[0])))["bytes"]
    acc32, acc8 = _nn_top1(g32, ytr, q32, yte), _nn_top1(g8, ytr, q8, yte)
    hog = HogPca().fit(xtr)
    acc_hog = _nn_top1(hog.codes(xtr).astype(np.float32), ytr, hog.codes(xte).astype(np.float32), yte)
    drop = 100 * (acc32 - acc8)
    rows = [["fashion-cnn-embed fp32 features", f"{g32.shape[1] * 4} B", f"{acc32:.4f}", "-", "-"],
            ["fashion-cnn-embed int8 codes (`task embed`)", f"{size} B", f"{acc8:.4f}", f"{drop:+.2f}",
             "PASS" if abs(drop) <= 1.0 and size <= 256 else "FAIL"],
            [f"HOG ({hog.basis.shape[0]} of "
             f"{hog.descriptor_size} PCA dims) int8 codes", f"{hog.basis.shape[0]} B",
             f"{acc_hog:.4f}", f"{100 * (acc32 - acc_hog):+.2f}", "reported"]]
    return (f"Compact features: nearest-neighbour top-1 on the Fashion-MNIST test set (10,000 queries, gallery of "
            f"{len(xtr):,} training images, cosine)",
            ["features", "bytes per frame", "top-1", "pp below fp32", "int8 within 1 pp, <= 256 B"], rows)
