"""bench/fair.py: the order helper every ratio table in bench/ measures through. Fast, no services."""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import fair  # noqa: E402


def test_every_slot_precedes_every_other_in_some_round():
    """A fixed order lets one slot always follow another; a shuffle per round must not."""
    seen: list[str] = []
    slots = {k: (lambda k=k: seen.append(k)) for k in ("a", "b", "c")}
    fair.rounds(fair.with_aa(slots, "a"), 40, seed=3)
    keys = ["a", "b", "c", "a" + fair.AA]
    # the A/A slot calls the baseline's own callable: "a" is recorded for both
    assert seen.count("a") == 80 and seen.count("b") == 40
    firsts = {seen[i * 4] for i in range(40)}
    assert firsts == {"a", "b", "c"}
    rounds = [seen[i * 4:i * 4 + 4] for i in range(40)]
    for x, y in itertools.permutations(["b", "c"], 2):
        assert any(r.index(x) < r.index(y) for r in rounds), (x, y, keys)


def test_aa_is_unbiased_where_a_fixed_order_is_not():
    """A slot that runs after "b" reads 10 % slower (a cache or thread pool "b" leaves behind). In a
    fixed order a, b, a-again the A/A reads 1.10x; with a shuffled order per round it must read 1.00x."""
    last = [""]

    def slot(name):
        def run():
            t = 1.1 if last[0] == "b" else 1.0
            last[0] = name
            return t
        return run

    slots = {"a": slot("a"), "b": slot("b")}
    fixed = {k: [] for k in ("a", "b", "a" + fair.AA)}
    for _ in range(50):
        for k in fixed:
            fixed[k].append(slots[k.removesuffix(fair.AA)]())
    assert fair.aa(fixed, "a").median > 1.05
    last[0] = ""
    shuffled = fair.rounds(fair.with_aa(slots, "a"), 200, seed=0)
    r = fair.aa(shuffled, "a")
    assert r.median == 1.0 and r.lo <= 1.0 <= r.hi


def test_ratio_median_and_interval():
    r = fair.ratio([2.0, 4.0, 6.0, 8.0], [1.0, 2.0, 3.0, 4.0])
    assert (r.median, r.lo, r.hi, r.n) == (2.0, 2.0, 2.0, 4)
    noisy = fair.ratio([1.0, 1.2, 0.9, 1.1, 1.0, 1.3, 0.8], [1.0] * 7)
    assert noisy.lo <= noisy.median <= noisy.hi and noisy.hi - noisy.lo > 0.05
    assert str(noisy) == f"{noisy.median:.3f}"


def test_timer_warms_up_before_timing():
    calls = []
    ms = fair.timer(lambda: calls.append(1), calls=5, warmup=2, best_of=3)()
    assert len(calls) == 2 + 5 * 3 and ms >= 0
