"""The int8 search's order rules: a sensitivity fallback (layers kept in float) only when nothing
passed; among passing candidates slower than fp32 on this host, the faster first."""
from __future__ import annotations

from lepton_edge.exporters import recipes as r


def _why(is_fallback: bool, best: str | None, since_best: int = 0, elapsed: float = 1.0) -> str | None:
    return r._not_started(is_fallback, best, True, elapsed, 180.0, since_best, 2)


def test_a_fallback_only_when_nothing_passed():
    assert _why(True, "nncf-default") == "not needed: nncf-default passed"
    assert _why(True, None, since_best=5) is None  # nothing passed: the fallback is the way left


def test_patience_and_the_search_time_bound_the_plain_candidates():
    assert _why(False, "nncf-default", since_best=2) == "not tried: 2 candidates in a row did not beat nncf-default"
    assert _why(False, "nncf-default", since_best=1) is None
    assert _why(False, None, elapsed=200.0) == "--search-time 180 s spent"


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
