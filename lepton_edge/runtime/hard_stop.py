"""The last resort for native work that cannot be asked to stop: the process ends, with one line.

Why: LiteRT's interpreter has no way to stop an invoke() once it started (its Python API has no
cancellation), and onnxruntime builds a session, constant folding included, before any run's
RunOptions exist. A .tflite WHILE loop that never ends held `lepton-edge run` and the agent for ever,
and 11 KB of ONNX folded gigabytes at load (60 MB/s until the kernel's OOM killer came). Nor could a
SIGTERM end them: Python runs signal handlers between the main thread's bytecodes, and that thread was
inside the engine. Both engines release the GIL while they work, so a watcher thread still runs, and a
process that ends is one a service manager restarts (the agent then comes back with its last good
bundle: agent/deploy.py). So:

- `begin(what, seconds, max_growth_bytes)` / `end(token)`: work that must finish within `seconds` (and,
  for a model's load, grow this process's memory by at most `max_growth_bytes`), else the process ends
  with EXIT_CODE and one error line saying what did not finish;
- `RunClock(what, limit, max_growth)`: a model's runs, each within `limit` seconds and (while one is in
  progress) at most `max_growth` bytes above the process's size between runs: a 1 KB graph that Expands
  its input to 3 GB at each run ran, and finished, on a 4 GB board;
- `end_on_signals()`: after SIGINT or SIGTERM the `on_signal` hooks run at once (onnxruntime's watchdogs
  stop its runs, so the usual way out is taken), and a process still inside such unstoppable work
  GRACE_S later ends with 128 + the signal's number.
"""
from __future__ import annotations

import itertools
import logging
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable

from lepton_edge.memory import rss_bytes

EXIT_CODE = 2  # as any model that fails in `run` (pipeline.ModelFailed, a BadInput): "the model could not be run"
GRACE_S = 5.0
TICK_S = 0.1

_lock = threading.Lock()
_limits: dict[int, tuple[float, int | None, str, float]] = {}  # token -> (deadline, RSS ceiling, what, seconds)
_ids = itertools.count(1)
_watcher: threading.Thread | None = None
_hooks: list[Callable[[], None]] = []
_clocks: weakref.WeakSet = weakref.WeakSet()  # RunClocks of the backends alive
_signals_installed = False


def begin(what: str, seconds: float, max_growth_bytes: int | None = None) -> int:
    """Start a limit; `end(token)` when the work returns (in a `finally`). For a model's load; a model's
    runs use a RunClock (cheaper: a 25 us LiteRT run took 1.04x its bare time with these locks)."""
    token = next(_ids)
    ceiling = rss_bytes() + max_growth_bytes if max_growth_bytes else None
    with _lock:
        _limits[token] = (time.monotonic() + seconds, ceiling, what, seconds)
    _ensure_watcher()
    return token


class RunClock:
    """One backend's runs, watched: `started` is set (time.monotonic()) just before a call the engine cannot
    stop and set back to None after it; the watcher ends the process when one has run past `limit`. Two
    attribute writes a run, no lock. `running`, when given, is a container that is not empty while a run is
    in progress (onnxruntime's watchdog's: it stops its own runs in time, and its runs cost nothing more).

    `max_growth`: while a run is in progress, this process may be at most that many bytes above `baseline`,
    its size when the watcher last saw no run in progress (so what grows between runs, frames, a log, another
    model's load, is not the run's); past it the process ends (an engine gives a run's memory back to its
    own arena, not to the device). Checked every TICK_S by the watcher, never by the run."""

    __slots__ = ("started", "limit", "what", "max_growth", "baseline", "running", "__weakref__")

    def __init__(self, what: str, limit: float, max_growth: int | None = None, running=None):
        self.started: float | None = None
        self.limit, self.what, self.max_growth, self.running = limit, what, max_growth, running
        self.baseline = rss_bytes()
        _clocks.add(self)
        _ensure_watcher()

    def busy(self) -> bool:
        return self.started is not None or bool(self.running)


def _ensure_watcher() -> None:
    global _watcher
    with _lock:
        if _watcher is None:
            _watcher = threading.Thread(target=_watch, name="hard-stop", daemon=True)
            _watcher.start()


LOAD_S = 120.0  # a model's load: a 100 MB model loads in seconds, on a Pi too
LOAD_GROWTH_MIN = 2 << 30
LOAD_GROWTH_PER_FILE_BYTE = 12  # an engine holds a model's weights a few times over while it builds


MAX_ENTRIES = 10_000  # files looked at beside a model for its weights (a model in a crowded folder: a looser budget)


def begin_load(path, what: str) -> int:
    """`begin` for loading the model at `path`: LOAD_S, and at most `growth_budget(path)` more memory."""
    return begin(f"{what} loading {os.path.basename(str(path))!r}", LOAD_S, growth_budget(path))


def growth_budget(path) -> int:
    """max(2 GiB, 12x the bytes of every file in the model's folder (and below)): a model's load, and by
    default each of its runs. The folder: an ONNX model over 2 GB keeps its weights in files beside it, and
    a 150-byte graph with 2.5 GB of weights in `w.bin` was ended as a bomb."""
    return max(LOAD_GROWTH_MIN, LOAD_GROWTH_PER_FILE_BYTE * _folder_bytes(os.path.dirname(str(path)) or "."))


def _folder_bytes(folder: str) -> int:
    total, seen, todo = 0, 0, [folder]
    while todo and seen < MAX_ENTRIES:
        try:
            with os.scandir(todo.pop()) as it:
                for e in it:
                    seen += 1
                    if seen > MAX_ENTRIES:
                        break
                    if e.is_dir(follow_symlinks=False):
                        todo.append(e.path)
                    elif e.is_file(follow_symlinks=False):
                        total += e.stat(follow_symlinks=False).st_size
        except OSError:
            continue
    return total


def end(token: int) -> None:
    with _lock:
        _limits.pop(token, None)
    rss = rss_bytes()  # what a load grew (watched by its own ceiling until now) is no run's growth
    for clock in list(_clocks):
        clock.baseline = max(clock.baseline, rss)


def _watch() -> None:
    while True:
        time.sleep(TICK_S)
        now = time.monotonic()
        _check_clocks(now)
        with _lock:
            limits = list(_limits.values())
        if not limits:
            continue
        rss = rss_bytes() if any(lim[1] for lim in limits) else 0
        for deadline, ceiling, what, seconds in limits:
            if now > deadline:
                finish(f"{what} did not finish in {seconds:g} s, and the engine cannot be stopped: ending the process")
            if ceiling is not None and rss > ceiling:
                finish(f"{what} grew this process to {rss / 2**30:.1f} GiB, past its memory budget, and the engine "
                       "cannot be stopped: ending the process")


def _check_clocks(now: float) -> None:
    """Each model's runs: the one in progress past its time, or this process past the run's memory budget.
    Whether a run is in progress is read before the size: a run starting in between adds microseconds of
    its growth to `baseline`, never a stretch between runs to the run's growth."""
    watched = []
    for clock in list(_clocks):
        started = clock.started
        if started is not None and now - started > clock.limit:
            finish(f"{clock.what} did not finish in {clock.limit:g} s, and the engine cannot be stopped: "
                   "ending the process")
        if clock.max_growth:
            watched.append((clock, clock.busy()))
    if not watched:
        return
    with _lock:
        loading = bool(_limits)  # a load's growth is its own ceiling's, not a run's
    rss = rss_bytes()
    allowed = sum(c.max_growth for c, busy in watched if busy)  # runs of several models at once: their sum
    for clock, busy in watched:
        if not busy or loading:
            clock.baseline = rss
        elif rss > clock.baseline + allowed:
            finish(f"{clock.what} grew this process by {(rss - clock.baseline) / 2**20:,.0f} MiB, past its budget "
                   f"of {clock.max_growth / 2**20:,.0f} MiB for one run, and the engine keeps what it took: "
                   "ending the process")


_finishing = threading.Lock()


def finish(line: str, code: int = EXIT_CODE) -> None:
    """One error record through the process's log setup (so --log-json stays JSON), then the exit (once:
    a second caller, a second signal's timer, waits for the first's exit)."""
    _finishing.acquire()
    try:
        logging.getLogger("lepton_edge.runtime").error(line)
        for h in logging.getLogger().handlers:
            h.flush()
    finally:
        os._exit(code)


def _finish_if_stuck(line: str, code: int) -> None:
    """The grace is over: end the process only if work no one can stop is still in progress (a LiteRT run,
    a model's load). A process closing its sinks, or waiting for a stalled camera's reader to give up,
    is on its way out: it was ended, blaming the model, with its summary unprinted."""
    with _lock:
        stuck = bool(_limits)
    if stuck or any(c.started is not None for c in list(_clocks)):
        finish(line, code)


def on_signal(hook: Callable[[], None]) -> None:
    """Call `hook` (from the signal thread) as soon as SIGINT or SIGTERM arrives, once `end_on_signals` is in."""
    with _lock:
        if hook not in _hooks:
            _hooks.append(hook)


def end_on_signals() -> bool:
    """From the main thread: SIGINT and SIGTERM reach the hooks at once, and end the process GRACE_S later
    if it is still inside work no engine can stop (`_finish_if_stuck`). The C-level handler writes the
    signal's number to a wakeup fd even while the main thread is inside native code; a thread reading it
    acts. Not installed where the process already
    has a wakeup fd (an asyncio loop's): that one is left as it is. True when installed (or already)."""
    global _signals_installed
    if _signals_installed:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        previous = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except ValueError:
        previous = None
    if previous != -1:
        if previous is not None:
            signal.set_wakeup_fd(previous)
        os.close(r)
        os.close(w)
        return False
    threading.Thread(target=_on_wakeup, args=(r,), name="stop-signals", daemon=True).start()
    _signals_installed = True
    return True


def _on_wakeup(fd: int) -> None:
    stops = {int(signal.SIGINT): "SIGINT", int(signal.SIGTERM): "SIGTERM"}
    armed = False
    while data := os.read(fd, 64):
        got = [s for s in data if s in stops]
        if not got:
            continue
        with _lock:
            hooks = list(_hooks)
        for hook in hooks:
            try:
                hook()
            except Exception:  # a hook's failure must not keep the process from ending
                pass
        if armed:
            continue
        armed, number = True, got[0]
        timer = threading.Timer(GRACE_S, _finish_if_stuck, args=(
            f"stopped by {stops[number]}: the model's engine did not return within {GRACE_S:g} s", 128 + number))
        timer.daemon = True
        timer.start()
