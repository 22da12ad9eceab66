"""Checks on output directories, made before any work that would write there.

Why before: an export runs for many seconds (a minute with calibration) before it writes its bundle;
`-o` naming an existing file, a read-only mount or /proc must be one line at once, not a traceback
at the end. Nothing is created by the check: the nearest existing ancestor is probed with a
temporary file that is removed at once.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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


def read_small(path, cap: int, what: str) -> bytes:
    """The bytes of a small file the user names (a key, a config): a regular file, symlinks followed,
    at most `cap` bytes. Why: `sign -k /dev/zero` read until memory ran out and a FIFO blocked forever;
    the size is checked on the open file, and no more than cap + 1 bytes are ever read."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise BadInput(f"{what} not found: {path}") from None
    except OSError as e:
        raise BadInput(f"cannot read {what} {path}: {e.strerror or e}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # (before fdopen, which refuses a directory with its own error)
        os.close(fd)
        raise BadInput(f"{what} {path}: not a regular file")
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(cap + 1)
        except OSError as e:
            raise BadInput(f"cannot read {what} {path}: {e.strerror or e}") from None
    if len(data) > cap:
        raise BadInput(f"{what} {path}: larger than {cap // 1024} KB")
    return data


def write_replacing(path, data: bytes, mode: int = 0o644) -> None:
    """Write `path` whole through a temporary file beside it and a rename, with `mode`.

    Why: a plain write follows a symlink at `path` (a `signature -> ~/notes.txt` in a bundle made `sign`
    overwrite the notes; a dangling `private.pem` link put the new key where the link pointed); a rename
    replaces the link itself, and a reader never sees half a file."""
    p = Path(path)
    with _written_beside(p, data, mode) as tmp:
        os.replace(tmp, p)


def write_new(path, data: bytes, mode: int = 0o600) -> None:
    """Write `path` whole, with `mode`, only if nothing is there (a file, a directory, a dangling link):
    FileExistsError otherwise, with what was there untouched.

    Why: checking first and then writing by rename (`write_replacing`) leaves a gap: two `keys new` run
    at once both found no private.pem, and the second replaced the key the first had already printed.
    Here the file appears by a hard link of a complete temporary file, which fails if the name exists,
    so a reader never sees half a key either; where links are not supported (some mounted file
    systems), by an exclusive create."""
    p = Path(path)
    with _written_beside(p, data, mode) as tmp:
        try:
            os.link(tmp, p, follow_symlinks=False)
        except FileExistsError:
            raise
        except OSError:  # no hard links here: an exclusive create, which a link at `p` fails too
            with os.fdopen(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode),
                           "wb") as f:
                f.write(data)


@contextmanager
def _written_beside(p: Path, data: bytes, mode: int) -> Iterator[str]:
    """A complete temporary file beside `p` (same file system: it can be renamed or linked into place)
    holding `data` with `mode`; gone after the block, whether or not it was moved."""
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield tmp
    finally:
        Path(tmp).unlink(missing_ok=True)


MAX_ONNX_BYTES = 2 << 30  # a protobuf message's limit: larger weights live in external data files


def check_onnx_file(path: Path) -> None:
    """What can be known of an .onnx file before parsing it, which reads it whole: its size within a
    protobuf's 2 GiB, and a first byte that can start one (a field tag, never 0). Why: a 4 GB sparse file
    named .onnx was read whole by `inspect` and `export` (4.25 GB, a MemoryError traceback under a limit)."""
    size = path.stat().st_size
    if size == 0:  # (protobuf parses it as an empty model: export then quoted the checker, run the runtime)
        raise BadInput(f"{path}: empty file, not an ONNX model")
    if size > MAX_ONNX_BYTES:
        raise BadInput(f"{path}: {size:,} bytes, over the {MAX_ONNX_BYTES:,} an ONNX file can be (larger models "
                       "keep their weights in external data files)")
    with open(path, "rb") as f:
        head = f.read(1)
    if head == b"\0":
        raise BadInput(f"{path}: not a readable ONNX model (it starts with a zero byte)")
