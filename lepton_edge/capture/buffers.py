"""Buffering policies: what happens to frames between the thread that reads a live source and the
consumer, and how many frames the pipeline keeps in hand.

Why named policies (after Roboflow Inference's buffer strategies): a camera must never build up
lag, so the consumer gets the newest frame and the rest are dropped (newest-frame, the default for
live sources); a file, or a recording of a stream where every frame matters, must lose none at
whatever pace the model allows (every-frame, the default and only choice for files and folders).

The newest-frame buffer also decides, per grabbed frame, whether it is worth decoding: only while
a consumer waits (see `NewestFrame.wanted`). Frames grabbed while the model is busy are counted as
dropped and never decoded.
"""
from __future__ import annotations

import enum
import queue
import threading
import time
from typing import Any

EVERY_FRAME_BACKLOG = 64  # frames a live every-frame source holds before its reader waits


class BufferPolicy(str, enum.Enum):
    NEWEST_FRAME = "newest-frame"
    EVERY_FRAME = "every-frame"

    @property
    def handover(self) -> int:
        """Frames the pipeline's hand-over queue holds: one for newest-frame, so no lag builds up
        behind the model; a few for every-frame, to absorb jitter."""
        return 1 if self is BufferPolicy.NEWEST_FRAME else 4

    def buffer(self) -> NewestFrame | EveryFrame:
        return NewestFrame() if self is BufferPolicy.NEWEST_FRAME else EveryFrame()


class NewestFrame:
    """One slot between a reader thread and its consumer. The reader asks `wanted()` after each
    grab: true only while a consumer waits in `take()` and the slot is empty; otherwise the frame
    is dropped undecoded. A frame left in the slot by a consumer that stopped waiting is stale:
    `discard_stale()` removes it before the next one."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._slot: Any = None
        self._waiting = 0
        self._closed = False

    def wanted(self) -> bool:
        with self._cond:
            return self._waiting > 0 and self._slot is None

    def discard_stale(self) -> bool:
        with self._cond:
            if self._slot is not None and self._waiting == 0:
                self._slot = None
                return True
            return False

    def offer(self, item: Any, stop: threading.Event) -> None:
        with self._cond:
            self._slot = item
            self._cond.notify_all()

    def take(self, timeout: float | None) -> Any:
        """The item, or None when `timeout` passes or the buffer is closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._waiting += 1
            try:
                while self._slot is None and not self._closed:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return None
                    self._cond.wait(0.2 if left is None else min(left, 0.2))
                item, self._slot = self._slot, None
                return item
            finally:
                self._waiting -= 1

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class EveryFrame:
    """A bounded FIFO: every grabbed frame is decoded and kept; when the consumer falls
    `EVERY_FRAME_BACKLOG` frames behind, the reader waits (the device or the network buffers,
    or drops, upstream of us)."""

    def __init__(self, backlog: int = EVERY_FRAME_BACKLOG) -> None:
        self._q: queue.Queue = queue.Queue(maxsize=backlog)
        self._closed = threading.Event()

    def wanted(self) -> bool:
        return True

    def discard_stale(self) -> bool:
        return False

    def offer(self, item: Any, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self._q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def take(self, timeout: float | None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return self._q.get_nowait()
            except queue.Empty:
                pass
            if self._closed.is_set():
                return None
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            try:
                return self._q.get(timeout=0.2 if left is None else min(left, 0.2))
            except queue.Empty:
                continue

    def close(self) -> None:
        self._closed.set()
