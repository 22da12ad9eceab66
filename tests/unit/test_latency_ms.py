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


def test_paired_timing_holds_the_ratio_through_a_busy_spell():
    """A candidate as fast as fp32, timed while the host is 3x slower than when fp32 was: timed one after
    the other it reads 3x fp32's time; timed beside fp32 (runs interleaved), as the recipe search and the
    export's latency line do, it reads about 1x."""
    from lepton_edge.exporters import recipes

    spell = {"factor": 1.0}

    def run(_x):
        time.sleep(0.002 * spell["factor"])

    x = np.zeros(1)
    fp32_before = val.latency_ms(run, x, runs=5, warmup=0, budget_s=0.0)["min_ms"]
    spell["factor"] = 3.0
    alone = val.latency_ms(run, x, runs=5, warmup=0, budget_s=0.0)["min_ms"]
    assert alone / fp32_before > 2.0  # what timing them apart reads
    cand, base = val.paired_latency_ms(run, run, x, runs=5, warmup=0, budget_s=0.0)
    assert cand["runs"] == base["runs"] == 5
    assert 0.7 < cand["min_ms"] / base["min_ms"] < 1.3
    _, over, fields = recipes._timing(True, run, x, None, run)
    assert over is None and fields["slower_than_fp32"] is False and 0.7 < fields["vs_fp32"] < 1.3, fields
