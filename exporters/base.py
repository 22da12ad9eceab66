"""The export path: load -> prune -> convert -> quantize -> validate -> budget -> bundle.

Why one orchestrator over small format modules: every format is validated the same way and no
format may write a bundle that was not validated (Optimum's rule). The bundle is staged in a
temporary directory and moved into place only when every check passed.
"""
from __future__ import annotations

import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from lepton_edge import targets, ui
from lepton_edge.ui import human
from lepton_edge.bundle import Bundle, Manifest, OutputSpec, staging, write_manifest
from lepton_edge.errors import BadInput, CheckFailed

FORMATS: dict[str, type["Exporter"]] = {}


class Exporter:
    """One output format. Subclasses set `format`, `suffix`, `precisions` and the methods below."""

    format: str = ""
    suffix: str = ""
    precisions: tuple[str, ...] = ()
    sources: tuple[str, ...] = ("torch", "onnx")  # model kinds this format converts from
    recipe_examples: tuple[str, ...] = ()  # int8 recipes to use when none of the profile's fit

    def supports_recipe(self, name: str) -> bool:
        """Whether this format can carry out the int8 recipe `name` (see targets.QuantizationSettings)."""
        return True

    def to_fp32(self, source, path: Path, opset: int) -> Path:
        """The reference-equivalent float artifact, written to `path`."""
        raise NotImplementedError

    def convert(self, fp32_path: Path, out_path: Path, precision: str) -> Path:
        """fp32/fp16 artifact from the fp32 one."""
        raise NotImplementedError

    def prepare_int8(self, fp32_path: Path, workdir: Path) -> Path:
        """The graph every int8 recipe starts from."""
        raise NotImplementedError

    def quantize_int8(self, prepared: Path, out_path: Path, calib, recipe, per_channel: bool, exclude=None):
        """One int8 candidate (a compress.quantize.QuantResult)."""
        raise NotImplementedError

    def predictor(self, path: Path, threads: int):
        """A function running the artifact on a batch of float inputs and returning every
        output (a list, in the graph's order) as float, through the device runtime's own backend (lepton_edge.runtime): what is
        validated here is what the device will run, engine settings included. An integer input
        (`--int8-io`) is quantized with the model's own scale and zero point."""
        from lepton_edge.runtime.backend import get_backend
        from lepton_edge.runtime.preprocess import quantize

        try:
            be = get_backend(self.format)(path, max(1, min(threads, os.cpu_count() or 1)))
        except BadInput as e:
            raise CheckFailed(f"the {self.format} runtime cannot load the exported model: {e}") from None
        info = be.inputs[0]
        q = info.quantization if info.dtype in ("int8", "uint8", "int16") else None
        first = info.shape[0] if info.shape else None
        fixed = first if isinstance(first, int) else (None if self.format == "onnx" else 1)

        def once(x: np.ndarray) -> list[np.ndarray]:
            return [np.asarray(o, dtype=np.float32) for o in be.run(np.ascontiguousarray(x))]

        def run(x: np.ndarray) -> list[np.ndarray]:
            if q is not None:
                x = quantize(x, q, info.dtype)
            if fixed is None or fixed == len(x):
                return once(x)
            parts = [once(x[i:i + fixed]) for i in range(0, len(x), fixed)]
            return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]

        return run

    def describe(self, path: Path) -> dict:
        """{'opset', 'inputs': [{name, shape}], 'outputs': [...]} of the artifact."""
        raise NotImplementedError


def register(cls: type[Exporter]) -> type[Exporter]:
    FORMATS[cls.format] = cls
    return cls


def get_exporter(fmt: str, **options) -> Exporter:
    """An exporter for `fmt`; `options` are format-specific (TFLite: int8_io)."""
    if not FORMATS:  # each format module registers itself
        from lepton_edge.exporters import onnx, tflite  # noqa: F401
    if fmt not in FORMATS:
        raise BadInput(f"format '{fmt}' is not available (have: {', '.join(sorted(FORMATS))})")
    return FORMATS[fmt](**options)


SIZE_UNITS = {"": 1, "B": 1, "KB": 1000, "K": 1000, "KIB": 1024, "MB": 1000**2, "M": 1000**2, "MIB": 1024**2,
              "GB": 1000**3, "G": 1000**3, "GIB": 1024**3}


def parse_size(text: str | int | None) -> int | None:
    """'1MB' -> 1_000_000, '512KiB' -> 524288, 1234 -> 1234."""
    if text is None or isinstance(text, int):
        return text
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("ABGIKMB")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1
    if unit not in SIZE_UNITS or value <= 0:
        raise BadInput(f"--max-size must look like 1MB, 800KB or 1048576, got {text!r}")
    return int(value * SIZE_UNITS[unit])


@dataclass
class ExportResult:
    bundle: Bundle
    report: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name):  # behaves like the Bundle it wraps
        return getattr(self.bundle, name)


def _toolchain() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "host": f"{platform.system()} {platform.machine()}"}
    for pkg in ("lepton-edge", "torch", "onnx", "onnxscript", "onnxruntime", "torch-pruning", "litert-torch",
                "ai-edge-litert", "ai-edge-quantizer", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _bundle_name(src, prof, fmt: str, precision: str) -> str:
    """<model>-<target>, with the format/precision appended when they are not the target's default."""
    name = f"{src.name}-{prof.id}"
    if fmt != prof.format:
        return f"{name}-{fmt}-{precision}"
    return name if precision == prof.precision else f"{name}-{precision}"


def _compress_torch(src, data, prune, finetune_epochs, train) -> dict[str, Any]:
    """Structured pruning (and fine-tuning) in place on src.module; returns the manifest entry."""
    import copy

    import torch

    from lepton_edge.compress import prune as pr
    from lepton_edge.exporters import datasets

    if finetune_epochs and not prune:
        raise BadInput("--finetune-epochs applies after --prune; give --prune RATIO")
    if not prune:
        return {}
    with ui.stage(f"prune {prune:.0%} of channels (torch-pruning)"):
        pruned = copy.deepcopy(src.module)
        rep = pr.prune(pruned, torch.zeros([1] + [int(d) for d in src.input_spec.shape[1:]]), prune).as_dict()
    if finetune_epochs:
        tx, ty = datasets.training(src, train)
        with ui.stage(f"fine-tune {finetune_epochs} epoch(s) on {len(tx)} samples"):
            pr.finetune(pruned, tx, ty, finetune_epochs)
        rep.update(finetune_epochs=finetune_epochs, finetune_samples=int(len(tx)))
    if data.eval_x is not None:  # accuracy of the unpruned model: what pruning cost, reported beside
        logits = _torch_predictor(src.module, None)(data.eval_x)[0]
        rep["accuracy_before"] = float((logits.argmax(1) == data.eval_y).mean())
    src.module = pruned
    return rep


def _torch_predictor(module, fixed_batch: int | None, batch: int = 64):
    import torch

    def run(x: np.ndarray) -> list[np.ndarray]:
        step = fixed_batch or batch
        with torch.no_grad():
            parts = [[o.numpy() for o in (out if isinstance(out, (tuple, list)) else [out])]
                     for out in (module(torch.from_numpy(np.ascontiguousarray(x[i:i + step], dtype=np.float32)))
                                 for i in range(0, len(x), step))]
        return [np.concatenate([p[k] for p in parts]).astype(np.float32) for k in range(len(parts[0]))]

    return run


def _check_conversion(src, fp32_pred, x: np.ndarray, n: int = 8) -> dict[str, Any]:
    """The fp32 graph must compute what the PyTorch model computes (float rounding aside).

    Why this split: PyTorch on the CPU is slow on depthwise convolutions (30 ms a 224x224 image
    here), so the PyTorch model is run on a few inputs to prove the fp32 graph equal to it, and
    every candidate is then compared with that graph on all the inputs. The chain is
    PyTorch == fp32 graph (to ~1e-5) -> candidate (agreement, accuracy).
    """
    from lepton_edge.exporters import validation as val

    with ui.stage(f"check the fp32 graph against PyTorch on {min(n, len(x))} inputs"):
        ref = _torch_predictor(src.module, src.batch)(x[:n])
        got = val.batched(fp32_pred, x[:n], 64)
    if len(ref) != len(got):
        raise CheckFailed(f"the exported fp32 graph has {len(got)} output(s), the PyTorch model {len(ref)}")
    worst, agree = 0.0, 1.0
    for k, (r, g) in enumerate(zip(ref, got)):  # every output, not the first alone
        if r.shape != g.shape:
            raise CheckFailed(f"the exported fp32 graph's output {k} has shape {list(g.shape)}, the PyTorch "
                              f"model's {list(r.shape)}: an op converted wrongly")
        diff = float(np.abs(r.astype(np.float64) - g).max()) if r.size else 0.0
        scale = float(np.abs(r).max()) if r.size else 1.0
        if k == 0 and r.ndim == 2 and r.shape[1] > 1:
            agree = float((r.argmax(1) == g.argmax(1)).mean())
        if diff > 1e-3 * (scale or 1.0) + 1e-4:  # (top-1 is not required: near-tied logits may swap by rounding)
            raise CheckFailed(f"the exported fp32 graph differs from the PyTorch model on output {k} (max abs diff "
                              f"{diff:.3g}): an op converted wrongly")
        worst = max(worst, diff)
    return {"samples": len(ref[0]), "max_abs_diff": worst, "top1_agreement": agree}


def export(
    model: Any,
    target: str = "x86-cpu",
    *,
    out: str | Path = "out",
    name: str | None = None,
    format: str | None = None,
    precision: str | None = None,
    example_input: Any = None,
    input_shape: list[int] | None = None,
    weights: str | None = None,
    labels: list[str] | None = None,
    calib: str | Path | None = None,
    calib_samples: int | None = None,
    eval: str | Path | None = None,
    eval_limit: int | None = None,
    train: str | Path | None = None,
    prune: float | None = None,
    finetune_epochs: int = 0,
    max_size: str | int | None = None,
    min_agreement: float | None = None,
    max_accuracy_drop: float = 0.5,
    task: str | None = None,
    min_confident_kept: float = 0.99,
    min_top5: float = 0.98,
    min_sqnr: float = 12.0,
    min_cosine: float = 0.97,
    min_f1: float = 0.9,
    recipes: list[str] | None = None,
    search_time: float = 180.0,
    max_memory: str | int | None = None,
    layout: str | None = None,
    int8_io: bool = False,
    allow_synthetic_calibration: bool = False,
    holdout: int = 64,
    measure_latency: bool = True,
    color: str | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> ExportResult:
    """Export `model` for `target` into `out/<name>-<target>/` and return the validated bundle.

    `model` is a torch.nn.Module (give `example_input`), a path to .pt/.pt2/.onnx, or 'zoo:<name>'.
    `task` (classify, detect, segment, embed, raw; inferred from the outputs when not given) picks
    the validation metrics; the `min_*`/`max_*` arguments are their thresholds (validation.Thresholds).
    Raises BadInput for unusable input and CheckFailed when validation or a budget fails;
    in both cases nothing is written.
    """
    from lepton_edge import model_source
    from lepton_edge.exporters import datasets, recipes as search
    from lepton_edge.exporters import validation as val

    t_start = time.perf_counter()
    _check_arguments(out=out, prune=prune, finetune_epochs=finetune_epochs, min_agreement=min_agreement,
                     max_accuracy_drop=max_accuracy_drop, calib_samples=calib_samples, eval_limit=eval_limit,
                     holdout=holdout, labels=labels, recipes=recipes)
    thresholds = _thresholds(task, min_agreement=min_agreement, max_accuracy_drop=max_accuracy_drop,
                             min_confident_kept=min_confident_kept, min_top5=min_top5, min_sqnr=min_sqnr,
                             min_cosine=min_cosine, min_f1=min_f1)
    prof = targets.load(target)
    fmt = format or prof.format
    if format is None and fmt == "tflite" and str(model).lower().endswith(".onnx"):
        fmt = "onnx"  # an ONNX graph is not converted to TFLite here: keep it ONNX (onnxruntime runs on ARM too)
        ui.info(f"[dim]{prof.id} prefers TFLite; an ONNX input is exported as ONNX (--format onnx)[/]")
    precision = precision or prof.precision
    if int8_io and fmt != "tflite":
        raise BadInput("--int8-io applies to TFLite int8 (ONNX QDQ models keep float input and output)")
    exporter = get_exporter(fmt, **({"int8_io": True} if int8_io else {}))
    if precision not in exporter.precisions:
        raise BadInput(f"{fmt} export supports {', '.join(exporter.precisions)}, not {precision}")
    budget = min(b for b in (prof.max_model_bytes, parse_size(max_size)) if b)
    search_time, memory_budget = search.check_search_time(search_time), search.parse_memory(max_memory)
    if recipes:
        try:
            targets.QuantizationSettings(recipes=recipes)  # validates the names
        except ValueError as e:
            raise BadInput(f"--recipes: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None

    with ui.stage("load model"):
        src = model_source.load(model, profile_hw=tuple(prof.input_size), input_shape=input_shape,
                                example_input=example_input, weights=weights, labels=labels, name=name,
                                color=color, mean=mean, std=std)
    if src.kind not in exporter.sources:
        raise BadInput(f"{fmt} export converts PyTorch models (zoo:, .pt, .pt2, nn.Module); "
                       f"for an {src.kind.upper()} file use --format onnx")
    from lepton_edge.exporters import layout as lay

    lay.apply(src, layout or prof.layout, explicit=layout is not None)
    if task in ("classify", "detect", "embed"):
        src.task = task  # what the device's post-processing does (a segment map stays raw there)
    recipes = _recipes_for(exporter, recipes, prof)
    if not src.trained:
        ui.info(f"[yellow]![/] {src.name} has random weights (no --weights): the accuracy gate is not applied")
    data = datasets.gather(src, precision=precision, calib=calib,
                           samples=calib_samples or prof.quantization.calibration_samples, eval_set=eval,
                           eval_limit=eval_limit, holdout=holdout, allow_synthetic=allow_synthetic_calibration)
    compression: dict[str, Any] = {"calibration": data.calib_info} if data.calib_info else {}
    if src.kind == "torch":
        if pruning := _compress_torch(src, data, prune, finetune_epochs, train):
            compression["pruning"] = pruning
        compression["params"] = sum(p.numel() for p in src.module.parameters())
    elif prune or finetune_epochs:
        raise BadInput("--prune needs a PyTorch model (zoo:, .pt, .pt2 or nn.Module); ONNX graphs cannot be pruned")

    with tempfile.TemporaryDirectory(prefix="lepton-export-") as tmpd:
        tmp = Path(tmpd)
        with ui.stage(f"export fp32 {fmt}"):
            fp32 = exporter.to_fp32(src, tmp / f"fp32{exporter.suffix}", prof.max_opset)
            described = exporter.describe(fp32)
        if (described.get("opset") or 0) > prof.max_opset:
            raise CheckFailed(f"the graph needs opset {described['opset']} but {prof.id} allows at most "
                              f"{prof.max_opset}")
        fp32_pred = exporter.predictor(fp32, prof.threads)
        conversion = _check_conversion(src, fp32_pred, data.check_x) if src.kind == "torch" else None
        validate = val.Validator(exporter, prof.threads, fp32_pred, fp32, data, thresholds=thresholds,
                                 task=task or (src.task if src.task != "raw" else None), input_spec=src.input_spec,
                                 labels=src.labels, enforce=src.trained)
        ui.info(f"[dim]validating as task '{validate.task}'"
                f"{' (inferred from the outputs)' if validate.task_inferred else ''}[/]")
        chosen = tmp / f"model{exporter.suffix}"
        if precision != "int8":
            with ui.stage(f"convert to {precision} and validate"):
                exporter.convert(fp32, chosen, precision)
                comp, pred, ram = validate(chosen)
            if not comp.passed:
                raise CheckFailed(f"{precision} artifact fails validation ({comp.task}): {comp.why}")
        else:
            found = search.search(exporter, recipes, exporter.prepare_int8(fp32, tmp),
                                  tmp, data.calib_x, data.check_x, validate, prof.quantization.per_channel,
                                  min_agreement, max_accuracy_drop, enforce=src.trained,
                                  search_time=search_time, max_memory=memory_budget)
            if found.path is None and found.failure:
                raise CheckFailed(found.failure)
            if found.path is None:
                best = max((a for a in found.attempts if not a.get("skipped")),
                           key=lambda a: tuple(a.get("score") or ()) or (a.get("top1_agreement"),))
                raise CheckFailed(
                    f"int8 failed the accuracy gate with all {len(found.attempts)} recipes (task {validate.task}; best: "
                    f"{best['recipe']}, {best['why']}); try --precision fp16, more or better --calib data, or relax "
                    f"{val.RELAX_FLAGS[validate.task]}")
            found.path.rename(chosen)
            comp, pred, ram = found.comparison, found.predict, found.ram
            compression["quantization"] = {
                "method": found.method, "recipe": found.recipe, "float_nodes": found.float_nodes,
                "attempts": found.attempts, "search_seconds": round(found.seconds, 2),
                "peak_rss_bytes": found.peak_rss_bytes, "max_memory_bytes": found.max_memory_bytes}
        size, fp32_size = chosen.stat().st_size, fp32.stat().st_size
        compression.update({"fp32_bytes": fp32_size, "bytes": size, "size_vs_fp32": size / fp32_size})
        latency = _latency(pred, fp32_pred, data.check_x[:1], prof) if measure_latency else {}
        if "quantization" in compression:
            compression["quantization"]["speed_vs_fp32"] = latency.get("vs_fp32")
        budgets = _check_budgets(size, budget, ram, latency, prof, precision, prune, src, max_size)
        validation = comp.as_dict()
        validation.update({"min_agreement": min_agreement, "max_accuracy_drop_pp": max_accuracy_drop,
                           "task_inferred": validate.task_inferred, "inputs": data.inputs_record(),
                           "eval_source": data.eval_src, "agreement_inputs": data.check_kind,
                           "reference": "pytorch, through the fp32 graph" if conversion else "onnx fp32",
                           "conversion": conversion,
                           "trained_weights": src.trained, "budgets": budgets, "passed": True})
        final = Path(out) / _bundle_name(src, prof, fmt, precision)
        with ui.stage(f"write bundle {final}"):
            _write_bundle(final, chosen, exporter, src, prof, fmt, precision, compression, validation, latency)
    report = {"name": src.name, "target": prof.id, "format": fmt, "precision": precision, "bundle": str(final),
              "bytes": size, "fp32_bytes": fp32_size, "validation": validation, "latency": latency,
              "compression": compression, "seconds": time.perf_counter() - t_start,
              "peak_rss_bytes": _peak_rss()}
    return ExportResult(Bundle.load(final), report)


def _peak_rss() -> int | None:
    """This process's peak resident memory so far (the export's, when the CLI ran it)."""
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
    except Exception:
        return None


def _check_arguments(*, out, prune, finetune_epochs, min_agreement, max_accuracy_drop, calib_samples, eval_limit,
                     holdout, labels, recipes) -> None:
    """The Python API's arguments, before any work: one BadInput naming the argument, not a
    TypeError a minute into the export. The output directory must be writable now, not at the end."""
    import math

    from lepton_edge.paths import check_output_dir

    def number(name, v, lo, hi, lo_open=False):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or v < lo or v > hi or (lo_open and v == lo):
            raise BadInput(f"{name} must be a number {'>' if lo_open else '>='} {lo} and <= {hi}, got {v!r}")

    def whole(name, v, lo, optional=True):
        if v is None and optional:
            return
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise BadInput(f"{name} must be a whole number >= {lo}, got {v!r}")

    check_output_dir(out, "out")
    if prune is not None:
        number("prune", prune, 0.0, 0.99)
    whole("finetune_epochs", finetune_epochs, 0, optional=False)
    if min_agreement is not None:
        number("min_agreement", min_agreement, 0.0, 1.0)
    number("max_accuracy_drop", max_accuracy_drop, 0.0, 100.0)
    whole("calib_samples", calib_samples, 1)
    whole("eval_limit", eval_limit, 1)
    whole("holdout", holdout, 1, optional=False)
    for name, v in (("labels", labels), ("recipes", recipes)):
        if v is not None and (not isinstance(v, list) or not all(isinstance(x, str) for x in v)):
            raise BadInput(f"{name} must be a list of strings, got {str(v)[:60]!r}")


def _thresholds(task, **values):
    """validation.Thresholds from export()'s arguments, each checked (one BadInput naming it)."""
    import math

    from lepton_edge.exporters import validation as val

    if task is not None and task not in val.TASKS:
        raise BadInput(f"task must be one of {', '.join(val.TASKS)}, got {task!r}")
    limits = {"max_accuracy_drop": 100.0, "min_sqnr": 200.0}
    for name, v in values.items():
        if v is None and name == "min_agreement":  # the default: judged against the fp32 ceiling
            continue
        lo = -200.0 if name == "min_sqnr" else 0.0
        hi = limits.get(name, 1.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
            raise BadInput(f"{name} must be a number >= {lo:g} and <= {hi:g}, got {v!r}")
    return val.Thresholds(**{k: None if v is None else float(v) for k, v in values.items()})


def _recipes_for(exporter, asked: list[str] | None, prof) -> list[str]:
    """The int8 recipes to try: the user's, else the profile's, limited to what the format can do."""
    wanted = asked or prof.quantization.recipes
    usable = [r for r in wanted if exporter.supports_recipe(r)]
    if asked and not usable:
        raise BadInput(f"--recipes: {exporter.format} int8 supports {', '.join(exporter.recipe_examples)}")
    return usable or list(exporter.recipe_examples)


def _latency(pred, fp32_pred, x1: np.ndarray, prof) -> dict[str, Any]:
    """Batch-1 latency of the artifact and of fp32 on this host, with the profile's threads."""
    from lepton_edge.exporters import validation as val

    lat, base = val.latency_ms(pred, x1), val.latency_ms(fp32_pred, x1)
    return {"host": _toolchain()["host"], "threads": min(prof.threads, os.cpu_count() or 1), "batch": 1,
            "p50_ms": lat["p50_ms"], "p90_ms": lat["p90_ms"], "fp32_p50_ms": base["p50_ms"],
            "vs_fp32": lat["p50_ms"] / base["p50_ms"]}


def _check_budgets(size, budget, ram, latency, prof, precision, prune, src, max_size) -> dict[str, Any]:
    if size > budget:
        raise CheckFailed(_size_advice(size, budget, precision, prune, prof, src, max_size))
    if ram is not None and ram > prof.ram_budget_bytes:
        raise CheckFailed(f"running the model took {human(ram)} of memory, over {prof.id}'s "
                          f"{human(prof.ram_budget_bytes)} RAM budget; try --prune, int8 or a smaller input")
    # Latency on this host says something about the target only when they are the same kind of CPU.
    same_cpu = prof.arch == platform.machine() and prof.execution_providers == ["CPUExecutionProvider"]
    if latency and same_cpu and latency["p50_ms"] > prof.latency_budget_ms:
        raise CheckFailed(f"p50 latency {latency['p50_ms']:.1f} ms on this host is over {prof.id}'s "
                          f"{prof.latency_budget_ms:g} ms budget; try --prune, int8 or a smaller input")
    return {"max_model_bytes": budget, "model_bytes": size, "ram_budget_bytes": prof.ram_budget_bytes,
            "ram_bytes_measured": ram, "latency_budget_ms": prof.latency_budget_ms,
            "latency_checked_on_host": bool(latency and same_cpu)}


def _write_bundle(final: Path, chosen: Path, exporter, src, prof, fmt, precision, compression, validation,
                  latency) -> None:
    """Stage the bundle in a temporary directory and move it into place (see bundle.staging)."""
    described = exporter.describe(chosen)
    with staging(final) as stage_dir:
        model_file = f"model{exporter.suffix}"
        (stage_dir / model_file).write_bytes(chosen.read_bytes())
        labels_file = None
        if src.labels:
            labels_file = "labels.txt"
            (stage_dir / labels_file).write_text("\n".join(src.labels) + "\n")
        in_spec = src.input_spec.model_copy()
        if described.get("inputs"):
            d = described["inputs"][0]
            if all(isinstance(v, int) for v in d["shape"]):  # else keep the concrete shape validated with
                in_spec.shape = d["shape"]
            if d.get("quantization"):  # integer input: the device quantizes frames with these
                in_spec.dtype, in_spec.quantization = d["dtype"], d["quantization"]
        manifest = Manifest(
            name=src.name, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            target={"id": prof.id, "sha256": prof.content_hash(), "arch": prof.arch, "runtime": prof.runtime,
                    "execution_providers": prof.execution_providers, "delegates": prof.delegates, "threads": prof.threads,
                    "latency_budget_ms": prof.latency_budget_ms, "device_packages": prof.device_packages},
            format=fmt, precision=precision, model_file=model_file, task=src.task, labels_file=labels_file,
            inputs=[in_spec],
            outputs=[OutputSpec(name=o["name"], shape=o["shape"], dtype=o.get("dtype", "float32"),
                                quantization=o.get("quantization")) for o in described.get("outputs", [])],
            compression=compression, validation=validation, latency=latency, toolchain=_toolchain(),
            opset=described.get("opset"),
        )
        write_manifest(stage_dir, manifest)


def _size_advice(size, budget, precision, prune, prof, src, max_size) -> str:
    tips = []
    if precision != "int8":
        tips.append("--precision int8 (about 4x smaller than fp32)")
    tips.append(f"--prune {min(0.9, (prune or 0) + 0.3):.1f}" if src.kind == "torch" else "prune the model before export")
    h, w = src.input_spec.hw()
    if h > 64:
        tips.append(f"a smaller input (--input-shape 1,{src.input_spec.channels},{h * 3 // 4},{w * 3 // 4})")
    limit = f"--max-size {max_size}" if max_size and parse_size(max_size) == budget else f"{prof.id} max_model_bytes"
    return f"model is {human(size)}, over the {human(budget)} budget ({limit}); try {', '.join(tips)}"


