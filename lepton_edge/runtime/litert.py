"""LiteRT backend (`ai-edge-litert`, `tflite_runtime` as a fallback): XNNPACK and threads.

Why dequantize here: a full-integer model (`--int8-io`) returns int8 tensors; every consumer
(postprocessing, telemetry, a user's code) wants real numbers, and the scale and zero point
live in the model, so the backend is the one place that knows them.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import AfterValidator, Field

from lepton_edge.runtime import hard_stop
from lepton_edge.runtime.backend import Backend, BackendOptions, TensorInfo
from lepton_edge.runtime.litert_loader import allocate_at, dynamic_input, interpreter_class, load_interpreter


def _info(d) -> TensorInfo:
    sig = d.get("shape_signature", d["shape"])
    shape = [int(v) if v >= 0 else "?" for v in sig]
    scale, zp = d["quantization"]
    q = {"scale": float(scale), "zero_point": int(zp)} if scale else None
    extra = {"index": d["index"]}
    qp = d.get("quantization_parameters") or {}
    scales = np.asarray(qp.get("scales", []), np.float32)
    if scales.size > 1:  # per-channel: `quantization` reads (0.0, 0), and an output's codes were returned as they are
        zps = np.asarray(qp.get("zero_points", []), np.float32)
        axis = int(qp.get("quantized_dimension", 0))
        bshape = [1] * len(d["shape"])
        if 0 <= axis < len(bshape) and int(d["shape"][axis]) == scales.size:
            bshape[axis] = scales.size
            extra["per_channel"] = (scales.reshape(bshape),
                                    (zps if zps.size == scales.size else np.zeros_like(scales)).reshape(bshape))
    return TensorInfo(d["name"], shape, np.dtype(d["dtype"]).name, q, extra)


def _absolute(path: str) -> str:
    if not Path(path).is_absolute():
        raise ValueError(f"a delegate library path must be absolute, got {path[:80]!r}")
    return path


def _dequantization(o: TensorInfo) -> tuple | None:
    """(scale, zero point) that turn an integer output's codes into real numbers (arrays along the channel axis
    for a per-channel one), or None: a float output, or integers that carry no quantization."""
    if not np.issubdtype(np.dtype(o.dtype), np.integer):
        return None
    if "per_channel" in o.extra:
        return o.extra["per_channel"]
    q = o.quantization
    return (np.float32(q["scale"]), np.float32(q["zero_point"])) if q else None


class LiteRTOptions(BackendOptions):
    """threads: interpreter threads (XNNPACK's too). delegates: external delegate *libraries* to load,
    which Runtime.load resolved from LOCAL configuration (the agent's `[delegates]` table, `run
    --delegate NAME=PATH`; runtime/delegates.py), never paths a manifest wrote."""

    delegates: list[Annotated[str, AfterValidator(_absolute)]] = Field(default_factory=list, max_length=16)
    # one run's time limit. LiteRT cannot stop an invoke(), so past it the process ends with one line
    # (runtime/hard_stop.py): a WHILE loop that never ends held `run` and the agent for good, deaf to SIGTERM.
    max_run_s: float = Field(120.0, gt=0, le=86400, allow_inf_nan=False)
    # one run's memory budget: how far this process may grow while a run is in progress (None: the load's,
    # max(2 GiB, 12x the model's files)); past it the process ends with one line (runtime/hard_stop.py)
    max_run_bytes: int | None = Field(None, gt=0, strict=True)


class LiteRTBackend(Backend):
    name = "litert"
    format = "tflite"
    suffixes = (".tflite",)
    Options = LiteRTOptions

    def __init__(self, path: Path, options: LiteRTOptions):
        libs = list(options.delegates)
        self.threads = options.threads
        self.delegates = ["XNNPACK"] + libs  # XNNPACK is LiteRT's default CPU delegate
        self.max_run_s = options.max_run_s
        limit = hard_stop.begin_load(path, "LiteRT")
        try:
            # (an input with open dimensions whose default shape cannot be allocated is sized by resize_input)
            self.interpreter = load_interpreter(path, self.threads, delegates=libs, defer_dynamic=True)
        finally:
            hard_stop.end(limit)
        self._path = path
        self._sized = not dynamic_input(self.interpreter)  # else: not allocated at a size run chose yet
        self._clock = hard_stop.RunClock(f"a LiteRT run of {Path(path).name!r}", options.max_run_s,
                                         options.max_run_bytes or hard_stop.growth_budget(path))
        it = self.interpreter
        self.inputs = [_info(d) for d in it.get_input_details()]
        self.outputs = [_info(d) for d in it.get_output_details()]
        self._prepare()

    @classmethod
    def sniff(cls, head: bytes) -> bool:
        return head[4:8] == b"TFL3"  # the FlatBuffer file identifier

    def _prepare(self) -> None:
        it = self.interpreter
        self._in = self.inputs[0].extra["index"]
        self._outs = [(o.extra["index"], _dequantization(o)) for o in self.outputs]
        self._set, self._invoke, self._get = it.set_tensor, it.invoke, it.get_tensor

    def resize_input(self, shape: list[int]) -> None:
        it = self.interpreter
        cur = [int(v) for v in it.get_input_details()[0]["shape"]]
        if cur != list(shape) or not self._sized:
            allocate_at(it, self._path, self.threads, list(shape))
            self._sized = True
            self.outputs = [_info(d) for d in it.get_output_details()]
            self._prepare()

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        self._set(self._in, x)
        clock = self._clock
        clock.started = time.monotonic()
        try:
            self._invoke()
        finally:
            clock.started = None
        get = self._get
        return [get(i) if q is None else (get(i).astype(np.float32) - q[1]) * q[0] for i, q in self._outs]

    def describe(self) -> dict:
        cls = interpreter_class()
        return {"backend": "litert", "module": cls.__module__.split(".")[0], "delegates": self.delegates,
                "threads": self.threads, "cpu_count": os.cpu_count()}
