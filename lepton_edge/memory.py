"""This process's memory and the machine's: what the export's budget and the runtime's limits read.

Why one module: the export (compress/calibration's MemoryWatch, the validation's RAM figure) and the
device side (runtime/hard_stop's load limit) both need this process's resident bytes, read the same
way; it imports nothing heavy, so the device side may use it.
"""
from __future__ import annotations

import os


def rss_bytes(pid: int | None = None) -> int:
    """Resident memory of this process, or of process `pid` (Linux /proc, psutil elsewhere); 0 when neither
    works (or the process is gone)."""
    try:
        with open(f"/proc/{pid or 'self'}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        try:
            import psutil

            return int(psutil.Process(pid).memory_info().rss)
        except Exception:
            return 0


def available_bytes() -> int | None:
    """Memory the system can give without swapping (MemAvailable), or None when unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def give_back_freed() -> None:
    """Return the memory this process has freed to the system: Python's garbage collected, then glibc's
    free heap trimmed (malloc_trim; nothing where there is no glibc).

    Why: glibc keeps freed blocks for reuse, so after an int8 candidate's sessions and tensors are gone
    the process stays 50-130 MB above what it holds (an 800x608 PicoDet detector: 582-669 MB between
    candidates, 472-535 MB trimmed). The export's memory budget is checked against RSS, so each next
    candidate started with that much less of it, and stops came from memory nothing used."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # (not glibc: musl, macOS)
        return
    trim(0)
