"""Agent benchmarks (issue: device agent): the cost of telemetry to the model's frame time, and
how fast the outbox commits, publishes and drains against a local mosquitto.

The frame-time ratio alternates runs with and without telemetry on the same bundle, video and
runtime object, in one process, and takes medians (this machine is shared and noisy).
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


def _measure(mode: str, bundle: str, video: str, seconds: float, broker_url: str, state: str) -> dict:
    """One measurement in this (fresh) process: ms of wall and CPU time per frame, after a warm second."""
    from lepton_edge.capture import open_source
    from lepton_edge.pipeline import Pipeline

    def measure(stats) -> tuple[float, float]:
        time.sleep(1.0)
        n0, t0, c0 = stats.frames, time.perf_counter(), time.process_time()
        time.sleep(seconds)
        n = stats.frames - n0
        return (time.perf_counter() - t0) * 1e3 / n, (time.process_time() - c0) * 1e3 / n

    if mode == "off":
        pipe = Pipeline(open_source(video, loop=True), Path(bundle))
        stop = threading.Event()
        th = threading.Thread(target=lambda: next((None for _ in pipe if stop.is_set()), None))
        th.start()
        wall, cpu = measure(pipe.stats)
        stop.set()
        th.join()
        pipe.close()
        return {"wall": wall, "cpu": cpu, "windows": 0}
    from lepton_edge.agent.config import AgentConfig
    from lepton_edge.agent.service import Agent

    cfg = AgentConfig(broker=broker_url, fleet="bench", device_id="dev", bundle=Path(bundle), source=video,
                      loop=True, window_s=1.0, state_dir=Path(state))
    agent = Agent(cfg, log=lambda m: None)
    th = threading.Thread(target=agent.run, kwargs={"install_signals": False})
    th.start()
    wall, cpu = measure(agent.pipeline.stats)
    agent.stop()
    th.join()
    return {"wall": wall, "cpu": cpu, "windows": agent.seq}


def telemetry_cost(bundle: Path, video: Path, seconds: float, rounds: int, work: Path):
    """Paired rounds, each measurement in a fresh process (nothing left over from the previous one),
    the order alternating (off-on, on-off); gated on the median of the per-round wall-time ratios.
    Process CPU time per frame, which counts the telemetry threads' own work, is reported beside it."""
    import subprocess

    def run(mode: str, r: int) -> dict:
        out = subprocess.run([sys.executable, __file__, "measure", mode, str(bundle), str(video), str(seconds),
                              broker.url, str(work / f"agent-state-{r}")], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    broker = Mosquitto(work / "broker-tc").start()
    try:
        wall, cpu, walls_off, walls_on, windows = [], [], [], [], 0
        for r in range(rounds):
            a, b = (run("off", r), run("on", r)) if r % 2 == 0 else reversed((run("on", r), run("off", r)))
            windows += b["windows"]
            walls_off.append(a["wall"])
            walls_on.append(b["wall"])
            wall.append(b["wall"] / a["wall"])
            cpu.append(b["cpu"] / a["cpu"])
        ratio = statistics.median(wall)
        return ("Agent: frame time with telemetry on vs off (fashion-cnn rpi4 bundle, looping video, one telemetry "
                f"window a second = 10x the default rate; {rounds} paired rounds of {seconds:g} s, each run in a "
                "fresh process, medians)",
                ["telemetry off (ms/frame)", "telemetry on (ms/frame)", "on / off (median of paired ratios)",
                 "CPU time per frame on / off", "windows sent", "<= 1.02x"],
                [[f"{statistics.median(walls_off):.4f}", f"{statistics.median(walls_on):.4f}", f"{ratio:.3f}",
                  f"{statistics.median(cpu):.3f}", str(windows), "PASS" if ratio <= 1.02 else "FAIL"]])
    finally:
        broker.stop()


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
        # an outage: 10,000 windows queue up, then the broker returns
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
        ok = pub2.flush(300)
        drain_s = time.perf_counter() - t0
        pub2.stop()
        rows.append([f"{n_drain:,} windows queued during an outage, broker back", "-",
                     f"{n_drain / drain_s:,.0f}/s" if ok else "did not drain", f"{drain_s:.2f} s to drain"])
    finally:
        broker.stop()
    return ("Outbox against a local mosquitto (QoS 1, deleted on PUBACK)",
            ["what", "commit rate", "end-to-end rate", "time"], rows)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "measure":
        mode, bundle, video, seconds, url, state = sys.argv[2:8]
        print(json.dumps(_measure(mode, bundle, video, float(seconds), url, state)))
        sys.exit(0)
    with tempfile.TemporaryDirectory() as d:
        for t in [outbox_rates(Path(d))]:
            print(t[0])
            for r in t[2]:
                print("   ", " | ".join(r))
