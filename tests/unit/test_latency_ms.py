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
