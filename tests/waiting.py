"""One polling helper for the tests: wait for a condition with a deadline instead of sleeping a guess."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(pred: Callable[[], Any], timeout: float = 20.0, step: float = 0.02) -> Any:
    """pred()'s first truthy value within timeout, else its last value (so the caller's assert shows it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(step)
    return pred()
