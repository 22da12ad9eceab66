"""This process's memory and the machine's: what the export's budget and the runtime's limits read.

Why one module: the export (compress/calibration's MemoryWatch, the validation's RAM figure) and the
device side (runtime/hard_stop's load limit) both need this process's resident bytes, read the same
way; it imports nothing heavy, so the device side may use it.
"""
from __future__ import annotations

import os


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc, psutil elsewhere); 0 when neither works."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        try:
            import psutil

            return int(psutil.Process().memory_info().rss)
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
