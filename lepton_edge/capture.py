"""Frame sources with OpenCV: camera index, video file, RTSP/HTTP stream, image folder or glob,
GStreamer pipeline string.

Why two reading strategies (after Roboflow Inference's VideoSource): a *file* must be read frame by
frame, none skipped, at whatever pace the model allows; a *live* source must never build up lag,
so a thread reads continuously and keeps only the newest frame, counting the ones nobody took.
A live source that drops is reopened with capped exponential backoff while the pipeline waits;
it never ends the run. Status counters (captured, dropped, corrupt, reconnects) feed telemetry.
"""
from __future__ import annotations

import glob as globlib
import os
import stat
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from lepton_edge.errors import BadInput

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt")
OPEN_TIMEOUT_MS = 5000
READ_TIMEOUT_MS = 5000


_quieted = False


def _cv2():
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # FFmpeg's own per-packet complaints, before import
    import cv2

    global _quieted
    if not _quieted:  # errors only: a dropped stream is reported by us, once, not by OpenCV per packet
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
        _quieted = True
    return cv2


@dataclass
class Frame:
    image: np.ndarray
    index: int  # frames delivered by this source so far (0-based)
    timestamp: float  # wall clock when it was captured
    capture_ms: float  # time the consumer waited for it
    path: str | None = None  # image sources: the file


class Source:
    """Base: iterate for frames; `close()` when done. Counters are cumulative."""

    live = False
    kind = "source"

    def __init__(self, spec: str):
        self.spec = spec
        self.captured = 0
        self.dropped = 0
        self.corrupt = 0
        self.reconnects = 0
        self.fps: float | None = None  # nominal rate where the source says (video files, cameras)

    closed = False

    def read(self) -> Frame | None:
        """The next frame, or None when the source has ended (files) or was closed."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __iter__(self) -> Iterator[Frame]:
        while (f := self.read()) is not None:
            yield f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def status(self) -> dict:
        return {"kind": self.kind, "live": self.live, "captured": self.captured, "dropped": self.dropped,
                "corrupt": self.corrupt, "reconnects": self.reconnects}

    def _frame(self, image: np.ndarray, t0: float) -> Frame:
        f = Frame(image, self.captured, time.time(), (time.perf_counter() - t0) * 1e3)
        self.captured += 1
        return f


class ImageFiles(Source):
    """A folder (recursively, sorted) or a glob of image files; unreadable files are skipped and counted."""

    kind = "images"

    def __init__(self, spec: str, files: list[Path]):
        super().__init__(spec)
        self.files = files
        self._i = 0

    def read(self) -> Frame | None:
        cv2 = _cv2()
        while self._i < len(self.files):
            t0 = time.perf_counter()
            path = self.files[self._i]
            self._i += 1
            img = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if img is None:
                self.corrupt += 1
                continue
            f = self._frame(img, t0)
            f.path = str(path)
            return f
        return None


class VideoFile(Source):
    """A video file read frame by frame; a frame that fails to decode mid-file is skipped and counted."""

    kind = "video"

    def __init__(self, spec: str, loop: bool = False, decode_threads: int | None = None):
        super().__init__(spec)
        cv2 = _cv2()
        self.loop = loop  # start again at the end (a device agent demonstrating on a recorded clip)
        self.cap = None
        if _thread_params(decode_threads):
            try:
                self.cap = cv2.VideoCapture(spec, cv2.CAP_FFMPEG, _thread_params(decode_threads))
            except cv2.error:
                pass
        if self.cap is None or not self.cap.isOpened():  # not FFmpeg's: OpenCV's own choice of reader
            self.cap = cv2.VideoCapture(spec)
        if not self.cap.isOpened():
            raise BadInput(f"cannot open video {spec!r} (unreadable, or a codec OpenCV lacks)")
        self.total = int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT)) or None
        self.fps = self.cap.get(cv2.CAP_PROP_FPS) or None
        self._pos = 0

    def read(self) -> Frame | None:
        cv2 = _cv2()
        t0 = time.perf_counter()
        while True:
            ok, img = self.cap.read()
            self._pos += 1
            if ok and img is not None:
                return self._frame(img, t0)
            if self.total is None or self._pos >= self.total:
                if self.loop and self.captured:
                    self.cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                    self._pos = 0
                    continue
                return None
            self.corrupt += 1  # a bad packet mid-file: skip it
            if self.corrupt > 1000 and self.captured == 0:
                raise BadInput(f"cannot decode any frame of {self.spec!r}")
            self.cap.set(cv2.CAP_PROP_POS_FRAMES, self._pos)

    def close(self) -> None:
        self.cap.release()


class LiveSource(Source):
    """Camera, stream or GStreamer pipeline, read by a thread that keeps only the newest frame.

    The first open must succeed (a wrong camera index or a stream that does not answer is bad
    input); after that, a failed read closes the capture and reopens it with backoff
    (0.5 s doubling to `max_backoff`), and `read()` simply waits for the next frame.

    A stream that stops sending without closing (a hung camera) is noticed by the read timeout
    (`stall_s`, FFmpeg sources) and reopened like a dropped one. A connection that ends without one
    decodable frame (a stream of garbage) counts as corrupt. `max_reconnects`: after that many
    attempts in a row with no decodable frame the source gives up and `failure` says why (`run`
    ends with that line); None (the agent, a service) retries for ever and telemetry shows the
    `reconnects`, `corrupt` and `connected` counters.
    """

    def __init__(self, spec: str, target, backend: int, kind: str = "stream",
                 max_backoff: float = 10.0, decode_threads: int | None = None, max_reconnects: int | None = None,
                 stall_s: float = READ_TIMEOUT_MS / 1000):
        super().__init__(spec)
        self.kind = kind
        self.live = True
        self._target, self._backend, self.max_backoff = target, backend, max_backoff
        self.decode_threads = decode_threads
        self.max_reconnects, self.stall_s = max_reconnects, stall_s
        self.failure: str | None = None  # why the source gave up (max_reconnects reached), else None
        self._cond = threading.Condition()
        self._latest: tuple[np.ndarray, float] | None = None
        self._stop = threading.Event()
        self.connected = False
        self.last_error: str | None = None
        self.cap = self._open()
        if self.cap is None:
            why = self.last_error
            if kind == "gstreamer" and not _has_gstreamer():
                why = "this OpenCV was built without GStreamer; use the distribution's python3-opencv"
            raise BadInput(f"cannot open {kind} {spec!r}" + (f" ({why})" if why else ""))
        self.connected = True
        self.fps = self.cap.get(_cv2().CAP_PROP_FPS) or None
        self._thread = threading.Thread(target=self._reader, name=f"capture:{spec}", daemon=True)
        self._thread.start()

    def _open(self):
        cv2 = _cv2()
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, OPEN_TIMEOUT_MS,
                  cv2.CAP_PROP_READ_TIMEOUT_MSEC, max(100, int(self.stall_s * 1000))]
        params += _thread_params(self.decode_threads)
        try:
            if self._backend == cv2.CAP_FFMPEG:  # network streams: bounded waits, never a hang
                cap = cv2.VideoCapture(self._target, self._backend, params)
            else:
                cap = cv2.VideoCapture(self._target, self._backend)
        except cv2.error as e:
            self.last_error = str(e).strip().splitlines()[-1][:200]
            return None
        if not cap.isOpened():
            cap.release()
            return None
        return cap

    def _reader(self) -> None:
        backoff = 0.5
        frames_this_connection = 0
        attempts = 0  # reopen attempts since the last decodable frame
        t_last = time.monotonic()
        while not self._stop.is_set():
            ok, img = self.cap.read() if self.cap is not None else (False, None)
            if ok and img is not None:
                backoff = 0.5
                frames_this_connection += 1
                attempts = 0
                t_last = time.monotonic()
                with self._cond:
                    if self._latest is not None:
                        self.dropped += 1  # the consumer never took the previous one
                    self._latest = (img, time.time())
                    self._cond.notify_all()
                continue
            # the source dropped, stalled past the read timeout, or sent nothing decodable: reopen
            # with backoff until it is back, we are closed, or (max_reconnects) we give up
            self.connected = False
            if self.cap is not None:
                if frames_this_connection == 0:
                    self.corrupt += 1  # it answered, but not one frame of it decoded
                self.cap.release()
                self.cap = None
            frames_this_connection = 0
            if self.max_reconnects is not None and attempts >= self.max_reconnects:
                self.failure = (f"no decodable frame for {time.monotonic() - t_last:.0f} s after {attempts} "
                                f"reconnect attempt(s) ({self.corrupt} connection(s) with no decodable frame)"
                                + (f"; last error: {self.last_error}" if self.last_error else ""))
                self._stop.set()
                with self._cond:
                    self._cond.notify_all()
                break
            if self._stop.wait(backoff):
                break
            backoff = min(backoff * 2, self.max_backoff)
            attempts += 1
            self.cap = self._open()
            if self.cap is not None:
                self.reconnects += 1
                self.connected = True

    def read(self, timeout: float | None = None) -> Frame | None:
        """The newest frame; waits (through reconnects) until one comes, the source is closed,
        or `timeout` seconds pass (then None)."""
        t0 = time.perf_counter()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._latest is None and not self._stop.is_set():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(0.2 if left is None else min(left, 0.2))
            if self._latest is None:
                return None
            img, ts = self._latest
            self._latest = None
        f = self._frame(img, t0)
        f.timestamp = ts
        return f

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=OPEN_TIMEOUT_MS / 1000 + self.stall_s + 2)
        if self.cap is not None:
            self.cap.release()

    def status(self) -> dict:
        return super().status() | {"connected": self.connected}


def _has_gstreamer() -> bool:
    info = _cv2().getBuildInformation()
    line = next((ln for ln in info.splitlines() if "GStreamer" in ln), "")
    return "YES" in line


def _image_files(spec: str) -> list[Path] | None:
    p = Path(spec)
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if any(ch in spec for ch in "*?["):
        return sorted(Path(f) for f in globlib.glob(spec, recursive=True)
                      if Path(f).suffix.lower() in IMAGE_SUFFIXES and Path(f).is_file())
    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
        return [p]
    return None


def _thread_params(decode_threads: int | None) -> list[int]:
    """VideoCapture open parameters giving FFmpeg `decode_threads` threads ([] for its default)."""
    cv2 = _cv2()
    if not decode_threads or not hasattr(cv2, "CAP_PROP_N_THREADS"):  # OpenCV >= 4.6 has it
        return []
    return [cv2.CAP_PROP_N_THREADS, int(decode_threads)]


def open_source(spec: str | int, max_backoff: float = 10.0, loop: bool = False,
                decode_threads: int | None = None, max_reconnects: int | None = None,
                stall_s: float = READ_TIMEOUT_MS / 1000) -> Source:
    """Pick the reader from the spec: '0' (camera index), 'rtsp://...' or 'http://...' (stream),
    a GStreamer pipeline ('... ! appsink'), a directory, a glob or an image (images), else a video file.

    `decode_threads`: FFmpeg's decoding threads for files and streams (None: OpenCV's default, one
    per core). The pipeline passes the cores the model leaves free: FFmpeg's own threads would
    otherwise preempt the model's, and MobileNetV2 on two cores runs ~3 % faster end to end with
    a one-thread decoder (bench/runtime_bench.py).

    `max_reconnects`, `stall_s`: live sources, see LiveSource (None: retry for ever, the agent's choice)."""
    cv2 = _cv2()
    live = {"max_backoff": max_backoff, "max_reconnects": max_reconnects, "stall_s": stall_s}
    s = str(spec).strip()
    if re.fullmatch(r"\d+", s):
        backend = cv2.CAP_V4L2 if os.name == "posix" and Path("/dev").exists() else cv2.CAP_ANY
        if backend == cv2.CAP_V4L2 and not Path(f"/dev/video{s}").exists():
            raise BadInput(f"camera {s} does not exist (no /dev/video{s})")
        return LiveSource(s, int(s), backend, kind="camera", **live)
    if " ! " in s:
        return LiveSource(s, s, cv2.CAP_GSTREAMER, kind="gstreamer", **live)
    scheme = s.split("://", 1)[0].lower() if "://" in s else ""
    if scheme in STREAM_SCHEMES:
        return LiveSource(s, s, cv2.CAP_FFMPEG, kind="stream", decode_threads=decode_threads, **live)
    if scheme == "file":
        s = s[len("file://"):]
    files = _image_files(s)
    if files is not None:
        if not files:
            raise BadInput(f"no images in {s!r} (looked for {', '.join(IMAGE_SUFFIXES)})")
        return ImageFiles(s, files)
    if not Path(s).exists():
        raise BadInput(f"source not found: {s!r} (a camera index, a video or image path, a folder, a glob, "
                       "or an rtsp:// / http:// URL)")
    mode = os.stat(s).st_mode
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):  # opening one blocks until a writer comes: maybe never
        raise BadInput(f"cannot open video {s!r}: a named pipe or socket, not a video file (stream it over "
                       "udp://, tcp:// or rtsp:// instead)")
    if Path(s).is_file() and Path(s).stat().st_size == 0:
        raise BadInput(f"cannot open video {s!r}: the file is empty")
    return VideoFile(s, loop=loop, decode_threads=decode_threads)
