"""Fair comparisons on a shared, noisy machine: every ratio table in bench/ measures through here.

Why: calls that alternate in a fixed order measure the order as well as the code. In the old
runtime table the bare call always followed another session's call and `predict` always followed
the bare call on a warm session; the same call in both slots read 0.98x and reversing the order
gave `predict` 1.02x, as large as the effect being gated. So:

- every round runs each slot once, in an order shuffled afresh per round (seeded: reproducible),
  so no slot always follows another;
- each slot warms up (untimed calls) right before it is timed, so it does not pay for whatever
  the previous slot left behind (caches, a thread pool still spinning);
- a ratio is the median of the per-round ratios (both figures from the same round saw the same
  machine), with a bootstrap 95 % interval of that median;
- every table carries an A/A row: the baseline measured in a second slot against itself. Its
  distance from 1.00 is the method's own bias on that run, printed beside the figure it qualifies.
"""
from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

AA = " (A/A)"  # suffix of the slot that repeats the baseline


@dataclass(frozen=True)
class Ratio:
    """Median of paired per-round ratios, with a bootstrap 95 % interval of that median."""

    median: float
    lo: float
    hi: float
    n: int

    def __str__(self) -> str:
        return f"{self.median:.3f}"

    @property
    def interval(self) -> str:
        return f"{self.lo:.3f} - {self.hi:.3f}"


def timer(f: Callable[[], Any], calls: int = 1, warmup: int = 1, best_of: int = 1) -> Callable[[], float]:
    """A slot that runs `warmup` untimed calls, then `calls` timed ones, and returns ms per call
    (the best of `best_of` such blocks: a block the scheduler preempted is noise, timeit's rule)."""

    def run() -> float:
        for _ in range(warmup):
            f()
        best = float("inf")
        for _ in range(best_of):
            t0 = time.perf_counter()
            for _ in range(calls):
                f()
            best = min(best, (time.perf_counter() - t0) * 1e3 / calls)
        return best

    return run


def with_aa(slots: dict[str, Callable[[], Any]], baseline: str) -> dict[str, Callable[[], Any]]:
    """The slots plus `baseline + AA`: the baseline's own callable again, in a slot of its own."""
    return {**slots, baseline + AA: slots[baseline]}


def rounds(slots: dict[str, Callable[[], Any]], n: int, seed: int = 0) -> dict[str, list[Any]]:
    """Each slot's figures, one per round: every round runs every slot once, in a seeded random order."""
    rng = random.Random(seed)
    keys = list(slots)
    out: dict[str, list[Any]] = {k: [] for k in keys}
    for _ in range(n):
        rng.shuffle(keys)
        for k in keys:
            out[k].append(slots[k]())
    return out


def ratio(num: list[float], den: list[float], seed: int = 0, resamples: int = 2000) -> Ratio:
    """num[i] / den[i] per round: the median and a bootstrap 95 % interval of the median."""
    r = np.asarray(num, np.float64) / np.asarray(den, np.float64)
    med = float(np.median(r))
    if len(r) < 2:
        return Ratio(med, med, med, len(r))
    boot = np.median(np.random.default_rng(seed).choice(r, (resamples, len(r))), axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return Ratio(med, float(lo), float(hi), len(r))


def aa(figures: dict[str, list[float]], baseline: str, seed: int = 0) -> Ratio:
    """The A/A ratio: the baseline's second slot over its first."""
    return ratio(figures[baseline + AA], figures[baseline], seed)


def paired_ratio(a: Callable[[], Any], b: Callable[[], Any], n: int, seed: int = 0, **timing) -> tuple[Ratio, Ratio]:
    """a over b and b's A/A, each slot timed by `timer(**timing)`: the one-pair form of the above."""
    figs = rounds(with_aa({"a": timer(a, **timing), "b": timer(b, **timing)}, "b"), n, seed)
    return ratio(figs["a"], figs["b"], seed), aa(figs, "b", seed)


def median(values: list[float]) -> float:
    return statistics.median(values)
