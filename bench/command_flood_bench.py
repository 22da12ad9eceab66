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
    """The demo classifier exported for x86-cpu and a short video of Fashion-MNIST test images."""
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


BROKER_UNCAPPED = "message_size_limit 0\nmax_queued_bytes 0\n"
BROKER_CAPPED = "max_packet_size 262144\n"  # as examples/raspberry_pi/mosquitto/lepton.conf


def run(seconds: float, mb: int, rate: float, mqtt_max_packet_bytes: int | None = None,
        work: Path | None = None, broker_conf: str = BROKER_UNCAPPED) -> dict:
    """One flood against one agent; mqtt_max_packet_bytes as in agent.toml (None: the default, MQTT
    3.1.1); broker_conf: the broker's limits (default: none, the worst case for the device)."""
    with tempfile.TemporaryDirectory(prefix="flood-") as tmp:
        work = Path(tmp) if work is None else work
        bundle, video = _bundle(work)
        broker = Mosquitto(Path(tmp) / "broker", extra=broker_conf).start()
        exe = Path(sys.executable).parent / "lepton-edge"
        conf = Path(tmp) / "agent.toml"
        conf.write_text("" if mqtt_max_packet_bytes is None else f"mqtt_max_packet_bytes = {mqtt_max_packet_bytes}\n")
        with open(Path(tmp) / "agent.log", "w") as log:  # the agent keeps its own copy of the descriptor
            agent = subprocess.Popen([str(exe), "agent", "--config", str(conf), "--broker", broker.url, "--fleet",
                                      "bench", "--device-id", "dev", "--bundle", str(bundle), "--source", str(video),
                                      "--loop", "--window", "1", "--state-dir", str(Path(tmp) / "state")],
                                     stdout=subprocess.DEVNULL, stderr=log)
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

            def settle():  # a capped broker closes the flooder's connection: paho reconnects, we go on
                for p in pending:
                    try:
                        p.wait_for_publish(5)
                    except (RuntimeError, ValueError):
                        pass
                pending.clear()

            while time.monotonic() - t0 < seconds:
                if not pub.is_connected():
                    time.sleep(0.05)
                    continue
                pending.append(pub.publish(f"{BASE}/cmd/ping", payload, qos=1))
                sent += 1
                if len(pending) >= 50:  # keep the flood's own memory bounded: wait for the broker
                    settle()
                ahead = sent / rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
            settle()
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
            return {"mqtt": "5" if mqtt_max_packet_bytes else "3.1.1",
                    "broker": "max_packet_size 256 KiB" if broker_conf == BROKER_CAPPED else "no size limit",
                    "payload_mb": mb, "target_rate_per_s": rate, "sent": sent, "flood_s": round(flood_s, 2),
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
            log = Path(tmp) / "agent.log"
            if os.environ.get("FLOOD_DEBUG") and log.exists():
                print(log.read_text()[-3000:], file=sys.stderr)


_BUNDLES: dict[Path, tuple[Path, Path]] = {}


def _bundle(work: Path) -> tuple[Path, Path]:
    """Export once per work directory (both protocol runs share it)."""
    if work not in _BUNDLES:
        _BUNDLES[work] = _bundle_and_video(work)
    return _BUNDLES[work]


def both(work: Path, seconds: float = 8.0, mb: int = 10, rate: float = 1000.0) -> list[dict]:
    """The flood on a broker with no size limit (the device's own defence alone) and on one capped as
    the example broker config caps it."""
    return [run(seconds, mb, rate, None, work), run(seconds, mb, rate, None, work, BROKER_CAPPED)]


def table(results: list[dict]):
    """BENCHMARKS.md rows (bench/run.py's `flood` section)."""
    rows = [[f"{r['broker']}, MQTT {r['mqtt']}", f"{r['sent']} x {r['payload_mb']} MB", f"{r['rate_per_s']}/s",
             f"{r['baseline_rss_mb']}",
             f"{r['peak_rss_mb']}", f"{r['end_rss_mb']}", f"{r['growth_mb']:+.1f}", str(r["error_replies"]),
             "-" if r["ping_after_flood_ms"] is None else f"{r['ping_after_flood_ms']:.0f} ms",
             "PASS" if r["ok"] else "FAIL"] for r in results]
    return ("Agent RSS under a flood of 10 MB commands on cmd/ping (real agent process and mosquitto; goal: "
            "peak within 20 MB of the baseline). With no broker limit paho must read each payload (about four "
            "copies of one at the peak); the agent refuses it before queueing, so RSS does not grow with the "
            "flood's length. The example broker config (max_packet_size 256 KiB) refuses such payloads at the "
            "door",
            ["broker, protocol", "flood", "rate reached", "baseline MB", "peak MB", "end MB", "peak growth MB",
             "error replies", "ping after", "goal"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--mb", type=int, default=10)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--capped", action="store_true", help="the broker capped as the example config caps it")
    a = ap.parse_args()
    print(json.dumps(run(a.seconds, a.mb, a.rate, broker_conf=BROKER_CAPPED if a.capped else BROKER_UNCAPPED),
                     indent=2))


if __name__ == "__main__":
    main()
