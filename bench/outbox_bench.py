"""Outbox benchmarks (issue 10): what a put costs with 0, 100, 10k and 100k windows queued (the
long outage the outbox exists for), how fast a 100k-window backlog drains, and its file size.

The previous implementation (from git) runs beside the working tree's in the same process, on copies of
the same pre-filled file, in alternating blocks, so the ratio is fair on this shared machine.

    .venv/bin/python bench/outbox_bench.py [--quick]     # prints JSON
"""
from __future__ import annotations

import importlib.util
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import fair  # noqa: E402
from lepton_edge.telemetry.outbox import Outbox  # noqa: E402
from lepton_edge.telemetry.schema import StageLatency, Telemetry  # noqa: E402

TOPIC = "lepton/v1/bench/dev/telemetry"
LEVELS = (0, 100, 10_000, 100_000)
AA_NEW = "new" + fair.AA


def window(seq: int) -> bytes:
    """A realistic telemetry window (~1.2 KB): four stages, health, bundle and source info."""
    st = StageLatency(p50=0.812, p95=1.204, p99=1.877, max=3.402)
    return Telemetry(boot_id="3f9c2b1e-7d41-4c8a-9a51-0b6f2e8d1c47", seq=seq, window_s=10.0, frames=298, fps=29.8,
                     dropped=2, latency_ms={s: st for s in ("capture", "preprocess", "inference", "postprocess",
                                                             "total")},
                     cpu_percent=57.3, system_cpu_percent=71.9, rss_bytes=154_312_704, temperature_c=61.4,
                     throttled="0x0", bundle={"name": "fashion-cnn", "version": "1.0.0", "target": "rpi4",
                                              "format": "tflite", "precision": "int8",
                                              "sha256": "9b2c" * 16, "manifest_sha256": "41d7" * 16,
                                              "profile_sha256": "c0a8" * 16, "key_id": "fleet-2026-05",
                                              "deployed_at": 1778400000.123, "previous": "fashion-cnn 0.9.2"},
                     source={"kind": "camera", "uri": "/dev/video0", "width": 640, "height": 480,
                             "reconnects": 0, "corrupt": 0, "host": "pi-warehouse-east-017",
                             "software": "lepton-edge 0.4.0"}).model_dump_json().encode()


# The outbox as issue #10 found it (a COUNT(*) per put): the baseline every later version is measured against.
BASELINE_COMMIT = "366ce1e"


def old_outbox_class():
    """The Outbox of BASELINE_COMMIT, loaded from git (None without git or that history)."""
    rel = "lepton_edge/telemetry/outbox.py"

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout

    try:
        src = git("show", f"{BASELINE_COMMIT}:{rel}")
    except (OSError, subprocess.CalledProcessError):
        return None
    mod_path = Path(tempfile.mkdtemp(prefix="old-outbox-")) / "old_outbox.py"
    mod_path.write_text(src)
    spec = importlib.util.spec_from_file_location("old_outbox", mod_path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["old_outbox"] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
    finally:
        shutil.rmtree(mod_path.parent, ignore_errors=True)
    return mod.Outbox


def prefill(path: Path, n: int, payload: bytes) -> None:
    """n windows queued, written in one transaction through the outbox's own schema."""
    ob = Outbox(path)
    ob.close()
    import sqlite3

    db = sqlite3.connect(path)
    now = time.time()
    db.executemany("INSERT INTO outbox (topic, payload, qos, retain, created) VALUES (?, ?, 1, 0, ?)",
                   ((TOPIC, payload, now) for _ in range(n)))
    db.commit()
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def copy_db(src: Path, dst: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{src}{suffix}").exists():
            shutil.copy(f"{src}{suffix}", f"{dst}{suffix}")


def put_latency(work: Path, impls: dict, blocks: int, per_block: int) -> dict:
    """p50/p95 (ms) of put at each queue depth, each implementation on its own copy of one file,
    in blocks of `per_block` puts, every round in a seeded random order (bench/fair.py). The default
    bound (100k) applies: at 100k every put also drops the oldest window, as it does in a long outage."""
    payload = window(1)
    out: dict = {}

    def block(ob) -> list[float]:
        ob.put(TOPIC, payload)  # the slot's warm-up: its pages back in cache after the other's block
        t = []
        for _ in range(per_block):
            t0 = time.perf_counter()
            ob.put(TOPIC, payload)
            t.append((time.perf_counter() - t0) * 1e3)
        return t

    for n in LEVELS:
        base = work / f"base-{n}.sqlite"
        prefill(base, n, payload)
        obs = {}
        for i, (name, cls) in enumerate(impls.items()):
            copy_db(base, work / f"impl{i}-{n}.sqlite")
            obs[name] = cls(work / f"impl{i}-{n}.sqlite")
        nb = blocks if n < 100_000 else max(2, blocks // 2)
        figs = fair.rounds({name: partial(block, ob) for name, ob in obs.items()}, nb, seed=n)
        times = {name: [t for b in blocks_ for t in b] for name, blocks_ in figs.items()}
        for name, ob in obs.items():
            ob.close()
            q = statistics.quantiles(times[name], n=20)
            out.setdefault(name, {})[str(n)] = {"p50_ms": round(statistics.median(times[name]), 4),
                                                "p95_ms": round(q[18], 4), "puts": len(times[name])}
        for f in work.glob(f"*-{n}.sqlite*"):
            f.unlink()
        for f in work.glob(f"base-{n}.sqlite*"):
            f.unlink()
    return out


def drain(work: Path, impls: dict, n: int = 100_000) -> dict:
    """A 100k-window backlog drained the way the publisher does: pending() batches of 100 (its
    in-flight window), then one delete() per PUBACK. Windows/s, and the file size at 100k."""
    base = work / "drain-base.sqlite"
    prefill(base, n, window(1))
    size = sum(Path(f"{base}{s}").stat().st_size for s in ("", "-wal") if Path(f"{base}{s}").exists())
    out = {"file_bytes_at_100k": size}
    obs, state, spent = {}, {}, {}
    for i, (name, cls) in enumerate(impls.items()):
        p = work / f"drain-impl{i}.sqlite"
        copy_db(base, p)
        obs[name], state[name], spent[name] = cls(p), [0, 0], 0.0  # [after, done]
    rng = random.Random(0)
    order = list(obs)
    while any(st[1] < n for st in state.values()):  # blocks of 10 batches, a random order each round
        rng.shuffle(order)
        for name in order:
            ob, st = obs[name], state[name]
            t0 = time.perf_counter()
            for _ in range(10):
                batch = ob.pending(limit=100, after=st[0])
                if not batch:
                    break
                for m in batch:
                    ob.delete(m.id)
                st[0], st[1] = batch[-1].id, st[1] + len(batch)
            spent[name] += time.perf_counter() - t0
    for name, ob in obs.items():
        assert len(ob) == 0 and state[name][1] == n
        ob.close()
        out[name] = {"windows_per_s": round(n / spent[name]), "seconds": round(spent[name], 2)}
    return out


def run(work: Path, quick: bool = False) -> dict:
    impls = {"new": Outbox, AA_NEW: Outbox}  # the A/A slot: the same class on its own copy of the file
    old = old_outbox_class()
    if old is not None:
        impls["old"] = old
    lat = put_latency(work, impls, 4 if quick else 8, 50 if quick else 100)
    res = {"payload_bytes": len(window(1)), "put": lat, "drain_after_100k": drain(work, impls)}
    new = lat["new"]
    res["new_p50_100k_over_empty"] = round(new["100000"]["p50_ms"] / new["0"]["p50_ms"], 2)
    return res


def tables(res: dict) -> list:
    """The figures as BENCHMARKS.md tables (bench/run.py's `outbox` section)."""
    lat, has_old = res["put"], "old" in res["put"]
    rows = []
    for n in LEVELS:
        k = str(n)
        new = lat["new"][k]
        aa = lat[AA_NEW][k]["p50_ms"] / new["p50_ms"] if AA_NEW in lat else float("nan")
        row = [f"{n:,}", f"{new['p50_ms']:.3f}", f"{new['p95_ms']:.3f}", f"{aa:.2f}x"]
        if has_old:
            old = lat["old"][k]
            row += [f"{old['p50_ms']:.3f}", f"{old['p95_ms']:.3f}", f"{old['p50_ms'] / new['p50_ms']:.1f}x"]
        rows.append(row)
    ratio = res["new_p50_100k_over_empty"]
    rows.append(["p50 at 100k / p50 empty", f"{ratio:.2f}x", "goal <= 2x: " + ("PASS" if ratio <= 2 else "FAIL"), ""]
                + (["", "", ""] if has_old else []))
    header = ["queued windows", "put p50 (ms)", "put p95 (ms)", "A/A: p50 new / new"] + (
        ["before: p50 (ms)", "before: p95 (ms)", "speed-up p50"] if has_old else [])
    d = res["drain_after_100k"]
    drows = [["new", f"{d['new']['windows_per_s']:,}/s", f"{d['new']['seconds']:.1f} s",
              f"{d['file_bytes_at_100k'] / 1e6:.0f} MB"]]
    if AA_NEW in d:
        drows.append(["new again (A/A)", f"{d[AA_NEW]['windows_per_s']:,}/s", f"{d[AA_NEW]['seconds']:.1f} s",
                      f"A/A rate ratio {d[AA_NEW]['windows_per_s'] / d['new']['windows_per_s']:.2f}x"])
    if has_old:
        drows.append(["before", f"{d['old']['windows_per_s']:,}/s", f"{d['old']['seconds']:.1f} s", "same file"])
    return [(f"Outbox.put latency by queue depth ({res['payload_bytes']} B window, default bound 100k; "
             "before = outbox.py as issue #10 found it (git 366ce1e), same process, blocks in a seeded random order "
             "per round (bench/fair.py); A/A = the current outbox on a second copy of the file)", header, rows),
            ("Outbox drain after a 100k-window outage (pending() batches of 100, one delete() per PUBACK; "
             "no broker; blocks of 10 batches in a random order per round, the current outbox twice for A/A)",
             ["outbox", "drain rate", "time", "file size at 100k"], drows)]


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    with tempfile.TemporaryDirectory(prefix="outbox-bench-") as d:
        print(json.dumps(run(Path(d), quick), indent=1))
