"""`lepton-edge quickstart`: the whole export story offline, on the shipped demo classifier.

Exports zoo:fashion-cnn as fp32 for x86 (the baseline), int8 for x86-cpu and int8 for rpi4,
then prints one table so the size / accuracy / latency trade-off is visible at a glance.
"""
from __future__ import annotations

from pathlib import Path

from rich import box
from rich.table import Table

from lepton_edge import ui

RUNS = [("x86-cpu", "fp32"), ("x86-cpu", "int8"), ("rpi4", "int8")]


def run(out: Path, quiet: bool = False) -> list[dict]:
    from lepton_edge import export
    from lepton_edge.ui import human

    ui.set_quiet(quiet)
    rows = []
    for target, precision in RUNS:
        ui.info(f"[bold]export zoo:fashion-cnn --target {target} --precision {precision}[/]")
        r = export("zoo:fashion-cnn", target, out=out, precision=precision)
        rep = r.report
        v = rep["validation"]
        rows.append({
            "bundle": rep["bundle"], "target": target, "precision": precision, "bytes": rep["bytes"],
            "accuracy": v["accuracy_artifact"], "accuracy_drop_pp": v["accuracy_drop_pp"],
            "agreement": v["top1_agreement"], "latency_ms": rep["latency"].get("p50_ms"),
            "recipe": rep["compression"].get("quantization", {}).get("recipe"),
        })
    if quiet:
        return rows
    c = ui.console()
    t = Table(title="zoo:fashion-cnn, Fashion-MNIST test set (10,000 images); latency on this host",
              box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("target", "prec.", "size", "accuracy", "drop", "agreement", "p50", "int8 recipe"):
        t.add_column(col, no_wrap=True)
    for r in rows:
        t.add_row(r["target"], r["precision"], human(r["bytes"]), f"{r['accuracy']:.4f}",
                  f"{r['accuracy_drop_pp']:+.2f}pp", f"{r['agreement']:.4f}", f"{r['latency_ms']:.3f}ms",
                  r["recipe"] or "-")
    c.print(t)
    c.print(f"bundles: {', '.join(r['bundle'] for r in rows)}")
    c.print("next:")
    c.print(f"  lepton-edge inspect {rows[-1]['bundle']}")
    c.print("  lepton-edge targets")
    c.print(f"  lepton-edge export zoo:fashion-cnn --target rpi4 --prune 0.3 --finetune-epochs 1 -o {out}")
    c.print(f"  lepton-edge export zoo:mobilenetv2-fashion --target x86-cpu --max-size 1MB -o {out}")
    return rows
