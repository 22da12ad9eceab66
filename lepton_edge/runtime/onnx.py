"""onnxruntime backend: execution providers and threads from the target profile.

Why `run` is one call: `Runtime.predict` must cost no more than a bare `InferenceSession.run`
(the benchmark holds it to 1.05x), so everything that can be decided once is decided here.
"""
from __future__ import annotations

import os
import time
import weakref
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import Field

from lepton_edge.errors import BadInput, RunTimedOut
from lepton_edge.runtime.backend import Backend, BackendOptions, TensorInfo
from lepton_edge.runtime.delegates import providers as filter_providers

# onnxruntime's type names -> numpy's; a type numpy cannot hold (bfloat16, float8, int4) keeps its
# onnxruntime name, which the input spec refuses in one line
_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
           "tensor(bool)": "bool", **{f"tensor({t})": t for t in ("uint8", "int8", "uint16", "int16", "uint32",
                                                                   "int32", "uint64", "int64")}}


def _info(v) -> TensorInfo:
    shape = [d if isinstance(d, int) else (d or "?") for d in (v.shape or [])]
    return TensorInfo(v.name, shape, _DTYPES.get(v.type, v.type))


class OnnxOptions(BackendOptions):
    """threads: intra-op threads. providers: execution provider *names* in order of preference (the
    profile's, a manifest's or the caller's); reduced to those this build has, never with options
    (options can name libraries to load, see runtime/delegates.py)."""

    providers: list[Annotated[str, Field(max_length=128)]] = Field(
        default_factory=lambda: ["CPUExecutionProvider"], max_length=16)
    # False: onnxruntime's QDQ fusion off ("session.disable_quant_qdq"), so its constant folding turns the
    # int8 weights' DequantizeLinear into float weights once, at load. The export chooses it (a manifest's
    # target.qdq_fusion) for an int8 graph where no layer fits an int8 kernel, e.g. NNCF's on PP-LCNet:
    # every convolution ran behind a weight dequantization at each frame, 2x fp32's time; folded at load
    # it is fp32's speed, the same outputs, and the file stays int8 (exporters/kernels.py).
    qdq_fusion: bool = Field(True, strict=True)
    # one run's time limit: past it onnxruntime stops the run (RunOptions.terminate) and it fails with one
    # line. Why: a Loop whose trip count is 2^62 ran forever, deaf to Ctrl-C (the run never returns to
    # Python), and a model that never finishes held the agent's pipeline and a core for good.
    max_run_s: float = Field(120.0, gt=0, le=86400, allow_inf_nan=False)
    # one run's memory budget: how far this process may grow while a run is in progress (None: the load's,
    # max(2 GiB, 12x the model's files)). Past it the process ends with one line (runtime/hard_stop.py):
    # a 1 KB graph Expanding its input to 3 GB ran, and finished, and onnxruntime's arena keeps what a run took.
    max_run_bytes: int | None = Field(None, gt=0, strict=True)


class OnnxBackend(Backend):
    name = "onnxruntime"
    format = "onnx"
    suffixes = (".onnx",)
    Options = OnnxOptions

    def __init__(self, path: Path, options: OnnxOptions):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BadInput("running .onnx needs onnxruntime (pip install onnxruntime)") from None
        threads = options.threads
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 4  # fatal only: a failing run raises with the same text it would log in red
        if os.environ.get("LEPTON_ORT_SPIN", "0") == "0":
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if not options.qdq_fusion:
            so.add_session_config_entry("session.disable_quant_qdq", "1")
        self.qdq_fusion = options.qdq_fusion
        self.providers, self.missing_providers = filter_providers(list(options.providers),
                                                                  ort.get_available_providers())
        from lepton_edge.paths import check_onnx_file
        from lepton_edge.runtime import hard_stop

        check_onnx_file(Path(path))  # (an empty file, as export and inspect say it, not onnxruntime's protobuf words)
        limit = hard_stop.begin_load(path, "onnxruntime")  # (its constant folding runs here, unstoppable: 11 KB
        try:  # of graph folded gigabytes)
            self.session = ort.InferenceSession(str(path), so, providers=self.providers)
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            raise BadInput(f"{path}: onnxruntime cannot load it ({first[:200]})") from None
        finally:
            hard_stop.end(limit)
        self.threads = threads
        self.inputs = [_info(v) for v in self.session.get_inputs()]
        self.outputs = [_info(v) for v in self.session.get_outputs()]
        if not self.inputs:  # (a model of constants only: nothing a frame could feed)
            raise BadInput(f"{path}: the model has no inputs; this runtime feeds it camera frames")
        self._feed = self.inputs[0].name
        self._run = self.session.run
        self._watch = _Watchdog(self, options.max_run_s)
        # the watchdog's runs in progress, watched for memory by hard_stop's thread (its own stops their time)
        self._clock = hard_stop.RunClock(f"an onnxruntime run of {Path(path).name!r}", float("inf"),
                                         options.max_run_bytes or hard_stop.growth_budget(path),
                                         running=self._watch._running)

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        w = self._watch
        ro = w.begin()
        try:
            return self._run(None, {self._feed: x}, ro)
        except Exception:
            if w.interrupted(ro):  # Ctrl-C or SIGTERM stopped it (stop_runs_on_signals): the caller's stop
                raise KeyboardInterrupt from None
            if ro.terminate:
                raise RunTimedOut(f"one run of the model took over {w.limit:g} s and was stopped (a loop that does not "
                               "end, or far too much work for this machine)") from None
            raise
        finally:
            w.end(ro)

    def describe(self) -> dict:
        import onnxruntime as ort

        return {"backend": "onnxruntime", "version": ort.__version__, "providers": self.session.get_providers(),
                "threads": self.threads, "cpu_count": os.cpu_count(),
                **({} if self.qdq_fusion else {"qdq_fusion": False})}


class _Watchdog:
    """One thread per backend that stops a run past `limit` seconds. Each calling thread reuses RunOptions
    of its own until one is stopped (a run stopped, or two runs at once from two threads, never touch
    another's); a run registers while it runs: two dict writes (a timer per run cost a thread start, more
    than a small model's whole run, and new RunOptions per run 0.5 us). The thread ends with its backend
    (a weak reference)."""

    def __init__(self, backend: OnnxBackend, limit: float):
        import threading

        import onnxruntime as ort

        self._ort, self.limit = ort, limit
        self._local = threading.local()
        self._running: dict[int, tuple[float, object]] = {}
        self._interrupted: set[int] = set()
        ref = weakref.ref(backend)
        threading.Thread(target=self._watch, args=(ref,), name="onnx-watchdog", daemon=True).start()
        _WATCHDOGS.add(self)

    def interrupt(self) -> None:
        """Stop every run in progress now, as interrupted (not as over the limit)."""
        for key, (_started, ro) in list(self._running.items()):
            self._interrupted.add(key)
            ro.terminate = True  # type: ignore[attr-defined]

    def interrupted(self, ro) -> bool:
        if id(ro) in self._interrupted:
            self._interrupted.discard(id(ro))
            return True
        return False

    def begin(self):
        ro = getattr(self._local, "options", None)
        if ro is None or ro.terminate:
            ro = self._local.options = self._ort.RunOptions()
            ro.log_severity_level = 4  # the stop is reported by the run's caller, once
        self._running[id(ro)] = (time.monotonic(), ro)
        return ro

    def end(self, ro) -> None:
        self._running.pop(id(ro), None)
        if self._interrupted:  # (a mark the run outlived: its id may come back on another RunOptions)
            self._interrupted.discard(id(ro))

    def _watch(self, ref) -> None:
        step = min(1.0, self.limit / 4)
        while ref() is not None:
            time.sleep(step)
            now = time.monotonic()
            for started, ro in list(self._running.values()):
                if now - started > self.limit:
                    ro.terminate = True  # type: ignore[attr-defined]


_WATCHDOGS: weakref.WeakSet[_Watchdog] = weakref.WeakSet()


def stop_runs_on_signals() -> bool:
    """From now on Ctrl-C and SIGTERM also stop an onnxruntime run in progress, at once; whoever called
    run() then gets KeyboardInterrupt. Call it from the main thread of a command that runs models
    (`lepton-edge run`). True when installed.

    Why: Python runs a signal's handler only between bytecodes of the main thread, and the main thread
    of `run` spends its time inside one `session.run` call. A model stuck in a long run (a Loop that
    does not end) ignored Ctrl-C until `max_run_s` (120 s) stopped it. hard_stop's signal thread (the
    C-level handler writes the signal's number to a wakeup fd at once) terminates the runs in progress,
    and ends the process if it is still inside work no engine can stop 5 s later (a model's load)."""
    from lepton_edge.runtime import hard_stop

    hard_stop.on_signal(_interrupt_runs)
    return hard_stop.end_on_signals()


def _interrupt_runs() -> None:
    for watchdog in list(_WATCHDOGS):
        watchdog.interrupt()

