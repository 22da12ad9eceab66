"""Device footprint (issue 12): wheelhouse and installed MB per kit, the agent's peak RSS over 1,000
frames and its time from start to the first inference; native here, emulated from the arm64 run.

    .venv/bin/python bench/footprint_bench.py [--model zoo:fashion-cnn | --bundle DIR] [--arm64 out/arm64/result.json]

Prints JSON; `tables(result)` gives bench/run.py's (title, header, rows) tables. Installed MB and the
emulated figures come from `make test-arm64` (scripts/arm64/run.sh writes out/arm64/result.json): a
venv's size is only meaningful on the platform it was installed for. Emulated timings (qemu-user) are
not speed figures; the emulated RSS is qemu's process, an upper bound of a Pi's.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts" / "arm64"))

# the bundle `make test-arm64` runs when ARM64_BUNDLE is not given (scripts/arm64/run.sh); newer runs
# name their model in result.json
ARM64_MODEL = "make test-arm64's zoo:fashion-cnn"
# the MobileNetV2 run (`make test-arm64-mnv2`): the emulated figure, kept beside CI's fashion-cnn run
ARM64_MNV2 = ROOT / "out" / "arm64-mnv2" / "result.json"
GOALS = {"tflite_wheels_mb": 80, "tflite_installed_mb": 250, "native_rss_mb": 150}


def _bundle(model: str, target: str, fmt: str | None, out: Path) -> Path:
    import lepton_edge

    kw = {"format": fmt} if fmt else {}
    exported = lepton_edge.export(model, target=target, out=out, eval_limit=500, measure_latency=False, **kw)
    return Path(exported.bundle.path)


def _video(out: Path, n: int = 1000) -> Path:
    import cv2

    from lepton_edge.datasets import fashion_mnist

    x, _ = fashion_mnist("test")
    path = out / "fashion.avi"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), 30, (56, 56), False)
    for img in x[:n]:
        w.write(cv2.resize(img, (56, 56), interpolation=cv2.INTER_NEAREST))
    w.release()
    return path


def run(model: str, bundle: Path | None, arm64: Path | None, frames: int = 1000,
        arm64_more: tuple[Path, ...] = ()) -> dict:
    import agent_check

    from lepton_edge import kit

    res: dict = {"model": model if bundle is None else str(bundle)}
    with tempfile.TemporaryDirectory(prefix="footprint-") as tmp:
        t = Path(tmp)
        tfl = bundle or _bundle(model, "rpi4", None, t / "tfl")
        onnx = _bundle(model, "x86-cpu", None, t / "onnx")
        for name, b, target in (("tflite", tfl, "rpi4"), ("onnx", onnx, "generic-arm64")):
            rep = kit.build(b, t / f"{name}-kit.tar.gz", target=target)
            res[f"{name}_kit"] = {"target": target, "wheels": len(rep.wheels),
                                  "wheels_mb": round(rep.wheels_bytes / 2**20, 1),
                                  "kit_mb": round(rep.kit_bytes / 2**20, 1)}
        video = _video(t, frames)
        exe = Path(sys.executable).parent / "lepton-edge"
        res["native_agent"] = agent_check.run(
            [str(exe), "agent", "--broker", "{broker}", "--fleet", "bench", "--device-id", "native",
             "--bundle", str(tfl), "--source", str(video), "--loop", "--window", "2", "--state-dir", str(t / "state")],
            "bench", "native", frames, 300)
    if arm64 and arm64.is_file():
        res["arm64"] = json.loads(arm64.read_text())
    res["arm64_more"] = [json.loads(p.read_text()) for p in arm64_more if p.is_file()]
    return res


def tables(res: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    a = res.get("arm64") or {}
    na = res["native_agent"]
    ins = {k: (a.get(k) or {}).get("installed_mb") for k in ("tflite", "onnx")}
    rows = []
    goals = (("tflite", GOALS["tflite_wheels_mb"], GOALS["tflite_installed_mb"]), ("onnx", None, None))
    for k, goal_w, goal_i in goals:
        kt = res[f"{k}_kit"]
        i = ins[k]
        verdict = ""
        if goal_w:
            ok = kt["wheels_mb"] <= goal_w and (i is None or i <= goal_i)
            verdict = f"{'PASS' if ok else 'FAIL'} (<= {goal_w} / {goal_i} MB)"
        rows.append([f"{k} kit ({kt['target']})", str(kt["wheels"]), f"{kt['wheels_mb']}",
                     f"{i}" if i is not None else "run make test-arm64", verdict])
    agent_rows = [["native (this host)", f"{na.get('peak_rss_mb')}", f"{na.get('status_online_s')}",
                   f"{na.get('first_inference_est_s')}",
                   f"{'PASS' if (na.get('peak_rss_mb') or 1e9) <= GOALS['native_rss_mb'] else 'FAIL'} (<= 150 MB)"]]
    for run_ in [a, *res.get("arm64_more", [])]:
        em = (run_.get("tflite") or {}).get("agent")
        if em:
            what = run_.get("model") or ARM64_MODEL
            agent_rows.append([f"emulated arm64, {what}, {em.get('frames', run_.get('agent_frames', '?'))} frames "
                               "(qemu; not a speed figure)", f"{em.get('peak_rss_mb')}",
                               f"{em.get('status_online_s')}", f"{em.get('first_inference_est_s')}", "upper bound"])
    return [
        ("Device footprint: kits (MiB)", ["kit", "wheels", "wheelhouse MiB", "installed MiB (arm64)", "goal"], rows),
        (f"Device footprint: agent over {na.get('frames')} frames, TFLite int8 ({res['model']})",
         ["where", "peak RSS MiB", "start -> online s", "start -> first inference s (est.)", "goal"], agent_rows),
    ]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="zoo:fashion-cnn")
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--arm64", type=Path, default=ROOT / "out" / "arm64" / "result.json")
    a = ap.parse_args()
    res = run(a.model, a.bundle, a.arm64)
    print(json.dumps(res, indent=2))
    return 0 if res["native_agent"].get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
