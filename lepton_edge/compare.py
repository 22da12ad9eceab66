"""`lepton-edge export MODEL --compare`: one model through every format and precision, one table.

Why: the choice between ONNX and TFLite, fp32, fp16 and int8 is a trade of size, accuracy and
speed that only measurements on the same model and data settle. Each row is a full, validated
export (bundles are kept), so the table compares artifacts a device could actually receive.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lepton_edge import ui
from lepton_edge.errors import LeptonError

VARIANTS = [("onnx", "fp32"), ("onnx", "int8"), ("tflite", "fp32"), ("tflite", "fp16"), ("tflite", "int8")]


def compare(model: Any, target: str, out: Path, **export_kw) -> list[dict]:
    from lepton_edge import export

    rows = []
    for fmt, precision in VARIANTS:
        ui.info(f"[bold]{fmt} {precision}[/]")
        row: dict[str, Any] = {"format": fmt, "precision": precision}
        kw = {k: v for k, v in export_kw.items() if fmt == "tflite" or k != "int8_io"}
        try:
            rep = export(model, target, out=out, format=fmt, precision=precision, **kw).report
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


def table(rows: list[dict], title: str):
    from rich import box
    from rich.table import Table

    from lepton_edge.ui import human

    t = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("format", "precision", "size", "accuracy", "drop", "agreement", "p50 latency", "note"):
        t.add_column(col, no_wrap=col != "note")
    for r in rows:
        if r["status"] != "ok":
            t.add_row(r["format"], r["precision"], "-", "-", "-", "-", "-", f"[red]{r['reason']}[/]")
            continue
        acc = f"{r['accuracy']:.4f}" if r["accuracy"] is not None else "-"
        drop = f"{r['accuracy_drop_pp']:+.2f}pp" if r["accuracy_drop_pp"] is not None else "-"
        t.add_row(r["format"], r["precision"], human(r["bytes"]), acc, drop, f"{r['agreement']:.4f}" if r.get("agreement") is not None else "-",
                  f"{r['latency_ms']:.3f}ms ({r['threads']} thr)" if r["latency_ms"] else "-", r["recipe"] or "")
    return t
