"""--search-time stops a candidate's Python work at the deadline once a candidate has passed, not only
between calibration batches: onnxruntime built a 10,000-node graph's calibration graph for minutes
before its first batch."""
from __future__ import annotations

import signal
import threading
import time

import pytest

from lepton_edge.exporters import recipes


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:  # pure Python, as onnxruntime's graph augmentation is
        sum(range(1000))


def test_the_deadline_stops_python_work_once_a_candidate_passed():
    d = recipes._Deadline(time.perf_counter(), 0.3)
    d.best = "nncf-default"
    before = signal.getsignal(signal.SIGALRM)
    t0 = time.perf_counter()
    with pytest.raises(recipes.SearchTimeSpent, match="--search-time 0.3 s spent .*nncf-default passed"), d.armed():
        _busy(5.0)
    assert time.perf_counter() - t0 < 2.0
    assert signal.getsignal(signal.SIGALRM) is before and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_no_timer_before_a_candidate_passed_or_off_the_main_thread():
    d = recipes._Deadline(time.perf_counter(), 0.05)
    with d.armed():  # nothing passed yet: the search needs one, however long it takes
        _busy(0.3)
    d.best = "u8-minmax"
    errors = []

    def other():
        try:
            with d.armed():
                _busy(0.3)
        except Exception as e:  # a signal cannot reach this thread: no timer was armed
            errors.append(e)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert not errors
    with pytest.raises(recipes.SearchTimeSpent), d.armed():  # past the deadline already: stopped on entry
        _busy(0.3)


def test_someone_elses_timer_is_left_alone():
    """An application's own SIGALRM handler or running timer (a watchdog, pytest-timeout) is not replaced."""
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(1))
    try:
        d = recipes._Deadline(time.perf_counter(), 0.05)
        d.best = "u8-minmax"
        time.sleep(0.06)
        with d.armed():  # past the deadline, but no timer of ours: the between-batch check decides
            _busy(0.1)
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0) and not fired
    finally:
        signal.signal(signal.SIGALRM, previous)
