"""LiteRT backend (`ai-edge-litert`, `tflite_runtime` as a fallback): XNNPACK and threads.

Why dequantize here: a full-integer model (`--int8-io`) returns int8 tensors; every consumer
(postprocessing, telemetry, a user's code) wants real numbers, and the scale and zero point
live in the model, so the backend is the one place that knows them.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lepton_edge.errors import BadInput
from lepton_edge.runtime.backend import Backend, TensorInfo, register
from lepton_edge.runtime.litert_loader import interpreter_class, load_interpreter


def _info(d) -> TensorInfo:
    sig = d.get("shape_signature", d["shape"])
    shape = [int(v) if v >= 0 else "?" for v in sig]
    scale, zp = d["quantization"]
    q = {"scale": float(scale), "zero_point": int(zp)} if scale else None
    return TensorInfo(d["name"], shape, np.dtype(d["dtype"]).name, q, {"index": d["index"]})


@register
class LiteRTBackend(Backend):
    format = "tflite"
    suffixes = (".tflite",)

    def __init__(self, path: Path, threads: int, providers: list[str] | None = None,
                 delegates: list[str] | None = None):
        # XNNPACK is LiteRT's default CPU delegate; `delegates` are library paths that Runtime.load took
        # from LOCAL configuration (runtime/delegates.py), never from a manifest
        libs = list(delegates or [])
        self.threads = int(threads)
        self.delegates = ["XNNPACK"] + libs
        self.interpreter = load_interpreter(path, self.threads, delegates=libs)
        it = self.interpreter
        self.inputs = [_info(d) for d in it.get_input_details()]
        self.outputs = [_info(d) for d in it.get_output_details()]
        self._prepare()

    def _prepare(self) -> None:
        it = self.interpreter
        self._in = self.inputs[0].extra["index"]
        self._outs = [(o.extra["index"], o.quantization if np.issubdtype(np.dtype(o.dtype), np.integer) else None)
                      for o in self.outputs]
        self._set, self._invoke, self._get = it.set_tensor, it.invoke, it.get_tensor

    def resize_input(self, shape: list[int]) -> None:
        it = self.interpreter
        cur = [int(v) for v in it.get_input_details()[0]["shape"]]
        if cur != list(shape):
            try:
                it.resize_tensor_input(self._in, list(shape), strict=True)
                it.allocate_tensors()
            except (ValueError, RuntimeError) as e:
                raise BadInput(f"LiteRT cannot resize input to {shape}: {str(e).splitlines()[0][:200]}") from None
            self.outputs = [_info(d) for d in it.get_output_details()]
            self._prepare()

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        self._set(self._in, x)
        self._invoke()
        get = self._get
        return [get(i) if q is None else (get(i).astype(np.float32) - q["zero_point"]) * np.float32(q["scale"])
                for i, q in self._outs]

    def describe(self) -> dict:
        cls = interpreter_class()
        return {"backend": "litert", "module": cls.__module__.split(".")[0], "delegates": self.delegates,
                "threads": self.threads, "cpu_count": os.cpu_count()}
