"""Host-side helpers of the arm64 proof: make its inputs, compare its outputs with the x86 run.

    python scripts/arm64/inputs.py make OUT_DIR [--bundle DIR]   bundle/ (rpi4 int8 TFLite), frames/*.png, video.avi
    python scripts/arm64/inputs.py compare A.jsonl B.jsonl (--exact | --min-top1 0.99)

Why PNG frames and an MJPG video: PNG decodes to the same pixels everywhere, so the arm64 scores must
equal x86's bit for bit; JPEG decoders round differently on arm64 (libjpeg-turbo's NEON IDCT), so the
video is held to top-1 agreement instead, as a camera's stream would be.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def make(out: Path, bundle: str | None, frames: int = 200, video_frames: int = 300) -> None:
    import cv2

    from lepton_edge.datasets import fashion_mnist

    out.mkdir(parents=True, exist_ok=True)
    if bundle:
        if (out / "bundle").exists():
            shutil.rmtree(out / "bundle")
        shutil.copytree(bundle, out / "bundle")
    elif not (out / "bundle" / "manifest.json").exists():
        import lepton_edge

        made = lepton_edge.export("zoo:fashion-cnn", target="rpi4", out=out / "export", eval_limit=1000)
        shutil.copytree(made.bundle.path, out / "bundle")
    x, _ = fashion_mnist("test")
    (out / "frames").mkdir(exist_ok=True)
    for i in range(frames):
        cv2.imwrite(str(out / "frames" / f"{i:05d}.png"), cv2.resize(x[i], (56, 56), interpolation=cv2.INTER_NEAREST))
    w = cv2.VideoWriter(str(out / "video.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 30, (56, 56), False)
    if not w.isOpened():
        sys.exit("cannot write an MJPG video with this OpenCV")
    for i in range(video_frames):
        w.write(cv2.resize(x[i], (56, 56), interpolation=cv2.INTER_NEAREST))
    w.release()


def _rows(p: Path) -> list[list[tuple[int, float]]]:
    return [[(r["index"], r["score"]) for r in json.loads(line)["result"]]
            for line in p.read_text().splitlines() if line.strip()]


def compare(a: Path, b: Path, exact: bool, min_top1: float) -> dict:
    ra, rb = _rows(a), _rows(b)
    n = min(len(ra), len(rb))
    top1 = sum(x[0][0] == y[0][0] for x, y in zip(ra, rb)) / n if n else 0.0
    identical = sum(x == y for x, y in zip(ra, rb))
    ok = n > 0 and len(ra) == len(rb) and (identical == n if exact else top1 >= min_top1)
    return {"frames_a": len(ra), "frames_b": len(rb), "identical": identical, "top1_agreement": round(top1, 4),
            "max_abs_score_diff": max((abs(p[1] - q[1]) for x, y in zip(ra, rb) for p, q in zip(x, y)), default=0.0),
            "ok": ok}


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("out", type=Path)
    m.add_argument("--bundle")
    m.add_argument("--frames", type=int, default=200, help="PNG frames (lossless: arm64 must equal x86 bit for bit)")
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    c.add_argument("--exact", action="store_true")
    c.add_argument("--min-top1", type=float, default=0.99)
    a = ap.parse_args()
    if a.cmd == "make":
        make(a.out, a.bundle, frames=a.frames)
        return 0
    res = compare(a.a, a.b, a.exact, a.min_top1)
    print(json.dumps(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
