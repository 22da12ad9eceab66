"""Sources read from disk: image folders and globs, video files. Every frame, none skipped, at
whatever pace the consumer allows (the every-frame policy); `read()` never waits on the outside."""
from __future__ import annotations

import logging
import os
import re
import stat
import time
from pathlib import Path
from typing import ClassVar

from pydantic import Field

from lepton_edge.capture.base import Frame, Source, SourceOptions, SourceState
from lepton_edge.capture.opencv import Grabber, cv2, native_quiet, oversized, thread_params
from lepton_edge.capture.registry import register_source
from lepton_edge.errors import BadInput

MAX_BAD_IN_A_ROW = 300  # undecodable frames in a row that end a video file (its header promised more)
# first bytes of files that name other files for FFmpeg to read (an HLS or DASH playlist, an ffconcat list): a
# local one played a video from outside its folder, whatever the source's own checks had looked at
_NAMES_OTHER_FILES = (b"#EXTM3U", b"ffconcat", b"<?xml", b"<MPD")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm")


def _inside(path: Path, root: Path) -> bool:
    """Whether `path`, symlinks resolved, lies under `root`: a folder's link to elsewhere is not
    what the user asked to read."""
    try:
        return path.resolve().is_relative_to(root)
    except OSError:
        return False


def image_files(spec: str) -> list[Path] | None:
    """The images a folder (recursively, sorted), a glob or one image names; None: not images.

    A file that exists is that file, whatever its name holds (`clip[1].avi`, `[2024-01-01] cam.png` were
    read as globs matching nothing). A glob's `**` does not follow links to folders (pathlib's, not the
    glob module's: two links back up made `loop/**/*.png` run without end)."""
    p = Path(spec)
    if p.is_file():
        return [p] if p.suffix.lower() in IMAGE_SUFFIXES else None
    if p.is_dir():
        root = p.resolve()
        return sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
                      and _inside(f, root) and not any(x.startswith(".") for x in f.relative_to(p).parts))
    if _is_glob(spec):
        first = min(i for i in (spec.find(ch) for ch in "*?[") if i >= 0)
        cut = spec.rfind("/", 0, first)
        base = Path(spec[:cut + 1] or ".")
        pattern = spec[cut + 1:]
        if not base.is_dir() or not pattern or Path(pattern).is_absolute():
            return []
        root = base.resolve()
        # '**' inside a name (`**.png`) is '*' there, as the glob module read it (pathlib refuses it), and
        # hidden files and folders match only a pattern part that starts with '.' (pathlib matches them:
        # macOS's ._IMG_0001.jpg on an SD card became corrupt frames)
        parts = [p if p == "**" else re.sub(r"\*{2,}", "*", p) for p in pattern.split("/") if p]
        dotted = any(p.startswith(".") for p in parts)
        return sorted(f for f in base.glob("/".join(parts))
                      if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file() and _inside(f, root)
                      and (dotted or not any(x.startswith(".") for x in f.relative_to(base).parts)))
    return None


def _is_glob(spec: str) -> bool:
    return any(ch in spec for ch in "*?[") and not Path(spec).exists()


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
        if p.is_file():
            return p.suffix.lower() in IMAGE_SUFFIXES
        return p.is_dir() or _is_glob(spec)

    @classmethod
    def from_spec(cls, spec: str, options: SourceOptions) -> ImageFiles:
        files = image_files(spec)
        if not files:
            p = Path(spec)
            linked = sum(1 for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()) \
                if p.is_dir() else 0
            why = (f"; {linked} link(s) to images outside the folder are not followed: link the folder, or copy "
                   "them in" if linked else "")
            raise BadInput(f"no images in {spec!r} (looked for {', '.join(IMAGE_SUFFIXES)}){why}")
        return cls(spec, files, options.policy)

    def read(self, timeout: float | None = None) -> Frame | None:
        c = cv2()
        while self._i < len(self.files) and not self.closed:
            t0 = time.perf_counter()
            path = self.files[self._i]
            self._i += 1
            self.grabbed += 1
            try:
                with native_quiet():  # libjpeg's 'Premature end of JPEG file' went to fd 2, between JSON log lines
                    img = c.imread(str(path), c.IMREAD_COLOR)
            except c.error:  # a header past OpenCV's pixel limit (40000x30000 in 1 KB): one corrupt file
                img = None
            if img is None:
                self.corrupt += 1
                logging.getLogger(__name__).info("skipped %r: OpenCV cannot decode it", str(path))  # (repr: a name
                # may hold terminal escapes, and a hostile SD card's would reach the operator's terminal)
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
        # FFmpeg, given the file's absolute path: a relative spec starting `concat:` or `subfile,` was FFmpeg's
        # protocol, reading another file than the one checked; and no fall back to OpenCV's other readers, whose
        # image-sequence reader took `f%03d.bin` as a pattern over the folder's other files. (OpenCV's own MJPEG
        # reader, for an AVI FFmpeg cannot open, reads that one file.)
        path = os.path.realpath(spec)
        cap = None
        for backend, params in ((c.CAP_FFMPEG, thread_params(decode_threads)),
                                (getattr(c, "CAP_OPENCV_MJPEG", None), [])):
            if backend is None:
                continue
            try:
                cap = c.VideoCapture(path, backend, params)
            except c.error:
                cap = None
            if cap is not None and cap.isOpened():
                break
        if cap is None or not cap.isOpened():
            self._set_state(SourceState.FAILED, "cannot open")
            raise BadInput(f"cannot open video {spec!r} (unreadable, or a codec OpenCV lacks)")
        self.cap = cap
        if (why := oversized(cap)) is not None:
            cap.release()
            self._set_state(SourceState.FAILED, why)
            raise BadInput(f"cannot open video {spec!r}: {why}")
        self.total = int(self.cap.get(c.CAP_PROP_FRAME_COUNT)) or None
        self.fps = self.cap.get(c.CAP_PROP_FPS) or None
        # MJPEG: each packet decoded by cv2.imdecode, so the pixel budget holds for every frame, not only the
        # size the header gave at open (a 64x48 file whose sixth frame was 16000x16000 took 0.8 GB in FFmpeg)
        self._frames = Grabber.wrap(cap, raw_jpeg=True)
        self._pos = self._in_a_row = 0
        self._set_state(SourceState.STREAMING)

    @classmethod
    def claims(cls, spec: str) -> bool:
        return True  # the last resort: from_spec says why a path is not a video

    @classmethod
    def from_spec(cls, spec: str, options: VideoOptions) -> VideoFile:
        try:
            st = os.stat(spec)
        except (FileNotFoundError, NotADirectoryError, ValueError):  # (ValueError: a NUL in the name)
            raise BadInput(f"source not found: {spec!r} (a camera index, a video or image path, a folder, a glob, "
                           "or an rtsp:// / http:// URL)") from None
        except OSError as e:  # a link loop, a name too long, a folder it may not read
            raise BadInput(f"cannot open video {spec!r}: {e.strerror or e}") from None
        mode = st.st_mode
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):  # opening one blocks until a writer comes: maybe never
            raise BadInput(f"cannot open video {spec!r}: a named pipe or socket, not a video file (stream it over "
                           "udp://, tcp:// or rtsp:// instead)")
        if not stat.S_ISREG(mode):  # a device (/dev/ptmx blocked in read, and SIGTERM did not end it), a folder
            raise BadInput(f"cannot open video {spec!r}: not a regular file (a camera is its index or /dev/videoN)")
        if st.st_size == 0:
            raise BadInput(f"cannot open video {spec!r}: the file is empty")
        if re.search(r"%\d*d", os.path.basename(os.path.realpath(spec))):  # FFmpeg's image2 reads such a name as a
            # pattern (f%03d.jps: the folder's f001.jps, f002.jps...), whatever the file named holds
            raise BadInput(f"cannot open video {spec!r}: its name reads as an image-sequence pattern (%d) to FFmpeg, "
                           "which would read other files; rename it")
        with open(spec, "rb") as f:
            head = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
        if head.startswith(_NAMES_OTHER_FILES) or b"<MPD" in head:
            raise BadInput(f"cannot open video {spec!r}: a playlist, which names other files to read; give the "
                           "stream's URL or the video itself")
        return cls(spec, loop=options.loop, decode_threads=options.decode_threads, policy=options.policy)

    def read(self, timeout: float | None = None) -> Frame | None:
        c = cv2()
        t0 = time.perf_counter()
        while not self.closed:
            ok = self._frames.grab()
            img = self._frames.retrieve() if ok else None
            self._pos += 1
            if ok and img is not None:
                self._in_a_row = 0
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
            self._in_a_row += 1
            if self._in_a_row > MAX_BAD_IN_A_ROW:
                # a header that claims more frames than the file holds (a truncated recording, or 10^9 on
                # purpose) is the end, not millions of "corrupt" frames: looping starts again, a file that
                # never gave a frame has failed
                if self.captured == 0:
                    self._set_state(SourceState.FAILED, "no decodable frame")
                    raise BadInput(f"cannot decode any frame of {self.spec!r}")
                if self.loop:
                    self.cap.set(c.CAP_PROP_POS_FRAMES, 0)
                    self._pos = self._in_a_row = 0
                    continue
                self._set_state(SourceState.ENDED, f"end of the decodable frames after {self.captured} frame(s) "
                                f"(the header claims {self.total})")
                return None
            self.cap.set(c.CAP_PROP_POS_FRAMES, self._pos)
        return None

    def close(self) -> None:
        super().close()
        self.cap.release()
