"""Live sources: a camera, a network stream, a GStreamer pipeline, read by a thread of their own.

Why a thread: a live source must never build up lag. The reader grabs every frame as it comes
and the buffering policy (`buffers.py`) decides what reaches the consumer: with newest-frame (the
default) only a frame grabbed while the consumer waits is decoded and handed over, the rest are
counted as dropped and never decoded; with every-frame each one is decoded and queued.

The first open must succeed (a wrong camera index or a stream that does not answer is bad
input). After that a failed grab closes the capture and reopens it with backoff (0.5 s doubling
to `max_backoff`) while `read()` simply waits: STREAMING -> RECONNECTING -> STREAMING. A stream
that stops sending without closing (a hung camera) is noticed by the read timeout (`stall_s`,
FFmpeg sources) and reopened like a dropped one; a connection that ends without one good frame
(a stream of garbage) counts as corrupt. `max_reconnects`: after that many attempts in a row with
no frame the source gives up (FAILED) and `failure` says why (`run` ends with that line); None
(the agent, a service) retries for ever and telemetry shows `reconnects` and `corrupt`.
"""
from __future__ import annotations

import http.client
import os
import re
import threading
import time
from pathlib import Path
from typing import ClassVar

from pydantic import Field

from lepton_edge.capture.base import Frame, Source, SourceOptions, SourceState, StatusUpdate, redacted
from lepton_edge.capture.buffers import BufferPolicy
from lepton_edge.capture.mjpeg import HttpMjpeg, http_url, open_error
from lepton_edge.capture.opencv import Grabber, OverBudget, cv2, has_gstreamer, oversized, thread_params
from lepton_edge.capture.registry import register_source
from lepton_edge.errors import BadInput

OPEN_TIMEOUT_MS = 5000
READ_TIMEOUT_MS = 5000
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt")


class LiveOptions(SourceOptions):
    max_backoff: float = Field(default=10.0, gt=0, le=3600)  # seconds between reopen attempts, at most
    max_reconnects: int | None = Field(default=None, ge=0)  # attempts in a row without a frame; None: for ever
    stall_s: float = Field(default=READ_TIMEOUT_MS / 1000, gt=0, le=3600)  # no frame this long: reopen
    decode_threads: int | None = Field(default=None, ge=1, le=64)  # FFmpeg's decoder threads


class LiveSource(Source):
    """A capture read by a reader thread; see the module docstring."""

    live = True
    kind = "stream"
    Options: ClassVar = LiveOptions
    policies = (BufferPolicy.NEWEST_FRAME, BufferPolicy.EVERY_FRAME)

    def __init__(self, spec: str, target, backend: int, kind: str | None = None,
                 max_backoff: float = 10.0, decode_threads: int | None = None, max_reconnects: int | None = None,
                 stall_s: float = READ_TIMEOUT_MS / 1000, policy: BufferPolicy | str | None = None):
        super().__init__(spec, policy)
        if kind:
            self.kind = kind
        self._target, self._backend, self.max_backoff = target, backend, max_backoff
        self.decode_threads = decode_threads
        self.max_reconnects, self.stall_s = max_reconnects, stall_s
        self._buffer = self.policy.buffer()
        self._stop = threading.Event()
        self.last_error: str | None = None
        self._raw_jpeg = True  # grab JPEG packets undecoded where FFmpeg reads MJPEG (see opencv.Grabber)
        self._grabber = self._open()
        if self._grabber is None:
            why = self.last_error
            if self.kind == "gstreamer" and not has_gstreamer():
                why = "this OpenCV was built without GStreamer; use the distribution's python3-opencv"
            self._set_state(SourceState.FAILED, why or "cannot open")
            raise BadInput(f"cannot open {self.kind} {self.spec!r}" + (f" ({why})" if why else ""))
        self.fps = self._grabber.fps()
        self._thread = threading.Thread(target=self._reader, name=f"capture:{self.spec}", daemon=True)
        self._thread.start()

    @classmethod
    def from_spec(cls, spec: str, options: LiveOptions) -> LiveSource:
        raise NotImplementedError  # the registered subclasses below know their OpenCV backend

    @property
    def connected(self) -> bool:
        """A capture is open (it may not have given a frame yet)."""
        return self._grabber is not None

    def _open(self) -> Grabber | HttpMjpeg | None:
        c = cv2()
        ffmpeg = self._backend == c.CAP_FFMPEG
        if ffmpeg and http_url(self._target):
            try:  # an MJPEG camera: read by us, a part at a time and bounded (see mjpeg.py); else FFmpeg's
                g = HttpMjpeg.open(self._target, OPEN_TIMEOUT_MS / 1000, self.stall_s)
            except (OSError, http.client.HTTPException, ValueError) as e:
                self.last_error = redacted(open_error(e))
                return None
            if g is not None:
                return g
        params = [c.CAP_PROP_OPEN_TIMEOUT_MSEC, OPEN_TIMEOUT_MS,
                  c.CAP_PROP_READ_TIMEOUT_MSEC, max(100, int(self.stall_s * 1000))]
        params += thread_params(self.decode_threads)
        try:
            if ffmpeg:  # network streams: bounded waits, never a hang
                cap = c.VideoCapture(self._target, self._backend, params)
            else:
                cap = c.VideoCapture(self._target, self._backend)
        except c.error as e:
            self.last_error = str(e).strip().splitlines()[-1][:200]
            return None
        if not cap.isOpened():
            cap.release()
            return None
        if (why := oversized(cap)) is not None:
            self.last_error = why
            cap.release()
            return None
        return Grabber.wrap(cap, ffmpeg and self._raw_jpeg)

    # ---- the reader thread --------------------------------------------------------------------
    def _reader(self) -> None:
        """Reads until closed or given up; whatever it raises fails the source in one line (a thread that died
        left the source `streaming` and every read waiting for ever)."""
        try:
            self._read_loop()
        except OverBudget as e:  # more than a frame may be: not a camera to reconnect to
            self._fail(str(e))
        except Exception as e:
            self._fail(f"the capture thread failed: {type(e).__name__}: {str(e).strip()[:200]}")

    def _fail(self, why: str) -> None:
        """Give up on the source: `failure` is the one line `run` ends with."""
        self.failure = why
        self._set_state(SourceState.FAILED, why)
        self._stop.set()
        self._buffer.close()

    def _read_loop(self) -> None:
        backoff = 0.5
        good = 0  # frames grabbed on this connection
        attempts = 0  # reopen attempts since the last frame
        t_last = time.monotonic()
        lost_at: float | None = None
        while not self._stop.is_set():
            g = self._grabber
            if g is not None and g.grab():
                backoff, attempts, t_last = 0.5, 0, time.monotonic()
                good += 1
                self.grabbed += 1
                if self._set_state(SourceState.STREAMING) and lost_at is not None:
                    self._back(lost_at, t_last)
                    lost_at = None
                self._hand_over(g)
                continue
            # the source dropped, stalled past the read timeout, or sent nothing decodable: reopen
            # with backoff until it is back, we are closed, or (max_reconnects) we give up
            if self._stop.is_set():
                break
            if g is not None and self._lost(g, good):
                lost_at = time.monotonic()
            good = 0
            if self.max_reconnects is not None and attempts >= self.max_reconnects:
                self._give_up(attempts, t_last)
                break
            if self._stop.wait(backoff):
                break
            backoff = min(backoff * 2, self.max_backoff)
            attempts += 1
            self._grabber = self._open()
            if self._grabber is not None:
                self.reconnects += 1

    def _lost(self, g: Grabber | HttpMjpeg, good: int) -> bool:
        """Close a connection that failed; True when that made the source start reconnecting."""
        if good == 0:
            self.corrupt += 1  # it answered, but not one frame of it was good
        g.release()
        self._grabber = None
        return self._set_state(SourceState.RECONNECTING,
                               "no good frame on this connection" if good == 0 else "the stream stopped")

    def _back(self, lost_at: float, now: float) -> None:
        """Frames flow again after a reconnect: tell the listeners how long it was down."""
        self._tell(StatusUpdate("reconnect", self.spec, self.kind, SourceState.STREAMING, count=self.reconnects,
                                down_s=round(now - lost_at, 3), reason=f"frames again after {now - lost_at:.1f} s"))

    def _hand_over(self, g: Grabber | HttpMjpeg) -> None:
        """The policy's call: decode the frame just grabbed for a waiting consumer, or drop it."""
        ts = time.time()
        if self._buffer.discard_stale():  # decoded for a consumer that stopped waiting
            self._note_dropped()
        if not self._buffer.wanted():
            self._note_dropped()
            return
        img = g.retrieve()
        if img is None:
            self.corrupt += 1
            if isinstance(g, Grabber) and g.raw_jpeg and self.decoded == 0:  # JPEG-looking packets that never
                # decode (FFmpeg's raw packets; HttpMjpeg judges its own): reopen and let
                self._raw_jpeg = False  # FFmpeg decode (and judge) every frame, as without raw mode
                g.release()
                self._grabber = None
            return
        self.decoded += 1
        self._buffer.offer((img, ts), self._stop)

    def _give_up(self, attempts: int, t_last: float) -> None:
        self.failure = (f"no decodable frame for {time.monotonic() - t_last:.0f} s after {attempts} "
                        f"reconnect attempt(s) ({self.corrupt} connection(s) with no decodable frame)"
                        + (f"; last error: {self.last_error}" if self.last_error else ""))
        self._set_state(SourceState.FAILED, self.failure)
        self._stop.set()
        self._buffer.close()

    # ---- the consumer's side ------------------------------------------------------------------
    def read(self, timeout: float | None = None) -> Frame | None:
        """The newest frame (newest-frame) or the next one (every-frame); waits through reconnects
        until one comes, the source is closed or fails, or `timeout` seconds pass (then None)."""
        t0 = time.perf_counter()
        item = self._buffer.take(timeout)
        if item is None:
            return None
        img, ts = item
        return self._frame(img, t0, ts)

    def close(self) -> None:
        self._stop.set()
        super().close()
        self._buffer.close()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=OPEN_TIMEOUT_MS / 1000 + self.stall_s + 2)
        if self._grabber is not None:
            self._grabber.release()
            self._grabber = None

    def status(self) -> dict:
        return super().status() | {"connected": self.connected}


@register_source
class Camera(LiveSource):
    """A camera by index: '0' is /dev/video0 (V4L2 on Linux)."""

    kind = "camera"
    claim_order = 10  # '0' is a camera even if a file named 0 exists

    @classmethod
    def claims(cls, spec: str) -> bool:
        return re.fullmatch(r"\d+", spec) is not None

    @classmethod
    def from_spec(cls, spec: str, options: LiveOptions) -> Camera:
        c = cv2()
        backend = c.CAP_V4L2 if os.name == "posix" and Path("/dev").exists() else c.CAP_ANY
        if backend == c.CAP_V4L2 and not Path(f"/dev/video{spec}").exists():
            raise BadInput(f"camera {spec} does not exist (no /dev/video{spec})")
        return cls(spec, int(spec), backend, max_backoff=options.max_backoff, max_reconnects=options.max_reconnects,
                   stall_s=options.stall_s, policy=options.policy)


@register_source
class GStreamerPipeline(LiveSource):
    """A GStreamer pipeline string ending in an appsink ('... ! appsink')."""

    kind = "gstreamer"
    claim_order = 20

    @classmethod
    def claims(cls, spec: str) -> bool:
        return " ! " in spec

    @classmethod
    def from_spec(cls, spec: str, options: LiveOptions) -> GStreamerPipeline:
        return cls(spec, spec, cv2().CAP_GSTREAMER, max_backoff=options.max_backoff,
                   max_reconnects=options.max_reconnects, stall_s=options.stall_s, policy=options.policy)


@register_source
class Stream(LiveSource):
    """A network stream FFmpeg reads: RTSP, HTTP (MJPEG), RTMP, UDP, TCP, SRT."""

    kind = "stream"
    schemes = STREAM_SCHEMES

    @classmethod
    def from_spec(cls, spec: str, options: LiveOptions) -> Stream:
        return cls(spec, spec, cv2().CAP_FFMPEG, decode_threads=options.decode_threads,
                   max_backoff=options.max_backoff, max_reconnects=options.max_reconnects, stall_s=options.stall_s,
                   policy=options.policy)
