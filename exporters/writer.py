"""The last steps of an export: check the target's budgets, then write the bundle.

Why apart from the orchestrator: what a bundle holds (manifest fields, file names, the input
spec as the artifact really has it) and what a budget failure says to do next are each one
decision, read on their own; the orchestrator (exporters/base.py) only calls them in order.
"""
from __future__ import annotations

import os
import platform
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lepton_edge.bundle import Manifest, OutputSpec, staging, write_manifest
from lepton_edge.errors import BadInput, CheckFailed
from lepton_edge.exporters.options import parse_size
from lepton_edge.manifest_sections import BudgetsSection
from lepton_edge.ui import human

TOOLCHAIN_PACKAGES = ("lepton-edge", "torch", "onnx", "onnxscript", "onnxruntime", "torch-pruning", "litert-torch",
                      "ai-edge-litert", "ai-edge-quantizer", "numpy")


def toolchain() -> dict[str, str]:
    """Python, host and the versions of every package that took part (those installed)."""
    import importlib.metadata as md

    from lepton_edge.runtime.cpu_int8 import cpu_int8

    out = {"python": platform.python_version(), "host": f"{platform.system()} {platform.machine()}"}
    dot = cpu_int8()  # (the int8 kernels validation ran on: `lepton-edge bench` on the device compares)
    if dot:
        out["cpu_int8"] = dot
    for pkg in TOOLCHAIN_PACKAGES:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


# the model's part of a bundle folder's name, in bytes: with '-<target id (64)>-<format>-<precision>' and the
# staging folder's '.<name>.<8 random>' it stays under the 255 bytes a file system allows a name
MAX_STEM_BYTES = 120


def bundle_name(src, prof, fmt: str, precision: str) -> str:
    """<model>-<target>, with the format/precision appended when they are not the target's default. The
    model's name is a file name's stem or --name: anything but letters (any script), digits, '_', '.'
    and '-' becomes '-', and no leading '.' (a bundle folder inside --out, never a hidden one or one
    elsewhere). The stem is cut to MAX_STEM_BYTES of UTF-8: a folder name is at most 255 bytes, and 128
    'é' (256 bytes) passed --name's length check only to fail with OSError once the export was done."""
    stem = re.sub(r"[^\w.-]+", "-", src.name).strip("-").lstrip(".-")
    stem = stem.encode("utf-8")[:MAX_STEM_BYTES].decode("utf-8", "ignore").rstrip("-") or "model"
    name = f"{stem}-{prof.id}"
    if fmt != prof.format:
        return f"{name}-{fmt}-{precision}"
    return name if precision == prof.precision else f"{name}-{precision}"


def check_budgets(ctx, size: int, budget: int, ram: int | None, latency: dict, precision: str) -> BudgetsSection:
    """The artifact against the profile's size, RAM and (on a host of the target's kind) latency
    budgets: a CheckFailed line saying what to change, or the budgets section of the manifest."""
    prof = ctx.profile
    if size > budget:
        raise CheckFailed(size_advice(ctx, size, budget, precision))
    if ram is not None and ram > prof.ram_budget_bytes:
        raise CheckFailed(f"running the model took {human(ram)} of memory, over {prof.id}'s "
                          f"{human(prof.ram_budget_bytes)} RAM budget; try --prune, int8 or a smaller input")
    same_cpu = latency_judged_here(prof)
    # Judged on the fastest timed run: other processes only ever add time, so on a shared or loaded host
    # the median measures the load (a 30 ms model read 52 ms at load 12 on 2 cores); the fastest run is
    # what the model costs when it has the CPU, as on a device that runs only it.
    best = latency.get("min_ms", latency.get("p50_ms")) if latency else None
    if best is not None and same_cpu and best > prof.latency_budget_ms:
        q = ctx.report.compression.quantization
        advice = latency_advice(latency, prof.latency_budget_ms, precision, q.attempts if q else None)
        raise CheckFailed(f"latency {best:.1f} ms (fastest of {latency.get('runs', '?')} runs; p50 "
                          f"{latency['p50_ms']:.1f} ms) on this host is over {prof.id}'s "
                          f"{prof.latency_budget_ms:g} ms budget; {advice}")
    return BudgetsSection(max_model_bytes=budget, model_bytes=size, ram_budget_bytes=prof.ram_budget_bytes,
                          ram_bytes_measured=ram, latency_budget_ms=prof.latency_budget_ms,
                          latency_checked_on_host=bool(latency and same_cpu))


def latency_judged_here(prof) -> bool:
    """Whether latency measured on this host says something about the target: only when they are the
    same kind of CPU (an x86 workstation's timings say nothing about a Pi's, nor about a GPU's)."""
    return prof.arch == platform.machine() and prof.execution_providers == ["CPUExecutionProvider"]


def latency_advice(latency: dict, budget_ms: float, precision: str, attempts: list[dict] | None = None) -> str:
    """What to try when the fastest run is over the budget. Why not always "int8": the artifact may be
    int8 already, and on some CPUs an int8 graph runs slower than its fp32 one (quantize/dequantize
    pairs around layers without int8 kernels); the export timed fp32 on this host too, so it can say.
    With the int8 search's `attempts`, it first says that no candidate passing the gate was fast enough."""
    fp32 = latency.get("fp32_p50_ms")
    timed = [a for a in attempts or [] if a.get("min_ms") is not None]
    if timed:
        shown = ", ".join(f"{a['recipe']} {a['min_ms']:.0f} ms" for a in sorted(timed, key=lambda a: a["min_ms"]))
        return f"no int8 candidate that passed the gate fits it ({shown}); " + \
            latency_advice(latency, budget_ms, precision)
    if precision == "int8" and fp32 is not None and fp32 <= budget_ms:
        return (f"the fp32 model runs in {fp32:.1f} ms here (int8 is slower on this CPU): try --precision fp32 "
                "or fp16")
    if precision == "int8":
        return "try --prune or a smaller input (--input-shape)"
    return "try --prune, --precision int8 or a smaller input (--input-shape)"


def size_advice(ctx, size: int, budget: int, precision: str) -> str:
    prof, src, prune, max_size = ctx.profile, ctx.source, ctx.options.prune, ctx.options.max_size
    tips = []
    if precision != "int8":
        tips.append("--precision int8 (about 4x smaller than fp32)")
    more = min(0.9, (prune or 0) + 0.3)
    tips.append(f"--prune {more:.1f}" if src.kind == "torch" else "prune the model before export")
    try:
        h, w = src.input_spec.hw()
    except BadInput:  # not an image input: no smaller picture size to suggest
        h = w = 0
    if h > 64:
        tips.append(f"a smaller input (--input-shape 1,{src.input_spec.channels},{h * 3 // 4},{w * 3 // 4})")
    limit = f"--max-size {max_size}" if max_size and parse_size(max_size) == budget else f"{prof.id} max_model_bytes"
    return f"model is {human(size)}, over the {human(budget)} budget ({limit}); try {', '.join(tips)}"


def observed_shape(described: dict, engine, progress=None) -> list:
    """An output's shape for the manifest: as the model declares it, but with each static dimension that the
    device's engine reports otherwise (`engine`: its TensorInfo for the output, from the validated artifact's
    predictor, or None) taken from the engine. Why: a model declaring `logits` [1, 5] whose graph gives
    [1, 10] exported with the declaration in its manifest, and `run` then refused the bundle: onnxruntime
    infers [1, 10] and the runtime checks the manifest against what the engine says (runtime.check_outputs),
    which this keeps to. (Not the validated arrays: those are batch-first, a time-major [T, 1, C] is not.)
    A static dim the engine does not know is recorded as unknown ("?"), which `run` does not check."""
    shape = list(described.get("shape") or [])
    seen = list(getattr(engine, "shape", None) or [])
    if len(seen) != len(shape):
        return shape
    # (a static dim the engine reports as unknown: onnxruntime's lenient merge of a declaration its own
    # inference contradicts, [1, 5] declared where a Flatten gives [1, 48]; unknown is then what is known)
    fixed = [b if isinstance(a, int) and isinstance(b, int) and a != b else
             "?" if isinstance(a, int) and b is not None and not isinstance(b, int) else a for a, b in zip(shape, seen)]
    if fixed != shape and progress is not None:
        progress.info(f"[yellow]output {described.get('name')!r}: the model declares {shape} and its runtime gives "
                      f"{fixed}: the manifest records {fixed}[/]")
    return fixed


def write_bundle(ctx, final: Path, chosen: Path, exporter, fmt: str, precision: str, engine_outputs=None) -> None:
    """Stage the bundle in a temporary directory and move it into place (see bundle.staging).
    `engine_outputs`: the outputs as the validated artifact's engine reports them (observed_shape)."""
    src, prof, rep = ctx.source, ctx.profile, ctx.report
    described = exporter.describe(chosen)
    engine = {o.name: o for o in engine_outputs or []}
    with staging(final) as stage_dir:
        model_file = f"model{exporter.suffix}"
        (stage_dir / model_file).write_bytes(chosen.read_bytes())
        labels_file = None
        if src.labels:
            labels_file = "labels.txt"
            (stage_dir / labels_file).write_text("\n".join(src.labels) + "\n", encoding="utf-8")
        manifest = Manifest(
            name=src.name, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            target=_target_record(prof, rep.compression.quantization), format=fmt, precision=precision,
            model_file=model_file, task=src.task,
            labels_file=labels_file,  # then the non-image inputs of a multi-input model, with their values
            inputs=[_input_spec(src, described), *getattr(src, "extra_inputs", [])],
            outputs=[OutputSpec(name=o["name"], shape=observed_shape(o, engine.get(o["name"]), ctx.progress),
                                dtype=o.get("dtype", "float32"), quantization=o.get("quantization"))
                     for o in described.get("outputs", [])],
            compression=rep.compression.record(), validation=rep.validation.record() if rep.validation else {},
            latency=rep.latency.record() if rep.latency else {}, toolchain=toolchain(),
            **({"postprocess": rep.postprocess.record()} if rep.postprocess else {}),
            opset=described.get("opset"),
        )
        write_manifest(stage_dir, manifest)


def _target_record(prof, quantization=None) -> dict[str, Any]:
    rec = {"id": prof.id, "sha256": prof.content_hash(), "arch": prof.arch, "runtime": prof.runtime,
           "execution_providers": prof.execution_providers, "delegates": prof.delegates, "threads": prof.threads,
           "latency_budget_ms": prof.latency_budget_ms, "device_packages": prof.device_packages}
    if quantization is not None and quantization.qdq_fusion is False:
        rec["qdq_fusion"] = False  # the device's onnxruntime runs it with QDQ fusion off (exporters/kernels.py)
    return rec


def _input_spec(src, described: dict):
    """The source's input spec as the artifact has it: its concrete shape, and for an integer
    input (--int8-io) the dtype and quantization the device quantizes frames with."""
    in_spec = src.input_spec.model_copy()
    if described.get("inputs"):
        d = described["inputs"][0]
        if all(isinstance(v, int) for v in d["shape"]):  # else keep the concrete shape validated with
            in_spec.shape = d["shape"]
        if d.get("quantization"):
            in_spec.dtype, in_spec.quantization = d["dtype"], d["quantization"]
    return in_spec


def threads_used(prof) -> int:
    return min(prof.threads, os.cpu_count() or 1)
