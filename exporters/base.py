"""The export path: load -> prune -> convert -> quantize -> validate -> budget -> bundle.

Why one orchestrator over small format modules: every format is validated the same way and no
format may write a bundle that was not validated (Optimum's rule). The bundle is staged in a
temporary directory and moved into place only when every check passed.

`export()` is a list of named steps over one `ExportContext` (exporters/context.py): each step
reads the options, profile, source and data there and leaves what the manifest records in
`ctx.report`. The format's work is the registered `Exporter`'s (exporters/exporter.py).
"""
from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lepton_edge import targets
from lepton_edge.bundle import Bundle, check_replaceable
from lepton_edge.errors import BadInput, CheckFailed, disk_full
from lepton_edge.exporters import kernels, writer
from lepton_edge.exporters.context import ExportContext
from lepton_edge.exporters.exporter import Exporter, formats, get_exporter, register  # noqa: F401 (API)
from lepton_edge.exporters.options import ExportOptions, parse_size  # noqa: F401 (API)
from lepton_edge.manifest_sections import (
    CalibrationSection,
    ConstantInputSection,
    ConversionSection,
    LatencySection,
    PostprocessSection,
    PruningSection,
    QuantizationSection,
    ValidationSection,
)
from lepton_edge.memory import give_back_freed


@dataclass
class ExportResult:
    bundle: Bundle
    report: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name):  # behaves like the Bundle it wraps
        return getattr(self.bundle, name)


def export(model: Any, target: str | None = None, *, options: ExportOptions | None = None,
           example_input: Any = None, **settings: Any) -> ExportResult:
    """Export `model` for `target` into `out/<name>-<target>/` and return the validated bundle.

    `model` is a torch.nn.Module (give `example_input`), a path to .pt/.pt2/.onnx, or 'zoo:<name>'.
    The settings are the fields of `ExportOptions` (exporters/options.py), given as keyword
    arguments, as `options`, or both (keywords win): `out`, `precision`, `calib`, `task` and the
    validation thresholds (`min_*`/`max_*`), ... A bad value is one BadInput naming it, before any work.
    Raises BadInput for unusable input and CheckFailed when validation or a budget fails;
    in both cases nothing is written.
    """
    if target is not None:
        settings["target"] = target
    return run_export(model, ExportOptions.of(options, **settings), example_input)


def run_export(model: Any, options: ExportOptions, example_input: Any = None) -> ExportResult:
    """The steps of one export, in order, for validated `options`."""
    from lepton_edge.paths import check_output_dir

    check_output_dir(options.out, "out")  # before minutes of work, not after
    prof = targets.load(options.target)
    try:
        with tempfile.TemporaryDirectory(prefix="lepton-export-") as tmpd:
            ctx = ExportContext(options, prof, Path(tmpd))
            try:
                return _steps(ctx, model, example_input)
            except CheckFailed as e:  # what a machine reader needs besides the line (export --json prints it)
                e.details = {**_failure_details(ctx), **(e.details or {})}
                raise
            except BadInput as e:
                if (hint := _guessed_size_hint(ctx, e)) is None:
                    raise
                raise BadInput(f"{e}; {hint}") from None
    except OSError as e:  # the work folder's disk filled (the bundle's own is checked, and staging says so)
        if not disk_full(e):
            raise
        raise BadInput(f"no space left for the export's work files in {tempfile.gettempdir()} ({e.strerror}): "
                       "free some, or set TMPDIR to a folder with room") from None


def _guessed_size_hint(ctx: ExportContext, e: BadInput) -> str | None:
    """What to try when the model could not run at an input size the export guessed (its open dims taken at
    the target's size), else None. Why: a ViT with open H and W but a positional embedding of one size failed
    on onnxruntime's broadcast error alone, though the guess was the cause and --input-shape the fix."""
    guessed = [n for n in (getattr(ctx.source, "notes", None) or []) if "open dims taken as" in n]
    if not guessed or "cannot run the model" not in str(e):
        return None
    return f"{guessed[0].split(':')[0]} had its open dims guessed: give the size it was made for with --input-shape"


def _steps(ctx: ExportContext, model: Any, example_input: Any) -> ExportResult:
    """Load, gather data, compress, convert, quantize or convert precision, validate, check the
    budgets, write: each step records what it learnt in `ctx.report`."""
    options, prof = ctx.options, ctx.profile
    exporter, fmt, precision = _choose_format(ctx, model)
    _load(ctx, model, example_input, exporter)
    _quantized_already(ctx.source, precision)
    final = Path(options.out) / writer.bundle_name(ctx.source, prof, fmt, precision)
    check_replaceable(final)  # before minutes of work: what is there must be a bundle, if anything
    recipes = _recipes_for(exporter, options.recipes, prof)
    _gather_data(ctx, precision)
    _compress(ctx)
    fp32, fp32_pred, conversion = _fp32(ctx, exporter)
    _latency_within_reach(ctx, fp32_pred, precision)
    validate = _validator(ctx, exporter, fp32, fp32_pred)
    chosen = ctx.workdir / f"model{exporter.suffix}"
    if precision == "int8":
        exact = exact_int8(ctx, exporter)
        if exact:
            validate.settings = {"qdq_fusion": False}
            ctx.progress.info(f"[dim]int8 is validated in the graph's exact arithmetic (onnxruntime's QDQ fusion "
                              f"off here): {prof.id}'s kernels are not this host's[/]")
        comp, pred, ram = _int8(ctx, exporter, fp32, chosen, validate, recipes)
        if exact:  # its RAM and speed as the device runs it, fused: the exact run held its weights as float
            pred, ram = validate.ram(chosen, qdq_fusion=True)  # (no second validation: the verdict is the exact one)
        comp, pred, ram = kernels.choose(ctx, exporter, chosen, comp, pred, ram, validate)
    else:
        comp, pred, ram = _float(ctx, exporter, fp32, chosen, precision, validate)
    size = _record_sizes(ctx, chosen, fp32, precision)
    latency = _measure_latency(ctx, pred, fp32_pred)
    _record_validation(ctx, comp, validate, conversion, size, ram, latency, precision)
    with ctx.progress.stage(f"write bundle {final}"):
        writer.write_bundle(ctx, final, chosen, exporter, fmt, precision, getattr(pred, "outputs", None))
    return ExportResult(Bundle.load(final), _report(ctx, fmt, precision, final))


def _failure_details(ctx: ExportContext) -> dict[str, Any]:
    """A refused export, for `--json`: the model, target and task, and, when the int8 search ran,
    every candidate tried with its metrics (the same figures the one-line error names)."""
    d: dict[str, Any] = {"target": ctx.profile.id}
    if ctx.source is not None:
        d.update(name=ctx.source.name, task=ctx.source.task)
    q = ctx.report.compression.quantization
    if q is not None:
        d.update(recipe=q.recipe, attempts=q.attempts)
    return d


# ---- the steps ---------------------------------------------------------------------------------

def _choose_format(ctx: ExportContext, model) -> tuple[Exporter, str, str]:
    """(exporter, format, precision): the options', else the profile's defaults."""
    opts, prof = ctx.options, ctx.profile
    fmt = opts.format or prof.format
    if opts.format is None and fmt == "tflite" and str(model).lower().endswith(".onnx"):
        fmt = "onnx"  # an ONNX graph is not converted to TFLite here: keep it ONNX (onnxruntime runs on ARM too)
        ctx.progress.info(f"[dim]{prof.id} prefers TFLite; an ONNX input is exported as ONNX (--format onnx)[/]")
    precision = opts.precision or prof.precision
    if opts.int8_io and fmt != "tflite":
        raise BadInput("--int8-io applies to TFLite int8 (ONNX QDQ models keep float input and output)")
    exporter = get_exporter(fmt)
    if precision not in exporter.precisions:
        raise BadInput(f"{fmt} export supports {', '.join(exporter.precisions)}, not {precision}")
    return exporter, fmt, precision


def _load(ctx: ExportContext, model, example_input, exporter: Exporter) -> None:
    """The model source, its input layout and task, checked against what the format converts."""
    from lepton_edge import model_source
    from lepton_edge.exporters import layout as lay

    o, prof = ctx.options, ctx.profile
    with ctx.progress.stage("load model"):
        src = model_source.load(model, profile_hw=tuple(prof.input_size), input_shape=o.input_shape,
                                example_input=example_input, weights=o.weights, labels=o.labels, name=o.name,
                                color=o.color, mean=o.mean, std=o.std, input_values=o.input_values)
    if src.extra_inputs:  # the constants baked for the non-image inputs, and how each was chosen
        ctx.report.compression.constant_inputs = [
            ConstantInputSection(name=i.name, shape=i.shape, dtype=i.dtype, value=i.value,
                                 rule=src.constant_rules.get(i.name, "")) for i in src.extra_inputs]
    if src.kind not in exporter.sources:
        raise BadInput(f"{exporter.format} export converts PyTorch models (zoo:, .pt, .pt2, nn.Module); "
                       f"for an {src.kind.upper()} file use --format onnx")
    _check_normalisation(src.input_spec, o)
    if o.resize:
        src.input_spec.resize = o.resize
    lay.apply(src, o.layout or prof.layout, explicit=o.layout is not None)
    if o.task in ("classify", "detect", "embed"):
        src.task = o.task  # what the device's post-processing does (a segment map stays raw there)
    if not src.trained:
        logging.getLogger(__name__).warning(f"{src.name} has random weights (no --weights): the accuracy gate is "
                                            "not applied")
    ctx.source = src


def _check_normalisation(spec, o: ExportOptions) -> None:
    """--mean/--std against the channels the model turned out to have (options alone cannot know
    them when --color is not given): one line, not a numpy broadcast error later."""
    for what in ("mean", "std"):
        given = getattr(o, what)
        if given is not None and len(given) not in (1, spec.channels):
            counts = "1 value" if spec.channels == 1 else f"1 or {spec.channels}"
            raise BadInput(f"{what} has {len(given)} values but the model's input has {spec.channels} "
                           f"channel(s) ({spec.color}): give {counts}")
    if o.mean and max(abs(m) for m in o.mean) > 1 and abs(spec.scale - 1 / 255) < 1e-9:
        # (ImageNet's 123.7,116.3,103.5 / 58.4,57.1,57.4, or a Caffe model's 104,117,123: after the 0..1
        # scaling every input value was about -2, the same for every frame, and the export went on)
        std = o.std or [1.0]
        def shown(v):
            return ",".join(f"{x / 255:.4g}" for x in v)
        raise BadInput(f"--mean {','.join(f'{m:g}' for m in o.mean)} is past 1, and --mean/--std apply after the "
                       f"pixels are scaled to 0..1; for values in 0..255 pixel units give --mean {shown(o.mean)} "
                       f"--std {shown(std)} (each divided by 255)")
    why = integer_input_overflow(spec)
    if why:
        raise BadInput(why)


def integer_input_overflow(spec) -> str | None:
    """Why an integer image input (uint8 or int8, no quantization: a model that normalises inside its graph)
    cannot hold (pixel * scale - mean) / std for every pixel 0..255, else None. Why: normalise() casts the
    float values to the input's type, so --mean 0.5 --std 0.2 on a uint8 input (a mean and std meant for
    0..1 pixels) wrapped every frame around 256 (pixels 0, 1, 51, 52 reached the model as 254, 2, 252, 1),
    and the export validated it, since the fp32 reference saw the same wrapped frames. Fractions are lost
    too: the values must be whole numbers in the type's range."""
    import numpy as np

    if spec.quantization or not np.issubdtype(np.dtype(spec.dtype), np.integer):
        return None
    info = np.iinfo(np.dtype(spec.dtype))
    n = max(len(spec.mean), len(spec.std))
    means = spec.mean * n if len(spec.mean) == 1 else spec.mean
    stds = spec.std * n if len(spec.std) == 1 else spec.std
    lo = hi = 0.0
    whole = True
    for m, s in zip(means, stds):
        a, b = np.float32(spec.scale) / np.float32(s), np.float32(m) / np.float32(s)  # (as normalise computes them)
        ends = (float(-b), float(np.float32(255) * a - b))
        lo, hi = min(lo, *ends), max(hi, *ends)
        whole = whole and float(a).is_integer() and float(b).is_integer()
    if whole and info.min <= lo and hi <= info.max:
        return None
    advice = ("give no --mean/--std: it takes the raw 0..255 pixels" if spec.dtype == "uint8" else
              "--mean 128 gives it pixels - 128 (-128..127)" if spec.dtype == "int8" else
              f"--std {1 / 255!r} gives it the raw 0..255 pixels (pixels are scaled by {spec.scale:g} first)")
    return (f"input {spec.name!r} takes {spec.dtype} values (the model normalises inside its graph), and "
            f"(pixel * {spec.scale:g} - mean {spec.mean}) / std {spec.std} gives {lo:.4g}..{hi:.4g}"
            f"{'' if whole else ', with fractions'}, which {spec.dtype} cannot hold ({info.min}..{info.max}): "
            f"every frame would be cut to fit; {advice}")


def _quantized_already(src, precision: str) -> None:
    """One line for an int8 ONNX file asked for fp32 or fp16: fp32 shipped it unchanged under an fp32 label,
    fp16 failed on onnxruntime's own words about an invalid graph. int8 goes on: the search quantizes what
    is still float, and validation judges the result against the file as given; a file with no float
    weights left is kept as given (_as_given). Likewise an fp16 file asked
    for fp32 (shipped unchanged, fp16 inputs and all, labelled fp32) or int8 (every recipe failed on
    onnxruntime's type errors, after which the line said to try fp16)."""
    if src.quantized_ops and precision in ("fp32", "fp16"):
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(src.quantized_ops.items()))
        raise BadInput(f"the model is quantized already ({ops}): --precision {precision} cannot undo that, and the "
                       f"bundle would carry int8 ops under an {precision} label; export the float model it came "
                       "from, or this one with --precision int8")
    if src.fp16_weights >= 0.5 and precision in ("fp32", "int8") and not src.quantized_ops:
        raise BadInput(f"the model's weights are fp16 ({src.fp16_weights:.0%} of them): "
                       + ("--precision fp32 would ship them unchanged under an fp32 label" if precision == "fp32" else
                          "int8 is calibrated and quantized from fp32 weights")
                       + "; export it with --precision fp16, or export the fp32 model it came from")


def _gather_data(ctx: ExportContext, precision: str) -> None:
    from lepton_edge.exporters import datasets

    o = ctx.options
    samples = o.calib_samples or ctx.profile.quantization.calibration_samples
    _pixels_fit(ctx, precision, samples)
    _random_inputs_fit(ctx, precision, samples)
    ctx.data = datasets.gather(ctx.source, precision=precision, calib=o.calib, samples=samples,
                               eval_set=o.eval, eval_limit=o.eval_limit, holdout=o.holdout,
                               allow_synthetic=o.allow_synthetic_calibration, max_bytes=_inputs_budget(ctx))
    if ctx.data.calib_info and precision != "fp32":  # (fp32's --calib data only validates: calibrates nothing)
        ctx.report.compression.calibration = CalibrationSection(**ctx.data.calib_info)


def _pixels_fit(ctx: ExportContext, precision: str, samples: int) -> None:
    """Refuse, before reading any image, an export whose inputs alone (held as uint8 pixels for the whole
    run: the calibration inputs, the held-out ones and their views, the evaluation set) would take over
    half the memory budget, the rest being the model's runs. Why: a 1x3x4096x4096 model with a folder of
    72 photos read ~7 GB of pixels, then the kernel's OOM killer took the export at 24 GB."""
    from lepton_edge.compress import calibration as cal
    from lepton_edge.exporters import datasets
    from lepton_edge.ui import human

    o, spec = ctx.options, ctx.source.input_spec
    if len(spec.shape) != 4 or not all(isinstance(d, int) for d in spec.shape[1:]):
        return
    n = 0
    if o.calib is not None and (precision == "int8" or precision == "fp16"):
        k = cal.count_inputs(str(o.calib), samples + o.holdout) or 0  # (0: an array, not read as pixels)
        if k:
            n += datasets.inputs_held(k, samples)
    if o.eval is not None:
        n += cal.count_inputs(str(o.eval), o.eval_limit) or 0
    budget = o.max_memory_bytes or cal.default_memory_budget()
    if not n or not budget:
        return
    per = math.prod(spec.hw()) * spec.channels  # (an input images cannot feed is refused here, before reading)
    if n * per <= budget // 2:
        return
    fit = max(1, int(budget // 2 // per / 1.6))  # images read, with the views of the fifth held out
    fewer = f"--calib-samples {fit - o.holdout}" if fit - o.holdout >= 8 else \
        f"a --calib folder of at most {fit} images"
    raise CheckFailed(f"{n} inputs of {spec.hw()[0]}x{spec.hw()[1]}x{spec.channels} pixels would take "
                      f"{human(n * per)}, over half the export's memory budget ({human(budget)}, --max-memory): "
                      f"use {fewer} (and --eval-limit with --eval), or a smaller --input-shape")


def _inputs_budget(ctx: ExportContext) -> int | None:
    """What the export's inputs may take at most: half its memory budget (the rest is the model's runs)."""
    from lepton_edge.compress import calibration as cal

    budget = ctx.options.max_memory_bytes or cal.default_memory_budget()
    return budget // 2 if budget else None


def _random_inputs_fit(ctx: ExportContext, precision: str, samples: int) -> None:
    """Refuse, before drawing any, random inputs (int8 forced to calibrate on noise, or fp32/fp16's agreement
    inputs with no data) that would take over half the memory budget, as `_pixels_fit` refuses images. Why:
    --calib-samples 3000 of 1x3x256x256 went past 2 GB under --max-memory 1GB, and fp32 of a 1x3x4096x4096
    model with no data drew 64 inputs as 24 GB of float64 (a MemoryError traceback)."""
    from lepton_edge.compress import calibration as cal
    from lepton_edge.exporters import datasets
    from lepton_edge.ui import human

    o, spec, limit = ctx.options, ctx.source.input_spec, _inputs_budget(ctx)
    n = datasets.synthetic_inputs(ctx.source, precision=precision, calib=o.calib, eval_set=o.eval, samples=samples,
                                  holdout=o.holdout, allow_synthetic=o.allow_synthetic_calibration)
    need = cal.synthetic_bytes(spec, n)
    if not n or not limit or need <= limit:
        return
    fit = limit // max(1, cal.synthetic_bytes(spec, 1))
    fewer = f"--calib-samples {fit - o.holdout}" if precision == "int8" and fit - o.holdout >= 1 else \
        f"--holdout {fit}" if fit >= 1 else "a smaller --input-shape (or the target's input_size)"
    raise CheckFailed(f"{n} random inputs of {[d if isinstance(d, int) else 1 for d in spec.shape[1:]]} (float32) "
                      f"would take {human(need)}, over half the export's memory budget ({human(2 * limit)}, "
                      f"--max-memory): use {fewer}, or give --calib data")


def _compress(ctx: ExportContext) -> None:
    """Structured pruning (and fine-tuning) of a PyTorch source, in place on ctx.source.module."""
    src, o = ctx.source, ctx.options
    if src.kind != "torch":
        if o.prune or o.finetune_epochs:
            raise BadInput("--prune needs a PyTorch model (zoo:, .pt, .pt2 or nn.Module); ONNX graphs cannot be "
                           "pruned")
        return
    if o.prune:
        import torch

        if any(isinstance(m, torch.jit.ScriptModule) for m in src.module.modules()):
            raise BadInput("--prune needs a Python nn.Module (zoo:, .pt2 or the Python API): a TorchScript .pt "
                           "cannot be pruned (torch-pruning follows Python modules' hooks)")
        ctx.report.compression.pruning = _prune(ctx)
    ctx.report.compression.params = sum(p.numel() for p in src.module.parameters())


def _prune(ctx: ExportContext) -> PruningSection:
    import copy

    import torch

    from lepton_edge.compress import prune as pr
    from lepton_edge.exporters import datasets

    src, o, data = ctx.source, ctx.options, ctx.data
    with ctx.progress.stage(f"prune {o.prune:.0%} of channels (torch-pruning)"):
        pruned = copy.deepcopy(src.module)
        rep = pr.prune(pruned, torch.zeros([1] + [int(d) for d in src.input_spec.shape[1:]]), o.prune).as_dict()
    if o.finetune_epochs:
        tx, ty = datasets.training(src, o.train, max_bytes=_inputs_budget(ctx))
        with ctx.progress.stage(f"fine-tune {o.finetune_epochs} epoch(s) on {len(tx)} samples"):
            pr.finetune(pruned, tx, ty, o.finetune_epochs)
        rep.update(finetune_epochs=o.finetune_epochs, finetune_samples=len(tx))
    before = after = None
    if data.eval_x is not None and data.eval_y is not None:
        before, after = (_labelled_accuracy(m, data.eval_x, data.eval_y) for m in (src.module, pruned))
    if before is not None and after is not None:
        # what pruning cost, on labels: the quantization gate compares against the pruned model, so a
        # prune that left a 0.90 classifier at 0.14 passed it (its int8 kept the pruned model's answers)
        rep.update(accuracy_before=before, accuracy_after=after)
        drop = 100 * (before - after)
        if ctx.enforce and drop > o.max_prune_drop:
            raise CheckFailed(f"pruning {o.prune:.0%} of channels cost {drop:.2f} pp of accuracy ({before:.4f} -> "
                              f"{after:.4f} on {len(data.eval_y)} labelled samples), over --max-prune-drop "
                              f"{o.max_prune_drop:g} pp: prune less, or fine-tune (--finetune-epochs with --train)")
    elif ctx.enforce:
        logging.getLogger(__name__).warning("no labelled set of class scores: what pruning cost in accuracy is not "
                                            "measured (the validation compares the exported model with the pruned one)")
    src.module = pruned
    return PruningSection(**rep)


def _labelled_accuracy(module, x, y) -> float | None:
    """Top-1 accuracy of `module` on labelled (x, y), or None when its first output is not one score a
    class per sample (a detector or a segmenter given class folders)."""
    out = np.asarray(_torch_predictor(module, None)(x)[0])
    flat = out.reshape(len(out), -1) if out.ndim else out
    if flat.ndim != 2 or len(flat) != len(y) or flat.shape[1] < 2 or int(np.max(y)) >= flat.shape[1]:
        return None
    return float((flat.argmax(1) == y).mean())


def _fp32(ctx: ExportContext, exporter: Exporter):
    """(fp32 artifact, its predictor, the conversion check against PyTorch or None)."""
    prof = ctx.profile
    with ctx.progress.stage(f"export fp32 {exporter.format}"):
        fp32 = exporter.to_fp32(ctx, ctx.workdir / f"fp32{exporter.suffix}")
        described = exporter.describe(fp32)
    if (described.get("opset") or 0) > prof.max_opset:
        raise CheckFailed(f"the graph needs opset {described['opset']} but {prof.id} allows at most {prof.max_opset}")
    fp32_pred = exporter.predictor(fp32, prof.threads)
    conversion = _check_conversion(ctx, fp32_pred) if ctx.source.kind == "torch" else None
    return fp32, fp32_pred, conversion


# How much faster than fp32 another precision can make a model on a CPU, at most: int8 convolutions
# with VNNI ran MobileNetV2 at 0.73x fp32's time here, and no CPU gives int8 4x; fp16 is no faster than
# fp32 on a CPU. Twice the budget for fp32 itself: the final check times more runs (noise only adds time).
REACH = {"int8": 4.0, "fp16": 2.0, "fp32": 2.0}


def _latency_within_reach(ctx: ExportContext, fp32_pred, precision: str) -> None:
    """Stop before validation and the int8 search when fp32 on this host is so far over the target's
    latency budget that `precision` cannot bring it within (REACH): the final budget check would refuse
    the bundle after all that work. Why here: a 10,000-node graph at 367 ms a run spent 48 s on reference
    outputs and 77 s on its first int8 candidate before any refusal; PicoDet-layout on x86-cpu (fp32 63 ms
    against 50 ms) is within int8's reach and still searched. Judged only where latency is (same CPU kind)."""
    from lepton_edge.exporters import validation as val

    prof = ctx.profile
    if not ctx.options.measure_latency or not writer.latency_judged_here(prof):
        return
    lat = val.latency_ms(fp32_pred, ctx.data.check_x[:1], runs=5, warmup=1, budget_s=1.0)
    reach = REACH.get(precision, 1.0)
    if lat["min_ms"] > reach * prof.latency_budget_ms:
        raise CheckFailed(f"fp32 runs in {lat['min_ms']:.1f} ms (fastest of {lat['runs']} runs) on this host, over "
                          f"{reach:g}x {prof.id}'s {prof.latency_budget_ms:g} ms budget: {precision} cannot bring it "
                          "within; try --prune, a smaller input (--input-shape) or a target with a larger "
                          "latency_budget_ms")


def _validator(ctx: ExportContext, exporter: Exporter, fp32: Path, fp32_pred):
    from lepton_edge.exporters import validation as val

    src, task = ctx.source, ctx.options.task
    from lepton_edge.compress import calibration as cal
    from lepton_edge.ui import human

    limit, held = ctx.options.max_memory_bytes, cal.rss_bytes()
    if limit is not None and held and limit < held:  # the reference's outputs, every candidate: stopped at once
        raise BadInput(f"--max-memory {human(limit)} is less than the export already holds ({human(held)}, the "
                       "model, its data and the libraries): give it more")
    validate = val.Validator(exporter, ctx.threads, fp32_pred, fp32, ctx.data, thresholds=ctx.options.thresholds(),
                             task=task or (src.task if src.task != "raw" else None), input_spec=src.input_spec,
                             labels=src.labels, enforce=src.trained,
                             memory_budget=ctx.options.max_memory_bytes or cal.default_memory_budget(),
                             constants=_constants_fed(src))
    ctx.progress.info(f"[dim]validating as task '{validate.task}'"
                      f"{' (inferred from the outputs)' if validate.task_inferred else ''}[/]")
    if validate.task == "detect":  # the device decodes boxes as the gate did: task and head in the manifest
        from lepton_edge.exporters.task_metrics import detect_head

        src.task = "detect"
        ctx.report.postprocess = PostprocessSection(head=detect_head(validate.ref.outputs, src.input_spec,
                                                                     src.labels))
    elif validate.task in ("classify", "embed") and src.task == "raw":
        # an unlabelled classifier (or embedder) was judged by its top-k (or nearest neighbours): the device
        # reports what was validated, not raw logits, as `run` on the plain file would (a map stays raw)
        src.task = validate.task
    give_back_freed()  # (what the reference's batches freed counts until it is returned)
    held = cal.rss_bytes()
    if limit is not None and held and limit <= held:  # (a 205 MB model under --max-memory 1GB: each candidate
        # was then skipped for "0 B left" in turn, and the export went on to 1.8 GB)
        raise BadInput(f"the export holds {human(held)} once the fp32 reference has run (the model, its session and "
                       f"its outputs), past --max-memory {human(limit)}, with nothing left to convert or quantize it "
                       "in: give it more")
    return validate


def exact_int8(ctx: ExportContext, exporter: Exporter) -> bool:
    """Whether int8 ONNX candidates are judged in their graph's exact arithmetic (onnxruntime's QDQ fusion off:
    weights dequantized to float once, activations quantized and dequantized where the graph says) instead
    of this host's fused int8 kernels. Why: exporting for another kind of device (a Pi, a GPU), the fused
    kernels of this host say nothing about the device's, and on an x86 CPU without VNNI they saturate (u8 x s8
    products added in int16 pairs) where ARM's, VNNI's and GPUs' compute exactly: ddddocr's detector for rpi4,
    judged on an AVX2-only EPYC, failed every recipe (best F1 0.890) and passed in exact arithmetic (u8-minmax
    0.908). The device still runs the graph fused; on a target of this host's kind the search judges what the
    device will run (exporters/kernels.py)."""
    return exporter.format == "onnx" and not writer.latency_judged_here(ctx.profile)


def _constants_fed(src) -> str:
    """The non-image inputs and what they are fed, for the line that says the outputs ignore the image."""
    return "; ".join(f"{i.name} = {i.value[:8]}{'...' if len(i.value or []) > 8 else ''} "
                     f"({src.constant_rules.get(i.name) or 'given'})" for i in src.extra_inputs if i.value is not None)


def _float(ctx: ExportContext, exporter: Exporter, fp32: Path, chosen: Path, precision: str, validate):
    with ctx.progress.stage(f"convert to {precision} and validate"):
        exporter.convert(ctx, fp32, chosen, precision)
        comp, pred, ram = validate(chosen)
    if not comp.passed:
        raise CheckFailed(f"{precision} artifact fails validation ({comp.task}): {comp.why}",
                          details={"validation": comp.as_dict()})
    return comp, pred, ram


def _int8(ctx: ExportContext, exporter: Exporter, fp32: Path, chosen: Path, validate, recipes: list[str]):
    """The recipe search (exporters/recipes.py); the best passing candidate becomes `chosen`."""
    from lepton_edge.compress import weight_memo
    from lepton_edge.exporters import recipes as search, validation as val

    if ctx.source.quantized_ops and not ctx.source.float_weight_ops and exporter.format == "onnx":
        return _as_given(ctx, fp32, chosen, validate)

    with weight_memo.kept_for_the_search():  # (each candidate's int8 weights are the same: computed once)
        found = search.search(ctx, exporter, exporter.prepare_int8(ctx, fp32), validate, recipes)
    if found.path is None and found.failure:
        raise CheckFailed(found.failure, details={"attempts": found.attempts})
    if found.path is None:
        best = max((a for a in found.attempts if not a.get("skipped")),
                   key=lambda a: tuple(a.get("score") or ()) or (a.get("top1_agreement"),))
        tried = sum(not a.get("skipped") for a in found.attempts)
        crashed = _crashed_note(found.attempts)
        raise CheckFailed(
            f"int8 failed the accuracy gate with all {tried} recipes tried (task {validate.task}; best: "
            f"{best['recipe']}, {best['why']}{crashed}); {search.what_to_try(best, val.RELAX_FLAGS[validate.task])}",
            details={"task": validate.task, "best": best, "attempts": found.attempts})
    found.path.rename(chosen)
    _something_quantized(exporter, chosen)
    ctx.report.compression.quantization = QuantizationSection(
        method=found.method, recipe=found.recipe, float_nodes=found.float_nodes, attempts=found.attempts,
        search_seconds=round(found.seconds, 2), peak_rss_bytes=found.peak_rss_bytes,
        max_memory_bytes=found.max_memory_bytes)
    return found.comparison, found.predict, found.ram


def _something_quantized(exporter: Exporter, chosen: Path) -> None:
    """One line when the int8 artifact quantizes nothing: a model of no op int8 quantizes (an sklearn
    LinearClassifier) passed every recipe as it was, and its bundle said int8 while `inspect` said fp32."""
    if exporter.format != "onnx":
        return
    import onnx

    from lepton_edge.model_source import quantized_ops

    m = onnx.load(str(chosen), load_external_data=False)
    if quantized_ops(m):
        return
    kinds = sorted({n.op_type for n in m.graph.node})
    raise BadInput(f"int8: no op of this model is one int8 quantizes (it has {', '.join(kinds[:6]) or 'no op'}"
                   f"{', ...' if len(kinds) > 6 else ''}), so an int8 bundle would be its fp32 model under another "
                   "name: export it with --precision fp32 (or fp16)")


def _crashed_note(attempts: list[dict]) -> str:
    """What the failure line adds for recipes whose quantizer (or validation) crashed: no accuracy verdict,
    and the line blamed the data alone (a TFLite model with `x * 5` inside: 2 of 3 recipes crashed in the
    quantizer, and "try more or better --calib data" was all it said)."""
    broke = [a for a in attempts if a.get("skipped") and str(a.get("why", "")).startswith(
        ("the quantizer failed", "validating it failed", "the sensitivity pass failed"))]
    return f"; {len(broke)} other(s) could not be made ({broke[0]['recipe']}: {broke[0]['why']})" if broke else ""


def _as_given(ctx: ExportContext, given: Path, chosen: Path, validate):
    """An ONNX file quantized already (an ONNX model zoo -int8/-qdq file, onnxruntime's dynamic quantization)
    asked for int8: its graph as given. Why not the search: quantizing it again put Q/DQ pairs around its
    own (ddddocr's detector, re-exported from its int8 bundle: 56 s, 1.01x the size and 1.24x the time of
    the file given), and the search ranks by the metric before size and time, where no candidate can beat
    the graph it is judged against."""
    import shutil

    from rich.markup import escape

    ops = ", ".join(f"{k} x{v}" for k, v in sorted(ctx.source.quantized_ops.items()))
    unused = (f"; --recipes {','.join(ctx.options.recipes)} not used: no float weights are left to quantize"
              if ctx.options.recipes else "")  # (asked for by name, so say why it was not run, not stay silent)
    ctx.progress.info(f"[dim]the model is quantized already ({escape(ops)}): its graph is kept as given"
                      f"{escape(unused)}[/]")
    shutil.copyfile(given, chosen)
    comp, pred, ram = validate(chosen)
    ctx.report.compression.quantization = QuantizationSection(
        method=f"as given: the model was quantized already ({ops}){unused}", recipe="as-given", search_seconds=0.0)
    return comp, pred, ram


def _record_sizes(ctx: ExportContext, chosen: Path, fp32: Path, precision: str = "fp32") -> int:
    """The artifact's size against fp32's, with a warning line where a smaller precision made it larger (a
    graph of few weights and many activations: 300 branches concatenated grew to 2.2x fp32 as int8, every
    tensor given a quantize/dequantize pair and its parameters), which the export otherwise reported silently."""
    c = ctx.report.compression
    size, fp32_size = chosen.stat().st_size, fp32.stat().st_size
    c.fp32_bytes, c.bytes, c.size_vs_fp32 = fp32_size, size, size / fp32_size
    if precision != "fp32" and size > fp32_size:
        from lepton_edge.ui import human

        logging.getLogger(__name__).warning(
            f"the {precision} model is {size / fp32_size:.2f}x fp32's size ({human(size)} vs {human(fp32_size)}): "
            f"its weights are a small part of it, and what {precision} adds (quantize/dequantize or cast nodes and "
            f"their parameters) outweighs what it saves; --precision fp32 gives the smaller file")
    return size




def _measure_latency(ctx: ExportContext, pred, fp32_pred) -> dict[str, Any]:
    """Batch-1 latency of the artifact and of fp32 on this host, with the profile's threads."""
    from lepton_edge.exporters import validation as val

    if not ctx.options.measure_latency:
        return {}
    x1 = ctx.data.check_x[:1]
    # (the rounds the recipe search timed this very graph in, where it is the one chosen: recipes._finished)
    lat, base = val.paired_latency_ms(pred, fp32_pred, x1, before=getattr(pred, "timed_rounds", None))
    ctx.report.latency = LatencySection(host=writer.toolchain()["host"], threads=writer.threads_used(ctx.profile),
                                        batch=1, p50_ms=lat["p50_ms"], p90_ms=lat["p90_ms"], min_ms=lat["min_ms"],
                                        runs=lat.get("runs"),
                                        fp32_p50_ms=base["p50_ms"], vs_fp32=lat["p50_ms"] / base["p50_ms"])
    if ctx.report.compression.quantization is not None:
        ctx.report.compression.quantization.speed_vs_fp32 = ctx.report.latency.vs_fp32
        if ctx.report.latency.vs_fp32 >= val.SLOWER_THAN_FP32:  # smaller is not faster everywhere: say so
            logging.getLogger(__name__).warning(
                f"the int8 model runs {ctx.report.latency.vs_fp32:.1f}x slower than fp32 on this host (p50 "
                f"{lat['p50_ms']:.3g} vs {base['p50_ms']:.3g} ms): the runtime's kernels here keep some int8 "
                "layers in float behind quantize/dequantize pairs; if speed matters more than size, compare "
                "--precision fp16 or fp32, and measure on the device (`lepton-edge bench`)")
    return ctx.report.latency.record()


def _record_validation(ctx: ExportContext, comp, validate, conversion: ConversionSection | None, size: int,
                       ram: int | None, latency: dict, precision: str) -> None:
    """The budgets checked, then the validation section: the verdict and what it was measured on."""
    o, data, src = ctx.options, ctx.data, ctx.source
    budget = min(b for b in (ctx.profile.max_model_bytes, o.max_size_bytes) if b)
    budgets = writer.check_budgets(ctx, size, budget, ram, latency, precision)
    ctx.report.validation = ValidationSection(**{
        **comp.as_dict(), "min_agreement": o.min_agreement, "max_accuracy_drop_pp": o.max_accuracy_drop,
        "task_inferred": validate.task_inferred, "inputs": data.inputs_record(), "eval_source": data.eval_src,
        "agreement_inputs": data.check_kind,
        "arithmetic": "exact: int8 graph run with onnxruntime's QDQ fusion off (the target's kernels are not this "
                      "host's)" if validate.settings.get("qdq_fusion") is False else None,
        "reference": "pytorch, through the fp32 graph" if conversion else "onnx fp32", "conversion": conversion,
        "trained_weights": src.trained, "budgets": budgets, "passed": True})


def _report(ctx: ExportContext, fmt: str, precision: str, final: Path) -> dict[str, Any]:
    rep = ctx.report
    c = rep.compression
    return {"name": ctx.source.name, "target": ctx.profile.id, "format": fmt, "precision": precision,
            "bundle": str(final), "bytes": c.bytes, "fp32_bytes": c.fp32_bytes, "validation": rep.validation.record(),
            "latency": rep.latency.record() if rep.latency else {}, "compression": c.record(),
            "seconds": time.perf_counter() - rep.started, "peak_rss_bytes": _peak_rss()}


# ---- helpers -----------------------------------------------------------------------------------

def _peak_rss() -> int | None:
    """This process's peak resident memory so far (the export's, when the CLI ran it)."""
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
    except (ImportError, OSError, ValueError):  # no `resource` (Windows) or no figure
        return None


def _recipes_for(exporter: Exporter, asked: list[str] | None, prof) -> list[str]:
    """The int8 recipes to try: the user's, else the profile's, limited to what the format can do."""
    wanted = asked or prof.quantization.recipes
    usable = [r for r in wanted if exporter.supports_recipe(r)]
    if asked and not usable:
        grammar = ("; any of nncf-default, nncf-mixed, <u8|s8>-<minmax|percentile|entropy>[-ends][-sensitive][-w7]"
                   if exporter.format == "onnx" else "")
        raise BadInput(f"--recipes: none of {', '.join(asked)} is a {exporter.format} int8 recipe (for example "
                       f"{', '.join(exporter.recipe_examples)}{grammar})")
    if not asked and len(usable) < len(wanted):
        # the profile's list names recipes of another format (x86-cpu's are onnxruntime's, and a TFLite export
        # there kept nncf-default alone: one quantizer failure and int8 failed): this format's own go after
        nncf = any(r.startswith("nncf") for r in wanted)  # (a profile without NNCF's, jetson's, gets none)
        usable += [r for r in exporter.recipe_examples if r not in usable and (nncf or not r.startswith("nncf"))]
    return usable or list(exporter.recipe_examples)


def _torch_predictor(module, fixed_batch: int | None, batch: int = 64):
    import torch

    from lepton_edge.exporters.validation import stack_outputs

    def calls(x: np.ndarray, step: int) -> list[list[np.ndarray]]:
        with torch.no_grad():
            return [[o.numpy() for o in (out if isinstance(out, (tuple, list)) else [out])]
                    for out in (module(torch.from_numpy(np.ascontiguousarray(x[i:i + step], dtype=np.float32)))
                                for i in range(0, len(x), step))]

    def run(x: np.ndarray) -> list[np.ndarray]:
        step = fixed_batch or batch
        parts = calls(x, step)
        if step > 1 and len(x) > 1 and any(np.ndim(o) == 0 for o in parts[0]):
            step = 1  # a 0-d output reduced over the whole batch: one input a call, as the device runs it
            parts = calls(x, step)
        inputs = [len(x[i:i + step]) for i in range(0, len(x), step)]
        return [o.astype(np.float32) for o in stack_outputs(parts, inputs)]  # (a 0-d output: one value a call)

    return run


def _check_conversion(ctx: ExportContext, fp32_pred, n: int = 8) -> ConversionSection:
    """The fp32 graph must compute what the PyTorch model computes (float rounding aside).

    Why this split: PyTorch on the CPU is slow on depthwise convolutions (30 ms a 224x224 image
    here), so the PyTorch model is run on a few inputs to prove the fp32 graph equal to it, and
    every candidate is then compared with that graph on all the inputs. The chain is
    PyTorch == fp32 graph (to ~1e-5) -> candidate (agreement, accuracy).
    """
    from lepton_edge.exporters import validation as val

    src, x = ctx.source, ctx.data.check_x
    with ctx.progress.stage(f"check the fp32 graph against PyTorch on {min(n, len(x))} inputs"):
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
    return ConversionSection(samples=len(ref[0]), max_abs_diff=worst, top1_agreement=agree)
