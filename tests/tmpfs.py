"""A small real filesystem for a test: a tmpfs mounted on a folder (root only), for full disks and inodes."""
from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def tmpfs(where: Path, opts: str) -> Iterator[Path]:
    """`where` (made if missing) as a tmpfs mounted with `opts` ("size=64k", "size=3m,nr_inodes=16") for the
    block, unmounted after. Skips the test where this user cannot mount one (CI runs as root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on `path`'s filesystem (what fills a disk to a mark)."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
