"""ui.libraries_silenced: what converters and quantizers print is muted for the block, and the block's
process-wide changes (stdout, logger levels, the quantizers' library patches) are one thread's at a time."""
from __future__ import annotations

import sys
import threading

from lepton_edge import ui


def test_two_threads_silenced_sections_take_turns_and_stdout_comes_back():
    """Interleaved, the block that ended last put back the other's redirection: stdout stayed a dead
    buffer for the rest of the process (two exports run from two threads of the Python API)."""
    real = sys.stdout
    inside, done = threading.Event(), threading.Event()

    def other():
        inside.wait(5)
        with ui.libraries_silenced("", stderr=False):
            print("muted")
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with ui.libraries_silenced("", stderr=False):
        assert sys.stdout is not real
        inside.set()
        assert not done.wait(0.5), "the other thread's block ran inside this one"
        with ui.libraries_silenced():  # (re-entrant: a block inside a block of the same thread)
            print("muted too")
    t.join(5)
    assert done.is_set() and sys.stdout is real
