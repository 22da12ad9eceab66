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
from lepton_edge.bundle import Bundle, Manifest, OutputSpec, staging, write_manifest
from lepton_edge.errors import BadInput, CheckFailed

FORMATS: dict[str, type["Exporter"]] = {}


class Exporter:
    """One output format. Subclasses set `format`, `suffix`, `precisions` and the methods below."""

    format: str = ""
    suffix: str = ""
    precisions: tuple[str, ...] = ()

    def to_fp32(self, source, path: Path, opset: int) -> Path: ...
    def convert(self, fp32_path: Path, out_path: Path, precision: str) -> Path: ...
    def predictor(self, path: Path, threads: int): ...
    def describe(self, path: Path) -> dict: ...


def register(cls: type[Exporter]) -> type[Exporter]:
    FORMATS[cls.format] = cls
    return cls


def get_exporter(fmt: str) -> Exporter:
    if not FORMATS:
        from lepton_edge.exporters import onnx  # noqa: F401  (registers itself)
    if fmt not in FORMATS:
        raise BadInput(f"format '{fmt}' is not available (have: {', '.join(sorted(FORMATS))})")
    return FORMATS[fmt]()


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


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


@dataclass
class ExportResult:
    bundle: Bundle
    report: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name):  # behaves like the Bundle it wraps
        return getattr(self.bundle, name)


def _toolchain() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "host": f"{platform.system()} {platform.machine()}"}
    for pkg in ("lepton-edge", "torch", "onnx", "onnxscript", "onnxruntime", "torch-pruning", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _calibration(src, prof, precision, calib, samples, holdout, allow_synthetic, seed=0):
    """(calibration inputs, held-out inputs or None, description) for int8."""
    from lepton_edge.compress import calibration as cal

    spec = src.input_spec
    if calib is not None:
        s = cal.load_inputs(str(calib), spec, limit=samples + holdout)
        if s.kind == "synthetic":
            raise BadInput("synthetic calibration")
        x = s.x
        if len(x) >= samples + 16:  # enough left over: check agreement on inputs calibration never saw
            return x[:samples], x[samples:], {"source": s.source, "kind": s.kind, "samples": samples}
        return x, None, {"source": s.source, "kind": s.kind, "samples": len(x)}
    data = src.zoo.data("train") if src.zoo is not None and src.zoo.dataset else None
    if data is not None:
        from lepton_edge.runtime.preprocess import preprocess_batch

        rng = np.random.default_rng(seed)
        idx = rng.choice(len(data[0]), size=samples, replace=False)
        x = preprocess_batch(list(data[0][idx]), spec)
        return x, None, {"source": f"zoo:{src.zoo.name} train split", "kind": "zoo", "samples": samples}
    if precision == "int8" and not allow_synthetic:
        raise BadInput(
            "int8 needs calibration data: pass --calib with an image folder, a .npy/.npz or a video "
            "(or --precision fp16/fp32; --allow-synthetic-calibration forces random data, which ruins accuracy)"
        )
    s = cal.synthetic(spec, samples + holdout, seed)
    return s.x[:samples], s.x[samples:], {"source": "synthetic", "kind": "synthetic", "samples": samples}


def _evaluation(src, eval_set, eval_limit):
    from lepton_edge.compress import calibration as cal

    if eval_set is not None:
        s = cal.load_labelled(str(eval_set), src.input_spec, src.labels, eval_limit)
        return s.x, s.y, s.source
    if src.zoo is not None and src.zoo.dataset:
        from lepton_edge.runtime.preprocess import preprocess_batch

        x, y = src.zoo.data("test")
        if eval_limit:
            x, y = x[:eval_limit], y[:eval_limit]
        return preprocess_batch(list(x), src.input_spec), y, f"zoo:{src.zoo.name} test split"
    return None, None, None


def _train_data(src, train, limit=None):
    from lepton_edge.compress import calibration as cal

    if train is not None:
        s = cal.load_labelled(str(train), src.input_spec, src.labels, limit)
        return s.x, s.y
    if src.zoo is not None and src.zoo.dataset:
        from lepton_edge.runtime.preprocess import normalise

        x, y = src.zoo.data("train")
        return normalise(x[..., None], src.input_spec), y
    raise BadInput("--finetune-epochs needs labelled training data: pass --train DIR (class folders) or .npz")


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
    min_agreement: float = 0.99,
    max_accuracy_drop: float = 0.5,
    recipes: list[str] | None = None,
    allow_synthetic_calibration: bool = False,
    holdout: int = 200,
    measure_latency: bool = True,
    color: str | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> ExportResult:
    """Export `model` for `target` into `out/<name>-<target>/` and return the validated bundle.

    `model` is a torch.nn.Module (give `example_input`), a path to .pt/.pt2/.onnx, or 'zoo:<name>'.
    Raises BadInput for unusable input and CheckFailed when validation or a budget fails;
    in both cases nothing is written.
    """
    from lepton_edge import model_source
    from lepton_edge.compress import quantize as q
    from lepton_edge.exporters import validation as val

    t_start = time.perf_counter()
    prof = targets.load(target)
    fmt = format or prof.format
    precision = precision or prof.precision
    exporter = get_exporter(fmt)
    if precision not in exporter.precisions:
        raise BadInput(f"{fmt} export supports {', '.join(exporter.precisions)}, not {precision}")
    budget = min(b for b in (prof.max_model_bytes, parse_size(max_size)) if b)
    if recipes:
        try:
            targets.QuantizationSettings(recipes=recipes)  # validates the names
        except ValueError as e:
            raise BadInput(f"--recipes: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    recipes = recipes or prof.quantization.recipes
    samples = calib_samples or prof.quantization.calibration_samples

    with ui.stage("load model"):
        src = model_source.load(model, profile_hw=tuple(prof.input_size), input_shape=input_shape,
                                example_input=example_input, weights=weights, labels=labels, name=name,
                                color=color, mean=mean, std=std)
    if not src.trained:
        ui.info(f"[yellow]![/] {src.name} has random weights (no --weights): agreement figures are not meaningful")
    bundle_name = f"{src.name}-{prof.id}" + ("" if precision == prof.precision and fmt == prof.format
                                              else f"-{fmt}-{precision}" if fmt != prof.format else f"-{precision}")
    report: dict[str, Any] = {"name": src.name, "target": prof.id, "format": fmt, "precision": precision}
    compression: dict[str, Any] = {}

    eval_x, eval_y, eval_src = (None, None, None)
    if eval is not None or src.zoo is not None:
        with ui.stage("load evaluation set"):
            eval_x, eval_y, eval_src = _evaluation(src, eval, eval_limit)
    calib_x = held = None
    calib_info: dict[str, Any] = {}
    if precision == "int8":
        with ui.stage("load calibration data"):
            calib_x, held, calib_info = _calibration(src, prof, precision, calib, samples, holdout,
                                                      allow_synthetic_calibration)
        compression["calibration"] = calib_info
    elif calib is not None:
        ui.info(f"[dim]--calib ignored: {precision} needs no calibration[/]")

    # Inputs the agreement check runs on, best first: the evaluation set, inputs held out from
    # calibration, the calibration inputs themselves, random inputs (fp32/fp16 without any data).
    if eval_x is not None:
        check_x, check_kind = eval_x, "evaluation set"
    elif held is not None:
        check_x, check_kind = held, "held-out calibration data"
    elif calib_x is not None:
        check_x, check_kind = calib_x, "calibration data (too few inputs to hold some out)"
    else:
        from lepton_edge.compress import calibration as cal

        check_x, check_kind = cal.synthetic(src.input_spec, 64, seed=1).x, "synthetic"
    if src.kind == "torch":
        import torch

        if prune:
            import copy

            from lepton_edge.compress import prune as pr

            with ui.stage(f"prune {prune:.0%} of channels (torch-pruning)"):
                pruned = copy.deepcopy(src.module)
                ex = torch.zeros([1] + [int(d) for d in src.input_spec.shape[1:]])
                rep = pr.prune(pruned, ex, prune)
            compression["pruning"] = rep.as_dict()
            if finetune_epochs:
                tx, ty = _train_data(src, train)
                with ui.stage(f"fine-tune {finetune_epochs} epoch(s) on {len(tx)} samples"):
                    pr.finetune(pruned, tx, ty, finetune_epochs, progress=not ui._quiet)
                compression["pruning"]["finetune_epochs"] = finetune_epochs
                compression["pruning"]["finetune_samples"] = int(len(tx))
            if eval_x is not None:  # accuracy of the unpruned model: what pruning cost, reported beside
                with torch.no_grad():
                    logits = np.concatenate([src.module(torch.from_numpy(eval_x[i:i + 256])).numpy()
                                             for i in range(0, len(eval_x), 256)])
                compression["pruning"]["accuracy_before"] = float((logits.argmax(1) == eval_y).mean())
            src.module = pruned
        elif finetune_epochs:
            raise BadInput("--finetune-epochs applies after --prune; give --prune RATIO")
        compression["params"] = sum(p.numel() for p in src.module.parameters())

        def ref_predict(x: np.ndarray) -> np.ndarray:
            step = src.batch or len(x)
            with torch.no_grad():
                outs = [src.module(torch.from_numpy(np.ascontiguousarray(x[i:i + step], dtype=np.float32)))
                        for i in range(0, len(x), step)]
            return np.concatenate([o[0] if isinstance(o, (tuple, list)) else o for o in outs]).astype(np.float32)
    elif prune:
        raise BadInput("--prune needs a PyTorch model (zoo:, .pt, .pt2 or nn.Module); ONNX graphs cannot be pruned")

    with tempfile.TemporaryDirectory(prefix="lepton-export-") as tmpd:
        tmp = Path(tmpd)
        with ui.stage(f"export fp32 {fmt}"):
            fp32 = exporter.to_fp32(src, tmp / f"fp32{exporter.suffix}", prof.max_opset)
        desc = exporter.describe(fp32) if fmt == "onnx" else {}
        if desc.get("opset", 0) > prof.max_opset:
            raise CheckFailed(f"the graph needs opset {desc['opset']} but {prof.id} allows at most {prof.max_opset}")
        fp32_pred = exporter.predictor(fp32, prof.threads)
        if src.kind == "onnx":
            ref_predict = fp32_pred
        with ui.stage(f"reference outputs on {len(check_x)} inputs"):
            ref_check = val.batched(ref_predict, check_x, 64)
            ref_eval = ref_check if eval_x is check_x else (
                val.batched(ref_predict, eval_x, 64) if eval_x is not None else None)
        fp32_latency = val.latency_ms(fp32_pred, check_x[:1]) if measure_latency else None

        def check(path: Path, label: str):
            pred = exporter.predictor(path, prof.threads)
            out_check = val.batched(pred, check_x, 64)
            c = val.compare(ref_check, out_check, None)
            if eval_x is not None:
                out_eval = out_check if eval_x is check_x else val.batched(pred, eval_x, 64)
                ce = val.compare(ref_eval, out_eval, eval_y)
                c.accuracy_reference, c.accuracy_artifact, c.eval_samples = (
                    ce.accuracy_reference, ce.accuracy_artifact, ce.eval_samples)
            return c, pred

        attempts: list[dict] = []
        chosen = tmp / f"model{exporter.suffix}"
        float_nodes: list[str] = []
        if precision != "int8":
            with ui.stage(f"convert to {precision} and validate"):
                exporter.convert(fp32, chosen, precision)
                comp, pred = check(chosen, precision)
            why = val.gate(comp, min_agreement, max_accuracy_drop) if src.trained else None
            if why:
                raise CheckFailed(f"{precision} artifact fails validation: {why}")
        else:
            prepared = q.prepare(fp32, tmp / "prepared.onnx")
            comp, pred, why = _search_recipes(
                exporter, prof, recipes, prepared, tmp, calib_x, check_x, check, min_agreement,
                max_accuracy_drop, attempts, fp32_pred, fp32_latency, src.trained, measure_latency)
            if comp is None:
                best = max(attempts, key=lambda a: a["top1_agreement"])
                raise CheckFailed(
                    f"int8 failed the accuracy gate with all {len(attempts)} recipes (best: {best['recipe']}, "
                    f"{best['why']}); try --precision fp16, more or better --calib data, or relax "
                    f"--min-agreement/--max-accuracy-drop"
                )
            chosen.unlink(missing_ok=True)
            Path(why["path"]).rename(chosen)
            float_nodes = why["float_nodes"]
            compression["quantization"] = {
                "method": "onnxruntime quantize_static, QDQ, weights int8 per-channel",
                "recipe": why["recipe"], "float_nodes": float_nodes, "speed_vs_fp32": why.get("speed_vs_fp32"),
                "attempts": attempts,
            }
        size = chosen.stat().st_size
        fp32_size = fp32.stat().st_size
        if size > budget:
            raise CheckFailed(_size_advice(size, budget, precision, prune, prof, src, max_size))
        lat = val.latency_ms(pred, check_x[:1]) if measure_latency else None
        ram = val.runtime_memory(lambda: exporter.predictor(chosen, prof.threads), check_x[:1])
        if ram is not None and ram > prof.ram_budget_bytes:
            raise CheckFailed(f"running the model took {human(ram)} of memory, over {prof.id}'s "
                              f"{human(prof.ram_budget_bytes)} RAM budget; try --prune, int8 or a smaller input")
        # Latency on this host says something about the target only when they are the same kind of CPU.
        same_cpu = prof.arch == platform.machine() and prof.execution_providers == ["CPUExecutionProvider"]
        if lat and same_cpu and lat["p50_ms"] > prof.latency_budget_ms:
            raise CheckFailed(f"p50 latency {lat['p50_ms']:.1f} ms on this host is over {prof.id}'s "
                              f"{prof.latency_budget_ms:g} ms budget; try --prune, int8 or a smaller input")
        budgets = {"max_model_bytes": budget, "model_bytes": size, "ram_budget_bytes": prof.ram_budget_bytes,
                   "ram_bytes_measured": ram, "latency_budget_ms": prof.latency_budget_ms,
                   "latency_checked_on_host": bool(lat and same_cpu)}
        validation = comp.as_dict()
        validation.update({"min_agreement": min_agreement, "max_accuracy_drop_pp": max_accuracy_drop,
                           "eval_source": eval_src, "reference": "pytorch" if src.kind == "torch" else "onnx fp32",
                           "agreement_inputs": check_kind,
                           "trained_weights": src.trained, "budgets": budgets, "passed": True})
        latency = {"host": _toolchain()["host"], "threads": min(prof.threads, os.cpu_count() or 1), "batch": 1}
        if lat:
            latency.update({"p50_ms": lat["p50_ms"], "p90_ms": lat["p90_ms"], "fp32_p50_ms": fp32_latency["p50_ms"],
                            "vs_fp32": lat["p50_ms"] / fp32_latency["p50_ms"]})
        compression.update({"fp32_bytes": fp32_size, "bytes": size, "size_vs_fp32": size / fp32_size})

        final = Path(out) / bundle_name
        described = exporter.describe(chosen)
        with ui.stage(f"write bundle {final}"), staging(final) as stage_dir:
            model_file = f"model{exporter.suffix}"
            (stage_dir / model_file).write_bytes(chosen.read_bytes())
            labels_file = None
            if src.labels:
                labels_file = "labels.txt"
                (stage_dir / labels_file).write_text("\n".join(src.labels) + "\n")
            in_spec = src.input_spec.model_copy()
            in_spec.shape = described["inputs"][0]["shape"] if described.get("inputs") else in_spec.shape
            manifest = Manifest(
                name=src.name, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                target={"id": prof.id, "sha256": prof.content_hash(), "arch": prof.arch, "runtime": prof.runtime,
                        "execution_providers": prof.execution_providers, "threads": prof.threads,
                        "latency_budget_ms": prof.latency_budget_ms, "device_packages": prof.device_packages},
                format=fmt, precision=precision, model_file=model_file, task=src.task, labels_file=labels_file,
                inputs=[in_spec],
                outputs=[OutputSpec(name=o["name"], shape=o["shape"]) for o in described.get("outputs", [])],
                compression=compression, validation=validation, latency=latency, toolchain=_toolchain(),
                opset=described.get("opset"),
            )
            write_manifest(stage_dir, manifest)
    report.update({"bundle": str(final), "bytes": size, "fp32_bytes": fp32_size, "validation": validation,
                   "latency": latency, "compression": compression, "seconds": time.perf_counter() - t_start})
    return ExportResult(Bundle.load(final), report)


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


def _search_recipes(exporter, prof, recipes, prepared, tmp, calib_x, check_x, check, min_agreement,
                    max_drop, attempts, fp32_pred, fp32_latency, trained, measure_latency):
    """Try the target's int8 recipes fastest first; return the first that passes the gate."""
    from lepton_edge.compress import quantize as q
    from lepton_edge.exporters import validation as val

    base_results: dict[str, Any] = {}
    for i, name in enumerate(recipes):
        r = q.Recipe.parse(name)
        candidates: list[list[str]] = [[]]
        if r.sensitive:
            base_name = name.replace("-sensitive", "")
            base = base_results.get(base_name)
            if base is None:
                base = exporter.quantize_int8(prepared, tmp / f"base-{i}.onnx", calib_x, q.Recipe.parse(base_name),
                                              prof.quantization.per_channel)
            with ui.stage(f"sensitivity pass for {base_name}"):
                ranked = q.sensitivity(prepared, base.path, check_x[:32].astype(np.float32))
            names = [n for n, _ in ranked]
            # up to half the quantizable layers in float; more would no longer be an int8 model
            candidates = [names[:k] for k in (1, 2, 4, 8, 16) if k <= max(1, len(names) // 2)]
        for j, exclude in enumerate(candidates):
            label = name if not exclude else f"{name} (float: {len(exclude)} layer(s))"
            with ui.stage(f"int8 recipe {label}"):
                res = exporter.quantize_int8(prepared, tmp / f"int8-{i}-{j}.onnx", calib_x, r,
                                             prof.quantization.per_channel, exclude)
                base_results.setdefault(name, res)
                comp, pred = check(res.path, label)
            why = val.gate(comp, min_agreement, max_drop) if trained else None
            entry = {"recipe": label, "top1_agreement": comp.top1_agreement, "accuracy": comp.accuracy_artifact,
                     "accuracy_drop_pp": comp.accuracy_drop_pp, "float_nodes": res.float_nodes,
                     "passed": why is None, "why": why or "passed"}
            attempts.append(entry)
            ui.info(f"  {'[green]pass[/]' if why is None else '[red]fail[/]'}: agreement {comp.top1_agreement:.4f}"
                    + (f", accuracy drop {comp.accuracy_drop_pp:.2f} pp" if comp.accuracy_drop_pp is not None else "")
                    + (f" ({why})" if why else ""))
            if why is None:
                speed = None
                if measure_latency and fp32_latency:
                    speed = val.latency_ms(pred, check_x[:1])["p50_ms"] / fp32_latency["p50_ms"]
                return comp, pred, {"path": str(res.path), "recipe": label, "float_nodes": res.float_nodes,
                                    "speed_vs_fp32": speed}
    return None, None, None


