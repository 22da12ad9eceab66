"""Console output shared by the CLI and the library: stage lines and progress bars on stderr.

Why stderr: stdout stays clean for `--json`, so scripts can pipe it while people still see progress.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

def console(stderr: bool = False) -> Console:
    """A rich console; when piped (CI logs, `| less`) 140 columns instead of rich's 80."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, highlight=False, width=None if stream.isatty() else 140)


err = console(stderr=True)
_quiet = False


def set_quiet(q: bool) -> None:
    global _quiet
    _quiet = q


def info(msg: str) -> None:
    if not _quiet:
        err.print(msg)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Print '✓ name (1.2 s)' when the stage ends; a spinner while it runs."""
    t0 = time.perf_counter()
    if _quiet:
        yield
        return
    with err.status(name):
        yield
    err.print(f"[green]✓[/] {name} [dim]({time.perf_counter() - t0:.1f} s)[/]")


@contextmanager
def progress(description: str, total: int) -> Iterator:
    """A transient bar; yields advance(n). Safe inside stage() (rich nests live displays)."""
    if _quiet or total <= 1:
        yield lambda n=1: None
        return
    with Progress(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


@contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Silence what C++ libraries (LiteRT, the TFLite converter) write straight to file descriptor 2,
    such as 'INFO: Created TensorFlow Lite XNNPACK delegate'. Python exceptions still propagate."""
    import os

    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@contextmanager
def libraries_silenced(*loggers: str, stderr: bool = True, native: bool = False) -> Iterator[None]:
    """Mute what converters and quantizers print or log (progress lines, recovered errors,
    warnings) while they run: our own stage line says what happened. `loggers` are logger names
    ("" is the root logger); stderr=False keeps our progress bars visible; native also mutes C++."""
    import contextlib
    import io
    import logging
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
        for lg, lv in zip(named, levels):
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
