"""MJPEG over HTTP (multipart/x-mixed-replace, as IP cameras serve it), read here instead of by FFmpeg.

Why: FFmpeg's mpjpeg demuxer buffers a part that has no Content-Length until the next boundary comes, and OpenCV
stops it only at the read timeout. One endless part from a hostile camera (a part header, then zeros) held 1.4 GB
within one 5 s timeout on loopback, and again after every reconnect, while the good frames before it kept the
source `streaming`. Here a part holds at most `max_part_bytes()` (one byte for each pixel of the frame budget:
a JPEG of a whole budget-sized frame is well under that) and is read within the stall time; a larger part ends
the source in one line (`OverBudget`). Each part is decoded by `cv2.imdecode`, so the pixel budget holds for
every frame. Any other HTTP content (an MP4, an HLS playlist) is left to FFmpeg.
"""
from __future__ import annotations

import http.client
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np

from lepton_edge.capture.opencv import OverBudget, decode_jpeg, max_pixels

MAX_HEADER_BYTES = 16 << 10  # a part's header block; a camera's is a few lines
CHUNK = 64 << 10
_LENGTH = re.compile(rb"(?im)^content-length[ \t]*:[ \t]*(\d+)[ \t\r]*$")
_HEADERS_END = re.compile(rb"\r?\n\r?\n")


def max_part_bytes() -> int:
    """The most one part may hold: one byte per pixel of the frame budget (OPENCV_IO_MAX_IMAGE_PIXELS)."""
    return max_pixels()


def _opener(url: str) -> tuple[urllib.request.OpenerDirector, str]:
    """An opener answering Basic and Digest challenges with the URL's `user:password@`, and the URL without
    them (FFmpeg, which read these URLs before, took both from the URL). Certificates are not verified, as
    FFmpeg did not (tls_verify=0): a camera's self-signed certificate must keep working."""
    parts = urllib.parse.urlsplit(url)
    handlers: list[urllib.request.BaseHandler] = [
        urllib.request.HTTPSHandler(context=ssl._create_unverified_context())]  # (FFmpeg's tls_verify=0)
    if parts.username is not None:
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        netloc += f":{parts.port}" if parts.port else ""
        url = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
        mgr = urllib.request.HTTPPasswordMgrWithDefaultRealm()
        mgr.add_password(None, url, urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or ""))
        handlers += [urllib.request.HTTPBasicAuthHandler(mgr), urllib.request.HTTPDigestAuthHandler(mgr)]
    return urllib.request.build_opener(*handlers), url


def open_error(e: Exception) -> str:
    """Why a camera could not be opened, in a few words: urllib's URLError wraps the reason ('<urlopen error
    [Errno 111] Connection refused>'); an HTTPError says it plainly ('HTTP Error 401: Unauthorized')."""
    why = e.reason if type(e) is urllib.error.URLError else e
    return " ".join(str(why).split())[:200] or type(e).__name__


def _boundary(content_type: str) -> bytes | None:
    """The multipart boundary of a multipart/x-mixed-replace response, or None for any other content."""
    kind, _, params = content_type.partition(";")
    if not kind.strip().lower().startswith("multipart/"):
        return None
    m = re.search(r"""(?i)boundary\s*=\s*"?([^";]+)"?""", params)
    b = m.group(1).strip().lstrip("-") if m else ""
    return b.encode("latin-1", "replace") if b else None


class HttpMjpeg:
    """One connection to an MJPEG camera, with a Grabber's interface: `grab()` reads the next part (bounded),
    `retrieve()` decodes it. Until a part of this connection has decoded, `grab()` decodes to judge it, so a
    camera sending JPEG-looking junk fails its connections (and, with max_reconnects, the source) as FFmpeg's
    own decoding did."""

    raw_jpeg = True

    def __init__(self, resp, boundary: bytes, stall_s: float, limit: int):
        self._resp, self.stall_s, self.limit = resp, stall_s, limit
        self._marker = b"--" + boundary  # also found in '----b', for a camera that wrote its '--' into the header
        self._buf = bytearray()
        self._part: bytes | None = None
        self._image: np.ndarray | None = None
        self._proven = False

    @classmethod
    def open(cls, url: str, open_timeout_s: float, stall_s: float) -> HttpMjpeg | None:
        """The camera's stream, or None when the URL serves something else (FFmpeg reads that). OSError and
        http.client.HTTPException when it cannot be opened."""
        opener, plain = _opener(url)
        resp = opener.open(urllib.request.Request(plain, headers={"User-Agent": "lepton-edge"}),
                           timeout=open_timeout_s)
        boundary = _boundary(resp.headers.get("Content-Type", ""))
        if boundary is None:
            resp.close()
            return None
        sock = getattr(getattr(resp.fp, "raw", None), "_sock", None)
        if sock is not None:  # a recv waits at most the stall time, not the open timeout
            sock.settimeout(max(0.1, stall_s))
        return cls(resp, boundary, stall_s, max_part_bytes())

    def fps(self) -> float | None:
        return None  # a multipart stream does not say

    def grab(self) -> bool:
        """The next part off the connection; False when the connection ended, stalled past `stall_s`, or sent a
        part that is not a JPEG image (before one decoded: an image that does not decode). OverBudget for a
        part larger than `limit`."""
        self._part = self._image = None
        try:
            part = self._next_part(time.monotonic() + self.stall_s)
        except (OSError, http.client.HTTPException, ValueError):  # reset, timed out, closed under us
            return False
        if part is None or len(part) <= 4 or part[:2] != b"\xff\xd8":
            return False
        self._part = part
        if not self._proven:
            self._image = decode_jpeg(np.frombuffer(part, np.uint8))
            self._proven = self._image is not None
            return self._proven
        return True

    def retrieve(self) -> np.ndarray | None:
        """The image of the part grabbed last, or None when it does not decode."""
        if self._image is not None:
            return self._image
        return decode_jpeg(np.frombuffer(self._part, np.uint8)) if self._part is not None else None

    def release(self) -> None:
        try:
            self._resp.close()
        except (OSError, http.client.HTTPException):
            pass

    # ---- parsing ------------------------------------------------------------------------------
    def _more(self, deadline: float) -> bool:
        """Append what the connection has (at most CHUNK bytes); False at its end or past `deadline`."""
        if time.monotonic() > deadline:
            return False
        data = self._resp.read1(CHUNK)
        if not data:
            return False
        self._buf += data
        return True

    def _too_big(self, what: str) -> OverBudget:
        return OverBudget(f"a part of the MJPEG stream {what}; a part may hold {self.limit:,} bytes, one for each "
                          "pixel of the frame budget (OPENCV_IO_MAX_IMAGE_PIXELS)")

    def _next_part(self, deadline: float) -> bytes | None:
        """The body of the next part, or None when the connection ended or stalled first."""
        buf, marker = self._buf, self._marker
        skipped = 0
        while (at := buf.find(marker)) < 0:  # the boundary, after the previous part's tail or a preamble
            cut = max(0, len(buf) - len(marker))
            del buf[:cut]
            skipped += cut
            if skipped > self.limit:
                raise self._too_big("runs on without a boundary")
            if not self._more(deadline):
                return None
        del buf[:at + len(marker)]
        while (end := _HEADERS_END.search(buf)) is None:
            if len(buf) > MAX_HEADER_BYTES or not self._more(deadline):
                return None
        m = _LENGTH.search(buf, 0, end.start())
        length = int(m.group(1)) if m else None  # (read before the buffer moves under the match)
        del buf[:end.end()]
        return self._to_boundary(deadline) if length is None else self._counted(length, deadline)

    def _counted(self, n: int, deadline: float) -> bytes | None:
        """A part of `n` bytes, as its Content-Length said; refused before reading when `n` is over the limit."""
        if n > self.limit:
            raise self._too_big(f"declares {n:,} bytes")
        while len(self._buf) < n:
            if not self._more(deadline):
                return None
        part = bytes(self._buf[:n])
        del self._buf[:n]
        return part

    def _to_boundary(self, deadline: float) -> bytes | None:
        """A part without a Content-Length: up to the next boundary, and never more than the limit."""
        buf, marker = self._buf, self._marker
        start = 0
        while (at := buf.find(marker, start)) < 0:
            if len(buf) > self.limit:
                raise self._too_big("runs on without a boundary")
            start = max(0, len(buf) - len(marker) + 1)
            if not self._more(deadline):
                return None
        part = bytes(buf[:at]).rstrip(b"-").rstrip(b"\r\n")  # ('-': the dashes of a '----b' boundary line)
        del buf[:at]
        return part


def http_url(target) -> bool:
    """Whether a stream target is an http:// or https:// URL (those may be MJPEG cameras)."""
    return isinstance(target, str) and target[:8].lower().startswith(("http://", "https://"))
