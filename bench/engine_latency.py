"""Batch-1 latency of model files on the bare engines (onnxruntime, LiteRT + XNNPACK), the figures of
the MobileNetV2 latency tables in BENCHMARKS.md.

Why the sessions come from the runtime's own backends: a baseline session made with other options
measures other settings. The first version left onnxruntime's thread spinning on (the runtime turns
it off), so a session's idle threads spun on the two cores the next session needed: fp32 at two
threads read 6.67 ms in one table and 3.93 ms in another. `OnnxBackend` sets threads, inter-op
threads and spinning exactly as `Runtime.load` does, so every table measures the same session.

Slots run through bench/fair.py: a seeded random order per round, warm-up calls before each timed
block, and the baseline repeated in an A/A slot.
"""
from __future__ import annotations

import statistics
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

import fair


def ort_calls(paths: dict[str, Path], threads: int, x: np.ndarray) -> dict[str, Callable[[], object]]:
    """One `InferenceSession.run` per model, on sessions made with the runtime's session options."""
    from lepton_edge.runtime.onnx import OnnxBackend, OnnxOptions

    calls = {}
    for k, p in paths.items():
        sess = OnnxBackend(Path(p), OnnxOptions(threads=threads)).session
        feed = {sess.get_inputs()[0].name: x}
        calls[k] = partial(sess.run, None, feed)
    return calls


def litert_calls(paths: dict[str, Path], threads: int) -> dict[str, Callable[[], object]]:
    """One `invoke()` per model (its input set once: the tensor stays between invokes)."""
    from lepton_edge.runtime.litert_loader import load_interpreter

    calls = {}
    for k, p in paths.items():
        it = load_interpreter(p, threads)
        d = it.get_input_details()[0]
        x = np.random.default_rng(0).standard_normal(d["shape"]).astype(np.float32)
        it.set_tensor(d["index"], x.astype(d["dtype"]) if np.issubdtype(d["dtype"], np.integer) else x)
        calls[k] = it.invoke
    return calls


def latency(calls: dict[str, Callable[[], object]], rounds: int, baseline: str, block: int = 5,
            seed: int = 0) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(median ms per call of each slot, the per-round figures) over `rounds` calls per slot in all,
    in blocks of `block` timed calls after two warm-up calls; `baseline` gets an A/A slot."""
    slots = {k: fair.timer(f, calls=block, warmup=2) for k, f in calls.items()}
    figs = fair.rounds(fair.with_aa(slots, baseline), max(8, rounds // block), seed)
    return {k: statistics.median(v) for k, v in figs.items()}, figs
