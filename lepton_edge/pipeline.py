"""capture -> preprocess -> infer -> postprocess, with per-stage timing.

Why two threads: decoding (and preprocessing) a frame and running the model both release the
GIL, so on a two-core device the next frame is decoded while the model runs on this one and the
pipeline goes as fast as the slower of the two instead of their sum. The hand-over queue is
short: long enough to absorb jitter for files, one frame for live sources so no lag builds up.

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
from pathlib import Path
from typing import Iterator

from lepton_edge.capture import Source, open_source
from lepton_edge.runtime import Result, Runtime
from lepton_edge.stats import StageTimes

_END = object()


def capture_threads(runtime: Runtime) -> int:
    """Decoder threads for a source feeding this runtime: the cores its engine leaves free (>= 1)."""
    return max(1, (os.cpu_count() or 1) - int(getattr(runtime.backend, "threads", 1)))


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
        self.max_frames = max_frames
        self.stats = StageTimes(window)
        self.bad_frames = 0  # frames that preprocessing or postprocessing could not handle
        self.sample_every = 1  # run the model on every Nth frame the source delivers (the agent's `set`)
        self.probe: list[float] | None = None  # when a list: inference ms of frames run by the current runtime
        self.preprocess_on_capture = True  # see the module docstring; revised every `balance_every` frames
        self.balance_every = 256
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None

    def swap(self, runtime: Runtime) -> Runtime:
        """Use another model from the next frame on (a deploy or a rollback); returns the old one.
        Frames already preprocessed for the old model are preprocessed again for the new one."""
        old, self.runtime = self.runtime, runtime
        self.probe = []
        return old

    def _preprocess(self, rt: Runtime, frame) -> tuple:
        """(tensor, ms), or (None, 0) for an odd frame (zero-sized, strange depth): skipped and
        counted, never fatal."""
        t0 = time.perf_counter()
        try:
            x = rt.preprocess(frame.image)
        except Exception:
            self.bad_frames += 1
            return None, 0.0
        return x, (time.perf_counter() - t0) * 1e3

    def _produce(self, q: queue.Queue) -> None:
        src = self.source
        try:
            while not self._stop.is_set():
                frame = src.read(timeout=0.5) if src.live else src.read()
                if frame is None:
                    if src.live and not src.closed:
                        continue  # waiting through a reconnect
                    break
                if self.sample_every > 1 and frame.index % self.sample_every:
                    continue
                rt = self.runtime
                on_capture = self.preprocess_on_capture  # read once: _balance() may flip it meanwhile
                x, pre_ms = self._preprocess(rt, frame) if on_capture else (None, 0.0)
                if on_capture and x is None:
                    continue
                item = (frame, x, pre_ms, rt)
                while not self._stop.is_set():
                    try:
                        q.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # surfaces in the consumer's thread
            q.put(e)
            return
        q.put(_END)

    def __iter__(self) -> Iterator[Result]:
        q: queue.Queue = queue.Queue(maxsize=1 if self.source.live else 4)
        worker = self._worker = threading.Thread(target=self._produce, args=(q,), name="pipeline:capture",
                                                 daemon=True)
        worker.start()
        st, n = self.stats, 0
        try:
            while self.max_frames is None or n < self.max_frames:
                item = q.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                frame, x, pre_ms, made_for = item
                rt = self.runtime
                if x is None or made_for is not rt:  # preprocessing runs here, or the model was swapped
                    x, pre_ms = self._preprocess(rt, frame)
                    if x is None:
                        continue
                t1 = time.perf_counter()
                y = rt.infer(x)
                t2 = time.perf_counter()
                try:
                    out = rt.postprocess(y, frame.image.shape[:2])
                except Exception:
                    self.bad_frames += 1
                    continue
                t3 = time.perf_counter()
                ms = {"capture": frame.capture_ms, "preprocess": pre_ms, "inference": (t2 - t1) * 1e3,
                      "postprocess": (t3 - t2) * 1e3}
                st.add(**ms)
                probe = self.probe
                if probe is not None and len(probe) < 100_000:
                    probe.append(ms["inference"])
                n += 1
                if n == 32 or n % self.balance_every == 0:  # a first look early, then now and then
                    self._balance()
                yield Result(rt.task, out, frame.index, frame.timestamp, ms, frame.image, frame.path)
        finally:
            self._stop.set()
            deadline = time.monotonic() + 5
            while worker.is_alive() and time.monotonic() < deadline:  # unblock a producer on a full queue
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
