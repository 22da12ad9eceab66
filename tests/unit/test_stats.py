"""StageTimes and Rolling: percentiles over the last N samples, fps over the same frames, and windows
that neither lose nor double-count a frame while the pipeline keeps adding."""
from __future__ import annotations

import threading

import pytest

from lepton_edge import stats
from lepton_edge.stats import Rolling, StageTimes, summarize


@pytest.fixture
def clock(monkeypatch):
    """A perf_counter the test moves by hand: fps from known frame times."""
    now = [1000.0]
    monkeypatch.setattr(stats.time, "perf_counter", lambda: now[0])
    return now


def test_percentiles_of_known_values():
    s = summarize(range(1, 101))
    assert s == {"p50": 50.5, "p95": pytest.approx(95.05), "p99": pytest.approx(99.01), "max": 100.0,
                 "mean": 50.5, "n": 100}
    assert summarize([]) is None


def test_ring_keeps_only_the_last_samples():
    r = Rolling(4)
    for v in range(1, 11):
        r.add(v)
    assert len(r) == 4 and r.total == 10
    assert sorted(r.values()) == [7, 8, 9, 10]
    assert r.summary()["max"] == 10 and r.summary()["mean"] == 8.5
    r.clear()
    assert len(r) == 0 and r.summary() is None and r.total == 10


def test_snapshot_reports_each_stage_that_has_samples(clock):
    st = StageTimes()
    for ms in (1.0, 2.0, 3.0):
        st.add(capture=ms, inference=10 * ms)
        clock[0] += 0.1
    snap = st.snapshot()
    assert set(snap["latency_ms"]) == {"capture", "inference"}  # stages never timed are left out
    assert snap["latency_ms"]["inference"]["p50"] == 20.0 and snap["latency_ms"]["capture"]["max"] == 3.0
    assert snap["frames"] == snap["window_frames"] == 3
    assert snap["fps"] == pytest.approx(10.0)


def test_fps_needs_two_frames_and_some_time(clock):
    st = StageTimes()
    assert st.fps() is None
    st.add(inference=1.0)
    assert st.fps() is None
    st.add(inference=1.0)  # same instant: no rate, not infinity
    assert st.fps() is None
    clock[0] += 0.5
    st.add(inference=1.0)
    assert st.fps() == pytest.approx(4.0)  # two intervals in 0.5 s


def test_window_resets_the_window_but_not_the_totals(clock):
    st = StageTimes()
    for _ in range(5):
        st.add(inference=1.0)
        clock[0] += 0.1
    st.dropped = 3
    first = st.window()
    assert first["window_frames"] == 5 and first["latency_ms"]["inference"]["n"] == 5
    st.add(inference=2.0)
    second = st.window()
    assert second["window_frames"] == 1 and second["latency_ms"]["inference"]["n"] == 1
    assert second["latency_ms"]["inference"]["max"] == 2.0  # nothing of the first window left
    assert second["frames"] == 6 and second["fps"] is None  # totals keep counting; fps is per window
    assert second["dropped"] == 3  # the source's running count: the agent takes differences


def test_windows_taken_while_frames_arrive_count_every_frame_once():
    st = StageTimes(size=64)
    n, counted, done = 20_000, [], threading.Event()

    def pipeline():
        for _ in range(n):
            st.add(capture=0.1, inference=1.0)
        done.set()

    t = threading.Thread(target=pipeline)
    t.start()
    while not done.is_set():
        counted.append(st.window()["window_frames"])
    t.join()
    counted.append(st.window()["window_frames"])
    assert sum(counted) == n == st.frames
