"""OpenCV, imported lazily and quietly, and the grab/retrieve split every reader uses.

Why split grab from retrieve: a live source that keeps only the newest frame throws most frames
away when the model is slower than the camera; only the frames that will be used need turning
into pixels. `grab()` takes the next frame off the device or the network, `retrieve()` makes the
image. For an MJPEG stream FFmpeg reads (JPEG over RTP; HTTP cameras are read by `mjpeg.HttpMjpeg`, which
does the same) FFmpeg's raw mode makes `grab()` read the compressed packet only and `retrieve()` decode it with
`cv2.imdecode`, so a dropped frame costs no decode at all; inter-frame codecs (H.264) must decode every
frame to decode the next one, and V4L2 and GStreamer decode or convert in their own `retrieve()`.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

_quieted = False
INTRA_ONLY = {"MJPG", "mjpg", "JPEG", "jpeg"}  # each frame decodes alone: safe to grab without decoding


def cv2():
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # FFmpeg's own per-packet complaints, before import
    import cv2 as _cv2

    global _quieted
    if not _quieted:  # errors only: a dropped stream is reported by us, once, not by OpenCV per packet
        _cv2.utils.logging.setLogLevel(_cv2.utils.logging.LOG_LEVEL_ERROR)
        _quieted = True
        max_pixels()  # (the warning, where cv2 came first)
    return _cv2


class OverBudget(Exception):
    """A source sent more than the capture budget allows (a part past `mjpeg.max_part_bytes()`): its message is
    the one line the source fails with."""


@contextmanager
def native_quiet() -> Iterator[None]:
    """Around one decode: what libjpeg and libpng write straight to file descriptor 2 ('Premature end of JPEG
    file', 'Corrupt JPEG data: ...', 'libpng warning: ...') goes nowhere. Why: a truncated JPEG in a folder put
    that line between `run --log-json`'s records, whose stderr must be JSON lines only; OpenCV's log level does
    not reach these libraries. Python log lines of other threads still reach stderr (ui.native_stderr_silenced),
    and the decode's outcome is ours to say (a corrupt frame, counted)."""
    from lepton_edge.ui import native_stderr_silenced

    with native_stderr_silenced():
        yield


def decode_jpeg(packet: np.ndarray) -> np.ndarray | None:
    """A JPEG's image, or None when it does not decode (OpenCV raises for one whose header claims more pixels
    than OPENCV_IO_MAX_IMAGE_PIXELS: one bad frame, not an error)."""
    c = cv2()
    try:
        with native_quiet():
            return c.imdecode(packet, c.IMREAD_COLOR)
    except c.error:
        return None


def thread_params(decode_threads: int | None) -> list[int]:
    """VideoCapture open parameters giving FFmpeg `decode_threads` threads ([] for its default)."""
    c = cv2()
    if not decode_threads or not hasattr(c, "CAP_PROP_N_THREADS"):  # OpenCV >= 4.6 has it
        return []
    return [c.CAP_PROP_N_THREADS, int(decode_threads)]


def has_gstreamer() -> bool:
    info = cv2().getBuildInformation()
    line = next((ln for ln in info.splitlines() if "GStreamer" in ln), "")
    return "YES" in line


OPENCV_DEFAULT_MAX_PIXELS = 1 << 30  # OpenCV's own, where it was loaded before lepton_edge could set it
_told_cv2_first = False


def max_pixels() -> int:
    """The frame budget in pixels: OpenCV's own for still images (lepton_edge sets it before OpenCV loads;
    a program that imported cv2 first keeps OpenCV's default, said once)."""
    import logging

    from lepton_edge import CV2_LOADED_FIRST, MAX_IMAGE_PIXELS

    global _told_cv2_first
    if CV2_LOADED_FIRST:
        if not _told_cv2_first:
            _told_cv2_first = True
            logging.getLogger(__name__).warning(
                "cv2 was imported before lepton_edge, so OpenCV keeps its own image budget (2^30 pixels, 3 GB a "
                "frame): import lepton_edge first, or set OPENCV_IO_MAX_IMAGE_PIXELS before importing cv2")
        return OPENCV_DEFAULT_MAX_PIXELS
    try:
        return int(os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", MAX_IMAGE_PIXELS))
    except ValueError:
        return MAX_IMAGE_PIXELS


def oversized(cap) -> str | None:
    """Why an opened video's frames are over the pixel budget (None: within it, or not known yet). Why: the
    image budget does not reach FFmpeg's decoder, and a 4.6 MB MJPEG file of 16000x16000 frames held 2.7 GB."""
    c = cv2()
    w, h = int(cap.get(c.CAP_PROP_FRAME_WIDTH) or 0), int(cap.get(c.CAP_PROP_FRAME_HEIGHT) or 0)
    if w * h > max_pixels():
        return f"frames of {w}x{h}, over the budget of {max_pixels():,} pixels (OPENCV_IO_MAX_IMAGE_PIXELS)"
    return None


def fourcc(cap) -> str:
    code = int(cap.get(cv2().CAP_PROP_FOURCC) or 0)
    return code.to_bytes(4, "little").decode("latin-1") if code else ""


class Grabber:
    """One opened capture: `grab()` the next frame, `retrieve()` the image of the last one grabbed."""

    def __init__(self, cap, raw_jpeg: bool = False):
        self.cap, self.raw_jpeg = cap, raw_jpeg
        self._packet: np.ndarray | None = None
        # fd 2 pointed away only around a decode by libjpeg (an MJPEG video): its warnings bypass every log
        # level; an H.264 decode writes nothing there, and the redirect costs ~34 us a frame
        self._quiet = fourcc(cap).upper() in ("MJPG", "JPEG", "MJPEG", "AVRN", "LJPG", "DMB1")

    @classmethod
    def wrap(cls, cap, raw_jpeg: bool) -> Grabber:
        """Raw packets + our own JPEG decode where `raw_jpeg` allows it (FFmpeg captures) and the
        stream is MJPEG, else OpenCV's own grab and retrieve."""
        c = cv2()
        if raw_jpeg and fourcc(cap) in INTRA_ONLY:
            try:
                if cap.set(c.CAP_PROP_FORMAT, -1):
                    return cls(cap, raw_jpeg=True)
            except c.error:
                pass
        return cls(cap)

    def fps(self) -> float | None:
        return self.cap.get(cv2().CAP_PROP_FPS) or None

    def grab(self) -> bool:
        """The next frame off the source; False when it failed, stalled past the read timeout, or
        (raw JPEG) sent a packet that is not a JPEG image."""
        if not self.cap.grab():
            return False
        if not self.raw_jpeg:
            return True
        ok, packet = self.cap.retrieve()  # raw mode: the compressed bytes, no decoding
        self._packet = packet.reshape(-1) if ok and packet is not None else None
        return self._packet is not None and self._packet.size > 4 and bytes(self._packet[:2]) == b"\xff\xd8"

    def retrieve(self) -> np.ndarray | None:
        """The image of the frame grabbed last, or None when it does not decode (OpenCV raises for a JPEG
        whose header claims more pixels than OPENCV_IO_MAX_IMAGE_PIXELS: one bad frame, not an error)."""
        c = cv2()
        if self.raw_jpeg:
            return decode_jpeg(self._packet) if self._packet is not None else None
        try:
            if self._quiet:  # (OpenCV's own MJPEG reader, or FFmpeg's, decodes with libjpeg here)
                with native_quiet():
                    ok, img = self.cap.retrieve()
            else:
                ok, img = self.cap.retrieve()
        except c.error:
            return None
        return img if ok else None

    def release(self) -> None:
        self.cap.release()
