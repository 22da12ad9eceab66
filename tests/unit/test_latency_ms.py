"""`validation.latency_ms` reports milliseconds: the latency budget (writer.check_budgets) compares its
figures with the profile's `latency_budget_ms`, so seconds or microseconds there would pass or refuse
every export."""
from __future__ import annotations

import time

import numpy as np

from lepton_edge.exporters import validation as val


def test_latency_is_in_milliseconds_with_its_run_count():
    def call(_x):
        time.sleep(0.004)

    lat = val.latency_ms(call, np.zeros(1), runs=6, warmup=1, budget_s=0.0)
    assert 3.5 <= lat["min_ms"] <= lat["p50_ms"] <= lat["p90_ms"] < 1000, lat
    assert lat["runs"] == 5 or lat["runs"] == 6, lat  # at least 5 runs even with no time budget left


class _Clock:
    """The host's time as the timing code reads it (validation.time): each run advances it by its cost,
    so a busy spell is exactly as slow as the test says, whatever else this machine does. (Real sleeps
    read 9.6 ms against 6.1 ms for equal work on a loaded CI host.)"""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_paired_timing_holds_the_ratio_through_a_busy_spell(monkeypatch):
    """A candidate as fast as fp32, timed while the host is 3x slower than when fp32 was: timed one after
    the other it reads 3x fp32's time; timed beside fp32 (runs interleaved), as the recipe search and the
    export's latency line do, it reads about 1x. The spell ends half way through the paired runs."""
    from lepton_edge.exporters import recipes

    clock = _Clock()
    monkeypatch.setattr(val, "time", clock)
    spell = {"factor": 1.0, "calls": 0, "ends_after": None}

    def run(_x):
        spell["calls"] += 1
        if spell["ends_after"] is not None and spell["calls"] > spell["ends_after"]:
            spell["factor"] = 1.0
        clock.now += 0.002 * spell["factor"]

    x = np.zeros(1)
    fp32_before = val.latency_ms(run, x, runs=5, warmup=0, budget_s=0.0)["min_ms"]
    spell["factor"] = 3.0
    alone = val.latency_ms(run, x, runs=5, warmup=0, budget_s=0.0)["min_ms"]
    assert abs(alone / fp32_before - 3.0) < 1e-6  # what timing them apart reads
    spell["calls"], spell["ends_after"] = 0, 5
    cand, base = val.paired_latency_ms(run, run, x, runs=5, warmup=0, budget_s=0.0)
    assert cand["runs"] == base["runs"] == 5
    assert abs(cand["min_ms"] / base["min_ms"] - 1.0) < 1e-6
    spell["factor"], spell["calls"] = 3.0, 0
    _, over, fields = recipes._timing(True, run, x, None, run)
    assert over is None and fields["slower_than_fp32"] is False and abs(fields["vs_fp32"] - 1.0) < 0.01, fields


def test_warm_up_runs_the_real_input_untimed_then_every_round_calls_each_function():
    """The warm-up calls (a session's first runs allocate and pick kernels) get the input that is timed,
    not a placeholder, and are left out of the figures; then each round calls every function once, in turn."""
    x = np.arange(3.0)
    calls: list[tuple[str, object]] = []

    def fn(tag):
        def call(arg):
            calls.append((tag, arg))
            time.sleep(0.03 if len(calls) <= 4 else 0.001)  # the warm-up is slow, as a first run is
        return call

    a, b = val.paired_latency_ms(fn("a"), fn("b"), x, runs=5, warmup=2, budget_s=0.0)
    assert all(arg is x for _, arg in calls), [type(arg) for _, arg in calls]
    assert [tag for tag, _ in calls] == ["a", "b"] * 7
    assert a["runs"] == b["runs"] == 5 and a["p90_ms"] < 20 and b["p90_ms"] < 20, (a, b)


def test_latency_defaults_warm_up_three_time_thirty_and_stop_after_a_second(monkeypatch):
    """The export's latency figures come from these defaults: 3 untimed warm-up calls, then 30 timed ones,
    with no new round once a second has passed (at least 5). On a clock each call advances by 0.1 s, a
    second holds 10 runs."""
    clock = _Clock()
    monkeypatch.setattr(val, "time", clock)
    calls = []

    def free(_x):
        calls.append(clock.now)
    lat = val.latency_ms(free, np.zeros(1))
    assert len(calls) == 33 and lat["runs"] == 30, (len(calls), lat)

    def slow(_x):
        clock.now += 0.1
    assert val.latency_ms(slow, np.zeros(1))["runs"] == 10


def test_the_reports_timing_goes_on_from_the_searchs_rounds(monkeypatch):
    """The recipe search timed its chosen candidate beside fp32 (10 rounds): the report's timing of the same
    graph counts those toward its 30 and times only the rest, and its figures are of all of them. The
    search's rounds reach the chosen one's predictor (recipes._timing keeps them; _finished hands them on)."""
    from lepton_edge.exporters import recipes

    clock = _Clock()
    monkeypatch.setattr(val, "time", clock)
    calls = {"a": 0, "b": 0}

    def fn(tag, cost):
        def call(_x):
            calls[tag] += 1
            clock.now += cost
        return call

    x = np.zeros(1)
    kept: list = []
    val.paired_latency_ms(fn("a", 0.002), fn("b", 0.001), x, runs=10, warmup=1, budget_s=10.0, kept=kept)
    assert [len(k) for k in kept] == [10, 10] and calls == {"a": 11, "b": 11}
    calls.update(a=0, b=0)
    a, b = val.paired_latency_ms(fn("a", 0.004), fn("b", 0.001), x, runs=30, warmup=3, budget_s=10.0, before=kept)
    assert calls == {"a": 23, "b": 23}  # 3 warm-up calls, then the 20 rounds the search's 10 left
    assert a["runs"] == b["runs"] == 30 and abs(a["min_ms"] - 2.0) < 1e-6 and abs(a["p90_ms"] - 4.0) < 1e-6
    _, _, fields = recipes._timing(True, fn("a", 0.002), x, None, fn("b", 0.001))
    assert len(fields[recipes.ROUNDS][0]) == len(fields[recipes.ROUNDS][1]) >= 5
