"""int8 recipe search: the target's recipes, fastest first, until one passes the accuracy gate.

Why: the fastest int8 setting on a CPU (uint8 activations on x86) is not always accurate enough,
and what fixes it differs by model: another activation type, percentile/entropy calibration,
float first/last layers, or the few layers a sensitivity pass finds worst kept in float.
Each attempt is recorded, so the manifest says what was tried and what won.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lepton_edge import ui
from lepton_edge.compress import quantize as q
from lepton_edge.exporters import validation as val


@dataclass
class SearchResult:
    path: Path | None = None
    recipe: str | None = None
    float_nodes: list[str] = field(default_factory=list)
    comparison: Any = None
    predict: Callable | None = None
    ram: int | None = None
    attempts: list[dict] = field(default_factory=list)


def search(exporter, recipes: list[str], prepared: Path, workdir: Path, calib_x: np.ndarray, check_x: np.ndarray,
           validate, per_channel: bool, min_agreement: float, max_drop_pp: float, enforce: bool) -> SearchResult:
    """Try `recipes` in order; `validate(path) -> (Comparison, predict, ram)` checks one candidate.

    The first recipe that passes wins, except that the exporter's first `compare_first` recipes
    are all tried and the best passing one (top-1 agreement, then accuracy) is kept: for TFLite,
    PT2E and the LiteRT quantizer, whichever validates better.
    """
    out = SearchResult()
    passed: list[SearchResult] = []
    compare_first = getattr(exporter, "compare_first", 1)
    done: dict[str, q.QuantResult] = {}
    for i, name in enumerate(recipes):
        recipe = q.Recipe.parse(name)
        candidates: list[list[str]] = [[]]
        if recipe.sensitive:
            base_name = name.replace("-sensitive", "")
            base = done.get(base_name) or exporter.quantize_int8(
                prepared, workdir / f"base-{i}{exporter.suffix}", calib_x, q.Recipe.parse(base_name), per_channel)
            with ui.stage(f"sensitivity pass for {base_name}"):
                ranked = q.sensitivity(prepared, base.path, check_x[:32].astype(np.float32), base.names)
            names = [n for n, _ in ranked]
            # up to half the quantizable layers in float; more would no longer be an int8 model
            candidates = [names[:k] for k in (1, 2, 4, 8, 16) if k <= max(1, len(names) // 2)]
        for j, exclude in enumerate(candidates):
            label = name if not exclude else f"{name} (float: {len(exclude)} layer(s))"
            with ui.stage(f"int8 recipe {label}"):
                res = exporter.quantize_int8(prepared, workdir / f"int8-{i}-{j}{exporter.suffix}", calib_x, recipe,
                                             per_channel, exclude)
                done.setdefault(name, res)
                comp, pred, ram = validate(res.path)
            why = val.gate(comp, min_agreement, max_drop_pp) if enforce else None
            out.attempts.append({
                "recipe": label, "top1_agreement": comp.top1_agreement, "accuracy": comp.accuracy_artifact,
                "accuracy_drop_pp": comp.accuracy_drop_pp, "float_nodes": res.float_nodes,
                "passed": why is None, "why": why or "passed"})
            drop = f", accuracy drop {comp.accuracy_drop_pp:.2f} pp" if comp.accuracy_drop_pp is not None else ""
            ui.info(f"  {'[green]pass[/]' if why is None else '[red]fail[/]'}: agreement "
                    f"{comp.top1_agreement:.4f}{drop}" + (f" ({why})" if why else ""))
            if why is None:
                passed.append(SearchResult(res.path, label, res.float_nodes, comp, pred, ram))
                break
        if passed and i + 1 >= compare_first:
            break
    if passed:
        best = max(passed, key=lambda r: (r.comparison.top1_agreement, r.comparison.accuracy_artifact or 0.0))
        best.attempts = out.attempts
        return best
    return out
