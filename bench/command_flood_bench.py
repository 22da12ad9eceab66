"""Agent RSS under a flood of oversized commands (issue #10): 10 MB payloads on cmd/ping, as fast
as the broker takes them up to 1,000 per second, against a real agent process and mosquitto.

Why this figure: commands used to be queued whole before their size was checked, and 110 such
payloads took an agent from 155 MB to 1.21 GB. The size is now checked in paho's callback before
anything is kept, so RSS should stay flat (goal: within 20 MB of the baseline) however long the
flood lasts. paho itself must still receive each payload; what matters is that none is kept.

Prints one JSON object: baseline/peak/end RSS, the growth, the commands sent and the rate reached,
how many error replies came back (rate-limited) and how long a ping took after the flood.

    python bench/command_flood_bench.py [--seconds 8] [--mb 10] [--rate 1000]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import paho.mqtt.client as mqtt  # noqa: E402
import psutil  # noqa: E402

from mqtt_broker import Mosquitto  # noqa: E402  (the same real broker the tests start)

BASE = "lepton/v1/bench/dev"


def _bundle_and_video(work: Path) -> tuple[Path, Path]:
    """The pre-exported fixtures when present, else a fresh export and a short video."""
    fixtures = Path("/tmp/lepton-fixtures")
    if (fixtures / "fashion-cnn-x86-cpu" / "manifest.json").is_file() and (fixtures / "fashion.avi").is_file():
        return fixtures / "fashion-cnn-x86-cpu", fixtures / "fashion.avi"
    import cv2

    import lepton_edge
    from lepton_edge.datasets import fashion_mnist

    b = lepton_edge.export("zoo:fashion-cnn", target="x86-cpu", out=work / "bundle", eval_limit=500)
    x, _ = fashion_mnist("test")
    video = work / "fashion.avi"
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"FFV1"), 30, (56, 56), False)
    for i in range(300):
        w.write(cv2.resize(x[i], (56, 56), interpolation=cv2.INTER_NEAREST))
    w.release()
    return b.bundle.path, video


def _client(port: int, name: str, replies: list | None = None) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{name}-{os.getpid()}")
    c.max_inflight_messages_set(100)
    if replies is not None:
        c.on_message = lambda cl, u, m: replies.append(json.loads(m.payload))
    c.connect("127.0.0.1", port)
    if replies is not None:
        c.subscribe(f"{BASE}/cmd/+/reply", qos=1)
        c.subscribe(f"{BASE}/events", qos=1)
    c.loop_start()
    return c


def run(seconds: float, mb: int, rate: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="flood-") as tmp:
        work = Path(tmp)
        bundle, video = _bundle_and_video(work)
        broker = Mosquitto(work / "broker", extra="message_size_limit 0\nmax_queued_bytes 0\n").start()
        exe = Path(sys.executable).parent / "lepton-edge"
        agent = subprocess.Popen([str(exe), "agent", "--broker", broker.url, "--fleet", "bench", "--device-id", "dev",
                                  "--bundle", str(bundle), "--source", str(video), "--loop", "--window", "1",
                                  "--state-dir", str(work / "state")], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        proc = psutil.Process(agent.pid)
        got: list[dict] = []
        listener = _client(broker.port, "listen", got)
        try:
            deadline = time.monotonic() + 60
            while not any(r.get("kind") == "started" for r in got) and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(3.0)  # settle: first windows, model warm
            samples: list[tuple[float, int]] = []
            stop = threading.Event()

            def sample():
                while not stop.is_set():
                    samples.append((time.monotonic(), proc.memory_info().rss))
                    time.sleep(0.1)

            baseline = proc.memory_info().rss
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            pub = _client(broker.port, "flood")
            payload = b"[" * (mb * 1024 * 1024)
            sent, t0 = 0, time.monotonic()
            pending = []
            while time.monotonic() - t0 < seconds:
                pending.append(pub.publish(f"{BASE}/cmd/ping", payload, qos=1))
                sent += 1
                if len(pending) >= 50:  # keep the flood's own memory bounded: wait for the broker
                    for p in pending:
                        p.wait_for_publish(30)
                    pending.clear()
                ahead = sent / rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
            for p in pending:
                p.wait_for_publish(30)
            flood_s = time.monotonic() - t0
            time.sleep(3.0)  # the broker finishes delivering to the agent
            stop.set()
            sampler.join()
            end = proc.memory_info().rss
            ping_t = time.monotonic()
            listener.publish(f"{BASE}/cmd/ping", json.dumps({"id": "after-flood"}), qos=1)
            while not any(r.get("id") == "after-flood" for r in got) and time.monotonic() - ping_t < 30:
                time.sleep(0.01)
            ping_ms = (time.monotonic() - ping_t) * 1e3 if any(r.get("id") == "after-flood" for r in got) else None
            pub.loop_stop()
            pub.disconnect()
            peak = max(r for _, r in samples)
            errors = [r for r in got if r.get("ok") is False and "exceeds" in (r.get("error") or "")]
            events = [r for r in got if r.get("kind") == "command_error"]
            return {"payload_mb": mb, "target_rate_per_s": rate, "sent": sent, "flood_s": round(flood_s, 2),
                    "rate_per_s": round(sent / flood_s, 1), "baseline_rss_mb": round(baseline / 2**20, 1),
                    "peak_rss_mb": round(peak / 2**20, 1), "end_rss_mb": round(end / 2**20, 1),
                    "growth_mb": round((peak - baseline) / 2**20, 1), "error_replies": len(errors),
                    "command_error_events": len(events), "ping_after_flood_ms": ping_ms,
                    "agent_alive": agent.poll() is None, "goal_growth_mb": 20,
                    "ok": agent.poll() is None and (peak - baseline) / 2**20 <= 20 and ping_ms is not None}
        finally:
            listener.loop_stop()
            listener.disconnect()
            agent.terminate()
            try:
                agent.wait(30)
            except subprocess.TimeoutExpired:
                agent.kill()
            broker.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--mb", type=int, default=10)
    ap.add_argument("--rate", type=float, default=1000.0)
    a = ap.parse_args()
    print(json.dumps(run(a.seconds, a.mb, a.rate), indent=2))


if __name__ == "__main__":
    main()
