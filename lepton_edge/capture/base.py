"""What every frame source is: an explicit state, counters, status callbacks, one `read()`.

Why an explicit state (after Roboflow Inference's VideoSource): "is the camera there?" used to be
read off several attributes (connected, a stop flag, a failure string, counters) that threads set
at different moments. One `SourceState`, changed only through `_set_state` (which checks the
transition, logs it and tells the listeners), answers it for the pipeline, the CLI and the agent.

Status callbacks (`add_listener`) are how the outside learns what happened without polling:
state changes, a reconnect that brought frames back, frames dropped (batched: at most one report
per `drop_report_s`, since a camera faster than the model drops all the time by design). The
agent turns them into events. A listener that raises is logged and forgotten about, never
allowed to stop the thread that reads the camera.
"""
from __future__ import annotations

import abc
import enum
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from lepton_edge.capture.buffers import BufferPolicy
from lepton_edge.errors import BadInput

log = logging.getLogger(__name__)


_CREDENTIALS = re.compile(r"(?<=://)[^/\s]*:[^/\s]*@")  # to the last '@' before the path, as FFmpeg splits


def redacted(spec: str) -> str:
    """The spec with a URL's `user:password@` shown as `***@`, wherever it appears (a stream URL, a GStreamer
    pipeline's location=). Why: the camera's password reached the log, the `started` event and the retained
    meta message, which every subscriber and the fleet dashboard read."""
    return _CREDENTIALS.sub("***@", str(spec))


class SourceState(str, enum.Enum):
    CONNECTING = "connecting"  # opened (or opening), no frame yet
    STREAMING = "streaming"  # frames are coming
    RECONNECTING = "reconnecting"  # a live source lost its stream and is reopening it
    ENDED = "ended"  # a file ran out, or the source was closed
    FAILED = "failed"  # gave up (see `failure`)


_NEXT = {
    SourceState.CONNECTING: {SourceState.STREAMING, SourceState.RECONNECTING, SourceState.ENDED, SourceState.FAILED},
    SourceState.STREAMING: {SourceState.RECONNECTING, SourceState.ENDED, SourceState.FAILED},
    SourceState.RECONNECTING: {SourceState.STREAMING, SourceState.ENDED, SourceState.FAILED},
    SourceState.ENDED: set(),
    SourceState.FAILED: set(),
}
TERMINAL = (SourceState.ENDED, SourceState.FAILED)


@dataclass(frozen=True)
class StatusUpdate:
    """What a listener is told. `kind`: "state" (`state` left `previous`), "reconnect" (frames flow
    again after `count` reopen attempts and `down_s` seconds), "dropped" (`count` frames since the
    last report, `total` so far)."""

    kind: Literal["state", "reconnect", "dropped"]
    source: str  # the spec
    source_kind: str
    state: SourceState
    previous: SourceState | None = None
    reason: str | None = None
    count: int = 0
    total: int = 0
    down_s: float | None = None
    ts: float = field(default_factory=time.time)


Listener = Callable[[StatusUpdate], None]


@dataclass
class Frame:
    image: np.ndarray
    index: int  # frames delivered by this source so far (0-based)
    timestamp: float  # wall clock when it was captured
    capture_ms: float  # time the consumer waited for it
    path: str | None = None  # image sources: the file


class SourceOptions(BaseModel):
    """The options every source takes; a source with more declares a subclass as its `Options`."""

    model_config = ConfigDict(extra="forbid")
    policy: BufferPolicy | None = None  # None: the source's default (newest-frame live, every-frame files)


class Source(abc.ABC):
    """Iterate for frames (or `read()` them); `close()` when done. Counters are cumulative.

    A subclass sets `kind`, `live`, `schemes` (URL schemes it opens) and `Options`, implements
    `read()` and `from_spec()`, and is registered with `capture.registry.register_source`.
    """

    kind: str = "source"
    live: ClassVar[bool] = False
    schemes: ClassVar[tuple[str, ...]] = ()
    claim_order: ClassVar[int] = 50  # built-ins claiming scheme-less specs are asked lowest first
    Options: ClassVar[type[SourceOptions]] = SourceOptions
    policies: ClassVar[tuple[BufferPolicy, ...]] = (BufferPolicy.EVERY_FRAME,)  # the ones it can do; first: default
    drop_report_s: float = 60.0

    def __init__(self, spec: str, policy: BufferPolicy | str | None = None):
        self.spec = redacted(spec)  # what logs, events and the agent's retained meta show; never opened
        self.captured = 0  # frames delivered
        self.dropped = 0  # frames taken from the source that nobody used (newest-frame policy)
        self.corrupt = 0
        self.reconnects = 0
        self.grabbed = 0  # frames taken off the device or the network
        self.decoded = 0  # of those, turned into images
        self.fps: float | None = None  # nominal rate where the source says (video files, cameras)
        self.failure: str | None = None  # why the source gave up (state FAILED), else None
        self.policy = BufferPolicy(policy) if policy else self.policies[0]
        if self.policy not in self.policies:
            raise BadInput(f"{self.kind} {self.spec!r}: buffering policy {self.policy.value} does not apply here "
                           f"(this source does {', '.join(p.value for p in self.policies)})")
        self._state = SourceState.CONNECTING
        self._state_lock = threading.Lock()
        self._listeners: list[Listener] = []
        self._drops_unreported, self._drops_reported_at = 0, time.monotonic()

    @classmethod
    @abc.abstractmethod
    def from_spec(cls, spec: str, options: Any) -> Source:
        """Open `spec` with `options` (an instance of `cls.Options`, validated); BadInput (one line)
        when it cannot be opened."""

    @classmethod
    def claims(cls, spec: str) -> bool:
        """Built-in sources only: whether this source reads a spec that has no URL scheme."""
        return False

    @abc.abstractmethod
    def read(self, timeout: float | None = None) -> Frame | None:
        """The next frame, or None: the source has ended or failed (see `state`), or, for a live
        source, nothing came within `timeout` seconds (None: wait). A file ignores `timeout`."""

    def close(self) -> None:
        self._set_state(SourceState.ENDED, "closed")

    # ---- state and listeners ------------------------------------------------------------------
    @property
    def state(self) -> SourceState:
        return self._state

    @property
    def closed(self) -> bool:
        return self._state in TERMINAL

    def add_listener(self, listener: Listener) -> None:
        """`listener(StatusUpdate)` on every state change, reconnect and batch of drops, called
        from the thread that saw it (the reader thread of a live source): keep it short."""
        self._listeners.append(listener)

    def _tell(self, update: StatusUpdate) -> None:
        for listener in list(self._listeners):
            try:
                listener(update)
            except Exception:  # a listener's bug must not stop the camera
                log.exception("%s: status listener %r failed", self.spec, listener)

    def _set_state(self, new: SourceState, reason: str | None = None) -> bool:
        """Move to `new` if the transition is allowed; log it and tell the listeners."""
        with self._state_lock:
            old = self._state
            if new == old or new not in _NEXT[old]:
                return False
            self._state = new
        # debug, not info: `run` ends with one line of its own when a source fails (the CLI shows info
        # records), and the agent turns these into events; the transitions are there with --verbose
        log.debug("%s %s: %s -> %s%s", self.kind, self.spec, old.value, new.value, f" ({reason})" if reason else "")
        self._tell(StatusUpdate("state", self.spec, self.kind, new, old, reason))
        return True

    def _note_dropped(self, n: int = 1) -> None:
        """Count `n` frames nobody used; report them in batches (see `drop_report_s`)."""
        self.dropped += n
        self._drops_unreported += n
        now = time.monotonic()
        if now - self._drops_reported_at >= self.drop_report_s:
            count, self._drops_unreported, self._drops_reported_at = self._drops_unreported, 0, now
            self._tell(StatusUpdate("dropped", self.spec, self.kind, self._state, count=count, total=self.dropped,
                                    reason=f"{count} frame(s) dropped in {self.drop_report_s:g} s "
                                           f"({self.policy.value}: the consumer is slower than the source)"))

    # ---- reading ------------------------------------------------------------------------------
    def frames(self, stop: threading.Event | None = None, poll_s: float = 0.5) -> Iterator[Frame]:
        """Frames until the source ends or fails, or `stop` is set; waits through a live source's
        reconnects, looking at `stop` every `poll_s` seconds."""
        while stop is None or not stop.is_set():
            f = self.read(timeout=poll_s if self.live else None)
            if f is not None:
                yield f
            elif self.closed or not self.live:
                return

    def __iter__(self) -> Iterator[Frame]:
        return self.frames()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def status(self) -> dict:
        return {"kind": self.kind, "live": self.live, "captured": self.captured, "dropped": self.dropped,
                "corrupt": self.corrupt, "reconnects": self.reconnects}

    def _frame(self, image: np.ndarray, t0: float, timestamp: float | None = None) -> Frame:
        f = Frame(image, self.captured, timestamp or time.time(), (time.perf_counter() - t0) * 1e3)
        self.captured += 1
        return f
