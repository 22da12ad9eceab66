"""Validation of an exported artifact against the reference model.

Why its own module: every exporter (ONNX, TFLite) is checked the same way, following Optimum's
`validate_model_outputs`: the artifact and the reference run on the same held-out inputs, and
agreement, output difference and accuracy decide whether the export may be written at all.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

Predict = Callable[[np.ndarray], np.ndarray]


@dataclass
class Comparison:
    samples: int
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    accuracy_reference: float | None = None
    accuracy_artifact: float | None = None
    eval_samples: int = 0

    @property
    def accuracy_drop_pp(self) -> float | None:
        if self.accuracy_reference is None or self.accuracy_artifact is None:
            return None
        return 100.0 * (self.accuracy_reference - self.accuracy_artifact)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["accuracy_drop_pp"] = self.accuracy_drop_pp
        return d


def batched(fn: Predict, x: np.ndarray, batch: int, description: str = "validating") -> np.ndarray:
    from lepton_edge import ui

    outs = []
    with ui.progress(description, len(x)) as advance:
        for i in range(0, len(x), batch):
            outs.append(fn(x[i:i + batch]))
            advance(len(outs[-1]))
    return np.concatenate(outs)


def compare(reference: np.ndarray, artifact: np.ndarray, y: np.ndarray | None) -> Comparison:
    """Outputs of both models on the same inputs ([N, classes] or any [N, ...])."""
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    art = artifact.reshape(len(artifact), -1).astype(np.float64)
    diff = np.abs(ref - art)
    agree = float((ref.argmax(1) == art.argmax(1)).mean()) if ref.shape[1] > 1 else float("nan")
    c = Comparison(len(ref), float(diff.max()), float(diff.mean()), agree)
    if y is not None:
        c.accuracy_reference = float((ref.argmax(1) == y).mean())
        c.accuracy_artifact = float((art.argmax(1) == y).mean())
        c.eval_samples = len(y)
    return c


def gate(c: Comparison, min_agreement: float, max_accuracy_drop_pp: float) -> str | None:
    """Why the comparison fails the gate, or None when it passes."""
    if c.top1_agreement == c.top1_agreement and c.top1_agreement < min_agreement:
        return f"top-1 agreement {c.top1_agreement:.4f} < {min_agreement}"
    drop = c.accuracy_drop_pp
    if drop is not None and drop > max_accuracy_drop_pp:
        return f"accuracy drop {drop:.2f} pp > {max_accuracy_drop_pp} pp"
    return None


def latency_ms(fn: Predict, x1: np.ndarray, runs: int = 30, warmup: int = 3, budget_s: float = 1.0) -> dict:
    """Median/p90 latency of one batch-1 call; stops early after budget_s to keep exports quick."""
    for _ in range(warmup):
        fn(x1)
    times = []
    t_end = time.perf_counter() + budget_s
    while len(times) < runs and (len(times) < 5 or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        fn(x1)
        times.append((time.perf_counter() - t0) * 1e3)
    a = np.asarray(times)
    return {"p50_ms": float(np.median(a)), "p90_ms": float(np.percentile(a, 90)), "runs": len(a)}


def rss_bytes() -> int | None:
    """Resident memory of this process (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None

