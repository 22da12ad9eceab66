"""Agent benchmarks (issue: device agent): the cost of telemetry and of per-frame stats to the
model's frame time, and how fast the outbox commits, publishes and drains against a local mosquitto.

The frame-time ratios switch one running agent between telemetry on, telemetry off and stats off
in blocks, every round in a seeded random order with an A/A slot (bench/fair.py), and take the
median of the per-round ratios (this machine is shared and noisy).
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from mqtt_broker import Mosquitto  # noqa: E402  (the same real broker the tests start)


def _window_payload(seq: int) -> bytes:
    stage = {"p50": 0.05, "p95": 0.08, "p99": 0.1, "max": 0.3}
    return json.dumps({"v": 1, "ts": time.time(), "boot_id": "bench", "seq": seq, "window_s": 10.0, "frames": 300,
                       "fps": 30.0, "latency_ms": {s: stage for s in ("capture", "preprocess", "inference",
                                                                       "postprocess")},
                       "cpu_percent": 50.0, "rss_bytes": 100_000_000, "bundle": {"name": "x"}}).encode()


SLOTS = {"on": (True, True), "off": (False, True), "stats off": (False, False)}  # name: (telemetry, stats)


def _alternate(bundle: str, video: str, block_s: float, rounds: int, broker_url: str, state: str,
               window_s: float) -> dict:
    """One agent, one run (in a fresh process, as on a device), switched between slots in blocks of
    block_s: telemetry on (stats recorded, windows sent), telemetry off (stats still recorded, no
    windows), telemetry off again (A/A), and stats off (telemetry off, no per-frame stats either).
    Every round runs each slot once in a seeded random order (bench/fair.py); frames and CPU time
    are counted per block.

    Why alternate within one run: a separate process per measurement adds process-to-process
    spread (memory layout, which core, what else runs) of ±10 % on this shared machine, far more
    than the 2 % being measured; adjacent one-second blocks see the same conditions.

    Why frames are counted by a wrapper around `StageTimes.add`: with stats off nothing else counts
    them. Every slot goes through the same wrapper (one counter increment), so it costs all alike;
    "stats off" skips only the recording behind it."""
    import fair
    from lepton_edge.agent.config import AgentConfig
    from lepton_edge.agent.service import Agent

    cfg = AgentConfig(broker=broker_url, fleet="bench", device_id="dev", bundle=Path(bundle), source=video,
                      loop=True, window_s=window_s, state_dir=Path(state))
    agent = Agent(cfg, log=lambda m: None)
    stats = agent.pipeline.stats
    record, frames, recording = stats.add, [0], [True]

    def counted_add(**ms: float) -> None:
        frames[0] += 1
        if recording[0]:
            record(**ms)

    stats.add = counted_add  # an instance attribute: the pipeline's `self.stats.add(...)` finds it first
    th = threading.Thread(target=agent.run, kwargs={"install_signals": False})
    th.start()
    agent.publisher.connected.wait(10)
    time.sleep(2.0)  # warm

    def slot(telemetry: bool, stats_on: bool):
        def block() -> tuple[float, float]:
            agent.set_telemetry(telemetry)
            recording[0] = stats_on
            time.sleep(0.1)  # the slot's own warm-up: the previous slot's work settles
            n0, t0, c0 = frames[0], time.perf_counter(), time.process_time()
            time.sleep(block_s)
            n = frames[0] - n0
            return (time.perf_counter() - t0) * 1e3 / n, (time.process_time() - c0) * 1e3 / n
        return block

    seq0 = agent.seq
    out = fair.rounds(fair.with_aa({k: slot(*v) for k, v in SLOTS.items()}, "off"), rounds, seed=0)
    windows = agent.seq - seq0
    recording[0] = True
    agent.set_telemetry(True)
    connected = agent.publisher.connected.is_set()
    agent.stop()
    th.join()
    return {"figures": out, "windows": windows, "connected": connected}


def telemetry_cost(bundle: Path, video: Path, block_s: float, rounds: int, work: Path):
    """Gated on telemetry on / off (both with per-frame stats, as the agent runs), the median of
    per-round ratios of frame time; stats on / off (telemetry off) and the whole of it (on / stats
    off) beside it, each with its A/A (off against itself). Process CPU time per frame, which counts
    the telemetry threads' own work, is reported beside the frame time."""
    import subprocess

    import fair

    window_s = block_s  # about one window per "on" block
    broker = Mosquitto(work / "broker-tc").start()
    try:
        out = subprocess.run([sys.executable, __file__, "alternate", str(bundle), str(video), str(block_s),
                              str(rounds), broker.url, str(work / "agent-state"), str(window_s)],
                             capture_output=True, text=True, check=True)
        d = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        broker.stop()
    f = d["figures"]
    wall = {k: [v[0] for v in f[k]] for k in f}
    cpu = {k: [v[1] for v in f[k]] for k in f}
    aa_key = "off" + fair.AA
    rows = []
    for what, num, den, gate in (("telemetry on / off (per-frame stats on in both)", "on", "off", 1.02),
                                 ("A/A: telemetry off / off", aa_key, "off", None),
                                 ("per-frame stats on / off (telemetry off in both)", "off", "stats off", None),
                                 ("telemetry and stats on / both off (the whole cost)", "on", "stats off", None)):
        r, c = fair.ratio(wall[num], wall[den]), fair.ratio(cpu[num], cpu[den])
        rows.append([what, f"{statistics.median(wall[num]):.4f}", f"{statistics.median(wall[den]):.4f}",
                     f"{r} ({r.interval})", f"{c} ({c.interval})",
                     ("PASS" if r.median <= gate else "FAIL") if gate else "reported"])
    rows.append(["windows sent", f"{d['windows']}{'' if d['connected'] else ' (broker lost!)'}", "", "", "", ""])
    return ("Agent: frame time with telemetry and per-frame stats on and off (fashion-cnn rpi4 bundle, looping video; "
            f"one agent run switched between 4 slots in {rounds} rounds of 1 block each of {block_s:g} s, each round "
            f"in a seeded random order (bench/fair.py); while on, a window every {window_s:g} s = "
            f"{10 / window_s:g}x the default rate, published to a local mosquitto). Ratios: median of per-round "
            "ratios, 95 % bootstrap interval in brackets; A/A = telemetry off against itself (the method's own bias)",
            ["ratio", "numerator (ms/frame)", "denominator (ms/frame)", "frame time ratio", "CPU time per frame ratio",
             "<= 1.02x"], rows)


def outbox_rates(work: Path, n_rate: int = 2000, n_drain: int = 10_000):
    from lepton_edge.telemetry.outbox import Outbox
    from lepton_edge.telemetry.publisher import Publisher

    rows = []
    broker = Mosquitto(work / "broker-ob").start()
    try:
        ob = Outbox(work / "rate.sqlite")  # the agent's default: WAL, no fsync per message
        pub = Publisher(broker.url, "bench-rate", ob)
        pub.start()
        pub.connected.wait(10)
        t0 = time.perf_counter()
        for i in range(n_rate):
            ob.put("lepton/v1/bench/dev/telemetry", _window_payload(i))
            pub.wake()
        commit_s = time.perf_counter() - t0
        pub.flush(120)
        total_s = time.perf_counter() - t0
        pub.stop()
        rows.append([f"{n_rate:,} windows committed while connected", f"{n_rate / commit_s:,.0f}/s",
                     f"{n_rate / total_s:,.0f}/s committed and acknowledged", f"{total_s:.2f} s"])
        # an outage: n_drain windows queue up, then the broker returns
        broker.stop()
        ob2 = Outbox(work / "drain.sqlite")
        for i in range(n_drain):
            ob2.put("lepton/v1/bench/dev/telemetry", _window_payload(i))
        pub2 = Publisher(broker.url, "bench-drain", ob2)
        pub2.start()
        time.sleep(0.5)
        broker.start()
        t0 = time.perf_counter()
        pub2.connected.wait(30)
        ok = pub2.flush(900)
        drain_s = time.perf_counter() - t0
        pub2.stop()
        rows.append([f"{n_drain:,} windows queued during an outage, broker back", "-",
                     f"{n_drain / drain_s:,.0f}/s" if ok else "did not drain", f"{drain_s:.2f} s to drain"])
    finally:
        broker.stop()
    return ("Outbox against a local mosquitto (QoS 1, deleted on PUBACK)",
            ["what", "commit rate", "end-to-end rate", "time"], rows)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "alternate":
        sys.path.insert(0, str(ROOT / "bench"))
        bundle, video, block_s, rounds, url, state, window_s = sys.argv[2:9]
        print(json.dumps(_alternate(bundle, video, float(block_s), int(rounds), url, state, float(window_s))))
        sys.exit(0)
    with tempfile.TemporaryDirectory() as d:
        for t in [outbox_rates(Path(d))]:
            print(t[0])
            for r in t[2]:
                print("   ", " | ".join(r))
