"""Benchmarks for the export path, the on-device runtime and the agent; writes BENCHMARKS.md (figures + the machine).

    make bench            # or: .venv/bin/python bench/run.py [--quick]

Speed is measured as ratios against a baseline run in the same process (bare onnxruntime, a bare
torch.onnx.export + quantize_static script), because this machine is shared and noisy. Targets
from the issues are printed next to each figure with PASS/FAIL.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle torch threads must not spin beside onnxruntime's

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import fair  # noqa: E402
import lepton_edge  # noqa: E402
from lepton_edge import ui  # noqa: E402

RESULTS: list[tuple[str, list[str], list[list[str]]]] = []
ONNX_MNV2: dict[str, Path] = {}  # fp32/int8 MobileNetV2 ONNX files, measured again beside LiteRT
BUNDLES: dict[str, Path] = {}  # MobileNetV2 int8 bundles from the export sections, reused by the runtime section


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def machine() -> str:
    cpu = "unknown"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if f in flags]
    import importlib.metadata as md

    vers = ", ".join(f"{p} {md.version(p)}" for p in ("torch", "onnxruntime", "onnx", "torch-pruning"))
    return (f"{cpu}; {os.cpu_count()} cores; SIMD: {', '.join(simd) or 'none'}; "
            f"{platform.system()} {platform.machine()}; Python {platform.python_version()}; {vers}")


def photo_folder(folder: Path, n: int) -> Path:
    """n real-photo crops at 224x224 written as JPEG files (a user's --calib folder)."""
    import cv2

    from lepton_edge.datasets import photo_crops

    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(photo_crops(n, 224, seed=7)):
        cv2.imwrite(str(folder / f"crop{i:03d}.jpg"), im)
    return folder


def ort_latency(paths: dict[str, Path], threads: int, x: np.ndarray, rounds: int,
                baseline: str = "fp32") -> tuple[dict[str, float], fair.Ratio]:
    """Median batch-1 latency (ms) of each model on sessions with the runtime's own options, and the
    A/A ratio of `baseline` (bench/engine_latency.py, bench/fair.py)."""
    import engine_latency as el

    ms, figs = el.latency(el.ort_calls(paths, threads, x), rounds, baseline, seed=threads)
    return ms, fair.aa(figs, baseline)


def bench_fashion(out: Path) -> None:
    """Accuracy measured by the bench, not read from the manifest (bench/fashion_bench.py)."""
    import fashion_bench as fb

    RESULTS.append(fb.table(out))


def bench_mobilenet(out: Path, calib: Path, rounds: int) -> None:
    common = dict(target="x86-cpu", out=out, calib=str(calib), measure_latency=False)
    fp32 = lepton_edge.export("zoo:mobilenetv2", precision="fp32", **common)
    int8 = lepton_edge.export("zoo:mobilenetv2", **common)
    pruned = lepton_edge.export("zoo:mobilenetv2", prune=0.3, name="mobilenetv2-p30", **common)
    ONNX_MNV2.update(fp32=fp32.bundle.model_path, int8=int8.bundle.model_path)
    BUNDLES["mobilenetv2 onnx int8"] = int8.bundle.path
    f32b = fp32.report["bytes"]
    p = pruned.manifest.compression["pruning"]
    size_rows = [
        ["int8", f"{int8.report['bytes'] / 1e6:.2f} MB", f"{int8.report['bytes'] / f32b:.3f}", "-", "<= 0.27x file",
         verdict(int8.report["bytes"] / f32b <= 0.27)],
        ["prune 0.3 + int8", f"{pruned.report['bytes'] / 1e6:.2f} MB", f"{pruned.report['bytes'] / f32b:.3f}",
         f"{p['params_after'] / p['params_before']:.3f} ({p['params_after']:,} / {p['params_before']:,})",
         "<= 0.2x file, <= 0.75x params",
         verdict(pruned.report["bytes"] / f32b <= 0.2 and p["params_after"] / p["params_before"] <= 0.75)],
    ]
    RESULTS.append((f"MobileNetV2 1.0 at 224x224 (fp32 file {f32b / 1e6:.2f} MB), x86-cpu profile",
                    ["variant", "file", "file vs fp32", "params vs fp32", "target", "result"], size_rows))
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    lat_rows = []
    for threads in (1, 2):
        import engine_latency as el

        ms, figs = el.latency(el.ort_calls({"fp32": fp32.bundle.model_path, "int8": int8.bundle.model_path,
                                            "p30-int8": pruned.bundle.model_path}, threads, x), rounds, "fp32",
                              seed=threads)
        ratio, p30, aa = fair.ratio(figs["int8"], figs["fp32"]), fair.ratio(figs["p30-int8"], figs["fp32"]), \
            fair.aa(figs, "fp32")
        lat_rows.append([str(threads), f"{ms['fp32']:.2f}", f"{ms['int8']:.2f}", f"{ratio} ({ratio.interval})",
                         f"{ms['p30-int8']:.2f}", f"{p30}", f"{aa} ({aa.interval})", verdict(ratio.median <= 0.7)])
    RESULTS.append(("MobileNetV2 224x224 latency, onnxruntime CPU with the runtime's session options (spinning off), "
                    "batch 1 (ms, median); ratios: median of per-round ratios, 95 % bootstrap interval in brackets, "
                    "slots in a seeded random order per round (bench/fair.py); A/A = fp32 against itself",
                    ["threads", "fp32", "int8", "int8 / fp32", "prune 0.3 + int8", "p30 / fp32", "A/A: fp32 / fp32",
                     "int8 <= 0.7x fp32"],
                    lat_rows))


def litert_latency(paths: dict[str, Path], threads: int, rounds: int,
                   baseline: str = "fp32") -> tuple[dict[str, float], dict[str, list[float]]]:
    """Median invoke() latency (ms) in LiteRT with XNNPACK, and the per-round figures (the
    baseline with an A/A slot), measured like ort_latency."""
    import engine_latency as el

    return el.latency(el.litert_calls(paths, threads), rounds, baseline, seed=threads)


def bench_tflite(out: Path, calib100: Path, rounds: int) -> None:
    """MobileNetV2 224x224 as TFLite (rpi4 profile: NHWC): size, latency beside onnxruntime, conversion time."""
    common = dict(target="rpi4", out=out, calib=str(calib100), measure_latency=False)
    fp32 = lepton_edge.export("zoo:mobilenetv2", precision="fp32", **common)
    fp16 = lepton_edge.export("zoo:mobilenetv2", precision="fp16", **common)
    t0 = time.perf_counter()
    int8 = lepton_edge.export("zoo:mobilenetv2", **common)
    convert_s = time.perf_counter() - t0
    BUNDLES["mobilenetv2 tflite int8"] = int8.bundle.path
    f32b = fp32.report["bytes"]
    RESULTS.append((f"MobileNetV2 224x224 TFLite (litert-torch, rpi4 profile, NHWC; fp32 file {f32b / 1e6:.2f} MB)",
                    ["variant", "file", "file vs fp32", "target", "result"],
                    [["fp16", f"{fp16.report['bytes'] / 1e6:.2f} MB", f"{fp16.report['bytes'] / f32b:.3f}", "-", "-"],
                     ["int8 (best of PT2E and the LiteRT quantizer)", f"{int8.report['bytes'] / 1e6:.2f} MB",
                      f"{int8.report['bytes'] / f32b:.3f}", "<= 0.27x", verdict(int8.report["bytes"] / f32b <= 0.27)],
                     ["int8 conversion wall time, 100 calibration photos, validation included",
                      f"{convert_s:.1f} s", "-", "reported", "-"]]))
    rows = []
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    for threads in (1, 2):
        lt, figs = litert_latency({"fp32": fp32.bundle.model_path, "fp16": fp16.bundle.model_path,
                                   "int8": int8.bundle.model_path}, threads, rounds)
        ort = ort_latency(ONNX_MNV2, threads, x, rounds)[0] if ONNX_MNV2 else {}
        r, aa = fair.ratio(figs["int8"], figs["fp32"]), fair.aa(figs, "fp32")
        rows.append([str(threads), f"{lt['fp32']:.2f}", f"{lt['fp16']:.2f}", f"{lt['int8']:.2f}",
                     f"{r} ({r.interval})", f"{aa} ({aa.interval})", f"{ort.get('fp32', float('nan')):.2f}",
                     f"{ort.get('int8', float('nan')):.2f}"])
    RESULTS.append(("MobileNetV2 224x224 latency (ms, median): LiteRT + XNNPACK beside onnxruntime (the runtime's "
                    "session options, as in the table above), same run; ratio and A/A (LiteRT fp32 against itself) "
                    "as above",
                    ["threads", "LiteRT fp32", "LiteRT fp16", "LiteRT int8", "LiteRT int8 / fp32",
                     "A/A: fp32 / fp32", "ORT fp32", "ORT int8"], rows))


def bare_export(calib: Path, workdir: Path) -> float:
    """What a user would write by hand: torch.onnx.export + quantize_static on the same 100 images."""
    import cv2
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from lepton_edge import zoo

    t0 = time.perf_counter()
    model = zoo.get("mobilenetv2").load()
    torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), str(workdir / "bare.onnx"), input_names=["input"])
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    files = sorted(calib.glob("*.jpg"))[:100]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(files)

        def get_next(self):
            f = next(self.it, None)
            if f is None:
                return None
            im = cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB).astype(np.float32) / 255
            return {"input": ((im - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)}

    quantize_static(str(workdir / "bare.onnx"), str(workdir / "bare-int8.onnx"), Reader(),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    return time.perf_counter() - t0


def bench_wall_time(out: Path, calib100: Path, repeats: int) -> None:
    rows = []
    runs = iter(range(10 ** 6))

    def bare() -> float:
        with tempfile.TemporaryDirectory() as d:
            return bare_export(calib100, Path(d))

    def ours() -> float:  # the bare script's recipe (uint8 MinMax, per-channel QDQ): the same work plus ours
        t0 = time.perf_counter()
        lepton_edge.export("zoo:mobilenetv2", target="x86-cpu", out=out / f"wall{next(runs)}", calib=str(calib100),
                           recipes=["u8-minmax"])
        return time.perf_counter() - t0

    # a seeded random order per round, so drift in machine load hits all alike; the bare script twice (A/A)
    figs = fair.rounds(fair.with_aa({"bare": bare, "ours": ours}, "bare"), repeats, seed=1)
    b, o = statistics.median(figs["bare"]), statistics.median(figs["ours"])
    r, aa = fair.ratio(figs["ours"], figs["bare"]), fair.aa(figs, "bare")
    rows.append(["MobileNetV2 int8, 100 photos, the bare script's recipe (u8-minmax; validation + latency included)",
                 f"{b:.1f}", f"{o:.1f}", f"{r.median:.2f}", f"{aa.median:.2f}",
                 verdict(r.median <= 1.3)])
    t0 = time.perf_counter()  # the default: every candidate that fits --search-time, NNCF first, the best kept
    lepton_edge.export("zoo:mobilenetv2", target="x86-cpu", out=out / "wall-default", calib=str(calib100))
    d = time.perf_counter() - t0
    rows.append(["MobileNetV2 int8, 100 photos, defaults (ranks the candidates within --search-time 180 s)",
                 f"{b:.1f}", f"{d:.1f}", f"{d / b:.2f}", "-", "reported"])
    from lepton_edge.errors import CheckFailed

    t0 = time.perf_counter()
    try:  # a bar int8 does not reach (every top-1 equal) makes every recipe run, sensitivity passes included
        lepton_edge.export("zoo:mobilenetv2-fashion", target="x86-cpu", out=out / "search", min_agreement=1.0)
    except CheckFailed:
        pass
    search = time.perf_counter() - t0
    from lepton_edge import targets

    n = len(targets.load("x86-cpu").quantization.recipes)
    rows.append([f"full recipe search, mobilenetv2-fashion ({n} recipes + sensitivity candidates, 10k-image eval each)",
                 "-", f"{search:.1f}", "-", "-", "reported"])
    RESULTS.append(("Export wall time (s), median of rounds in one process, each round in a seeded random order "
                    "(bench/fair.py); ratio = median of per-round ratios; A/A = the bare script against itself",
                    ["what", "bare torch.onnx.export + quantize_static", "lepton-edge export", "ratio",
                     "A/A: bare / bare", "<= 1.3x"],
                    rows))


def bench_runtime(out: Path, calib: Path, quick: bool) -> None:
    """The on-device runtime: wrapper overhead, pipeline fps, compact features (bench/runtime_bench.py)."""
    import runtime_bench as rb

    fashion = {f"fashion-cnn {fmt} int8": lepton_edge.export("zoo:fashion-cnn", target=t, out=out,
                                                            measure_latency=False).bundle.path
               for fmt, t in (("onnx", "x86-cpu"), ("tflite", "rpi4"))}
    mnv2 = {k: BUNDLES[k] for k in ("mobilenetv2 onnx int8", "mobilenetv2 tflite int8") if k in BUNDLES}
    if "mobilenetv2 onnx int8" not in mnv2:
        mnv2["mobilenetv2 onnx int8"] = lepton_edge.export("zoo:mobilenetv2", target="x86-cpu", out=out,
                                                           calib=str(calib), measure_latency=False).bundle.path
    if "mobilenetv2 tflite int8" not in mnv2:  # the int8 conversion takes minutes: fp32 serves the overhead
        mnv2["mobilenetv2 tflite fp32"] = lepton_edge.export("zoo:mobilenetv2", target="rpi4", precision="fp32",
                                                             out=out, measure_latency=False).bundle.path
    RESULTS.append(rb.overhead(fashion | mnv2, 25 if quick else 101))
    video = rb.camera_video(out / "camera.mp4")
    RESULTS.append(rb.pipeline_fps(mnv2 | fashion, video, 1 if quick else 5, gated=set(mnv2)))
    RESULTS.append(rb.compact_features(out, 10000 if quick else None))


def bench_agent(out: Path, quick: bool) -> None:
    """The device agent: telemetry's cost to frame time, outbox rates (bench/agent_bench.py)."""
    import cv2

    import agent_bench as ab
    from lepton_edge.datasets import fashion_mnist

    out.mkdir(parents=True, exist_ok=True)
    bundle = lepton_edge.export("zoo:fashion-cnn", target="rpi4", out=out, measure_latency=False).bundle.path
    x, _ = fashion_mnist("test")
    video = out / "fashion.avi"
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"FFV1"), 30, (56, 56), False)
    for img in x[:2000]:
        w.write(cv2.resize(img, (56, 56), interpolation=cv2.INTER_NEAREST))
    w.release()
    RESULTS.append(ab.telemetry_cost(bundle, video, 1.0, 20 if quick else 60, out))


def bench_outbox(out: Path, quick: bool) -> None:
    """The outbox alone: put cost by queue depth, drain after a 100k outage (bench/outbox_bench.py)."""
    import agent_bench as ab
    import outbox_bench as obb

    out.mkdir(parents=True, exist_ok=True)
    RESULTS.extend(obb.tables(obb.run(out, quick)))
    # the same through a real broker: commit rate, and a 100k-window outage drained by the publisher
    RESULTS.append(ab.outbox_rates(out, n_drain=10_000 if quick else 100_000))


def bench_flood(out: Path, quick: bool) -> None:
    """Agent RSS under a flood of oversized commands, MQTT 5 and 3.1.1 (bench/command_flood_bench.py)."""
    import command_flood_bench as cfb

    out.mkdir(parents=True, exist_ok=True)
    RESULTS.append(cfb.table(cfb.both(out, seconds=4.0 if quick else 8.0)))


def bench_footprint(out: Path, quick: bool) -> None:
    """Device footprint (bench/footprint_bench.py): kit wheels, installed size and the emulated agent from
    the last `make test-arm64` (out/arm64/result.json), the agent's peak RSS natively with MobileNetV2."""
    import footprint_bench as fpb

    out.mkdir(parents=True, exist_ok=True)
    model = "zoo:fashion-cnn" if quick else "zoo:mobilenetv2"
    RESULTS.extend(fpb.tables(fpb.run(model, None, ROOT / "out" / "arm64" / "result.json",
                                      arm64_more=(fpb.ARM64_MNV2,))))


def bench_third_party(out: Path, quick: bool) -> None:
    """Third-party models from PyPI wheels, int8 by default beside NNCF's default PTQ
    (bench/third_party_bench.py; over an hour for the whole corpus on 2 cores)."""
    import third_party_bench as tpb

    out.mkdir(parents=True, exist_ok=True)
    RESULTS.extend(tpb.tables(tpb.run(out, quick)))


def bench_fleet_ingest(out: Path, quick: bool) -> None:
    """The monitor's ingest vs a bare subscriber (SQLite, PostgreSQL, $share) and the store's size
    per device-day (bench/fleet_ingest_bench.py)."""
    import fleet_ingest_bench as fib

    RESULTS.extend(fib.tables(fib.run(out, quick)))


def bench_fleet_web(out: Path, quick: bool) -> None:
    """The web dashboard: fleet JSON, first paint in Chromium, 24 h chart query (bench/fleet_web_bench.py)."""
    import fleet_web_bench as fwb

    RESULTS.append(fwb.table(fwb.run(out, quick)))


def bench_mutation(out: Path, quick: bool) -> None:
    """Mutation score per module from the last `make mutation` (bench/mutation_bench.py; out/mutation/results.json);
    with no results yet, a run first (a sample of 10 mutants per module with --quick, else 30)."""
    import json

    import mutation_bench as mb

    if not mb.RESULTS.exists():
        mb.run(list(mb.MODULES), 10 if quick else 30, ROOT, 900.0)
    RESULTS.append(mb.table(json.loads(mb.RESULTS.read_text())))


SECTIONS = ["fashion", "mobilenet", "tflite", "wall", "runtime", "agent", "outbox", "flood", "fleet_ingest",
            "fleet_web", "footprint", "third_party", "mutation"]
STORE = ROOT / "bench" / "results.json"  # every section's last tables, so `--only` refreshes one section


def write(path: Path, fresh: dict[str, list], store: Path = STORE) -> None:
    import json

    saved = json.loads(store.read_text()) if store.exists() else {}
    stamp = f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {machine()}"
    for key, tables in fresh.items():
        saved[key] = {"when": stamp, "tables": tables}
    store.write_text(json.dumps(saved, indent=1) + "\n")
    lines = ["# Benchmarks", "", f"Machine: {machine()}", "",
             "Generated by `make bench` (bench/run.py; `--only SECTION` refreshes one section). Ratios compare runs "
             "made in the same process, interleaved in a seeded random order per round with a warm-up before each "
             "timed slot (bench/fair.py); each ratio table has an A/A figure, the baseline against itself, which "
             "shows the method's own bias on that run.", ""]
    for key in SECTIONS:
        if key not in saved:
            continue
        lines += [f"<!-- section {key}: {saved[key]['when']} -->", ""]
        for title, header, rows in saved[key]["tables"]:
            lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(r) + " |" for r in rows]
            lines.append("")
    lines += ["Notes:",
              "- Fair ratios (bench/fair.py): calls that alternate in a fixed order measure the order too (the same",
              "  call in both slots read 0.98x, and reversing the order moved `Runtime.predict` from 0.97x to 1.02x).",
              "  Every round now runs each slot once in a shuffled order, each slot warmed up before it is timed; a",
              "  ratio is the median of per-round ratios with a bootstrap 95 % interval; the A/A figure beside it is",
              "  the baseline in a second slot. A ratio inside the A/A's spread of 1.00 is no measured difference.",
              "- Fashion-MNIST accuracy is measured by the bench (the bundle through the device runtime, the fp32",
              "  PyTorch model through the bench's own preprocessing), not read from the manifest: the exporter",
              "  enforces the same thresholds, so its own figures could only read PASS.",
              "- onnxruntime baselines use the runtime's session options (bench/engine_latency.py: `OnnxBackend`,",
              "  spinning off); with spinning on, a session's idle threads slowed the next session's run on two cores.",
              "- MobileNetV2 224x224 uses torchvision's architecture with random weights (nothing is downloaded);",
              "  its figures are size, parameters, latency and time, not accuracy. Calibration images are crops of",
              "  scikit-learn's two sample photographs.",
              "- Accuracy figures use the zoo models the project trains itself (lepton_edge/zoo/train.py).",
              "- TFLite int8 size: the schema stores a float32 scale and an int64 zero point per output channel of",
              "  every per-channel weight and bias (0.42 MB for MobileNetV2; the interpreter wants as many zero",
              "  points as scales). The exporter writes each repeated vector once (all zero points are 0), which",
              "  takes 0.29 MB off with bit-identical outputs (exporters/tflite_flatbuffer.py `_pack`).",
              "- Runtime overhead: the gated figure is `Runtime.predict` returning the raw outputs, the same work as",
              "  the bare call; top-5 classification with labels costs the few microseconds shown beside it, which",
              "  the bare call does not do at all.",
              "- Pipeline: gated for MobileNetV2 at the pipeline's default thread count (this machine's cores less",
              "  one, left to capture). Two inference threads plus the capture thread oversubscribe two cores. The",
              "  demo classifier is reported only: at 640x480 its preprocessing (~0.25 ms) costs more than its",
              "  inference (~0.08 ms) and nearly as much as decoding, and neither baseline includes it. The",
              "  pipeline moves that preprocessing to the inference thread (decided from the stage times), which",
              "  lifts the demo from ~0.5 to 0.6-0.8 of decode-only; two busy threads on this machine's two",
              "  vCPUs still slow each other's decoding and preprocessing.", ""]
    path.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description="export-path benchmarks -> BENCHMARKS.md")
    ap.add_argument("--quick", action="store_true", help="fewer latency rounds and repeats")
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--only", type=lambda v: v.split(","), default=None, metavar="SECTION[,SECTION]",
                    help=f"run these sections only ({', '.join(SECTIONS)}); the others keep their last figures")
    a = ap.parse_args()
    if a.only and set(a.only) - set(SECTIONS):
        ap.error(f"unknown section(s): {', '.join(sorted(set(a.only) - set(SECTIONS)))}")
    ui.set_quiet(True)
    work = Path(tempfile.mkdtemp(prefix="lepton-bench-"))
    try:
        calib = photo_folder(work / "photos", 130)
        calib100 = work / "photos100"
        calib100.mkdir()
        for f in sorted(calib.glob("*.jpg"))[:100]:
            shutil.copy(f, calib100 / f.name)
        steps = {"fashion": lambda: bench_fashion(work / "fashion"),
                 "mobilenet": lambda: bench_mobilenet(work / "mnv2", calib, 40 if a.quick else 200),
                 "tflite": lambda: bench_tflite(work / "tflite", calib100, 40 if a.quick else 200),
                 "wall": lambda: bench_wall_time(work / "wall", calib100, 1 if a.quick else 5),
                 "runtime": lambda: bench_runtime(work / "runtime", calib, a.quick),
                 "agent": lambda: bench_agent(work / "agent", a.quick),
                 "outbox": lambda: bench_outbox(work / "outbox", a.quick),
                 "flood": lambda: bench_flood(work / "flood", a.quick),
                 "fleet_ingest": lambda: bench_fleet_ingest(work / "fleet_ingest", a.quick),
                 "fleet_web": lambda: bench_fleet_web(work / "fleet_web", a.quick),
                 "footprint": lambda: bench_footprint(work / "footprint", a.quick),
                 "third_party": lambda: bench_third_party(work / "third_party", a.quick),
                 "mutation": lambda: bench_mutation(work / "mutation", a.quick)}
        fresh: dict[str, list] = {}
        for key, step in steps.items():
            if a.only and key not in a.only:
                continue
            done = len(RESULTS)
            step()
            fresh[key] = [list(t) for t in RESULTS[done:]]
            for title, _, rows in RESULTS[done:]:
                print(title, file=sys.stderr)
                for r in rows:
                    print("   ", " | ".join(r), file=sys.stderr)
        write(a.out, fresh)
        print(f"wrote {a.out}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
