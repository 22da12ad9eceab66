"""Sources read from disk: image folders and globs, video files. Every frame, none skipped, at
whatever pace the consumer allows (the every-frame policy); `read()` never waits on the outside."""
from __future__ import annotations

import glob as globlib
import logging
import os
import stat
import time
from pathlib import Path
from typing import ClassVar

from pydantic import Field

from lepton_edge.capture.base import Frame, Source, SourceOptions, SourceState
from lepton_edge.capture.opencv import cv2, thread_params
from lepton_edge.capture.registry import register_source
from lepton_edge.errors import BadInput

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm")


def _inside(path: Path, root: Path) -> bool:
    """Whether `path`, symlinks resolved, lies under `root`: a folder's link to elsewhere is not
    what the user asked to read."""
    try:
        return path.resolve().is_relative_to(root)
    except OSError:
        return False


def image_files(spec: str) -> list[Path] | None:
    """The images a folder (recursively, sorted), a glob or one image names; None: not images."""
    p = Path(spec)
    if p.is_dir():
        root = p.resolve()
        return sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
                      and _inside(f, root))
    if any(ch in spec for ch in "*?["):
        base = Path(spec.split("*")[0].split("?")[0].split("[")[0] or ".")
        root = (base if base.is_dir() else base.parent).resolve()
        return sorted(Path(f) for f in globlib.glob(spec, recursive=True)
                      if Path(f).suffix.lower() in IMAGE_SUFFIXES and Path(f).is_file() and _inside(Path(f), root))
    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
        return [p]
    return None


@register_source
class ImageFiles(Source):
    """A folder (recursively, sorted) or a glob of image files; unreadable files are skipped and counted."""

    kind = "images"
    claim_order = 50  # after cameras and pipelines, before the video-file fallback

    def __init__(self, spec: str, files: list[Path], policy=None):
        super().__init__(spec, policy)
        self.files = files
        self._i = 0
        self._set_state(SourceState.STREAMING)

    @classmethod
    def claims(cls, spec: str) -> bool:
        p = Path(spec)
        return p.is_dir() or any(ch in spec for ch in "*?[") or (p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    @classmethod
    def from_spec(cls, spec: str, options: SourceOptions) -> ImageFiles:
        files = image_files(spec)
        if not files:
            raise BadInput(f"no images in {spec!r} (looked for {', '.join(IMAGE_SUFFIXES)})")
        return cls(spec, files, options.policy)

    def read(self, timeout: float | None = None) -> Frame | None:
        c = cv2()
        while self._i < len(self.files) and not self.closed:
            t0 = time.perf_counter()
            path = self.files[self._i]
            self._i += 1
            self.grabbed += 1
            img = c.imread(str(path), c.IMREAD_COLOR)
            if img is None:
                self.corrupt += 1
                logging.getLogger(__name__).info("skipped %s: OpenCV cannot decode it", path)  # (which one, for -v)
                continue
            self.decoded += 1
            f = self._frame(img, t0)
            f.path = str(path)
            return f
        self._set_state(SourceState.ENDED, f"{self.captured} image(s) read")
        return None


class VideoOptions(SourceOptions):
    loop: bool = False  # start again at the end (a device agent demonstrating on a recorded clip)
    decode_threads: int | None = Field(default=None, ge=1, le=64)


@register_source
class VideoFile(Source):
    """A video file read frame by frame; a frame that fails to decode mid-file is skipped and counted."""

    kind = "video"
    Options: ClassVar = VideoOptions
    claim_order = 90  # the last resort for a path

    def __init__(self, spec: str, loop: bool = False, decode_threads: int | None = None, policy=None):
        super().__init__(spec, policy)
        c = cv2()
        self.loop = loop
        cap = None
        if thread_params(decode_threads):
            try:
                cap = c.VideoCapture(spec, c.CAP_FFMPEG, thread_params(decode_threads))
            except c.error:
                pass
        if cap is None or not cap.isOpened():  # not FFmpeg's: OpenCV's own choice of reader
            cap = c.VideoCapture(spec)
        self.cap = cap
        if not self.cap.isOpened():
            self._set_state(SourceState.FAILED, "cannot open")
            raise BadInput(f"cannot open video {spec!r} (unreadable, or a codec OpenCV lacks)")
        self.total = int(self.cap.get(c.CAP_PROP_FRAME_COUNT)) or None
        self.fps = self.cap.get(c.CAP_PROP_FPS) or None
        self._pos = 0
        self._set_state(SourceState.STREAMING)

    @classmethod
    def claims(cls, spec: str) -> bool:
        return True  # the last resort: from_spec says why a path is not a video

    @classmethod
    def from_spec(cls, spec: str, options: VideoOptions) -> VideoFile:
        if not Path(spec).exists():
            raise BadInput(f"source not found: {spec!r} (a camera index, a video or image path, a folder, a glob, "
                           "or an rtsp:// / http:// URL)")
        mode = os.stat(spec).st_mode
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):  # opening one blocks until a writer comes: maybe never
            raise BadInput(f"cannot open video {spec!r}: a named pipe or socket, not a video file (stream it over "
                           "udp://, tcp:// or rtsp:// instead)")
        if Path(spec).is_file() and Path(spec).stat().st_size == 0:
            raise BadInput(f"cannot open video {spec!r}: the file is empty")
        return cls(spec, loop=options.loop, decode_threads=options.decode_threads, policy=options.policy)

    def read(self, timeout: float | None = None) -> Frame | None:
        c = cv2()
        t0 = time.perf_counter()
        while not self.closed:
            ok, img = self.cap.read()
            self._pos += 1
            if ok and img is not None:
                self.grabbed += 1
                self.decoded += 1
                return self._frame(img, t0)
            if self.total is None or self._pos >= self.total:
                if self.loop and self.captured:
                    self.cap.set(c.CAP_PROP_POS_FRAMES, 0)
                    self._pos = 0
                    continue
                self._set_state(SourceState.ENDED, f"end of file after {self.captured} frame(s)")
                return None
            self.corrupt += 1  # a bad packet mid-file: skip it
            if self.corrupt > 1000 and self.captured == 0:
                self._set_state(SourceState.FAILED, "no decodable frame")
                raise BadInput(f"cannot decode any frame of {self.spec!r}")
            self.cap.set(c.CAP_PROP_POS_FRAMES, self._pos)
        return None

    def close(self) -> None:
        super().close()
        self.cap.release()
