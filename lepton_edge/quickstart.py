"""`lepton-edge quickstart`: the whole export story offline, on the shipped demo classifier.

Exports zoo:fashion-cnn as fp32 for x86 (the baseline), int8 for x86-cpu and int8 for rpi4,
then prints one table so the size / accuracy / latency trade-off is visible at a glance; runs the
rpi4 bundle the way a device would (the runtime, no torch) on a video of real test images; and ends
with the whole loop (quickstart_fleet.py): a real agent on that video sends telemetry through a local
mosquitto to the monitor, whose store feeds the printed fleet table and the web dashboard.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

from lepton_edge import ui

RUNS = [("x86-cpu", "fp32"), ("x86-cpu", "int8"), ("rpi4", "int8")]


def run(out: Path, quiet: bool = False, broker: str | None = None, serve: bool = False,
        fleet_wait_s: float = 10.0) -> dict[str, Any]:
    """{"exports": [row per bundle], "device_run": {...}, "fleet": what fleet_loop saw}; quiet: no text.
    broker: use this one instead of starting a local mosquitto; serve: keep the loop up until Ctrl-C."""
    from lepton_edge import export
    from lepton_edge.quickstart_fleet import fleet_loop, probe_broker
    from lepton_edge.ui import human

    if broker:
        probe_broker(broker)  # a wrong --broker is one line now, not after minutes of export
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
    c = ui.console()
    t = Table(title="zoo:fashion-cnn, Fashion-MNIST test set (10,000 images); latency on this host",
              box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("target", "prec.", "size", "accuracy", "drop", "agreement", "p50", "int8 recipe"):
        t.add_column(col, no_wrap=True)
    for r in rows:
        t.add_row(r["target"], r["precision"], human(r["bytes"]), f"{r['accuracy']:.4f}",
                  f"{r['accuracy_drop_pp']:+.2f}pp", f"{r['agreement']:.4f}", f"{r['latency_ms']:.3f}ms",
                  r["recipe"] or "-")
    if not quiet:
        c.print(t)
        c.print(f"bundles: {', '.join(r['bundle'] for r in rows)}")
    video = _demo_video(Path(out) / "fashion-test.avi")
    device_run = _run_on_device(rows[-1]["bundle"], video, c, quiet=quiet)
    fleet = fleet_loop(rows[-1]["bundle"], video, Path(out), broker=broker, serve=serve, wait_s=fleet_wait_s,
                       console=c, quiet=quiet)
    result = {"exports": rows, "device_run": device_run, "fleet": fleet}
    if quiet:
        return result
    c.print("next:")
    c.print(f"  lepton-edge run {rows[-1]['bundle']} --source {video} --save {Path(out) / 'annotated.mp4'}")
    c.print(f"  lepton-edge bench {rows[-1]['bundle']} {rows[1]['bundle']} --threads 1,2")
    c.print(f"  lepton-edge inspect {rows[-1]['bundle']}")
    c.print("  lepton-edge targets")
    c.print(f"  lepton-edge export zoo:fashion-cnn --target rpi4 --prune 0.3 --finetune-epochs 1 -o {out}")
    c.print(f"  lepton-edge export zoo:mobilenetv2-fashion --target x86-cpu --max-size 1MB -o {out}")
    return result


def _demo_video(path: Path, n: int = 1000) -> Path:
    """The first n Fashion-MNIST test images as a lossless 56x56 video (a camera's view of them)."""
    import cv2

    from lepton_edge.datasets import fashion_mnist

    x, _ = fashion_mnist("test")
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), 30, (56, 56), False)
    for img in x[:n]:
        w.write(cv2.resize(img, (56, 56), interpolation=cv2.INTER_NEAREST))
    w.release()
    return path


def _run_on_device(bundle: str, video: Path, c, quiet: bool = False) -> dict[str, Any]:
    """What `lepton-edge run` does on the Pi: decode, preprocess from the manifest, LiteRT, top-5."""
    from lepton_edge.datasets import fashion_mnist
    from lepton_edge.pipeline import Pipeline

    _, y = fashion_mnist("test")
    pipe = Pipeline(str(video), bundle)
    hits = sum(r.output[0]["index"] == y[r.index] for r in pipe)
    st = pipe.status()
    pipe.close()
    inf = st["latency_ms"]["inference"]
    res = {"backend": pipe.runtime.describe()["backend"], "frames": st["frames"],
           "accuracy": round(hits / st["frames"], 4), "fps": round(st["fps"], 1),
           "inference_p50_ms": round(inf["p50"], 4)}
    if quiet:
        return res
    c.print(f"device run ({pipe.runtime.describe()['backend']}): {Path(bundle).name} on {st['frames']} video frames, "
            f"accuracy {hits / st['frames']:.4f}, {st['fps']:.0f} fps, inference p50 {inf['p50']:.3f} ms")
    return res
