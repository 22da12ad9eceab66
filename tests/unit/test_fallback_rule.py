"""When the int8 search starts a sensitivity fallback (layers kept in float): after no pass, or after
passes that are all over the latency budget or slower than fp32; never after a fast pass."""
from __future__ import annotations

from lepton_edge.exporters import recipes as r


def _best(within_budget: bool, not_slower: bool) -> r.SearchResult:
    return r.SearchResult(recipe="nncf-default", rank_key=(within_budget, 0.0 if not_slower else -2.9, (1.0,),
                                                           -100, -3.0))


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


def test_among_candidates_slower_than_fp32_the_faster_ranks_first():
    """Both passed; one is 1.3x fp32's time, the other 3.8x with a better metric: the faster wins, and a
    candidate no slower than fp32 beats both."""
    assert r._speed({"vs_fp32": 0.7, "slower_than_fp32": False}) == 0.0
    assert r._speed({}) == 0.0  # not timed against fp32 (latency not judged on this host)
    near = r.SearchResult(recipe="near", rank_key=(True, r._speed({"vs_fp32": 1.3, "slower_than_fp32": True}),
                                                   (0.9,), -10, -3.3))
    far = r.SearchResult(recipe="far", rank_key=(True, r._speed({"vs_fp32": 3.8, "slower_than_fp32": True}),
                                                 (0.99,), -10, -9.7))
    fast = r.SearchResult(recipe="fast", rank_key=(True, 0.0, (0.8,), -10, -2.0))
    best, improved = r._better(far, near)
    assert best is near and improved
    assert r._better(near, fast)[0] is fast
    assert not r._fast(near) and r._fast(fast)
