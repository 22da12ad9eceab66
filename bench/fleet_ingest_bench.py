"""Fleet ingest (issue 11): simulated devices -> mosquitto (loopback) -> Monitor -> store, against a bare
paho subscriber that only counts, same broker, same run; and the store's size per device-day.

The fleet is `lepton_edge.fleet.simulate.Simulator` (one MQTT connection and Last Will per device, one
schema-valid window a second each) in a process of its own, as a real fleet is not inside the monitor's
process; its chaos behaviours are off (shares={}) so that every window it publishes must be stored:
lost = published - stored. Three set-ups: SQLite, PostgreSQL (a real server, tests/postgres_server.py),
and two monitor workers in a `$share` group writing to that PostgreSQL. The rates are windows per second
from the first to the last message (the bare subscriber) or stored batch (the monitor); `drain lag` is
how long after the bare subscriber's last message the monitor had stored everything.

Store size: one day of 10 s windows for 10 devices written through the store's API (payloads from the
simulator), measured per table with SQLite's dbstat, then again after downsampling to 1-minute rows.

    python bench/fleet_ingest_bench.py [--quick]          # prints JSON
"""
from __future__ import annotations

import json
import random
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import paho.mqtt.client as mqtt  # noqa: E402

from lepton_edge.fleet.monitor import Monitor  # noqa: E402
from lepton_edge.fleet.store import open_store  # noqa: E402

FLEET = "bench"
TARGET, GOAL = 0.5, 0.8  # monitor / bare, from the issue


class Counter:
    """The baseline: a paho subscriber (QoS 1, persistent session) that counts telemetry and nothing else."""

    def __init__(self, port: int, client_id: str = "bench-bare"):
        self.n, self.first, self.last = 0, None, None
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        self.c.on_connect = lambda c, *a: c.subscribe(f"lepton/v1/{FLEET}/+/telemetry", qos=1)
        self.c.on_message = self._on
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def _on(self, c, u, m):
        t = time.time()
        self.first = self.first or t
        self.last, self.n = t, self.n + 1

    def rate(self) -> float:
        return self.n / max(1e-9, self.last - self.first) if self.first else 0.0

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def simulate(broker_url: str, devices: int, seconds: float) -> dict:
    """The simulated fleet in a child process; its summary (windows published) as a dict."""
    code = ("import json, sys\nfrom lepton_edge.fleet.simulate import Simulator\n"
            f"s = Simulator({broker_url!r}, devices={devices}, window_s=1.0, seconds={seconds}, seed=1, "
            f"fleet={FLEET!r}, prefix='dev', shares={{}}).start()\n"
            "s.wait()\nprint(json.dumps(s.summary()))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=seconds + 120,
                       cwd=ROOT)
    if r.returncode:
        raise RuntimeError(f"simulator failed: {r.stderr[-500:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def ingest(work: Path, devices: int, seconds: float, store_url: str, workers: int = 1) -> dict:
    from mqtt_broker import Mosquitto

    broker = Mosquitto(work / "broker", extra="max_inflight_messages 1000\nmax_connections -1\n").start()
    mons: list[Monitor] = []
    stores = []
    bare = bare_aa = None
    try:
        stores = [open_store(store_url) for _ in range(workers)]
        stamps: list[float] = []
        lock = threading.Lock()

        def changed(_):  # stamps from the first stored window on (not the retained status at connect)
            if any(m.stats["stored"] for m in mons):
                with lock:
                    stamps.append(time.time())

        mons[:] = [Monitor(broker.url, s, group="bench" if workers > 1 else None, client_id=f"bench-mon-{i}",
                        fleet=FLEET, on_change=changed, log=lambda _: None).start() for i, s in enumerate(stores)]
        bare = Counter(broker.port)
        bare_aa = Counter(broker.port, "bench-bare-aa")  # A/A: the baseline against itself, same run
        for m in mons:
            m.connected.wait(10)
        time.sleep(0.5)
        sim = simulate(broker.url, devices, seconds)
        sent = sim["windows"]
        # until everything is stored, or nothing more was stored for 30 s (then what is missing is lost;
        # a slow store only shows as drain lag), at most 10 minutes
        deadline, last, progress = time.time() + 600, -1, time.time()
        while time.time() < min(deadline, progress + 30):
            n = sum(d.windows for d in stores[0].devices())
            if n >= sent:
                break
            if n > last:
                last, progress = n, time.time()
            time.sleep(0.5)
        for m in mons:
            m.wait_idle(30)
        devs = [d for d in stores[0].devices() if d.fleet == FLEET]
        stored = sum(d.windows for d in devs)
        done = stamps[-1] if stamps else time.time()
        mon_rate = stored / max(1e-9, done - stamps[0]) if stamps else 0.0
        bare_rate = bare.rate()
        return {"store": store_url.split(":")[0] if "://" in store_url else "sqlite", "workers": workers,
                "devices": devices, "seconds": seconds, "connected": sim["connected"], "sent": sent,
                "bare_received": bare.n, "stored": stored, "lost": sent - stored,
                "duplicates_stored": max(0, stored - sent), "duplicates_refused": sum(d.duplicates for d in devs),
                "seq_gaps": sum(d.seq_gaps for d in devs), "bad": sum(m.stats["bad"] for m in mons),
                "monitor_windows_per_s": round(mon_rate, 1), "bare_windows_per_s": round(bare_rate, 1),
                "ratio": round(mon_rate / bare_rate, 3) if bare_rate else None,
                "aa_ratio": round(bare_aa.rate() / bare_rate, 3) if bare_rate else None,
                "drain_lag_s": round(done - bare.last, 2) if bare.last and stamps else None,
                "per_worker_stored": [m.stats["stored"] for m in mons]}
    finally:
        for b in (bare, bare_aa):
            if b:
                b.close()
        for m in mons:
            m.stop()
        for s in stores:
            s.close()
        broker.stop()


def store_size(work: Path, devices: int = 10, window_s: float = 10.0) -> dict:
    """Bytes per device-day at a 10 s window (raw windows + the minute rows the writer keeps), and once the
    raw windows are downsampled away (minute rows only); SQLite's dbstat, per table and index."""
    from lepton_edge.fleet.simulate import SimDevice

    path = work / "size.sqlite"
    st = open_store(path)
    now = time.time()
    n = int(86_400 / window_s)
    for i in range(devices):
        d = SimDevice(FLEET, f"dev{i:02d}", random.Random(i), window_s)
        rows = []
        for s in range(n):
            d.seq = s
            ts = now - 86_400 + s * window_s
            p = d.telemetry().model_dump(mode="json")
            p["ts"] = ts
            rows.append((FLEET, d.name, p, ts))
        for k in range(0, n, 5000):
            st.add_windows(rows[k:k + 5000])

    def measure() -> tuple[int, int]:
        c = sqlite3.connect(path)
        try:
            c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            c.execute("VACUUM")
            total = c.execute("SELECT SUM(pgsize) FROM dbstat").fetchone()[0]
            nwin = c.execute("SELECT count(*) FROM windows").fetchone()[0]
            return total, nwin
        finally:
            c.close()

    raw, nwin = measure()
    st.downsample(older_than_s=0, bucket_s=60, now=now + 120)
    st.close()
    ds, left = measure()
    return {"devices": devices, "window_s": window_s, "windows": nwin,
            "bytes_per_device_day": round(raw / devices), "bytes_per_device_day_downsampled_1min": round(ds / devices),
            "raw_windows_left": left}


def run(work: Path, quick: bool = False) -> dict:
    from postgres_server import Postgres, pg_bin

    work.mkdir(parents=True, exist_ok=True)
    devices, seconds = 1000, (15 if quick else 60)
    res: dict = {"runs": []}
    res["runs"].append(ingest(work / "sqlite", devices, seconds, str(work / "fleet.sqlite")))
    if pg_bin("initdb") and pg_bin("postgres"):
        for workers in (1, 2):
            pg = Postgres().start()
            try:
                res["runs"].append(ingest(work / f"pg{workers}", devices, seconds, pg.url, workers))
            finally:
                pg.cleanup()
    else:
        res["postgres"] = "skipped: PostgreSQL is not installed (Debian: postgresql)"
    res["size"] = store_size(work)
    return res


def tables(res: dict) -> list:
    """BENCHMARKS.md tables: (title, header, rows) like bench/run.py's RESULTS."""
    rows = []
    for r in res["runs"]:
        what = f"{r['store']}, {r['workers']} worker{'s in a $share group' if r['workers'] > 1 else ''}"
        ok = r["lost"] == 0 and r["duplicates_stored"] == 0 and (r["ratio"] or 0) >= TARGET
        rows.append([what, f"{r['sent']:,}", f"{r['stored']:,}", str(r["lost"]), str(r["duplicates_stored"]),
                     f"{r['monitor_windows_per_s']:.0f}", f"{r['bare_windows_per_s']:.0f}", f"{r['ratio']:.3f}",
                     f"{r['aa_ratio']:.3f}" if r.get("aa_ratio") is not None else "-",
                     f"{r['drain_lag_s']} s", "PASS" if ok else "FAIL"])
    r0 = res["runs"][0]
    t1 = (f"Fleet ingest: {r0['devices']:,} simulated devices (one MQTT connection each), one window a second, "
          f"{r0['seconds']:g} s, mosquitto on loopback; monitor vs a bare paho subscriber in the same run (both "
          "subscribed at once, so no order to bias); A/A = a second bare subscriber against the first",
          ["store", "published", "stored", "lost", "duplicates stored", "monitor windows/s", "bare windows/s",
           "ratio", "A/A: bare / bare", "drain lag", f"0 lost, 0 dup, ratio >= {TARGET} (goal {GOAL})"], rows)
    s = res["size"]
    t2 = (f"Fleet store size per device-day, SQLite, 10 s windows ({s['devices']} devices x 24 h written through "
          "the store, dbstat after VACUUM)",
          ["history kept", "bytes per device-day", "per 1,000 devices for 7 days"],
          [["every 10 s window (+ the 1-minute rows kept beside them)", f"{s['bytes_per_device_day'] / 1e6:.2f} MB",
            f"{s['bytes_per_device_day'] * 7000 / 1e9:.1f} GB"],
           ["downsampled to 1-minute rows", f"{s['bytes_per_device_day_downsampled_1min'] / 1e6:.2f} MB",
            f"{s['bytes_per_device_day_downsampled_1min'] * 7000 / 1e9:.1f} GB"]])
    return [t1, t2]


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    with tempfile.TemporaryDirectory(prefix="lepton-ingest-bench-") as d:
        r = run(Path(d), quick)
    print(json.dumps(r, indent=2))
