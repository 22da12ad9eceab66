"""This process's memory as the export's budget reads it (lepton_edge/memory.py)."""
from __future__ import annotations

import numpy as np

from lepton_edge.memory import give_back_freed, rss_bytes


def test_memory_freed_goes_back_to_the_system_before_the_next_candidate():
    """glibc keeps freed heap for reuse: 200 MB of small blocks freed around a few live ones stay in
    this process's RSS, which the export's --max-memory is checked against, until it is trimmed."""
    blocks = [np.ones(2048, np.uint8) for _ in range(100_000)]  # (each under malloc's mmap threshold)
    keep = blocks[::64]  # a few live blocks pin the heap: freeing the rest returns nothing by itself
    del blocks
    before = rss_bytes()
    give_back_freed()
    assert rss_bytes() < before - 100e6, f"{before / 1e6:.0f} MB -> {rss_bytes() / 1e6:.0f} MB"
    assert len(keep) == 1563
