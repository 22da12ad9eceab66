"""`lepton-edge export MODEL --compare`: one model through every format and precision, one table.

Why: the choice between ONNX and TFLite, fp32, fp16 and int8 is a trade of size, accuracy and
speed that only measurements on the same model and data settle. Each row is a full, validated
export (bundles are kept), so the table compares artifacts a device could actually receive.
"""
from __future__ import annotations

from typing import Any

from lepton_edge import ui
from lepton_edge.errors import BadInput, LeptonError

VARIANTS = [("onnx", "fp32"), ("onnx", "int8"), ("tflite", "fp32"), ("tflite", "fp16"), ("tflite", "int8")]


def compare(model: Any, options, example_input: Any = None) -> list[dict]:
    """One validated export per variant of `options` (an ExportOptions without format or
    precision: the variants set them), each a row; a variant that fails is a row saying why."""
    from lepton_edge.exporters.base import run_export

    if options.format or options.precision:
        raise BadInput("--compare runs every format and precision; drop --format/--precision")
    rows = []
    for fmt, precision in VARIANTS:
        ui.info(f"[bold]{fmt} {precision}[/]")
        row: dict[str, Any] = {"format": fmt, "precision": precision}
        try:
            variant = options.varied(format=fmt, precision=precision,
                                     int8_io=options.int8_io and fmt == "tflite")  # ONNX keeps float I/O
            rep = run_export(model, variant, example_input).report
        except LeptonError as e:  # one variant failing (a check, an unsupported source) is a row, not the end
            row.update(status="failed", reason=str(e))
            rows.append(row)
            continue
        v, lat = rep["validation"], rep["latency"]
        row.update(status="ok", bundle=rep["bundle"], bytes=rep["bytes"], accuracy=v.get("accuracy_artifact"),
                   accuracy_drop_pp=v.get("accuracy_drop_pp"), agreement=v.get("top1_agreement"),
                   latency_ms=lat.get("p50_ms"), threads=lat.get("threads"),
                   recipe=rep["compression"].get("quantization", {}).get("recipe"))
        rows.append(row)
    return rows


def table(rows: list[dict], title):
    """The rows as a table. Text objects of printable strings for whatever came from the user (the title's
    model and target paths, a failure's reason, which quotes them): "[/]" in a path was a MarkupError
    traceback after every export had run."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    from lepton_edge.ui import human, printable

    t = Table(title=title if isinstance(title, Text) else Text(printable(title)), box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("format", "precision", "size", "accuracy", "drop", "agreement", "p50 latency", "note"):
        t.add_column(col, no_wrap=col != "note")
    for r in rows:
        if r["status"] != "ok":
            t.add_row(r["format"], r["precision"], "-", "-", "-", "-", "-", Text(printable(r["reason"]), style="red"))
            continue
        acc = f"{r['accuracy']:.4f}" if r["accuracy"] is not None else "-"
        drop = f"{r['accuracy_drop_pp']:+.2f}pp" if r["accuracy_drop_pp"] is not None else "-"
        agreement = f"{r['agreement']:.4f}" if r.get("agreement") is not None else "-"
        t.add_row(r["format"], r["precision"], human(r["bytes"]), acc, drop, agreement,
                  f"{r['latency_ms']:.3f}ms ({r['threads']} thr)" if r["latency_ms"] else "-",
                  Text(printable(r["recipe"] or "")))
    return t
