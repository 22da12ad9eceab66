"""Error types that the CLI maps to exit codes.

Why: a user who passes a bad file should see one line and exit code 2, a failed
accuracy or size check exit code 1, and a bug a traceback. Raising these two types
(and nothing else on purpose) keeps that promise without try/except in every verb.
"""
from __future__ import annotations

import difflib
import errno


class LeptonError(Exception):
    """Base class of the errors the CLI prints as one line. `details` (optional) is what a
    machine reader gets besides the line: `export --json` prints it with the error, e.g. every
    int8 candidate tried and the best one's metrics when none passed."""

    exit_code = 1

    def __init__(self, *args: object, details: dict | None = None):
        super().__init__(*args)
        self.details = details


class BadInput(LeptonError):
    """The user gave us something we cannot use (file, flag, profile). Exit code 2."""

    exit_code = 2


class RunTimedOut(BadInput):
    """One run of a model went past its time limit and was stopped: a loop that does not end, or far more
    work than the machine can do. The pipeline gives up on the model sooner for these (pipeline.py)."""


class CheckFailed(LeptonError):
    """An artifact was produced but failed validation or a budget. Exit code 1."""

    exit_code = 1


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception's first non-empty line, or its type's name: str(MemoryError()) is '', and
    `str(e).splitlines()[0]` then raised IndexError inside the error handler."""
    line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "") or type(e).__name__
    if len(line) <= limit:
        return line
    cut = line[:limit - 1]  # (at a word's end where there is one: a cut mid-word read as a typo)
    return (cut.rsplit(" ", 1)[0] if " " in cut[limit // 2:] else cut) + "…"


def closest(name: str, choices: list[str], n: int = 3) -> str:
    """A ' (did you mean: a, b?)' hint for unknown names, or ''."""
    near = difflib.get_close_matches(name, choices, n=n, cutoff=0.4)
    return f" (did you mean: {', '.join(near)}?)" if near else ""


def disk_full(e: BaseException) -> bool:
    """An OSError saying the disk (or the user's quota) is full. Why apart: a full work folder is the
    machine's state, not the input's fault: one line (exit 2), not a traceback nor a refused int8 candidate."""
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
