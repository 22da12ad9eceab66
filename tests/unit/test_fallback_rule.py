"""When the int8 search starts a sensitivity fallback (layers kept in float): after no pass, or after
passes that are all over the latency budget or slower than fp32; never after a fast pass."""
from __future__ import annotations

from lepton_edge.exporters import recipes as r


def _best(within_budget: bool, not_slower: bool) -> r.SearchResult:
    return r.SearchResult(recipe="nncf-default", rank_key=(within_budget, not_slower, (1.0,), -100, -3.0))


def test_fast_means_within_the_budget_and_no_slower_than_fp32():
    assert r._fast(None) is False
    assert r._fast(_best(True, True)) is True
    assert r._fast(_best(False, True)) is False
    assert r._fast(_best(True, False)) is False


def _why(is_fallback: bool, best, since_best: int = 0, elapsed: float = 1.0) -> str | None:
    return r._not_started(is_fallback, best.recipe if best else None, r._fast(best), True, elapsed, 180.0,
                          since_best, 2)


def test_a_fallback_is_not_needed_after_a_fast_pass():
    assert _why(True, _best(True, True)) == "not needed: nncf-default passed"
    assert _why(True, None) is None  # nothing passed: the fallback is the way left


def test_a_fallback_runs_after_slow_passes_whatever_the_patience():
    for slow in (_best(False, True), _best(True, False)):
        assert _why(True, slow, since_best=5) is None
        assert _why(False, slow, since_best=5) == "not tried: 2 candidates in a row did not beat nncf-default"


def test_the_search_time_still_bounds_a_fallback():
    assert _why(True, _best(True, False), elapsed=200.0) == "--search-time 180 s spent"
