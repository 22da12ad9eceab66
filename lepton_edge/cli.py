"""`lepton-edge` command line: one thin command per verb over the library, no logic of its own.

Exit codes: 0 success, 1 a check failed (validation, budget), 2 bad input (file, flag, profile).
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import typer
from rich import box
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from lepton_edge import logs, ui
from lepton_edge.errors import BadInput, CheckFailed, LeptonError


class _Interrupted(Exception):
    """Ctrl-C (or SIGTERM, see _interrupt_on_sigterm) inside a verb, carried past typer to main()."""


class _Group(typer.core.TyperGroup):
    """The root group: a KeyboardInterrupt leaves a verb as _Interrupted. Why: typer turns it into a
    silent exit 130, so main()'s 'interrupted' line (its --log-json record too) was never written and a
    stopped export or bench ended without a word."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise _Interrupted from None


app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="Export small, fast, validated model bundles for edge devices, run them there, and watch them.")
targets_app = typer.Typer(help="List target profiles, or show one.", invoke_without_command=True)
app.add_typer(targets_app, name="targets")
keys_app = typer.Typer(help="Signing keys for bundles (ed25519).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
out = ui.console()
log = logging.getLogger("lepton_edge.cli")  # not __name__: `python -m lepton_edge.cli` names it __main__


@app.callback()
def _logging_options(
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors on stderr; no progress bars."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug records too, each with its time, level "
                                 "and logger."),
    log_json: bool = typer.Option(False, "--log-json", envvar="LEPTON_EDGE_LOG_JSON", help="Log records as JSON "
                                  "lines on stderr (time, level, logger, message, fields), for log shippers."),
) -> None:
    # Options of every verb (before it: `lepton-edge --quiet export ...`): logging is set up once, here.
    if quiet and verbose:
        raise BadInput("--quiet and --verbose contradict each other; choose one")
    logs.configure(verbosity=-1 if quiet else 1 if verbose else 0, json_lines=log_json)


_emit_json = ui.emit_json


@targets_app.callback()
def targets_list(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """Table of the built-in target profiles."""
    if ctx.invoked_subcommand:
        return
    from lepton_edge import targets
    from lepton_edge.ui import human

    profs = targets.all_profiles()
    if as_json:
        return _emit_json([p.model_dump() for p in profs])
    t = Table(title="target profiles", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("id", "arch", "runtime", "default", "threads", "max model", "RAM", "latency", "opset"):
        t.add_column(col, no_wrap=True)
    for p in profs:
        t.add_row(p.id, p.arch, p.runtime.replace("onnxruntime", "ort"), f"{p.format} {p.precision}", str(p.threads),
                  human(p.max_model_bytes, binary=True), human(p.ram_budget_bytes, binary=True),
                  f"{p.latency_budget_ms:g}ms", str(p.max_opset))
    out.print(t)
    out.print("[dim]lepton-edge targets show ID for one profile; --target PATH.toml for your own[/]")


@targets_app.command("show")
def targets_show(target: str = typer.Argument(..., help="Profile id or path to a .toml file."),
                 as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """All fields of one profile."""
    from lepton_edge import targets

    p = targets.load(target)
    if as_json:
        return _emit_json(p.model_dump())
    # Text of printable strings: a profile is someone's file; "[/]" in its description was a MarkupError
    # traceback, and an ESC in it reached the terminal
    t = Table(title=Text(ui.printable(f"{p.id}: {p.description}")), show_header=False)
    for k, v in p.model_dump().items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items())
        t.add_row(Text(ui.printable(k)), Text(ui.printable(v)))
    out.print(t)


def _floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise BadInput(f"{what} must be comma-separated numbers, got {text!r}") from None


@app.command()
def export(
    model: str = typer.Argument(..., help="zoo:NAME, a .onnx, .pt (TorchScript) or .pt2 (torch.export) file."),
    target: str = typer.Option("x86-cpu", "--target", "-t", help="Profile id (see `targets`) or a .toml path."),
    output: Path = typer.Option(Path("out"), "--out", "-o", help="Parent directory of the bundle."),
    precision: str | None = typer.Option(None, help="fp32, fp16 or int8 (default: the target's)."),
    fmt: str | None = typer.Option(None, "--format", help="onnx or tflite (default: the target's)."),
    layout: str | None = typer.Option(None, help="Input layout NCHW or NHWC (default: the target's)."),
    int8_io: bool = typer.Option(False, "--int8-io", help="TFLite int8: integer-only input/output (for "
                                 "integer-only accelerators); the manifest records the input's scale/zero-point."),
    input_shape: str | None = typer.Option(None, help="e.g. 1,3,224,224 (needed for .pt/.pt2 files)."),
    weights: str | None = typer.Option(None, help="state_dict for a zoo architecture (torchvision keys)."),
    labels: Path | None = typer.Option(None, help="labels.txt, one class name a line."),
    calib: str | None = typer.Option(None, help="Calibration data: image folder/glob, .npy/.npz or video."),
    calib_samples: int | None = typer.Option(None, help="Calibration samples (default: the target's)."),
    eval_set: str | None = typer.Option(None, "--eval", help="Labelled evaluation set: class folders or .npz."),
    eval_limit: int | None = typer.Option(None, help="Use at most this many evaluation samples."),
    train: str | None = typer.Option(None, help="Labelled training data for --finetune-epochs."),
    prune: float | None = typer.Option(None, help="Structured pruning ratio, e.g. 0.3 removes 30% of channels."),
    finetune_epochs: int = typer.Option(0, help="Fine-tune after pruning for this many epochs."),
    max_prune_drop: float = typer.Option(2.0, help="--prune with a labelled --eval: maximum accuracy pruning may "
                                         "cost, in percentage points against the unpruned model."),
    max_size: str | None = typer.Option(None, help="Size budget, e.g. 1MB (tighter than the target's)."),
    task: str | None = typer.Option(None, help="classify, detect, segment, embed or raw: picks the validation "
                                       "metrics (default: inferred from the outputs; stated in the report)."),
    min_agreement: float | None = typer.Option(None, help="classify: top-1 agreement wanted; embed: nearest-"
                                                  "neighbour agreement wanted (default: the fp32 model's own "
                                                  "agreement under input noise, its ceiling, minus 0.05)."),
    min_confident_kept: float = typer.Option(0.99, help="classify: share of confident fp32 top-1 (softmax >= 0.5) "
                                             "kept (one miss allowed when few)."),
    min_top5: float = typer.Option(0.98, help="classify: share of fp32 top-1 within the top-5 (> 5 classes)."),
    max_accuracy_drop: float = typer.Option(0.5, help="classify with a labelled --eval: maximum accuracy drop in "
                                            "percentage points (the main gate)."),
    min_sqnr: float = typer.Option(12.0, help="Dense and raw outputs: minimum SQNR in dB, each output."),
    min_cosine: float = typer.Option(0.97, help="Dense/raw outputs and embeddings: minimum mean cosine similarity."),
    min_f1: float = typer.Option(0.9, help="detect: minimum F1 of boxes matched to fp32's (IoU >= 0.5)."),
    min_mask_iou: float = typer.Option(0.8, help="segment: minimum IoU of probability masks (>= 0.5) with "
                                       "fp32's, pooled over the validation inputs; and of a label output's "
                                       "values (an ArgMax's: mean IoU over them)."),
    min_correlation: float = typer.Option(0.5, help="Dense/raw outputs: minimum correlation of the artifact's values "
                                          "with fp32's about their means (an offset cannot hide a flattened "
                                          "output)."),
    recipes: str | None = typer.Option(None, help="int8 recipes to try in order, e.g. nncf-default,u8-percentile."),
    search_time: float = typer.Option(180.0, help="int8: seconds to spend trying recipes; the best that passes "
                                      "is kept (the first always completes)."),
    max_memory: str | None = typer.Option(None, help="Memory budget of the export, e.g. 4GB: the "
                                             "reference outputs are validated on as many inputs as it holds, an int8 "
                                             "recipe over it is stopped and skipped (default: available memory less a "
                                             "margin)."),
    allow_synthetic_calibration: bool = typer.Option(False, help="Calibrate int8 on random data (ruins accuracy)."),
    name: str | None = typer.Option(None, help="Bundle name (default: the model's)."),
    color: str | None = typer.Option(None, help="Input colour order: RGB, BGR or GRAY."),
    resize: str | None = typer.Option(None, help="How frames of another shape become the input: stretch "
                                      "(default), letterbox (keeps the aspect ratio) or center_crop."),
    mean: str | None = typer.Option(None, help="Per-channel mean after scaling to 0..1, e.g. 0.485,0.456,0.406."),
    std: str | None = typer.Option(None, help="Per-channel std, e.g. 0.229,0.224,0.225."),
    input_value: list[str] | None = typer.Option(None, "--input-value", help="NAME=V1,V2,...: the constant fed "
                                                 "to a non-image input of a multi-input model (repeatable; "
                                                 "default: a rule by name, or zeros; the export says which, "
                                                 "and `inspect BUNDLE` shows it)."),
    compare: bool = typer.Option(False, "--compare", help="Export ONNX fp32/int8 and TFLite fp32/fp16/int8 "
                                 "and print one comparison table."),
    as_json: bool = typer.Option(False, "--json", help="Print the export report as JSON on stdout."),
):
    """Export MODEL for a target: prune, quantize, validate, check the budget, write a bundle."""
    from lepton_edge import export as do_export
    from lepton_edge.exporters.options import ExportOptions
    from lepton_edge.model_source import parse_shape
    from lepton_edge.paths import check_output_dir

    if as_json:
        ui.set_quiet(True)
    if recipes is not None and not recipes.strip(" ,"):
        raise BadInput("--recipes is empty: name at least one recipe, or leave it out for the target's")
    check_output_dir(output, "--out")  # before minutes of work, not after
    options = ExportOptions.of(  # flags as typed (case aside); every check is the options' own
        flags=True, target=target, out=output, name=name, format=fmt, precision=precision,
        layout=layout.upper() if layout else None, int8_io=int8_io,
        input_shape=parse_shape(input_shape) if input_shape else None, weights=weights,
        labels=_read_labels(labels) if labels is not None else None, color=color.upper() if color else None,
        resize=resize.lower() if resize else None, mean=_floats(mean, "--mean"), std=_floats(std, "--std"),
        input_values=input_value or None,
        calib=calib, calib_samples=calib_samples,
        eval=eval_set, eval_limit=eval_limit, train=train, allow_synthetic_calibration=allow_synthetic_calibration,
        prune=prune, finetune_epochs=finetune_epochs, max_prune_drop=max_prune_drop,
        recipes=recipes.split(",") if recipes else None,
        search_time=search_time, max_memory=max_memory, max_size=max_size, task=task.lower() if task else None,
        min_agreement=min_agreement, max_accuracy_drop=max_accuracy_drop, min_confident_kept=min_confident_kept,
        min_top5=min_top5, min_sqnr=min_sqnr, min_cosine=min_cosine, min_f1=min_f1, min_mask_iou=min_mask_iou,
        min_correlation=min_correlation)
    _interrupt_on_sigterm()  # a `timeout` or a service stop: the export's work folder is removed as on Ctrl-C
    from lepton_edge.runtime.onnx import stop_runs_on_signals

    stop_runs_on_signals()  # ... also while the model runs: a Loop that never ends held a SIGTERM for its 600 s limit
    if compare:
        from lepton_edge.compare import compare as do_compare, table

        rows = do_compare(model, options)
        if as_json:
            _emit_json(rows)
        else:
            out.print(table(rows, Text(ui.printable(f"{model} for {target}: formats and precisions (latency on "
                                                     "this host)"))))  # (paths: text, not markup)
        if all(r["status"] != "ok" for r in rows):
            raise CheckFailed("no variant passed its checks")
        return
    r = do_export(model, options=options)
    if as_json:
        return _emit_json({"ok": True, **r.report})
    _print_report(r.report)


def _read_labels(path: Path, max_bytes: int = 4 << 20) -> list[str]:
    """labels.txt: UTF-8 text, one class a line; one line (exit 2) for a missing, huge or binary file."""
    if not path.is_file():  # (a folder or a FIFO there read "not found", which sent users looking for a typo)
        raise BadInput(f"labels file {path}: not a regular file" if path.exists() else f"labels file not found: {path}")
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as e:
        raise BadInput(f"cannot read labels file {path}: {e.strerror or e}") from None
    if len(raw) > max_bytes:
        raise BadInput(f"labels file {path}: larger than {max_bytes >> 20} MB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"labels file {path}: not UTF-8 text (byte {e.start}); one class name a line") from None
    if "\x00" in text:
        raise BadInput(f"labels file {path}: binary data (NUL bytes); one class name a line")
    # lines end at \n (and \r\n) only: splitlines() also breaks at U+0085, U+2028 and the like, which would
    # split one label into two and shift every class name after it; a label holding one is refused instead
    # (stripped of any whitespace at its ends: a line of only U+3000 or NBSP is no label, as before)
    return [ln.strip() for ln in text.split("\n") if ln.strip()]


_GATES = {  # metric -> (threshold key, "min"/"max", format)
    "accuracy_drop_pp": ("max_accuracy_drop", "max", "{:.2f} pp"), "top1_agreement": ("top1_agreement_required", "min",
                                                                                    "{:.4f}"),
    "confident_top1_kept": ("min_confident_kept", "min", "{:.4f}"), "top1_in_top5": ("min_top5", "min", "{:.4f}"),
    "f1_vs_fp32": ("min_f1", "min", "{:.4f}"), "nn_agreement": ("nn_agreement_required", "min", "{:.4f}"),
    "sqnr_db": ("min_sqnr", "min", "{:.1f} dB"), "cosine": ("min_cosine", "min", "{:.4f}"),
    "mask_iou": ("min_mask_iou", "min", "{:.4f}"), "label_iou": ("min_mask_iou", "min", "{:.4f}"),
    "correlation": ("min_correlation", "min", "{:.4f}"),
    "score_drift": (None, "", "{:.4f}"), "ceiling": (None, "", "{:.4f}"),
    "mask_samples": (None, "", "{:.0f} inputs show fp32's mask"),
    "box_inputs": (None, "", "{:.0f} inputs show boxes (fp32's or its own)"),
    "max_rel_diff": ("max_rel_diff_allowed", "max", "{:.4f}"),
}


def _confident_allowed(v: dict, bound: float) -> int:
    from lepton_edge.exporters.task_metrics import confident_losses_allowed

    return confident_losses_allowed(int(v["confident_samples"]), bound)


def _closeness_rule(v: dict, metric: str, rule: str) -> str:
    """SQNR's or cosine's threshold as the gate held it (task_metrics.dense): on every output, on
    some of them (named), or on none (reported, and what judged the outputs instead)."""
    from lepton_edge.exporters.task_metrics import closeness_gated_on, closeness_reported

    why = closeness_reported(v, metric)
    if why:
        return f" (reported; {why})"
    on = closeness_gated_on(v, metric) or []
    judged = [o for o in v.get("per_output") or [] if isinstance(o, dict) and o.get("gated_by")]
    if rule and on and len(on) < len(judged):
        return f"{rule[:-1]} on {', '.join(ui.printable(n) for n in on)})"
    return rule


def _gate_rows(v: dict) -> list[tuple[str, str]]:
    """Each measured metric with its threshold (the export summary shows what decided)."""
    th = dict(v.get("thresholds") or {})
    th["top1_agreement_required"] = v.get("top1_agreement_required")
    th["nn_agreement_required"] = v.get("nn_agreement_required")
    from lepton_edge.exporters.task_metrics import NO_EVIDENCE_MAX_REL

    th["max_rel_diff_allowed"] = NO_EVIDENCE_MAX_REL  # (of each output's range, where no F1 could be judged)
    rows = []
    for m, (key, sense, fmt) in _GATES.items():
        if v.get(m) is None:
            continue
        bound = th.get(key) if key else None
        rule = f" ({'>=' if sense == 'min' else '<='} {fmt.format(bound)})" if bound is not None else ""
        if m == "confident_top1_kept" and bound is not None and v.get("confident_samples"):
            rule = f" (>= {fmt.format(bound)}: at most {_confident_allowed(v, bound)} of " \
                   f"{int(v['confident_samples'])} lost)"
        if m == "top1_agreement" and bound is not None and v[m] < bound and v.get("top1_agreement_p") is not None:
            from lepton_edge.exporters.task_metrics import AGREEMENT_P

            # below the line by chance: an artifact on the line would differ this often with probability p
            rule = f" (>= {fmt.format(bound)}, or as near as chance allows on {int(v['samples'])} inputs: " \
                   f"p {v['top1_agreement_p']:.2f} >= {AGREEMENT_P:g})"
        if m in ("sqnr_db", "cosine"):
            rule = _closeness_rule(v, m, rule)
        rows.append((m, fmt.format(v[m]) + rule))
    return rows


def _print_report(rep: dict) -> None:
    from lepton_edge.ui import human

    v, c, lat = rep["validation"], rep["compression"], rep["latency"]
    # (printable: the name and the bundle's path come from the user's model and flags, ESC and all)
    t = Table(title=Text(ui.printable(f"{rep['name']} -> {rep['target']} ({rep['format']} {rep['precision']})")),
              show_header=False)
    t.add_row("bundle", Text(ui.printable(rep["bundle"])))
    t.add_row("size", f"{human(rep['bytes'])} ({rep['bytes'] / rep['fp32_bytes']:.2f}x fp32)")
    if "pruning" in c:
        p = c["pruning"]
        t.add_row("pruning", f"{p['ratio']:.0%}: params {p['params_before']:,} -> {p['params_after']:,} "
                             f"({p['params_after'] / p['params_before']:.2f}x)")
    if "quantization" in c:
        qz = c["quantization"]
        attempts = qz.get("attempts") or []
        tried = sum(not a.get("skipped") for a in attempts)
        t.add_row("int8 recipe", f"{qz['recipe']} (quantized already: no search)" if qz["recipe"] == "as-given" else
                  f"{qz['recipe']} ({tried} of {len(attempts)} candidates validated; "
                  f"float layers: {', '.join(qz.get('float_nodes') or []) or 'none'})")
    if c.get("fp16", {}).get("float_nodes"):
        f16 = c["fp16"]
        t.add_row("fp32 nodes", f"{f16['float_node_count']} kept in fp32 (out of fp16's range): "
                                f"{', '.join(f16['float_nodes'][:5])}{' ...' if f16['float_node_count'] > 5 else ''}")
    t.add_row("validation", f"task {v.get('task')}{' (inferred)' if v.get('task_inferred') else ''}, "
                            f"{int(v['samples'])} inputs ({v['agreement_inputs']})")
    for name, text in _gate_rows(v):
        t.add_row(f"  {name}", text)
    if v.get("accuracy_reference") is not None:
        t.add_row("accuracy", f"{v['accuracy_reference']:.4f} -> {v['accuracy_artifact']:.4f} "
                              f"({-v['accuracy_drop_pp']:+.2f} pp) on {v['eval_samples']} ({v['eval_source']})")
    if "p50_ms" in lat:
        t.add_row("latency", f"{lat['p50_ms']:.3f} ms p50 on this host, {lat['threads']} thread(s) "
                             f"({lat['vs_fp32']:.2f}x fp32)")
    t.add_row("time", f"{rep['seconds']:.1f} s")
    out.print(t)
    out.print(f"next: [bold]lepton-edge inspect {escape(ui.printable(rep['bundle']))}[/]")


def _plain_rows(t: Table):
    """add_row for cells shown as written: names and shapes come from the file, and a tensor named
    'a[/]b' is text, not Rich markup (it raised MarkupError); control characters show as '?' (a producer
    name of ESC[2J cleared the terminal, and a newline printed a line of the file's choosing)."""
    from lepton_edge.ui import printable

    return lambda key, value: t.add_row(key, Text(printable(value)))


@app.command()
def inspect(path: Path = typer.Argument(..., help="A bundle directory, an .onnx or a .tflite file."),
            as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """Inputs/outputs (dynamic dims, layout), opset, op histogram, parameters, precision, size."""
    from lepton_edge.inspect import inspect as do_inspect
    from lepton_edge.ui import human

    info = do_inspect(path)
    if as_json:
        return _emit_json(info)
    # (printable: the path is the user's, and a file named with ESC[2J cleared the terminal it was inspected on)
    t = Table(title=Text(ui.printable(str(path))), show_header=False)
    row = _plain_rows(t)
    opset = f", opset {info['opset']}" if info.get("opset") else ""
    row("format", f"{info['format']}{opset} {info.get('producer', '')}".strip())
    row("precision", info["precision"])
    row("size", human(info["bytes"]))
    row("parameters", f"{info['parameters']:,}")
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            dyn = f" dynamic dims {v['dynamic']}" if v["dynamic"] else ""
            lay = f" {v['layout']}" if v.get("layout") else ""
            qp = v.get("quantization")
            pc = (qp or {}).get("per_channel")
            quant = "" if not qp else f" scale={qp['scale']:.6g} zero_point={qp['zero_point']}" if not pc else \
                (f" per-channel along axis {pc['axis']}: {pc['channels']} scales {pc['min_scale']:.6g}.."
                 f"{pc['max_scale']:.6g}")
            shape = "(rank unknown)" if v["shape"] is None else v["shape"]
            row(kind[:-1], f"{v['name']}: {v['dtype']} {shape}{lay}{dyn}{quant}")
    b = info.get("bundle")
    rules = {c["name"]: c.get("rule") for c in (b or {}).get("constant_inputs", [])}
    for c in (b or {}).get("constant_inputs") or info.get("constant_inputs", []):  # the manifest's, else the file's
        vals = c["value"]
        shown = ("not listed (large)" if vals is None else
                 f"[{', '.join(f'{x:g}' for x in vals[:8])}{', ...' if len(vals) > 8 else ''}]")
        rule = f" ({rules[c['name']]})" if rules.get(c["name"]) else ""
        shape = "(rank unknown)" if c["shape"] is None else c["shape"]
        row("constant input", f"{c['name']}: {c['dtype']} {shape} = {shown}{rule}")
    row("ops", ", ".join(f"{k} {n}" for k, n in info["ops"].items()))
    if info["custom_ops"]:
        row("custom ops", ", ".join(info["custom_ops"]))
    if "xnnpack" in info:
        x = info["xnnpack"]
        row("XNNPACK", x["error"] if "error" in x else x["note"] if "note" in x else
                  f"applied, {x['partitions']} delegated partition(s)" if x["applied"] else "not applied")
    if b:
        row("bundle", f"{b['name']} for {b['target']}, task {b['task']}, checksums {b['checksums']}")
        s = b["input_spec"]
        row("preprocess", f"{s['color']} {s['layout']} resize={s['resize']} scale={s['scale']:.5g} "
                                f"mean={s['mean']} std={s['std']}")
        v = b["validation"]
        if v:
            acc = (f", accuracy {v['accuracy_reference']:.4f} -> {v['accuracy_artifact']:.4f}"
                   if v.get("accuracy_reference") is not None else "")
            agree = (f"agreement {v['top1_agreement']:.4f}" if v.get("top1_agreement") is not None
                     else f"task {v.get('task')}, passed {v.get('passed')}")
            row("validation", f"{agree}{acc}")
        if b["quantization"]:
            row("int8 recipe", f"{b['quantization']['recipe']}; float layers: "
                                     f"{', '.join(b['quantization']['float_nodes']) or 'none'}")
    out.print(t)


@app.command()
def run(
    model: str = typer.Argument(..., help="A bundle directory, or a plain .onnx / .tflite file."),
    source: str = typer.Option(..., "--source", "-s", help="Camera index (0), video file, rtsp:// or http:// "
                               "URL, image folder or glob ('frames/*.png'), a GStreamer pipeline, or a .npy/.npz of "
                               "inputs (a row an input, for a model whose input is not an image)."),
    save: Path | None = typer.Option(None, "--save", help="Write an annotated video (.mp4, .avi, .mkv)."),
    jsonl: str | None = typer.Option(None, "--jsonl", help="Write every result as a JSON line ('-': stdout)."),
    raw_values: int = typer.Option(4096, "--raw-values", min=0, max=1 << 24,
                                   help="Values of a raw output a JSON line carries whole; a larger output is "
                                        "summarised (shape, min, max, mean, argmax)."),
    max_frames: int | None = typer.Option(None, "--max-frames", "-n", min=1, help="Stop after this many frames."),
    threads: int | None = typer.Option(None, help="Inference threads, 1..64 (default: the bundle's target's, "
                                          "leaving one core of this machine to capture)."),
    delegate: list[str] | None = typer.Option(None, "--delegate", help="NAME=/abs/path/lib.so: a LiteRT delegate "
                                                 "this machine allows; a bundle may name it (repeatable)."),
    max_reconnects: int = typer.Option(5, "--max-reconnects", help="Live sources: give up after this many "
                                       "reconnects in a row with no decodable frame (0: never)."),
    input_spec: str | None = typer.Option(None, "--input-spec", help="For plain models, or to override: "
                                             "'layout=NHWC;color=BGR;size=320x320;scale=1/255;mean=..;std=..' "
                                             "or a JSON file."),
    task: str | None = typer.Option(None, help="classify, detect, embed or raw (default: the bundle's)."),
    top_k: int = typer.Option(5, "--top-k", min=1, help="Classes per classification result."),
    conf: float = typer.Option(0.25, help="Detection score threshold."),
    iou: float = typer.Option(0.45, help="Detection NMS IoU threshold."),
    every: float = typer.Option(1.0, min=0.0, max=86400.0, help="Seconds between console lines (0: every result)."),
    show: bool | None = typer.Option(None, "--show/--no-show", help="Show a window (default: when a "
                                        "display exists)."),
    as_json: bool = typer.Option(False, "--json", help="Print the run summary as JSON on stdout."),
    trusted_key: list[Path] | None = typer.Option(None, "--trusted-key", help="A public key (PEM, `lepton-edge "
                                                  "keys new`): run the bundle only if one of these signed it "
                                                  "(repeatable), as the agent's trusted_keys."),
    max_run_s: float | None = typer.Option(None, "--max-run-s", help="One inference's time limit in seconds, "
                                           "past which the run stops with an error (default 120; LiteRT "
                                           "cannot stop a run, so the process ends)."),
    max_run_mib: int | None = typer.Option(None, "--max-run-mib", min=1, help="How far, in MiB, the process "
                                           "may grow while one inference runs, past which it ends with an error "
                                           "(default: max(2048, 12x the model's files in MiB))."),
):
    """Run a bundle on frames from a camera, video, stream or images; per-stage timing at the end."""
    from lepton_edge.capture import open_source
    from lepton_edge.pipeline import Pipeline, capture_threads

    if max_reconnects < 0:
        raise BadInput(f"--max-reconnects must be 0 or more, got {max_reconnects}")
    _interrupt_on_sigterm()  # from the start: a SIGTERM while a stream opens ended the process without a word
    from lepton_edge.runtime.onnx import stop_runs_on_signals

    if every != every:  # (NaN passes the range: every result was printed)
        raise BadInput("--every: a number of seconds from 0 to 86400, got nan")
    stop_runs_on_signals()  # Ctrl-C stops a long onnxruntime run at once, and any engine stuck past 5 s ends the
    # process (runtime/hard_stop.py): a LiteRT loop or a model's load is deaf to Python's handlers
    _check_signature(model, trusted_key)
    rt = _load_runtime(model, threads=threads, input_spec=input_spec, task=task, top_k=top_k, conf=conf, iou=iou,
                       delegate=delegate, max_run_s=max_run_s,
                       max_run_bytes=max_run_mib << 20 if max_run_mib else None)
    src = open_source(source, decode_threads=capture_threads(rt), max_reconnects=max_reconnects or None)
    pipe = Pipeline(src, rt, max_frames=max_frames)
    outs = _run_sinks(pipe, src, rt, every=every, jsonl=jsonl, save=save, show=show,
                      lines_to_stderr=as_json or jsonl == "-", raw_values=raw_values)
    d = rt.describe()
    ui.info(f"[bold]{escape(ui.printable(rt.name))}[/] ({d['backend']}, {d['threads']} thread(s), task {rt.task}) "
            f"on {src.kind} {escape(ui.printable(src.spec))}")
    interrupted = _drive(pipe, outs)
    status = pipe.status() | {"model": d, "interrupted": interrupted}
    _report_run(status, as_json)
    failed = getattr(src, "failure", None)
    if failed and not interrupted:
        raise BadInput(f"{src.spec}: {failed}")
    # (the model's own error when it failed on every frame: it was counted, unsaid; a stop is not a failure)
    if status["frames"] == 0 and not interrupted:
        why = f": {pipe.last_failure}" if pipe.last_failure else ""
        raise BadInput(f"no frame could be read or processed from {src.spec!r}{why}")


def _check_signature(model: str, trusted: list[Path] | None) -> None:
    """With --trusted-key, the bundle must verify (lepton_edge.signing.verify) before anything of it runs.
    Without, a signature is only mentioned: a tampered signed bundle ran without a word, as if checked."""
    p = Path(model)
    if trusted:
        from lepton_edge import signing

        if not p.is_dir():
            raise BadInput(f"--trusted-key checks a bundle's signature; {model} is not a bundle directory")
        kid = signing.verify(p, list(trusted))
        log.info(f"bundle signed by trusted key {kid}")
    elif p.is_dir() and (p / "signature").exists():
        log.warning(f"{model}: its signature was not checked (give --trusted-key PUBLIC.pem to run it only when "
                    "it verifies; the agent checks it with trusted_keys)")


def _load_runtime(model: str, delegate: list[str] | None, **kw):
    """The runtime for `run`, one core left to capture; what it chose to ignore becomes warnings."""
    from lepton_edge.runtime import Runtime
    from lepton_edge.runtime.delegates import parse_allowlist

    rt = Runtime.load(model, leave_cores=1, delegates=parse_allowlist(delegate), **kw)
    for w in rt.warnings:
        log.warning(w)
    return rt


def _run_sinks(pipe, src, rt, *, every: float, jsonl: str | None, save: Path | None, show: bool | None,
               lines_to_stderr: bool, raw_values: int = 4096) -> list:
    """Where results go: rate-limited console lines (on stderr when stdout carries JSON, and not at
    all when stderr carries JSON log records), JSON lines, an annotated video, a window."""
    from lepton_edge import sinks

    outs: list = []
    if not (lines_to_stderr and logs.json_mode()):
        outs.append(sinks.ConsoleLines(ui.err if lines_to_stderr else out, every, pipe.stats))
    _not_the_source(src, jsonl=None if jsonl == "-" else jsonl, save=save)
    if not rt.takes_images and (save or show):  # (arrays: nothing to draw on)
        raise BadInput(f"{'--save' if save else '--show'} draws results on the frames, and {rt.name}'s input is "
                       "not an image: use --jsonl for its results")
    window = sinks.Window(f"lepton-edge: {rt.name}") if rt.takes_images and (
        show or (show is None and sinks.display_available())) else None
    # (first: its refusal must come before a file output is created or truncated)
    if jsonl:
        outs.append(sinks.JsonLines(None if jsonl == "-" else Path(jsonl), raw_limit=raw_values))
    if save:
        outs.append(sinks.VideoOut(save, src.fps))
    if window is not None:
        outs.append(window)
    return outs


def _not_the_source(src, **outputs) -> None:
    """One line when an output file is the file the frames come from, or two outputs are one file.
    Why: `--save clip.avi -s clip.avi` overwrote the video while it was read (20 frames became 13), and
    `--jsonl clip.avi` replaced it with JSON lines."""
    inputs: set[Path] = set()
    if src.kind in ("video", "arrays"):
        inputs.add(Path(src.spec).resolve())
    elif src.kind == "images":
        inputs.update(Path(f).resolve() for f in getattr(src, "files", []))
    seen: dict[Path, str] = {}
    for flag, value in outputs.items():
        if not value:
            continue
        out = Path(value).expanduser().resolve()
        if out in inputs:
            raise BadInput(f"--{flag} {value}: that is the source being read (or one of its files); write elsewhere")
        if out in seen:
            raise BadInput(f"--{flag} {value}: the same file as --{seen[out]}")
        seen[out] = flag


def _interrupt_on_sigterm() -> None:
    """SIGTERM raises KeyboardInterrupt here, as Ctrl-C does: the `with` blocks unwind (an export's
    temporary work folder, up to several GB of candidates, used to stay behind) and main() prints
    'interrupted' (exit 130)."""
    import signal

    def _stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)


def _drive(pipe, outs: list) -> bool:
    """Every result to every sink until the source ends; Ctrl-C or SIGTERM ends it early (True)."""
    _interrupt_on_sigterm()
    try:
        for r in pipe:
            for o in outs:
                o.write(r)
    except KeyboardInterrupt:
        return True
    finally:
        failed = None
        for o in outs:  # every sink closed, the first failure said after (a full disk fails at close)
            try:
                o.close()
            except BadInput as e:
                failed = failed or e
        pipe.close()
        if failed is not None:
            raise failed
    return False


def _report_run(status: dict, as_json: bool) -> None:
    """The run summary: JSON on stdout (--json), one log record (--log-json), else a table on stderr."""
    if as_json:
        _emit_json(status)
    elif logs.json_mode():
        log.info("%s: %d frame(s)", status["model"]["name"], status["frames"], extra={"summary": status})
    else:
        _print_run_summary(status)


def _print_run_summary(s: dict) -> None:
    fps = f", {s['fps']:.1f} fps" if s["fps"] else ""
    t = Table(title=Text(ui.printable(f"{s['model']['name']}: {s['frames']} frame(s){fps}")), box=box.SIMPLE_HEAD,
              pad_edge=False)  # (the name is the bundle's: ESC in it cleared the operator's screen)
    for col in ("stage", "p50", "p95", "p99", "max"):
        t.add_column(col, justify="left" if col == "stage" else "right")
    for stage, v in s["latency_ms"].items():
        if v:
            t.add_row(stage, *(f"{v[k]:.3f}ms" for k in ("p50", "p95", "p99", "max")))
    ui.err.print(t)
    src = s["source"]
    ui.err.print(f"dropped {s['dropped']}, corrupt/skipped {s['corrupt']}, reconnects {src['reconnects']}"
                 + (" (interrupted)" if s["interrupted"] else ""))


@app.command()
def bench(
    models: list[str] = typer.Argument(..., help="Bundles or .onnx/.tflite files to compare."),
    threads: str | None = typer.Option(None, help="Thread counts, e.g. 1,2 (default: each bundle's target)."),
    # (at most a million: each run's stage times are kept, and --runs 99999999999 was one row reading
    # "MemoryError: Unable to allocate 745. GiB", 1e20 a bare "ValueError: Maximum allowed dimension exceeded")
    runs: int = typer.Option(200, min=1, max=1_000_000, help="Timed runs per configuration."),
    warmup: int = typer.Option(20, min=0, help="Untimed runs first."),
    source: str | None = typer.Option(None, "--source", "-s", help="Frames from a video/images, or a .npy "
                                         "of inputs (default: a synthetic 640x480 frame; zeros for a model whose "
                                         "input is not an image)."),
    input_spec: str | None = typer.Option(None, "--input-spec", help="For plain models (see `run`)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    max_time: float = typer.Option(900.0, "--max-time", help="Seconds the whole comparison may take; past them "
                                   "bench ends with one line after the rows measured (a model far too slow "
                                   "for --runs)."),
    max_run_mib: int | None = typer.Option(None, "--max-run-mib", min=1, help="How far, in MiB, the process may "
                                           "grow during one run (default: max(2048, 12x the model's files))."),
):
    """Per-stage latency percentiles, throughput and peak RSS; one table across models and threads."""
    from lepton_edge import bench as b

    # SIGTERM (`timeout`, a cancelled CI job) as Ctrl-C: the measuring child is ended with bench. It stayed
    # behind, busy for up to --runs runs and holding the caller's stdout and stderr open
    _interrupt_on_sigterm()
    thr = b.parse_threads(threads)
    total = len(models) * len(thr)
    with ui.progress("benchmarking", total) as advance:
        try:
            rows = b.compare(models, thr, runs, warmup, source, input_spec, progress=advance, max_s=max_time,
                             max_run_bytes=max_run_mib << 20 if max_run_mib else None)
        except b.OverBudget as e:
            if e.rows and not as_json:  # what was measured is shown; the line says where the time ran out
                out.print(b.table(e.rows, f"{runs} runs after {warmup} warm-up, on this host (incomplete)"))
            raise
    if as_json:
        _emit_json(rows)
    else:
        out.print(b.table(rows, f"{runs} runs after {warmup} warm-up, on this host"))
    for note in dict.fromkeys(r["note"] for r in rows if r.get("note")):  # (once, whatever the thread counts)
        log.warning(note)
    if all("error" in r for r in rows):
        raise BadInput("; ".join(r["error"] for r in rows))


@keys_app.command("new")
def keys_new(output: Path = typer.Option(Path("keys"), "--out", "-o",
                                         help="Directory for private.pem and public.pem.")):
    """Make an ed25519 key pair: sign bundles with private.pem, give devices public.pem."""
    from lepton_edge.paths import check_output_dir
    from lepton_edge.signing import key_id, load_public, new_keys

    check_output_dir(output, "--out")
    try:
        priv, pub = new_keys(output)
    except OSError as e:  # a race or an odd file system past the check: still one line
        raise BadInput(f"--out {output}: cannot write keys ({e.strerror or e})") from None
    out.print(f"private key {priv} (keep it secret), public key {pub} (key id {key_id(load_public(pub))})")
    out.print(f"next: [bold]lepton-edge sign BUNDLE --key {priv}[/]; list {pub} under trusted_keys in agent.toml")


@app.command()
def sign(bundle: Path = typer.Argument(..., help="Bundle directory."),
         key: Path = typer.Option(..., "--key", "-k", help="private.pem from `lepton-edge keys new`.")):
    """Sign a bundle (its checksums are verified first); devices with the public key accept it.

    The signature records the time it was made: a device refuses a bundle signed before the newest
    one it has run (a replay). To roll a device back to an older bundle on purpose, sign it again."""
    from lepton_edge.signing import exposed, read_signature, sign as do_sign, utc

    sig = do_sign(bundle, key)
    if why := exposed(key):
        log.warning(why)
    out.print(f"signed: {sig} (at {utc(read_signature(sig.parent).signed_at or 0)})")


@app.command()
def agent(
    config: Path | None = typer.Option(None, "--config", "-c", help="agent.toml (flags override its fields)."),
    broker: str | None = typer.Option(None, help="mqtt://host:1883, mqtts://host:8883, ws://host:9001/mqtt."),
    username: str | None = typer.Option(None, help="Broker user name."),
    password: str | None = typer.Option(None, help="Broker password."),
    ca_file: Path | None = typer.Option(None, help="CA certificate for TLS."),
    cert_file: Path | None = typer.Option(None, help="Client certificate for TLS."),
    key_file: Path | None = typer.Option(None, help="Client key for TLS."),
    fleet: str | None = typer.Option(None, help="Fleet name (a topic segment)."),
    device_id: str | None = typer.Option(None, help="Device id (default: hostname or machine id)."),
    bundle: Path | None = typer.Option(None, help="Bundle to start with (a deployed one in state-dir wins)."),
    source: str | None = typer.Option(None, "--source", "-s", help="Frame source, as for `run`."),
    loop: bool | None = typer.Option(None, "--loop/--no-loop", help="Video files: start again at the end."),
    threads: int | None = typer.Option(None, min=1, help="Inference threads."),
    window_s: float | None = typer.Option(None, "--window", help="Seconds per telemetry window (default 10)."),
    state_dir: Path | None = typer.Option(None, help="Outbox and deployed bundles (default /var/lib/lepton-edge)."),
    outbox_max: int | None = typer.Option(None, help="Outbox bound in messages (oldest dropped, counted)."),
    trusted_key: list[Path] | None = typer.Option(None, "--trusted-key", help="Public key(s) bundles must be "
                                                     "signed with; unsigned bundles are then refused."),
    deploy_path: list[Path] | None = typer.Option(None, "--deploy-path", help="A directory a deploy command's "
                                                     "`path` may name a bundle in (repeatable; default "
                                                     "STATE_DIR/incoming)."),
):
    """The device service: run the pipeline, send telemetry over MQTT, take deploy/set/ping commands."""
    import signal

    from lepton_edge.agent.config import load
    from lepton_edge.agent.service import Agent

    cfg = load(config, {"broker": broker, "username": username, "password": password, "ca_file": ca_file,
                        "cert_file": cert_file, "key_file": key_file, "fleet": fleet, "device_id": device_id,
                        "bundle": bundle, "source": source, "loop": loop, "threads": threads, "window_s": window_s,
                        "state_dir": state_dir, "outbox_max": outbox_max, "trusted_keys": trusted_key or None,
                        "deploy_paths": [p.absolute() for p in deploy_path] if deploy_path else None})
    logs.show_timestamps()  # a service's lines on a terminal carry the time (the journal stamps its own)
    early: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: early.append(1))  # a stop while the model loads: kept for run()
    a = Agent(cfg)  # it logs through logging: plain lines in the journal, no markup read from messages
    signal.signal(signal.SIGTERM, a.request_stop)  # (a flag: stop() from a handler could deadlock, see there)
    if early:  # (SIGTERM's default action killed it mid-load: exit -15, no offline status, no last window)
        a.stop()  # (here, outside any handler and before run() waits, stop() is safe and the pipeline never starts)
    from lepton_edge.telemetry.broker import redacted

    ui.info(f"agent {cfg.fleet}/{cfg.device_id} -> {redacted(cfg.broker)} (boot {a.boot_id}); "
            f"telemetry every {cfg.window_s:g} s")
    raise typer.Exit(a.run())


@app.command()
def deploy(
    target: str = typer.Argument(..., help="FLEET/DEVICE, or FLEET for every online device of the fleet."),
    bundle: str = typer.Argument(..., help="A local bundle directory (served to the devices), or an http(s) URL."),
    broker: str = typer.Option(..., help="The fleet's broker, e.g. mqtt://broker:1883."),
    username: str | None = typer.Option(None), password: str | None = typer.Option(None),
    ca_file: Path | None = typer.Option(None), cert_file: Path | None = typer.Option(None),
    key_file: Path | None = typer.Option(None),
    device_path: bool = typer.Option(False, help="BUNDLE is a path on the device (already copied there, "
                                     "into a directory of its agent's deploy_paths: STATE_DIR/incoming by default)."),
    serve_host: str | None = typer.Option(None, help="Address devices reach this machine at (default: the "
                                             "one that reaches the broker)."),
    serve_port: int = typer.Option(0, min=0, max=65535, help="Port to serve the bundle on (default: any free one)."),
    timeout: float = typer.Option(120.0, help="Seconds to wait for the devices' replies."),
    health_frames: int | None = typer.Option(None, help="Frames the device checks the new model on."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Ask devices to switch to a bundle; each verifies, swaps, health-checks and replies (or rolls back)."""
    from lepton_edge.fleet.deploy import deploy as do_deploy
    from lepton_edge.ui import printable

    rows = do_deploy(target, bundle, broker, username=username, password=password,
                     ca_file=str(ca_file) if ca_file else None, cert_file=str(cert_file) if cert_file else None,
                     key_file=str(key_file) if key_file else None, device_path=device_path, serve_host=serve_host,
                     serve_port=serve_port, timeout=timeout, health_frames=health_frames)
    if as_json:
        _emit_json(rows)
    else:
        t = Table(title=Text(ui.printable(f"deploy {bundle} to {target}")), box=box.SIMPLE_HEAD, pad_edge=False)
        for col in ("device", "result", "detail"):
            t.add_column(col)
        for r in rows:
            t.add_row(Text(printable(r["device"])), "[green]ok[/]" if r["ok"] else "[red]failed[/]",
                      Text(printable(_deploy_detail(r))[:300]))
        out.print(t)
    if not all(r["ok"] for r in rows):
        raise CheckFailed(f"{sum(not r['ok'] for r in rows)} of {len(rows)} device(s) did not take the bundle")


def _deploy_detail(row: dict) -> str:
    """One device's deploy outcome in a line. Its reply is the device's own JSON: any field may be any
    type (a `bundle` that was a string made the whole table a traceback, every other device's outcome lost)."""
    if row["error"]:
        return str(row["error"])
    d = row["data"] if isinstance(row["data"], dict) else {}
    bundle = d.get("bundle") if isinstance(d.get("bundle"), dict) else {}
    return (f"{bundle.get('name')}: inference p50 {d.get('inference_p50_ms')} ms "
            f"(budget {d.get('latency_budget_ms')} ms)")


@app.command()
def quickstart(output: Path = typer.Option(Path("out/quickstart"), "--out", "-o", help="Where the bundles go."),
               as_json: bool = typer.Option(False, "--json", help="Print the comparison as JSON."),
               broker: str | None = typer.Option(None, help="Broker for the fleet loop (default: a local "
                                                    "mosquitto on a free loopback port)."),
               serve: bool = typer.Option(False, "--serve", help="Keep the agent, monitor and dashboard up "
                                          "until Ctrl-C.")):
    """Offline demo: export the demo classifier for rpi4 and x86-cpu, compare them, run the rpi4 bundle
    on a video, then the whole loop: agent -> MQTT -> monitor -> fleet table and web dashboard."""
    from lepton_edge.quickstart import run

    result = run(output, quiet=as_json, broker=broker, serve=serve)
    if as_json:
        return _emit_json(result)


# The operator's verbs (monitor, simulate, fleet ...) and the device kit live beside the code they drive;
# their modules import only typer at the top, so mounting them costs the other verbs nothing.
from lepton_edge.fleet import cli as _fleet_cli  # noqa: E402
from lepton_edge.kit_cli import kit as _kit  # noqa: E402

app.command("monitor")(_fleet_cli.monitor)
app.command("simulate")(_fleet_cli.simulate)
app.add_typer(_fleet_cli.fleet_app, name="fleet")
app.command("kit")(_kit)


class _Stdout:
    """sys.stdout for the verbs, remembering a write to it that failed (`failed`): main() then says so in
    one line. Why: a full disk under `lepton-edge inspect B --json > report.json` (or /dev/full) was an
    OSError traceback, exit 1, and nothing tells that error from any other OSError once it is raised."""

    def __init__(self, f):
        self._f, self.failed = f, None

    def write(self, text):
        try:
            return self._f.write(text)
        except OSError as e:
            self.failed = e
            raise

    def flush(self):
        try:
            return self._f.flush()
        except OSError as e:
            self.failed = e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def _stdout_to_null() -> None:
    """fd 1 to /dev/null: the interpreter's last flush of what is still buffered must not fail again (an
    'Exception ignored ... OSError' and exit 120 after our line)."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)


def _closed_stdout(e: BaseException) -> bool:
    """Whether `e` is a write to a stdout that was closed when the process started (`>&-`: sys.stdout is
    None), not some other AttributeError, whose traceback must not be hidden behind that line."""
    return isinstance(e, AttributeError) and "'NoneType' object has no attribute" in str(e) \
        and any(w in str(e) for w in ("'write'", "'flush'", "'isatty'", "'fileno'", "'encoding'"))


def _json_refusal(stdout, error: str, exit_code: int, details: dict | None = None) -> None:
    """With `--json`, the refusal (or the interruption) as stdout's one document when the verb printed none;
    written now (flushed), while a stdout that cannot take it is still ours to pass over. Why: with stdout
    closed (`>&-`) this write was an AttributeError traceback, and on /dev/full (or a full disk, at the last
    flush) an OSError one: exit 1 instead of the refusal's line and code. Such a stdout gets nothing; the
    line on stderr says what was refused, and a failure is kept in `stdout.failed` for main()."""
    if stdout is None or stdout.failed is not None:
        return
    try:
        ui.json_error(error, exit_code, details)
        stdout.flush()
    except OSError:
        pass


def main() -> None:
    """Entry point: usage errors are typer's (exit 2); our errors print one line (exit 1 or 2)."""
    stdout = sys.stdout = _Stdout(sys.stdout) if sys.stdout is not None else None
    args = sys.argv[1:]
    ui.start_json_output("--json" in (args[:args.index("--")] if "--" in args else args))
    try:
        try:
            app()
        except SystemExit:
            if stdout is not None:  # what the verb printed is written now, while a failure is still ours to
                stdout.flush()  # report: buffered (stdout to a file), `--json > /dev/full` failed at the
            raise  # interpreter's exit, 'Exception ignored' and exit 120, or exit 0 with the output lost
    except LeptonError as e:
        _json_refusal(stdout, str(e), e.exit_code, e.details)  # (`--json`: the document stdout gets)
        if logs.json_mode():
            log.error(str(e), extra={"exit_code": e.exit_code})
        else:
            # (printable: a message quotes names from model files and profiles; an ESC in an input's name
            # reached the terminal, where `\x1b]0;...` retitled it and `\x1b[2J` cleared the screen)
            ui.err.print(f"[red]error:[/] {escape(ui.printable(e))}", soft_wrap=True)
        if stdout is not None and stdout.failed is not None:
            _stdout_to_null()
        sys.exit(e.exit_code)
    except (OSError, AttributeError) as e:
        failed = stdout.failed if stdout is not None else None
        if failed is None and not (stdout is None and _closed_stdout(e)):
            raise
        _stdout_to_null()
        if isinstance(failed, BrokenPipeError):  # `... | head`: the reader had what it wanted (exit 1, as click)
            sys.exit(1)
        why = f"cannot write the output to stdout: {failed.strerror if failed is not None else 'it is closed'}"
        if logs.json_mode():
            log.error(why, extra={"exit_code": BadInput.exit_code})
        else:
            ui.err.print(f"[red]error:[/] {escape(why)}", soft_wrap=True)
        sys.exit(BadInput.exit_code)
    except (KeyboardInterrupt, _Interrupted):
        _json_refusal(stdout, "interrupted", 130)
        if logs.json_mode():
            log.warning("interrupted", extra={"exit_code": 130})
        else:
            ui.err.print("interrupted")
        if stdout is not None and stdout.failed is not None:
            _stdout_to_null()
        sys.exit(130)


if __name__ == "__main__":
    main()
