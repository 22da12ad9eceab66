"""Checks on output directories, made before any work that would write there.

Why before: an export runs for many seconds (a minute with calibration) before it writes its bundle;
`-o` naming an existing file, a read-only mount or /proc must be one line at once, not a traceback
at the end. Nothing is created by the check: the nearest existing ancestor is probed with a
temporary file that is removed at once.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from lepton_edge.errors import BadInput

_PSEUDO = ("/proc", "/sys", "/dev")  # kernel file systems: never a place for our files


def check_output_dir(path, what: str = "--out") -> Path:
    """`path` as a Path when it is (or can be made) a writable directory, else BadInput."""
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise BadInput(f"{what} must be a directory path, got {path!r}")
    p = Path(path)
    resolved = p.expanduser().resolve()
    if any(resolved == Path(d) or Path(d) in resolved.parents for d in _PSEUDO):
        raise BadInput(f"{what} {p}: a kernel file system ({resolved}), not a place for output")
    probe = resolved
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise BadInput(f"{what} {p}: {probe} exists and is not a directory")
    try:  # a real write is the one test that covers permissions, read-only mounts and quotas alike
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".lepton-write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise BadInput(f"{what} {p}: {probe} is not writable ({e.strerror or e})") from None
    return p
