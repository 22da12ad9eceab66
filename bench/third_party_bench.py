"""Third-party models (issue 14): every model of the corpus (tests/third_party/corpus.py: real
pretrained models shipped in PyPI wheels) exported as a user would, with default flags, and NNCF's
default post-training quantization on the same inputs beside it.

Per model: `lepton-edge export` int8 (the default) for x86-cpu, fp16, fp32, and for rpi4; then
`lepton-edge run` on real frames. Every command runs in its own process under a memory limit
(`prlimit --as`) and a timeout, timed by `/usr/bin/time -v` (peak RSS), so one model that eats
memory costs a line in the table, not the machine. The int8 artifacts (ours and NNCF's) are judged
here, independently of the exporter's own gate, on held-out photo crops against the fp32 bundle:
classifiers by top-1 agreement (and its ceiling: fp32 against itself under input noise of sd
0.01), confident top-1 kept and fp32 top-1 within int8 top-k; every model by the worst output's
SQNR and cosine; probability maps by mask IoU.

The int8 export's time against NNCF's is measured again in TIME_ROUNDS paired rounds (each round runs
the same export and the same NNCF process once, in a shuffled order: bench/fair.py), and the table gives
the median of the per-round ratios with its bootstrap interval. Why: one run of each, minutes apart on
this shared 2-core machine, put the same export at 15-25 s and NNCF's at 8-32 s across benches.

    .venv/bin/python bench/third_party_bench.py [--quick] [--models a,b]   # prints JSON, then the table
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import fair  # noqa: E402  (bench/fair.py: shuffled paired rounds)
from third_party.corpus import MODELS, calib_dir, calib_for, eval_dir, fetch, judge_on  # noqa: E402

CLI = str(Path(sys.executable).parent / "lepton-edge")
MEM_LIMIT = int(os.environ.get("LEPTON_BENCH_MEM", 8 << 30))  # address-space cap of every command
TIMEOUT_S = int(os.environ.get("LEPTON_BENCH_TIMEOUT", 900))
QUICK_MODELS = ("ppocr-cls", "mtcnn-onet")
TIME_ROUNDS = int(os.environ.get("LEPTON_BENCH_TIME_ROUNDS", 3))  # paired rounds of int8 export vs NNCF (0: none)


def guarded(cmd: list[str], timeout: int = TIMEOUT_S, cwd: Path | None = None) -> dict:
    """Run cmd under a memory cap and a timeout; rc, wall time, peak RSS, stdout, stderr's last line."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        full = ["/usr/bin/time", "-v", "-o", tf.name, "timeout", "-k", "10", str(timeout),
                "prlimit", f"--as={MEM_LIMIT}", "--", *cmd]
        t0 = time.perf_counter()
        r = subprocess.run(full, capture_output=True, text=True, cwd=cwd)
        wall = time.perf_counter() - t0
        stats = Path(tf.name).read_text()
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stats)
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    why = next((ln for ln in reversed(err) if ln.lower().startswith(("error", "int8", "fp16"))), err[-1] if err else "")
    if r.returncode == 124:
        why = f"timed out after {timeout} s"
    elif r.returncode in (-9, 137) or "MemoryError" in r.stderr or "std::bad_alloc" in r.stderr:
        why = f"out of memory (cap {MEM_LIMIT >> 20} MiB): {why}"
    return {"rc": r.returncode, "wall_s": round(wall, 1), "peak_rss_mb": round(int(m.group(1)) / 1024) if m else None,
            "stdout": r.stdout, "why": why[:400] if r.returncode else None}


def model_file(bundle: Path) -> Path | None:
    man = json.loads((bundle / "manifest.json").read_text())
    files = man.get("files") or {}
    names = list(files) if isinstance(files, dict) else [f.get("path") or f.get("name") for f in files]
    for n in names:
        if n and n.endswith((".onnx", ".tflite")):
            return bundle / n
    return None


def export_cmd(model: str, src: Path, out: Path, target: str, precision: str | None) -> list[str]:
    m = MODELS[model]
    cmd = [CLI, "export", str(src), "--target", target, "--calib", str(calib_for(m)), "--out", str(out), "--json",
           *m.flags]
    return cmd + (["--precision", precision] if precision else [])


def export(model: str, src: Path, out: Path, target: str, precision: str | None) -> dict:
    """One guarded `lepton-edge export`; its record is kept beside the bundle, so a re-run with the
    same --work reuses it (the full matrix takes long on a shared machine)."""
    record = out.with_suffix(".json")
    if record.exists():
        return json.loads(record.read_text())
    shutil.rmtree(out, ignore_errors=True)
    cmd = export_cmd(model, src, out, target, precision)
    res = guarded(cmd)
    res["cmd"] = " ".join(c if c != CLI else "lepton-edge" for c in cmd)
    bundles = [p.parent for p in out.rglob("manifest.json")] if out.exists() else []
    res["bundle"] = str(bundles[0]) if bundles and res["rc"] == 0 else None
    if res["bundle"]:
        f = model_file(Path(res["bundle"]))
        res["file"] = str(f) if f else None
        res["bytes"] = f.stat().st_size if f else None
        try:
            res["report"] = summary(json.loads(res["stdout"]))
        except (ValueError, AttributeError, TypeError):
            pass
    res.pop("stdout", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(res, default=str))
    return res


GATE_METRICS = ("top1_agreement", "ceiling", "confident_top1_kept", "confident_samples", "top1_in_top5",
                "accuracy_drop_pp", "f1_vs_fp32", "score_drift", "nn_agreement", "sqnr_db", "cosine", "mask_iou",
                "mask_samples", "box_inputs", "max_rel_diff", "label_iou", "correlation")


def summary(rep: dict) -> dict:
    """What the table shows of one export report: task, gate decision with its metrics and
    thresholds, the int8 candidates tried (and why each passed, failed or was skipped), size,
    latency, time, peak RSS."""
    v = rep.get("validation") or {}
    comp = rep.get("compression") or {}
    quant = comp.get("quantization") or {}
    lat = rep.get("latency") or {}
    out = {"format": rep.get("format"), "precision": rep.get("precision"), "task": v.get("task"),
           "task_inferred": v.get("task_inferred"), "passed": v.get("passed"),
           "metrics": {k: v[k] for k in GATE_METRICS if isinstance(v.get(k), (int, float))},
           "thresholds": v.get("thresholds"), "inputs": v.get("inputs"), "recipe": quant.get("recipe"),
           "size_vs_fp32": comp.get("size_vs_fp32"), "latency_vs_fp32": lat.get("vs_fp32"),
           "seconds": rep.get("seconds"), "peak_rss_bytes": rep.get("peak_rss_bytes")}
    from lepton_edge.exporters.task_metrics import closeness_reported

    # (SQNR and cosine that no output's gate judged, and what judged them instead)
    out["reported"] = {k: why for k in ("sqnr_db", "cosine") if (why := closeness_reported(v, k))}
    if quant.get("attempts"):
        out["attempts"] = [{"recipe": a.get("recipe"), "passed": a.get("passed"), "skipped": a.get("skipped"),
                            "chosen": a.get("chosen"), "why": (a.get("why") or "")[:160]} for a in quant["attempts"]]
    return out


def run_bundle(bundle: str, source: Path) -> dict:
    res = guarded([CLI, "run", bundle, "--source", str(source), "--max-frames", "20", "--json", "--no-show"],
                  timeout=300)
    try:
        s = json.loads(res["stdout"])
        res["frames"] = s.get("frames")
    except (ValueError, AttributeError):
        res["frames"] = None
    res.pop("stdout", None)
    return res


# ---- judging int8 artifacts against the fp32 bundle, on held-out inputs -------------------------------
def inputs(fp32_bundle: str, folder: Path, limit: int) -> list[np.ndarray]:
    import cv2

    from lepton_edge.runtime import Runtime

    rt = Runtime.load(fp32_bundle)
    out = []
    for p in sorted(folder.glob("*.jpg"))[:limit]:
        out.append(np.ascontiguousarray(rt.preprocess(cv2.imread(str(p)))))
    return out


def session(path: str, threads: int = 1):
    """A bare onnxruntime session on the file, opened as the device runtime opens it: with QDQ fusion off
    when the bundle's manifest beside it says `target.qdq_fusion: false` (exporters/kernels.py). A file
    outside a bundle (NNCF's) is opened as its user would, with the defaults."""
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.log_severity_level = 3  # (a multi-input bundle's input defaults make onnxruntime warn on every load)
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    manifest = Path(path).parent / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("target", {}).get("qdq_fusion") is False:
        o.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])


def outputs(sess, xs: list[np.ndarray]) -> list[list[np.ndarray]]:
    name = sess.get_inputs()[0].name
    want = sess.get_inputs()[0].type
    dt = np.float16 if "float16" in want else np.float32
    return [[np.asarray(o, np.float32) for o in sess.run(None, {name: x.astype(dt)})] for x in xs]


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    noise = float(np.sum((ref - got) ** 2))
    return 99.0 if noise == 0 else float(10 * np.log10(max(float(np.sum(ref ** 2)), 1e-30) / noise))


def cosine(ref: np.ndarray, got: np.ndarray) -> float:
    a, b = ref.ravel(), got.ravel()
    d = float(np.linalg.norm(a) * np.linalg.norm(b))
    return 1.0 if d == 0 else float(a @ b / d)


def softmaxed(v: np.ndarray) -> np.ndarray:
    v = v.reshape(-1).astype(np.float64)
    if v.min() >= 0 and abs(v.sum() - 1) < 1e-3:
        return v
    e = np.exp(v - v.max())
    return e / e.sum()


def judge(task: str, ref: list[list[np.ndarray]], got: list[list[np.ndarray]], noisy: list[list[np.ndarray]],
          spec=None) -> dict:
    """Task metrics of `got` against `ref` (fp32); `noisy` is fp32 on inputs + N(0, 0.01): the ceiling.
    Detectors (with the fp32 bundle's input spec): boxes decoded by the head that reads fp32's outputs,
    F1 against fp32's boxes, as the export's gate does (exporters/task_metrics.detect)."""
    m: dict[str, float] = {}
    if task == "detect" and spec is not None:
        from types import SimpleNamespace

        from lepton_edge.exporters import task_metrics as tm

        def stacked(per_input: list[list[np.ndarray]]) -> list[np.ndarray]:
            return [np.concatenate([o[k] for o in per_input]) for k in range(len(per_input[0]))]

        found: dict = {}
        if tm.detect(stacked(ref), stacked(got), spec, None, SimpleNamespace(min_f1=0.9), found) is not None:
            m.update({k: round(float(v), 4) for k, v in found.items()})
    n_out = len(ref[0])
    m["sqnr_db"] = round(min(sqnr_db(np.concatenate([r[i].ravel() for r in ref]),
                                     np.concatenate([g[i].ravel() for g in got])) for i in range(n_out)), 2)
    m["cosine"] = round(min(cosine(np.concatenate([r[i].ravel() for r in ref]),
                                   np.concatenate([g[i].ravel() for g in got])) for i in range(n_out)), 4)
    if task == "classify":
        k = min(5, ref[0][0].size - 1) or 1
        pr = [softmaxed(r[0]) for r in ref]
        pg = [softmaxed(g[0]) for g in got]
        pn = [softmaxed(n[0]) for n in noisy]
        agree = [a.argmax() == b.argmax() for a, b in zip(pr, pg)]
        conf = [ok for a, ok in zip(pr, agree) if a.max() >= 0.9]
        m["top1_agreement"] = round(float(np.mean(agree)), 4)
        m["ceiling"] = round(float(np.mean([a.argmax() == b.argmax() for a, b in zip(pr, pn)])), 4)
        m["confident_top1_kept"] = round(float(np.mean(conf)), 4) if conf else 1.0
        m["confident_n"] = len(conf)
        m[f"top1_in_top{k}"] = round(float(np.mean([a.argmax() in np.argsort(-b)[:k] for a, b in zip(pr, pg)])), 4)
    if task == "segment":  # pooled over the inputs: an empty map matched by an empty one earns nothing,
        inter = union = shown = 0  # and text "found" on an input without any costs its pixels
        for r, g in zip(ref, got):
            a, b = r[0] > 0.3, g[0] > 0.3
            inter += int(np.logical_and(a, b).sum())
            union += int(np.logical_or(a, b).sum())
            shown += int(a.mean() >= 0.001)
        m["mask_iou"] = round(inter / union, 4) if union else float("nan")
        m["mask_inputs"] = shown  # inputs where fp32's mask shows something: the IoU's evidence
    return m


def latency_ms(paths: dict[str, str], x: np.ndarray, rounds: int = 10, block: int = 3,
               threads: int = 1) -> dict[str, float]:
    """Median batch-1 latency of each file, alternating short blocks (fair on a shared machine: a busy
    spell falls on every file alike; with 3 blocks of 10, PP-OCR cls read 1.06x fp32 in one run, 1.47x in
    the next)."""
    sess = {k: session(p, threads) for k, p in paths.items()}
    times: dict[str, list[float]] = {k: [] for k in paths}
    for s in sess.values():
        outputs(s, [x])  # warm-up
    for _ in range(rounds):
        for k, s in sess.items():
            for _ in range(block):
                t0 = time.perf_counter()
                outputs(s, [x])
                times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: round(statistics.median(v), 3) for k, v in times.items()}


NNCF_SCRIPT = r"""
import sys, time, numpy as np, onnx, nncf
from lepton_edge.compress.quantize import no_nncf_telemetry, with_defaults, without_defaults
no_nncf_telemetry()  # as the export: no usage events sent (a forked sender per event)
src, calib, dst = sys.argv[1:4]
xs = list(np.load(calib).values())
# a multi-input bundle carries its non-image inputs' values as defaults: NNCF gets them as inputs, fed
# the same constants, and the quantized model gets the defaults back (so both run the same way)
model, fixed = without_defaults(onnx.load(src))
inits = {i.name for i in model.graph.initializer}
name = next(i.name for i in model.graph.input if i.name not in inits and i.name not in fixed)
t0 = time.perf_counter()
q = nncf.quantize(model, nncf.Dataset(xs, lambda x: {name: x, **fixed}))
onnx.save(with_defaults(q, fixed), dst)
print(time.perf_counter() - t0)
"""


def nncf_quantize(fp32_onnx: str, calib_xs: list[np.ndarray], work: Path) -> dict:
    """NNCF 3.x default PTQ (ONNX backend) on the same calibration inputs, in a guarded process."""
    record = work / "nncf.json"
    if record.exists():
        return json.loads(record.read_text())
    cmd, dst = nncf_cmd(fp32_onnx, calib_xs, work)
    res = guarded(cmd)
    res.pop("stdout", None)
    if res["rc"] == 0 and dst.exists():
        res["file"], res["bytes"] = str(dst), dst.stat().st_size
    record.write_text(json.dumps(res, default=str))
    return res


def nncf_cmd(fp32_onnx: str, calib_xs: list[np.ndarray], work: Path, dst_name: str = "nncf_int8.onnx"
             ) -> tuple[list[str], Path]:
    """The command of NNCF's quantize on `calib_xs` (saved beside it, kept for the paired rounds), and its file."""
    npz = work / "calib.npz"
    np.savez(npz, *calib_xs)  # (written again each time: never a file an interrupted run left)
    script = work / "nncf_q.py"
    script.write_text(NNCF_SCRIPT)
    dst = work / dst_name
    return [sys.executable, str(script), fp32_onnx, str(npz), str(dst)], dst


def paired_times(int8_cmd: list[str], int8_out: Path, nncf: tuple[list[str], Path], record: Path,
                 rounds: int = TIME_ROUNDS) -> dict:
    """The int8 export's wall time over NNCF's, both run again in `rounds` shuffled paired rounds
    (fair.rounds): the median per-round ratio and its bootstrap 95 % interval. A failed run ends the rounds."""
    if record.exists():
        return json.loads(record.read_text())

    def slot(cmd: list[str], clear: Path):
        def run() -> float:
            shutil.rmtree(clear, ignore_errors=True) if clear.is_dir() else clear.unlink(missing_ok=True)
            r = guarded(cmd)
            if r["rc"] != 0:
                raise RuntimeError(f"rc {r['rc']}: {r.get('why')}")
            return r["wall_s"]
        return run

    try:
        figs = fair.rounds({"int8": slot(int8_cmd, int8_out), "nncf": slot(nncf[0], nncf[1])}, rounds)
    except RuntimeError as e:
        return {"error": str(e)[:300]}
    finally:
        shutil.rmtree(int8_out, ignore_errors=True)
        nncf[1].unlink(missing_ok=True)
    r = fair.ratio(figs["int8"], figs["nncf"])
    res = {"int8_s": figs["int8"], "nncf_s": figs["nncf"], "median": round(r.median, 3), "lo": round(r.lo, 3),
           "hi": round(r.hi, 3), "rounds": r.n}
    record.write_text(json.dumps(res))
    return res


PLANS = {"fp32": ("x86-cpu", "fp32"), "int8": ("x86-cpu", None), "fp16": ("x86-cpu", "fp16"), "rpi4": ("rpi4", None),
         "rpi4-fp16": ("rpi4", "fp16"), "rpi4-fp32": ("rpi4", "fp32")}


def bench_model(name: str, work: Path, quick: bool, plan: list[str] | None = None) -> dict:
    m = MODELS[name]
    src = fetch(name)
    row: dict = {"model": name, "package": f"{m.package}=={m.version}", "task": m.task, "opset": m.opset,
                 "layout": m.layout, "inputs": m.inputs, "outputs": m.outputs, "licence": m.licence,
                 "src_bytes": src.stat().st_size}
    d = work / name
    keys = plan or (["fp32", "int8"] if quick else list(PLANS))
    for key in keys:
        target, prec = PLANS[key]
        row[key] = export(name, src, d / key, target, prec)
        if row[key].get("bundle") and "run" not in row[key]:  # `lepton-edge run` on real frames, kept too
            row[key]["run"] = run_bundle(row[key]["bundle"], judge_on(m))
            (d / f"{key}.json").write_text(json.dumps(row[key], default=str))
    fp32 = row["fp32"]
    # the reference: the fp32 bundle's model, else (an fp32 export refused, e.g. over the latency budget
    # on this host) the ONNX source itself, which is the fp32 model; preprocessing from any bundle made
    ref_file = fp32.get("file") if (fp32.get("file") or "").endswith(".onnx") else \
        (str(src) if src.suffix == ".onnx" and not m.derived_from else None)
    spec_bundle = next((row[k]["bundle"] for k in PLANS if (row.get(k) or {}).get("bundle")), None)
    if not ref_file or not spec_bundle:
        row["judged"] = "no fp32 ONNX model to judge against"
        return row
    ref_bytes = os.path.getsize(ref_file)
    try:
        # a text detector is judged on photos with words drawn on them (the evaluation crops show text in 2 of
        # 60), a layout detector on document pages (corpus.judge_on)
        xs = inputs(spec_bundle, judge_on(m), 60)
        from lepton_edge.runtime import Runtime

        spec = Runtime.load(spec_bundle).spec
        cal = inputs(spec_bundle, calib_for(m), 72)
        ref_s = session(ref_file, 2)
        ref = outputs(ref_s, xs)
        rng = np.random.default_rng(0)
        noisy = outputs(ref_s, [x + rng.normal(0, 0.01, x.shape).astype(np.float32) for x in xs])
        row["nncf"] = nncf_quantize(ref_file, cal, d)
        if TIME_ROUNDS and (row.get("int8") or {}).get("bundle") and row["nncf"].get("rc") == 0:
            row["time_vs_nncf"] = paired_times(export_cmd(name, src, d / "int8-timed", *PLANS["int8"]),
                                               d / "int8-timed", nncf_cmd(ref_file, cal, d, "nncf-timed.onnx"),
                                               d / "paired_times.json")
        (d / "calib.npz").unlink(missing_ok=True)
        files = {"fp32": ref_file}
        for key, res in (("int8", row["int8"]), ("rpi4", row.get("rpi4") or {}), ("nncf", row["nncf"])):
            f = res.get("file")
            if f and f.endswith(".onnx"):
                res["metrics"] = judge(m.task, ref, outputs(session(f, 2), xs), noisy, spec)
                res["size_vs_fp32"] = round(res["bytes"] / ref_bytes, 3)
                files[key] = f
        # with the threads the export itself times on (x86-cpu's); with one thread the ratios of models of
        # 1-2 ms differed from the export's own (ppocr-cls: 1.49x here, 0.73x there)
        from lepton_edge import targets

        lat = latency_ms(files, xs[0], threads=targets.load("x86-cpu").threads)
        for key in files:
            if key != "fp32":
                row[key]["latency_vs_fp32"] = round(lat[key] / lat["fp32"], 3)
        row["fp32"]["latency_ms"] = lat["fp32"]
    except Exception as e:  # noqa: BLE001 - a model the judge cannot handle is a line in the table
        row["judged"] = f"{type(e).__name__}: {e}"[:300]
    return row


def run(work: Path, quick: bool = False, models: list[str] | None = None, plan: list[str] | None = None) -> dict:
    """Every corpus model (or `models`) through the plan. LEPTON_THIRD_PARTY_WORK names a folder that
    keeps the exports and reuses the finished ones (`make bench` starts from nothing otherwise: over an
    hour on 2 cores). LEPTON_THIRD_PARTY_MODELS and LEPTON_THIRD_PARTY_PLAN (comma-separated) narrow
    a run to some models and some columns of PLANS."""
    work = Path(os.environ.get("LEPTON_THIRD_PARTY_WORK") or work)
    names = models or [n for n in os.environ.get("LEPTON_THIRD_PARTY_MODELS", "").split(",") if n] or \
        (list(QUICK_MODELS) if quick else list(MODELS))
    plan = plan or [k for k in os.environ.get("LEPTON_THIRD_PARTY_PLAN", "").split(",") if k] or None
    if plan and "fp32" not in plan:  # the fp32 export is the reference every other column is judged against
        plan = ["fp32", *plan]
    res = {"mem_limit_mb": MEM_LIMIT >> 20, "timeout_s": TIMEOUT_S, "calib": str(calib_dir()),
           "eval": str(eval_dir()), "models": []}
    for n in names:
        t0 = time.perf_counter()
        res["models"].append(bench_model(n, work, quick, plan))
        print(f"[third-party] {n}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return res


def _outcome(r: dict | None) -> str:
    """ok/FAIL with the export's wall time and peak RSS (and whether `run` on real frames worked)."""
    if not r:
        return "-"
    if r.get("bundle") or (r.get("rc") == 0 and r.get("file")):  # a bundle, or NNCF's bare file
        head = f"ok {r['wall_s']:.0f} s, {r.get('peak_rss_mb')} MB"
        if not r.get("bundle"):
            return head
        ran = r.get("run") or {}
        fmt = (r.get("report") or {}).get("format")
        head += f" ({fmt})" if fmt else ""
        return head + (f", ran {ran.get('frames')} frames" if ran.get("rc") == 0 else ", run FAILED")
    return f"FAIL {r['wall_s']:.0f} s, {r.get('peak_rss_mb')} MB: {(r.get('why') or '')[:140]}"


def _metric(r: dict | None) -> str:
    mt = (r or {}).get("metrics")
    if not mt:
        return "-"
    if "top1_agreement" in mt:
        topk = next(k for k in mt if k.startswith("top1_in_top"))
        return (f"top1 {mt['top1_agreement']:.3f} (ceiling {mt['ceiling']:.3f}), conf kept "
                f"{mt['confident_top1_kept']:.3f}/{mt['confident_n']}, {topk} {mt[topk]:.3f}")
    s = f"SQNR {mt['sqnr_db']:.1f} dB, cos {mt['cosine']:.4f}"
    if "f1_vs_fp32" in mt:
        s = (f"F1 vs fp32 {mt['f1_vs_fp32']:.3f} ({mt['boxes_reference']:.0f} fp32 boxes), score drift "
             f"{mt['score_drift']:.3f}; " + s)
    if "mask_inputs" in mt:
        s += f", {mt['mask_inputs']} inputs showing text"
    return s + (f", mask IoU {mt['mask_iou']:.3f}" if "mask_iou" in mt else "")


def _gate(rep: dict) -> str:
    """The exporter's own gate decision: each metric beside its threshold."""
    m, th = rep.get("metrics") or {}, rep.get("thresholds") or {}
    pairs = {"top1_agreement": None, "ceiling": None, "confident_top1_kept": "min_confident_kept",
             "top1_in_top5": "min_top5", "f1_vs_fp32": "min_f1", "sqnr_db": "min_sqnr", "cosine": "min_cosine",
             "mask_iou": "min_mask_iou", "label_iou": "min_mask_iou", "correlation": "min_correlation",
             "nn_agreement": None, "accuracy_drop_pp": "max_accuracy_drop", "max_rel_diff": None}
    parts = []
    for k, t in pairs.items():
        if k in m:
            rule = f" (>= {th[t]:g})" if t and th.get(t) is not None and k != "accuracy_drop_pp" else ""
            if k == "confident_top1_kept" and rule and m.get("confident_samples"):
                from lepton_edge.exporters.task_metrics import confident_losses_allowed

                n = int(m["confident_samples"])
                rule = f" (>= {th[t]:g}: at most {confident_losses_allowed(n, th[t])} of {n} lost)"
            if k == "max_rel_diff":
                from lepton_edge.exporters.task_metrics import NO_EVIDENCE_MAX_REL

                rule = f" (<= {NO_EVIDENCE_MAX_REL:g} of a channel's range: too few boxes to judge F1)"
            if k in (rep.get("reported") or {}):
                rule = f" (reported; {rep['reported'][k]})"  # as the export summary says
            parts.append(f"{k} {m[k]:.4g}{rule}")
    return ", ".join(parts) or "-"


def _attempts(rep: dict) -> str:
    out = []
    for a in rep.get("attempts") or []:
        mark = "chosen" if a.get("chosen") else "skipped" if a.get("skipped") else "pass" if a.get("passed") else "fail"
        why = "" if a.get("chosen") or a.get("why") == "passed" else f": {a.get('why', '')[:70]}"
        out.append(f"{a['recipe']} {mark}{why}")
    return "; ".join(out) or "-"


def _ratio(ours: dict, nncf: dict, key: str) -> str:
    """Our default int8 export against NNCF's bare quantize on the same inputs (its whole process:
    loading, calibration, saving; ours also searches candidates and validates each)."""
    a, b = ours.get(key), nncf.get(key)
    return f"{a / b:.1f}x" if ours.get("bundle") and nncf.get("rc") == 0 and a and b else "-"


def _time_ratio(r: dict, ours: dict, nncf: dict) -> str:
    """The paired rounds' median ratio and interval, else (no rounds) the one run of each."""
    t = r.get("time_vs_nncf") or {}
    if t.get("median"):
        return f"{t['median']:.1f}x ({t['lo']:.1f}-{t['hi']:.1f}; {t['rounds']} paired runs)"
    return _ratio(ours, nncf, "wall_s") + (f" ({t['error'][:60]})" if t.get("error") else "")


def tables(res: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    rows, gates, out = [], [], []
    for r in res["models"]:
        i8, nn = r.get("int8") or {}, r.get("nncf") or {}
        made = next((x["report"] for x in (r.get(k) or {} for k in PLANS) if x.get("report")), {})
        task, inferred = made.get("task") or r["task"], made.get("task_inferred")  # the exporter's task

        def fig(x: dict, k: str, unit: str = "") -> str:
            return f"{x[k]}{unit}" if x.get(k) is not None else "-"

        rows.append([r["model"], task + (" (inferred)" if inferred else ""), r["opset"], r["layout"],
                     _outcome(i8), (i8.get("report") or {}).get("recipe") or "-", _metric(i8),
                     fig(i8, "size_vs_fp32", "x"), fig(i8, "latency_vs_fp32", "x"),
                     _outcome(nn) if nn else r.get("judged", "-"), _metric(nn), fig(nn, "size_vs_fp32", "x"),
                     fig(nn, "latency_vs_fp32", "x"), _time_ratio(r, i8, nn), _ratio(i8, nn, "peak_rss_mb"),
                     _outcome(r.get("fp16")), _outcome(r.get("fp32")), _outcome(r.get("rpi4")),
                     _metric(r.get("rpi4")),
                     _outcome(r.get("rpi4-fp16")), _outcome(r.get("rpi4-fp32"))])
        for key in PLANS:
            e = r.get(key)
            if not e:
                continue
            rep = e.get("report") or {}
            decision = ("passed" if rep.get("passed") else "-") if e.get("bundle") else \
                f"refused: {(e.get('why') or '')[:200]}"
            gates.append([r["model"], key, f"{rep.get('format') or '-'} {rep.get('precision') or ''}".strip(),
                          rep.get("task") or "-", decision, _gate(rep), _attempts(rep)])
    out.append(("Third-party models", ["model", "task", "opset", "layout", "int8 (default): export",
                                       "int8 recipe", "int8 metric (held-out inputs)", "int8 size vs fp32",
                                       "int8 latency vs fp32 (x86-cpu threads)", "NNCF PTQ: quantize", "NNCF metric",
                                       "NNCF size", "NNCF latency",
                                       "int8 export time vs NNCF (median of paired runs; 95 % interval)",
                                       "int8 peak RSS vs NNCF",
                                       "fp16 x86-cpu", "fp32 x86-cpu", "rpi4 (default int8)", "rpi4 int8 metric",
                                       "rpi4 fp16", "rpi4 fp32"], rows))
    out.append(("Third-party models: every gate decision", ["model", "export", "artifact", "task", "decision",
                                                             "metrics (threshold)", "int8 candidates"], gates))
    return out


def markdown(tbls) -> str:
    lines = []
    for title, head, rows in tbls:
        lines += [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default="")
    ap.add_argument("--plan", default="", help="exports to run, e.g. fp32,int8 (default: fp32,int8,fp16,rpi4)")
    ap.add_argument("--work", default="", help="keep bundles here and reuse finished exports")
    ap.add_argument("--out", default="", help="also write the JSON here")
    a = ap.parse_args()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="third-party-"))
    try:
        res = run(work, a.quick, [s for s in a.models.split(",") if s] or None,
                  [s for s in a.plan.split(",") if s] or None)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(res, indent=1, default=str)
    if a.out:
        Path(a.out).write_text(text)
    print(text)
    print(markdown(tables(res)))


if __name__ == "__main__":
    main()
