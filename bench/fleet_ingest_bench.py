"""Fleet ingest: simulated devices -> mosquitto (loopback) -> Monitor -> store, against a bare paho
subscriber that only counts, same broker, same run. Prints JSON.

    python bench/fleet_ingest_bench.py --devices 1000 --seconds 60 [--postgres URL] [--workers 2]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from lepton_edge.fleet.monitor import Monitor  # noqa: E402
from lepton_edge.fleet.store import open_store  # noqa: E402
from lepton_edge.telemetry.schema import Telemetry  # noqa: E402


class Counter:
    def __init__(self, port: int):
        self.n, self.first, self.last = 0, None, None
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-bare", clean_session=False)
        self.c.on_connect = lambda c, *a: c.subscribe("lepton/v1/+/+/telemetry", qos=1)
        self.c.on_message = self._on
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def _on(self, c, u, m):
        t = time.time()
        self.first = self.first or t
        self.last, self.n = t, self.n + 1


def publish(port: int, devices: int, seconds: int, clients: int = 20) -> int:
    """`clients` connections, each publishing one window a second for its share of the devices."""
    def run(k):
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{k}")
        c.max_queued_messages_set(0)
        c.connect("127.0.0.1", port)
        c.loop_start()
        mine = range(k, devices, clients)
        t0 = time.monotonic()
        for s in range(seconds):
            for d in mine:
                c.publish(f"lepton/v1/bench/dev{d:05d}/telemetry",
                          Telemetry(boot_id="b1", seq=s, window_s=1, frames=30, fps=30.0, temperature_c=50.0,
                                    latency_ms={"inference": {"p50": 3, "p95": 5, "p99": 6, "max": 9}},
                                    cpu_percent=40.0, rss_bytes=80_000_000).model_dump_json(), qos=1)
            time.sleep(max(0.0, t0 + s + 1 - time.monotonic()))
        while c.want_write():
            time.sleep(0.05)
        time.sleep(0.5)
        c.loop_stop()
        c.disconnect()

    ts = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    return devices * seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--postgres", default=None, help="postgresql:// URL (default: a SQLite file)")
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args()
    from mqtt_broker import Mosquitto

    tmp = Path(tempfile.mkdtemp(prefix="lepton-bench-"))
    broker = Mosquitto(tmp / "broker", extra="max_inflight_messages 1000\n").start()
    try:
        url = a.postgres or str(tmp / "fleet.sqlite")
        stores = [open_store(url) for _ in range(a.workers)]
        first: list[float] = []
        done_at: list[float] = []

        def changed(_):
            first.append(time.time()) if not first else done_at.append(time.time())

        mons = [Monitor(broker.url, s, group="bench" if a.workers > 1 else None, client_id=f"bench-mon-{i}",
                        on_change=changed, log=lambda _: None).start() for i, s in enumerate(stores)]
        bare = Counter(broker.port)
        for m in mons:
            m.connected.wait(10)
        time.sleep(0.5)
        sent = publish(broker.port, a.devices, a.seconds)
        deadline = time.time() + 120
        while time.time() < deadline and sum(m.stats["stored"] + m.stats["duplicates"] for m in mons) < sent:
            time.sleep(0.1)
        for m in mons:
            m.wait_idle(30)
        devs = stores[0].devices()
        stored = sum(d.windows for d in devs)
        mon_rate = stored / max(1e-9, (done_at[-1] if done_at else time.time()) - first[0]) if first else 0.0
        bare_rate = bare.n / max(1e-9, bare.last - bare.first) if bare.first else 0.0
        out = {"devices": a.devices, "seconds": a.seconds, "store": "postgresql" if a.postgres else "sqlite",
               "workers": a.workers, "sent": sent, "stored": stored, "lost": sent - stored,
               "duplicates_stored": max(0, stored - sent),
               "duplicates_refused": sum(d.duplicates for d in devs), "seq_gaps": sum(d.seq_gaps for d in devs),
               "monitor_windows_per_s": round(mon_rate, 1), "bare_windows_per_s": round(bare_rate, 1),
               "ratio": round(mon_rate / bare_rate, 3) if bare_rate else None}
        for m in mons:
            m.stop()
        if not a.postgres:  # size per device-day at a 10 s window, raw and downsampled to 1-minute rows
            import sqlite3

            for st in stores:
                st.close()

            def size() -> float:
                c = sqlite3.connect(url)
                c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                c.execute("VACUUM")
                n = c.execute("SELECT (SELECT count(*) FROM windows), (SELECT count(*) FROM windows_ds)").fetchone()
                c.close()
                return Path(url).stat().st_size, n

            raw, (nw, _) = size()
            out["bytes_per_device_day_at_10s"] = round(raw / max(1, nw) * 8640)
            s2 = open_store(url)
            s2.downsample(older_than_s=-3600, bucket_s=60)
            s2.close()
            ds, (_, nds) = size()
            out["bytes_per_device_day_downsampled_1min"] = round(ds / max(1, nds) * 1440)
        bare.c.loop_stop()
        print(json.dumps(out))
    finally:
        broker.stop()


if __name__ == "__main__":
    main()
