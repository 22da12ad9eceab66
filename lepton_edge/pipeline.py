"""capture -> preprocess -> infer -> postprocess, with per-stage timing.

Why two threads: decoding (and preprocessing) a frame and running the model both release the
GIL, so on a two-core device the next frame is decoded while the model runs on this one and the
pipeline goes as fast as the slower of the two instead of their sum. The hand-over queue is
short, sized by the source's buffering policy (`capture/buffers.py`): a few frames to absorb
jitter for every-frame (files), one for newest-frame (live sources) so no lag builds up.

Where preprocessing runs is decided from the measured stage times, every `balance_every` frames:
on the capture thread when the model is the slow part (MobileNetV2: decode + preprocess 0.6 ms,
inference 3 ms), on the inference thread when decoding is (a 28x28 classifier on 640x480 video:
decode 0.33 ms, preprocess 0.25 ms, inference 0.08 ms), whichever makes the busier thread less
busy. A switch needs a 5 % gain, so noise does not flip it back and forth.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from lepton_edge.capture import ArrayFile, Source, open_source
from lepton_edge.errors import BadInput, RunTimedOut
from lepton_edge.runtime import Result, Runtime
from lepton_edge.stats import StageTimes

_END = object()
# Frames in a row that inference or postprocessing could not handle before the pipeline stops with
# why: then the model or its task does not fit (an input size it cannot take, outputs no detector
# head reads), not one odd frame. Before any frame has gone through, a few tell; after, a long run.
FAILS_BEFORE_FIRST = 3
FAILS_IN_A_ROW = 100
# Runs stopped at their time limit in a row: each cost max_run_s (120 s), so a model that loops for ever was
# tried 3 times before `run` said so (6 minutes), and one that loops on dark frames only took 38 minutes
# for `run -n 5` at night, every stop counted as a corrupt frame.
TIMEOUTS_IN_A_ROW = 2


class ModelFailed(BadInput):
    """Inference or postprocessing failed on every frame for a while (see FAILS_IN_A_ROW)."""


def capture_threads(runtime: Runtime) -> int:
    """Decoder threads for a source feeding this runtime: the cores its engine leaves free (>= 1)."""
    return max(1, (os.cpu_count() or 1) - int(getattr(runtime.backend, "threads", 1)))


def fits(runtime: Runtime, source: Source) -> None:
    """BadInput (one line) for a model whose input is not an image fed by a source of camera frames: every
    frame would fail its preprocessing, and `run` said only that no frame could be read."""
    spec = runtime.spec
    if not runtime.takes_images and source.kind != ArrayFile.kind:
        raise BadInput(f"{runtime.name}: input {spec.name!r} {list(spec.shape)} is not an image, so the {source.kind} "
                       f"source cannot feed it: give --source a .npy/.npz of its inputs ([N, ...] rows)")
    if not runtime.takes_images and isinstance(source, ArrayFile) and not runtime.input_shaped(source.row_shape):
        raise BadInput(f"{runtime.name}: rows of {list(source.row_shape)} in {source.spec} are not inputs of "
                       f"{list(spec.shape)} (input {spec.name!r})")


class Pipeline:
    """`for result in Pipeline(source, bundle): ...` yields one Result per frame.

    `source`: a Source or anything open_source() takes; `model`: a Runtime or a bundle/model path.
    `stats` holds the rolling per-stage windows; `status()` adds the source's counters.
    """

    def __init__(self, source: Source | str | int, model: Runtime | str | Path, *, max_frames: int | None = None,
                 window: int = 1024, **load_options):
        if not isinstance(model, Runtime):
            load_options.setdefault("leave_cores", 1)
        self.runtime = model if isinstance(model, Runtime) else Runtime.load(model, **load_options)
        self.source = source if isinstance(source, Source) else open_source(
            source, decode_threads=capture_threads(self.runtime))
        try:
            fits(self.runtime, self.source)
        except BadInput:
            self.source.close()
            raise
        self._arrays = self.source.kind == ArrayFile.kind  # rows of a .npy: inputs as they are, or frames
        self.max_frames = max_frames
        self.stats = StageTimes(window)
        self.bad_frames = 0  # frames that preprocessing, inference or postprocessing could not handle
        self._through = 0  # frames that went through inference and postprocessing
        self._in_a_row = 0  # frames in a row that inference or postprocessing failed on
        self._timeouts_in_a_row = 0  # runs in a row stopped at their time limit
        self.failed_since_swap = 0  # frames inference or postprocessing failed on since the last swap()
        self.last_failure: str | None = None  # the last such failure, one line
        self.sample_every = 1  # run the model on every Nth frame the source delivers (the agent's `set`)
        self.probe: list[float] | None = None  # when a list: inference ms of frames run by the current runtime
        self.preprocess_on_capture = True  # see the module docstring; revised every `balance_every` frames
        self.balance_every = 256
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None

    def swap(self, runtime: Runtime) -> Runtime:
        """Use another model from the next frame on (a deploy or a rollback); returns the old one.
        Frames already preprocessed for the old model are preprocessed again for the new one. (A model
        the source cannot feed, see fits(), fails on every frame: the agent's health check rolls it back.)"""
        old, self.runtime = self.runtime, runtime
        self.probe = []
        # the new model starts afresh: FAILS_BEFORE_FIRST applies to it, and what failed is counted for
        # the deploy's health check (agent/service.py), never what the old model did
        self._through = self._in_a_row = self.failed_since_swap = self._timeouts_in_a_row = 0
        self.last_failure = None
        return old

    def _preprocess(self, rt: Runtime, frame) -> tuple:
        """(tensor, ms), or (None, 0) for an odd frame (zero-sized, strange depth): skipped and
        counted, never fatal."""
        t0 = time.perf_counter()
        try:
            x = rt.from_array(frame.image) if self._arrays else rt.preprocess(frame.image)
        except Exception:
            self.bad_frames += 1
            return None, 0.0
        return x, (time.perf_counter() - t0) * 1e3

    def _produce(self, q: queue.Queue) -> None:
        """The capture thread: frames from the source (its buffering policy decides which), sampled,
        preprocessed here when that is where it belongs, handed over. Ends with _END, or with the
        exception, which the consumer raises in its own thread."""
        try:
            for frame in self.source.frames(self._stop):
                if self.sample_every > 1 and frame.index % self.sample_every:
                    continue
                item = self._prepare(frame)
                if item is not None and not self._hand_over(q, item):
                    break  # stopped: still end with _END for a consumer that waits
        except BaseException as e:
            q.put(e)
            return
        q.put(_END)

    def _prepare(self, frame) -> tuple | None:
        """(frame, tensor or None, preprocess ms, the runtime it was made for); None: a bad frame."""
        rt = self.runtime
        if not self.preprocess_on_capture:  # read once: _balance() may flip it meanwhile
            return frame, None, 0.0, rt
        x, pre_ms = self._preprocess(rt, frame)
        return None if x is None else (frame, x, pre_ms, rt)

    def _hand_over(self, q: queue.Queue, item) -> bool:
        """Put `item` on the queue, waiting while it is full; False when the pipeline stops first."""
        while not self._stop.is_set():
            try:
                q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[Result]:
        q: queue.Queue = queue.Queue(maxsize=self.source.policy.handover)
        worker = self._worker = threading.Thread(target=self._produce, args=(q,), name="pipeline:capture",
                                                 daemon=True)
        worker.start()
        n = 0
        try:
            while self.max_frames is None or n < self.max_frames:
                item = q.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                result = self._infer(*item)
                if result is None:
                    continue
                n += 1
                if n == 32 or n % self.balance_every == 0:  # a first look early, then now and then
                    self._balance()
                yield result
        finally:
            self._stop.set()
            self._release(worker, q)

    def _infer(self, frame, x, pre_ms: float, made_for: Runtime) -> Result | None:
        """[preprocess] -> infer -> postprocess on the current runtime, timed into `stats`; None for
        a frame that preprocessing or postprocessing could not handle (counted in `bad_frames`)."""
        rt = self.runtime
        if x is None or made_for is not rt:  # preprocessing runs here, or the model was swapped
            x, pre_ms = self._preprocess(rt, frame)
            if x is None:
                return None
        t1 = time.perf_counter()
        try:
            y = rt.infer(x)
        except Exception as e:
            self._failed(rt, "inference", e)
            return None
        t2 = time.perf_counter()
        try:
            out = rt.postprocess(y, frame.image.shape[:2])
        except Exception as e:
            self._failed(rt, "postprocessing", e)
            return None
        t3 = time.perf_counter()
        # a model swapped out while this frame ran made it: the new model's counts and its deploy's health
        # check probe are the new model's own (an old model's frame counted as the new one's first success,
        # and FAILS_IN_A_ROW, not FAILS_BEFORE_FIRST, then applied to a new model failing on every frame)
        current = rt is self.runtime
        if current:
            self._through, self._in_a_row, self._timeouts_in_a_row = self._through + 1, 0, 0
        ms = {"capture": frame.capture_ms, "preprocess": pre_ms, "inference": (t2 - t1) * 1e3,
              "postprocess": (t3 - t2) * 1e3}
        self.stats.add(**ms)
        probe = self.probe
        if current and probe is not None and len(probe) < 100_000:
            probe.append(ms["inference"])
        return Result(rt.task, out, frame.index, frame.timestamp, ms, frame.image, frame.path)

    def _failed(self, rt: Runtime, stage: str, e: Exception) -> None:
        """Count a frame that `stage` failed on; raise ModelFailed (one line: which stage, the error,
        what to try) once FAILS_BEFORE_FIRST frames failed before any went through, or FAILS_IN_A_ROW in a row."""
        self.bad_frames += 1
        if rt is not self.runtime:  # the swapped-out model failed on a frame it had started: not the new one's
            return
        self._in_a_row += 1
        self.failed_since_swap += 1
        self.last_failure = rt.failure(stage, e)
        self._timeouts_in_a_row = self._timeouts_in_a_row + 1 if isinstance(e, RunTimedOut) else 0
        if self._timeouts_in_a_row and (not self._through or self._timeouts_in_a_row >= TIMEOUTS_IN_A_ROW):
            raise ModelFailed(rt.failure(stage, e, f"on {self._in_a_row} frame(s) in a row"
                                                   f"{'' if self._through else ', every frame so far'}"))
        if self._in_a_row >= (FAILS_IN_A_ROW if self._through else FAILS_BEFORE_FIRST):
            raise ModelFailed(rt.failure(stage, e, f"on {self._in_a_row} frames in a row"
                                                   f"{'' if self._through else ', every frame so far'}"))

    @staticmethod
    def _release(worker: threading.Thread, q: queue.Queue) -> None:
        """Let the capture thread end: empty the queue it may be blocked on, for up to 5 s."""
        deadline = time.monotonic() + 5
        while worker.is_alive() and time.monotonic() < deadline:
            try:
                q.get_nowait()
            except queue.Empty:
                worker.join(0.05)

    def _balance(self) -> None:
        """Put preprocessing on the thread that makes the busier of the two less busy."""
        mean = {k: float(r.values().mean()) if len(r) else 0.0 for k, r in self.stats.stages.items()}
        c, p, i, q = (mean[k] for k in ("capture", "preprocess", "inference", "postprocess"))
        on_capture, on_inference = max(c + p, i + q), max(c, p + i + q)
        if self.preprocess_on_capture and on_inference < 0.95 * on_capture:
            self.preprocess_on_capture = False
        elif not self.preprocess_on_capture and on_capture < 0.95 * on_inference:
            self.preprocess_on_capture = True

    def close(self) -> None:
        """Stop, and release the source once the capture thread has let go of it (closing a
        capture while another thread reads it can crash OpenCV)."""
        self._stop.set()
        w = self._worker
        if w is not None and w is not threading.current_thread():
            w.join(timeout=5)
        self.source.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def status(self) -> dict:
        """Stage statistics and the source's counters: what a summary and telemetry report."""
        # read now, not per frame: the source may have skipped files after the last frame it delivered
        self.stats.dropped, self.stats.corrupt = self.source.dropped, self.source.corrupt + self.bad_frames
        return self.stats.snapshot() | {"source": self.source.status()}
