"""Where results go: a rate-limited console line, JSON lines, an annotated video, a window.

Why rate-limited: a classifier at 2000 fps would otherwise spend its time printing; one line a
second says what is happening, and --jsonl keeps every result for whoever needs all of them.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rich.markup import escape

from lepton_edge.errors import BadInput
from lepton_edge.runtime import Result
from lepton_edge.ui import printable

if TYPE_CHECKING:
    import cv2


class ConsoleLines:
    def __init__(self, console, every_s: float = 1.0, stats=None):
        self.console, self.every_s, self.stats = console, every_s, stats
        self._last = 0.0

    def write(self, r: Result) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        self._last = now
        fps = self.stats.fps() if self.stats else None
        rate = f" [dim]{fps:.1f} fps[/]" if fps else ""
        # (the summary holds the model's labels: text, never markup; a label '[/]' raised MarkupError)
        self.console.print(f"#{r.index:<6} {escape(printable(r.summary()))}{rate}", highlight=False)

    def close(self) -> None:
        pass


class JsonLines:
    """Every result as a JSON line, to a file or (path None) to this process's stdout as it is: reopening
    /dev/stdout truncated a file that `>>` appended to, and failed on a socket (journald). A raw output of
    more than `raw_limit` values is summarised (runtime.raw_summary): a line stays kilobytes."""

    def __init__(self, path: Path | None, raw_limit: int | None = None):
        from lepton_edge.runtime.runtime import RAW_JSON_VALUES

        self.path, self.raw_limit = path, RAW_JSON_VALUES if raw_limit is None else raw_limit
        if path is None:
            self.f, self.own = sys.stdout, False
            return
        try:
            self.f, self.own = open(path, "w", buffering=1 << 16), True  # noqa: SIM115 - closed by close()
        except OSError as e:
            raise BadInput(f"cannot write {path}: {e.strerror}") from None

    def write(self, r: Result) -> None:
        d = r.to_dict(self.raw_limit)
        line = json.dumps(d, separators=(",", ":"))
        if "NaN" in line or "Infinity" in line:  # strict JSON: a NaN score is null (rare: walk it only then)
            line = json.dumps(_finite(d), separators=(",", ":"), allow_nan=False)
        try:
            self.f.write(line + "\n")
        except OSError as e:  # a full SD card: one line, not a traceback
            raise BadInput(f"cannot write {self.path or 'stdout'}: {e.strerror or e}") from None

    def close(self) -> None:
        try:
            self.f.close() if self.own else self.f.flush()
        except OSError as e:  # the last buffered lines: /dev/full fails here, not in write()
            raise BadInput(f"cannot write {self.path or 'stdout'}: {e.strerror or e}") from None


def _finite(x):
    """The value with every NaN or infinity replaced by None, for strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _frame_of(r: Result) -> np.ndarray:
    """The frame a drawing sink draws on: the pipeline keeps it on every Result it hands to the sinks."""
    if r.frame is None:
        raise ValueError(f"result #{r.index} carries no frame to draw on")
    return r.frame


def annotate(frame: np.ndarray, r: Result) -> np.ndarray:
    """A copy of the frame with the result drawn on it (labels, boxes)."""
    import cv2

    img = frame.copy() if frame.ndim == 3 else cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    if img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    scale = max(0.35, min(img.shape[:2]) / 640)
    th = max(1, round(scale * 2))
    if r.task == "detect":
        for d in r.output:
            x1, y1, x2, y2 = (int(v) for v in d["box"])
            cv2.rectangle(img, (x1, y1), (x2, y2), (0, 255, 0), th)
            cv2.putText(img, f"{d['label']} {d['score']:.2f}", (x1, max(12, y1 - 4)), cv2.FONT_HERSHEY_SIMPLEX,
                        scale, (0, 255, 0), th)
    else:
        text = r.summary().split(",")[0]
        cv2.putText(img, text, (4, max(12, int(24 * scale))), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 255, 0), th)
    return img


class VideoOut:
    """An annotated copy of the stream; the codec follows the suffix (.mp4 mp4v, .avi MJPG)."""

    def __init__(self, path: Path, fps: float | None):
        self.path, self.fps = Path(path), fps or 25.0
        self.writer: cv2.VideoWriter | None = None
        self.size: tuple[int, int] = (0, 0)  # the first frame's (width, height), once the writer is open
        if self.path.suffix.lower() not in (".mp4", ".avi", ".mkv", ".mov"):
            raise BadInput(f"--save {path}: use a .mp4, .avi, .mkv or .mov file name")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BadInput(f"--save {path}: cannot make its folder ({e.strerror or e})") from None

    def write(self, r: Result) -> None:
        import cv2

        img = annotate(_frame_of(r), r)
        if self.writer is None:
            fourcc = cv2.VideoWriter.fourcc(*("MJPG" if self.path.suffix.lower() == ".avi" else "mp4v"))
            writer = cv2.VideoWriter(str(self.path), fourcc, self.fps, (img.shape[1], img.shape[0]))
            if not writer.isOpened():
                raise BadInput(f"cannot write video {self.path}")
            self.writer, self.size = writer, (img.shape[1], img.shape[0])
        if (img.shape[1], img.shape[0]) != self.size:  # streams may change resolution after a reconnect
            img = cv2.resize(img, self.size)
        self.writer.write(img)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()
            self.writer = None
            if _no_room_left(self.path.parent):
                raise BadInput(f"--save {self.path}: the disk is full, so the video is cut short (OpenCV's writer "
                               "does not report a failed write)")


def _no_room_left(folder: Path) -> bool:
    """No block left for this process under `folder`. Why: OpenCV's VideoWriter drops a failed write without
    a word, and `run --save` on a full disk exited 0 with a video cut off at the disk's size; a writer that
    filled the disk is the one sign there is."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) == 0


def display_available() -> bool:
    """A window only where there is a display and OpenCV was built with a GUI (not -headless)."""
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or os.name == "nt"):
        return False
    return gui_available()


def gui_available() -> bool:
    """Whether this OpenCV build can open a window at all."""
    import cv2

    info = cv2.getBuildInformation()
    return "GUI" in info and "NONE" not in info.split("GUI:")[1][:40]


class Window:
    def __init__(self, title: str):
        self.title = title
        if not gui_available():
            raise BadInput("--show: this OpenCV has no GUI (opencv-python-headless, as the device extra installs); "
                           "use --save or --jsonl, or install opencv-python")

    def write(self, r: Result) -> None:
        import cv2

        cv2.imshow(self.title, annotate(_frame_of(r), r))
        if cv2.waitKey(1) & 0xFF in (27, ord("q")):
            raise KeyboardInterrupt

    def close(self) -> None:
        import cv2

        cv2.destroyAllWindows()
