"""Presentation shared by the CLI and the library's long steps: spinners and progress bars on stderr,
stage and info lines as log records (lepton_edge.logs decides how records look).

Why stderr: stdout stays clean for `--json`, so scripts can pipe it while people still see progress.
Why log records for lines: a spinner or a bar is for a person at a terminal and disappears otherwise
(piped, --quiet, --log-json); a line that says what happened ('✓ load model (0.3 s)') is worth keeping
in the journal, the CI log or a log shipper, so it is a logging record like any other.
"""
from __future__ import annotations

import io
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import IO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lepton_edge import logs


def _caller_log() -> logging.Logger:
    """The logger of the module that called into ui (past ui's and contextlib's own frames), as if
    it had called logging.getLogger(__name__) itself: filtering by logger name keeps working for
    code that reports through info() and stage()."""
    f: FrameType | None = sys._getframe(1)
    while f is not None and f.f_globals.get("__name__") in (__name__, "contextlib"):
        f = f.f_back
    name = f.f_globals.get("__name__", "lepton_edge") if f is not None else "lepton_edge"
    return logging.getLogger("lepton_edge.cli" if name == "__main__" else name)


class _StderrConsole(Console):
    """A console on stderr that follows `logs.stderr()`: during a silenced window (native output sent
    to /dev/null) its lines and live displays still reach the original stderr."""

    @property
    def file(self) -> IO[str]:
        file = self._file or logs.stderr()
        return getattr(file, "rich_proxied_file", file)  # as Console.file: never write into our own live proxy

    @file.setter
    def file(self, new_file: IO[str]) -> None:
        self._file = new_file


def console(stderr: bool = False) -> Console:
    """A rich console; when piped (CI logs, `| less`) 140 columns instead of rich's 80."""
    stream = sys.stderr if stderr else sys.stdout
    cls = _StderrConsole if stderr else Console
    # (stream None: started with stdout closed, `>&-`; every verb was a traceback at import)
    return cls(stderr=stderr, highlight=False, width=None if stream is not None and stream.isatty() else 140)


err = console(stderr=True)


def set_quiet(q: bool) -> None:
    """Only warnings and errors, no bars (a verb printing --json)."""
    logs.set_quiet(q)


class _JsonOut:
    """Whether this process's verb was asked for `--json` and has printed its document yet. Why: a verb's
    refusal (a missing bundle, a file that is not a model) printed its line on stderr and nothing on stdout, so a script
    reading `run --json` or `fleet ls --json` got an empty document to parse; `cli.main` now prints the error
    as the one JSON document when nothing was printed before it."""
    requested = False
    emitted = False


def start_json_output(requested: bool) -> None:
    """cli.main, once per call: whether the verb was given --json; nothing printed yet."""
    _JsonOut.requested, _JsonOut.emitted = requested, False


def emit_json(obj) -> None:
    """The verb's one JSON document on stdout (marked printed before the write: a Ctrl-C while it is written
    must not append an error document to half of it)."""
    _JsonOut.emitted = True
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def json_error(error: str, exit_code: int, details: dict | None = None) -> None:
    """For `--json`: the failure as the one document, unless the verb printed its own."""
    if _JsonOut.requested and not _JsonOut.emitted:
        emit_json({"ok": False, "error": error, "exit_code": exit_code, **(details or {})})


def live() -> bool:
    """Spinners and bars only for a person at a terminal: not when piped, --quiet or --log-json."""
    return err.is_terminal and not logs.quiet() and not logs.json_mode()


def plain(markup: str) -> str:
    """The text of a rich-markup string ('[bold]x[/]' -> 'x'); a string that is not valid markup as is."""
    from rich.markup import MarkupError
    from rich.text import Text

    try:
        return Text.from_markup(markup).plain
    except MarkupError:
        return markup


_CONTROL = None


def printable(text: object) -> str:
    """`text` with every C0/C1 control character (ESC, BEL, CR...) and bidirectional override shown as '?'.
    Why: a device names its own bundle and writes its own event messages, and Rich passes ESC through:
    `x\x1b]52;c;...` wrote the operator's clipboard and `\x1b[2J` cleared the screen from a dashboard cell.
    Markup is escaped apart."""
    import re

    global _CONTROL
    if _CONTROL is None:
        _CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")  # (+ bidi overrides)
    return _CONTROL.sub("?", str(text))


def info(msg: str, log: logging.Logger | None = None) -> None:
    """An info line for people: `msg` may carry rich markup, shown on a terminal; the journal and
    JSON get its plain text."""
    (log or _caller_log()).info(plain(msg), extra={"_rich": msg})


@contextmanager
def stage(name: str, log: logging.Logger | None = None) -> Iterator[None]:
    """A spinner while the stage runs (on a terminal), then the record 'name (1.2 s)' with the fields
    stage and seconds, shown as '✓ name (1.2 s)'. Nothing is logged when the stage raises."""
    log = log or _caller_log()
    t0 = time.perf_counter()
    if live():
        with err.status(name):
            yield
    else:
        yield
    dt = time.perf_counter() - t0
    log.info("%s (%.1f s)", name, dt, extra={"stage": name, "seconds": round(dt, 3)})


@contextmanager
def progress(description: str, total: int) -> Iterator:
    """A transient bar; yields advance(n). Safe inside stage() (rich nests live displays)."""
    if not live() or total <= 1:
        yield lambda n=1: None
        return
    with Progress(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


class _Silencer:
    """Points fd 2 at /dev/null while at least one thread is inside native_stderr_silenced.

    Why a depth count under a lock: two threads loading models at once would otherwise each save
    fd 2, and the second would save /dev/null and restore it last, silencing the process for good.
    Why the original stderr is duplicated once and kept: log handlers of other threads may hold the
    duplicate (logs.stderr()) a moment past the window; it must stay the real stderr then, never a
    closed or reused descriptor. A new duplicate is made only if fd 2 itself was replaced meanwhile."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.depth = 0
        self.saved: dict[tuple[int, int], IO[str]] = {}  # (st_dev, st_ino) of fd 2 -> text stream on its dup
        self.keep: int | None = None  # fd 2's dup to restore from, while silenced

    def enter(self) -> None:
        with self.lock:
            if self.depth == 0:
                self._silence()
            self.depth += 1

    def _silence(self) -> None:
        for s in (sys.stderr, logs.stderr()):
            try:
                s.flush()
            except (AttributeError, ValueError, OSError):
                pass
        try:
            st = os.fstat(2)
        except OSError:  # no fd 2 at all (a daemon that closed it): nothing to silence
            return
        alt = self.saved.get((st.st_dev, st.st_ino))
        if alt is None:
            fd = os.dup(2)
            alt = io.TextIOWrapper(io.FileIO(fd, "w", closefd=False),
                                   encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                                   errors="backslashreplace", line_buffering=True)
            self.saved[(st.st_dev, st.st_ino)] = alt
        self.keep = alt.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        logs._redirect = alt

    def exit(self) -> None:
        with self.lock:
            self.depth -= 1
            if self.depth == 0 and self.keep is not None:
                logs._redirect = None
                os.dup2(self.keep, 2)
                self.keep = None


_silencer = _Silencer()


@contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Silence what C++ libraries (LiteRT, the TFLite converter) write straight to file descriptor 2,
    such as 'INFO: Created TensorFlow Lite XNNPACK delegate'. Python exceptions still propagate, and
    Python log records (this thread's or another's, e.g. the agent's) still reach the original stderr:
    only what bypasses Python is silenced. Keep the window to the native call that talks."""
    _silencer.enter()
    try:
        yield
    finally:
        _silencer.exit()


# Held while a libraries_silenced block runs: what it changes is the process's, not the thread's.
_silenced_section = threading.RLock()


@contextmanager
def libraries_silenced(*loggers: str, stderr: bool = True, native: bool = False) -> Iterator[None]:
    """Mute what converters and quantizers print or log (progress lines, recovered errors,
    warnings) while they run: our own stage line says what happened. `loggers` are logger names
    ("" is the root logger); stderr=False keeps our progress bars visible; native also mutes C++.

    One thread at a time runs such a block (a re-entrant lock): sys.stdout, logger levels and warning
    filters are the process's, and so are the library patches the quantizers apply inside these blocks
    (onnxruntime's calibrators, NNCF's engine). Two exports in two threads interleaved them: the one
    that ended last put back the other's redirection, and this process's stdout went to a dead buffer
    for good. Exports in threads now take turns through their quantizers and converters."""
    with _silenced_section, _libraries_silenced(loggers, stderr, native):
        yield


@contextmanager
def _libraries_silenced(loggers: tuple[str, ...], stderr: bool, native: bool) -> Iterator[None]:
    import contextlib
    import warnings

    named = [logging.getLogger(n) for n in loggers]
    levels = [lg.level for lg in named]
    for lg in named:
        lg.setLevel(logging.CRITICAL)
    sys.stdout.flush()
    sink = io.StringIO()
    try:
        with contextlib.ExitStack() as stack:
            if native:
                stack.enter_context(native_stderr_silenced())
            stack.enter_context(contextlib.redirect_stdout(sink))
            if stderr:
                stack.enter_context(contextlib.redirect_stderr(sink))
            stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(named, levels, strict=True):
            lg.setLevel(lv)


def human(n: float, binary: bool = False) -> str:
    """1234567 -> '1.23 MB' (or '1.2 MiB' with binary=True, as the profiles' budgets are set)."""
    step, units = (1024, ("B", "KiB", "MiB", "GiB")) if binary else (1000, ("B", "KB", "MB", "GB"))
    for unit in units:
        if n < step or unit == units[-1]:
            if unit == "B":
                return f"{n:.0f} B"
            return f"{n:.3g} {unit}" if binary else f"{n:.2f} {unit}"
        n /= step
    return str(n)
