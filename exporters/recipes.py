"""int8 recipe search: the target's candidates within a time budget, the best that passes kept.

Why a search and why the best, not the first: what fixes int8 differs by model (NNCF's PTQ with
bias correction, another activation type, percentile/entropy calibration, float first/last
layers, the few layers a sensitivity pass finds worst kept in float), and the first candidate
that scrapes past the gate is often not the one that keeps the task's metric best. So every
candidate the budget allows is quantized, checked (a graph that does not load or run is skipped
with its reason, never the export's end) and validated; the passing ones are ranked by the
validator's score (the task metric), then size, then latency. Sensitivity candidates (layers kept
in float: larger, slower) are fallbacks, tried only when no plain candidate passed. Each attempt
is recorded with its metrics or why it was skipped, so the manifest says what was tried and why
the winner won.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lepton_edge import ui
from lepton_edge.compress import calibration as cal
from lepton_edge.compress import quantize as q
from lepton_edge.errors import CheckFailed
from lepton_edge.exporters import validation as val

DEFAULT_SEARCH_TIME_S = 180.0
# Stop starting candidates once this many in a row did not beat the best passing one: the budget
# bounds a hard model's search, this bounds an easy one's (a CI export of a small model tries
# three candidates, not eight).
PATIENCE = 2


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


def _quantize(exporter, prepared, out, calib_x, recipe, per_channel, exclude, check):
    """exporter.quantize_int8, passing the memory check where the exporter takes one."""
    params = inspect.signature(exporter.quantize_int8).parameters
    kw = {"check": check} if "check" in params else {}
    return exporter.quantize_int8(prepared, out, calib_x, recipe, per_channel, exclude, **kw)


def _method(exporter, recipe: q.Recipe) -> str:
    fn = getattr(exporter, "int8_method", None)
    return fn(recipe) if fn else recipe.method()


def search(exporter, recipes: list[str], prepared: Path, workdir: Path, calib_x: np.ndarray, check_x: np.ndarray,
           validate, per_channel: bool, min_agreement: float, max_drop_pp: float, enforce: bool, *,
           search_time: float = DEFAULT_SEARCH_TIME_S, max_memory: int | None = None,
           patience: int = PATIENCE) -> SearchResult:
    """Try `recipes` within `search_time` seconds; `validate(path) -> (verdict, predict, ram)`.

    Returns the best passing candidate; when none passes, a result with `path` None, the
    attempts, and `failure` (one line: why every candidate was skipped, and what to try) when
    none could even be validated.
    `max_memory` bounds this process's RSS while a candidate calibrates (None: the machine's
    available memory less a margin); a candidate over it is stopped and skipped.
    """
    t0 = time.perf_counter()
    limit = max_memory if max_memory is not None else cal.default_memory_budget()
    out = SearchResult(max_memory_bytes=limit)
    passed: list[SearchResult] = []
    done: dict[str, q.QuantResult] = {}
    plain = [r for r in recipes if not q.Recipe.parse(r).sensitive]
    fallback = [r for r in recipes if q.Recipe.parse(r).sensitive]
    order = [(r, False) for r in plain] + [(r, True) for r in fallback]
    x1 = check_x[:1]
    since_best = 0  # candidates tried since the best passing one

    def record(label: str, **fields) -> dict:
        entry = {"recipe": label, **fields}
        out.attempts.append(entry)
        return entry

    for i, (name, is_fallback) in enumerate(order):
        elapsed = time.perf_counter() - t0
        if is_fallback and passed:
            record(name, passed=False, skipped=True, why="not needed: a candidate without float layers passed")
            continue
        if out.attempts and elapsed > search_time:
            record(name, passed=False, skipped=True, why=f"--search-time {search_time:g} s spent")
            continue
        if passed and since_best >= patience:
            record(name, passed=False, skipped=True, why=f"not tried: {patience} candidates in a row did not beat "
                                                         f"{max(passed, key=lambda r: r.rank_key).recipe}")
            continue
        recipe = q.Recipe.parse(name)
        with cal.MemoryWatch(limit, what=f"int8 recipe {name}") as watch:
            try:
                candidates: list[list[str]] = [[]]
                if recipe.sensitive:
                    base = done.get(recipe.base) or _quantize(
                        exporter, prepared, workdir / f"base-{i}{exporter.suffix}", calib_x,
                        q.Recipe.parse(recipe.base), per_channel, None, watch.check)
                    with ui.stage(f"sensitivity pass for {recipe.base}"):
                        ranked = q.sensitivity(prepared, base.path, check_x[:32].astype(np.float32), base.names)
                    names = [n for n, _ in ranked]
                    # up to half the quantizable layers in float; more would no longer be an int8 model
                    candidates = [names[:k] for k in (1, 2, 4, 8, 16) if k <= max(1, len(names) // 2)]
            except (cal.MemoryExceeded, q.BrokenGraph, CheckFailed, ValueError, RuntimeError) as e:
                _skip(record, name, e, watch)
                continue
            for j, exclude in enumerate(candidates):
                label = name if not exclude else f"{name} (float: {len(exclude)} layer(s))"
                if j and time.perf_counter() - t0 > search_time:
                    record(label, passed=False, skipped=True, why=f"--search-time {search_time:g} s spent")
                    break
                t1 = time.perf_counter()
                try:
                    with ui.stage(f"int8 recipe {label}"):
                        res = _quantize(exporter, prepared, workdir / f"int8-{i}-{j}{exporter.suffix}", calib_x,
                                        recipe, per_channel, exclude, watch.check)
                        done.setdefault(name, res)
                        result, pred, ram = validate(res.path)
                        watch.check()
                except Exception as e:  # noqa: BLE001 - any quantizer failure skips this candidate only
                    if isinstance(e, KeyboardInterrupt):
                        raise
                    _skip(record, label, e, watch)
                    continue
                ok, why, score, metrics = _judge(result, min_agreement, max_drop_pp, enforce)
                size = res.path.stat().st_size
                lat = val.latency_ms(pred, x1, runs=10, warmup=1, budget_s=0.3)["p50_ms"] if ok else None
                entry = record(label, passed=ok, skipped=False, why=why or "passed", metrics=metrics,
                               score=list(score), bytes=size, p50_ms=lat, float_nodes=res.float_nodes,
                               seconds=round(time.perf_counter() - t1, 2), peak_rss_bytes=watch.peak)
                # the fields the manifest showed before, kept for readers of old reports
                for k in ("top1_agreement", "accuracy_drop_pp"):
                    if k in metrics:
                        entry[k] = metrics[k]
                entry["accuracy"] = metrics.get("accuracy_artifact")
                _say(ok, why, metrics)
                if ok:
                    cand = SearchResult(res.path, label, _method(exporter, recipe), res.float_nodes, result,
                                        pred, ram, rank_key=(score, -size, -(lat or 0.0)))
                    since_best = 0 if not passed or cand.rank_key > max(r.rank_key for r in passed) else since_best + 1
                    passed.append(cand)
                    break
                if passed:
                    since_best += 1
        out.peak_rss_bytes = max(out.peak_rss_bytes, watch.peak)
    out.seconds = time.perf_counter() - t0
    if passed:
        best = max(passed, key=lambda r: r.rank_key)
        best.attempts, best.peak_rss_bytes, best.max_memory_bytes, best.seconds = (
            out.attempts, out.peak_rss_bytes, out.max_memory_bytes, out.seconds)
        for a in out.attempts:
            a["chosen"] = a["recipe"] == best.recipe
        return best
    if not any(not a.get("skipped") for a in out.attempts):
        out.failure = _failure(out.attempts)
    return out


def _skip(record, label: str, e: Exception, watch) -> None:
    why = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    if not isinstance(e, (cal.MemoryExceeded, q.BrokenGraph)):
        why = f"the quantizer failed: {why}"
    record(label, passed=False, skipped=True, why=why, peak_rss_bytes=watch.peak)
    ui.info(f"  [yellow]skipped[/]: {why}")


def _say(ok: bool, why: str | None, metrics: dict) -> None:
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                      if k in ("top1_agreement", "confident_top1_kept", "top1_in_top5", "sqnr_db", "cosine",
                               "mask_iou", "f1_vs_fp32", "accuracy_drop_pp") and isinstance(v, (int, float)))
    ui.info(f"  {'[green]pass[/]' if ok else '[red]fail[/]'}: {shown}" + (f" ({why})" if why else ""))


def parse_memory(value: str | int | None) -> int | None:
    """--max-memory: '4GB', '512MiB' or bytes; None keeps the default (available memory less a margin)."""
    from lepton_edge.errors import BadInput
    from lepton_edge.exporters.base import parse_size

    try:
        n = parse_size(value)
    except BadInput:
        raise BadInput(f"--max-memory must look like 4GB, 512MiB or 1073741824, got {value!r}") from None
    if n is not None and (isinstance(n, bool) or n < (64 << 20)):
        raise BadInput(f"--max-memory must be at least 64MiB, got {value!r}")
    return n


def check_search_time(value) -> float:
    """--search-time: seconds, > 0 and at most a day."""
    import math

    from lepton_edge.errors import BadInput

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 < value <= 86400:
        raise BadInput(f"--search-time must be a number of seconds > 0 and <= 86400, got {value!r}")
    return float(value)


def _failure(attempts: list[dict]) -> str:
    """One line: the best candidate's result, or why every one was skipped, and what to try."""
    tried = [a for a in attempts if not a.get("skipped")]
    if tried:
        best = max(tried, key=lambda a: tuple(a.get("score") or ()))
        return (f"int8 failed the accuracy gate with all {len(tried)} recipes (best: {best['recipe']}, {best['why']}); "
                "try --precision fp16, more or better --calib data, or relax the validation thresholds")
    skipped = [a for a in attempts if a.get("skipped") and "--search-time" not in a["why"]]
    if skipped and all("--max-memory" in a["why"] for a in skipped):
        return (f"int8 export stopped: no candidate fits the memory budget ({skipped[0]['why']}); "
                "try fewer --calib-samples, a smaller input, or a larger --max-memory")
    first = skipped[0] if skipped else {"recipe": "?", "why": "nothing was tried"}
    return (f"int8 failed: every recipe was skipped (first: {first['recipe']}: {first['why']}); "
            "try --precision fp16 or other --recipes")
