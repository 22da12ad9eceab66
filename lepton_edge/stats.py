"""Rolling latency windows: p50/p95/p99/max and fps, shared by the pipeline, `bench` and telemetry.

Why a fixed ring of floats: the pipeline records four stages on every frame, so recording must
cost well under a microsecond and memory must not grow on a device that runs for months.
Percentiles are computed only when someone asks (a console line, a telemetry window).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterable

import numpy as np

STAGES = ("capture", "preprocess", "inference", "postprocess")


class Rolling:
    """The last `size` samples of one quantity (milliseconds)."""

    __slots__ = ("_buf", "_n", "_i", "total")

    def __init__(self, size: int = 1024):
        self._buf = np.zeros(size, dtype=np.float64)
        self._n = 0
        self._i = 0
        self.total = 0  # samples ever recorded

    def add(self, value: float) -> None:
        self._buf[self._i] = value
        self._i = (self._i + 1) % len(self._buf)
        if self._n < len(self._buf):
            self._n += 1
        self.total += 1

    def values(self) -> np.ndarray:
        return self._buf[:self._n].copy() if self._n < len(self._buf) else self._buf.copy()

    def __len__(self) -> int:
        return self._n

    def summary(self) -> dict[str, float] | None:
        return summarize(self.values())

    def clear(self) -> None:
        self._n = self._i = 0


def summarize(values: Iterable[float] | np.ndarray) -> dict[str, float] | None:
    """{"p50", "p95", "p99", "max", "mean", "n"} in the values' unit, or None for no samples."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return None
    p50, p95, p99 = np.percentile(v, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "max": float(v.max()),
            "mean": float(v.mean()), "n": int(v.size)}


class StageTimes:
    """Per-stage rolling windows plus frame timestamps for fps over the same window."""

    def __init__(self, size: int = 1024, stages: tuple[str, ...] = STAGES):
        self.stages = {s: Rolling(size) for s in stages}
        self._frames = Rolling(size)  # perf_counter() at the end of each frame
        self.window_frames = 0  # frames since the last reset (exact, unlike the ring)
        self.dropped = 0  # frames the source dropped (live sources keep only the newest)
        self.corrupt = 0  # frames that could not be decoded or processed, skipped
        self._lock = threading.Lock()  # the pipeline adds while telemetry takes a window

    def add(self, **ms: float) -> None:
        """Record one frame's stage times in milliseconds: add(capture=.., inference=..)."""
        with self._lock:
            for k, v in ms.items():
                self.stages[k].add(v)
            self._frames.add(time.perf_counter())
            self.window_frames += 1

    @property
    def frames(self) -> int:
        return self._frames.total

    def fps(self) -> float | None:
        t = self._frames.values()
        if t.size < 2:
            return None
        span = t.max() - t.min()
        return float((t.size - 1) / span) if span > 0 else None

    def snapshot(self) -> dict:
        """What a console line, `bench` and a telemetry window report."""
        return {"frames": self.frames, "window_frames": self.window_frames, "fps": self.fps(),
                "dropped": self.dropped, "corrupt": self.corrupt,
                "latency_ms": {k: r.summary() for k, r in self.stages.items() if len(r)}}

    def reset(self) -> None:
        """Start a new window (telemetry sends one window, then starts over)."""
        with self._lock:
            self._reset()

    def _reset(self) -> None:
        for r in self.stages.values():
            r.clear()
        self._frames.clear()
        self.window_frames = 0

    def window(self) -> dict:
        """snapshot() and reset() as one step, so no frame falls between two windows."""
        with self._lock:
            snap = self.snapshot()
            self._reset()
        return snap
