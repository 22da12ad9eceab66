"""Web dashboard benchmarks (issue 11): the fleet JSON for 1,000 devices, the dashboard's first paint in
Chromium with 1,000 devices, and a device page's 24 h chart query with 24 h of 1 s windows stored.

Everything goes through the real parts: a SQLite store filled through its own write API, the Starlette
app under uvicorn on loopback, requests over HTTP (httpx) and Debian's chromium driven by Playwright.

    .venv/bin/python bench/fleet_web_bench.py [--quick]     # prints JSON
"""
from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lepton_edge.fleet.store import open_store  # noqa: E402
from lepton_edge.fleet.web.app import WebServer, create_app  # noqa: E402

TARGETS = {"devices_json_ms": 200.0, "first_paint_ms": 1000.0, "history_24h_ms": 300.0}
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def window(seq: int, ts: float, i: int = 0) -> dict:
    lat = {"p50": 5.0 + i % 7, "p95": 8.0 + i % 7, "p99": 9.0 + i % 7, "max": 12.0}
    return {"v": 1, "ts": ts, "boot_id": "b1", "seq": seq, "window_s": 1.0, "frames": 15, "fps": 15.0 + (seq % 10),
            "latency_ms": {"capture": lat, "inference": lat}, "cpu_percent": 40.0, "rss_bytes": 80_000_000,
            "temperature_c": 50.0 + (seq % 20) / 2, "bundle": {"name": "fashion-cnn", "sha256": "ab" * 32}}


def fill_fleet(store, n: int, now: float) -> None:
    rows = []
    for i in range(n):
        dev = f"cam-{i:04d}"
        store.set_status("bench", dev, {"v": 1, "online": i % 50 != 0, "boot_id": "b1", "ts": now}, now)
        store.set_meta("bench", dev, {"v": 1, "boot_id": "b1", "software": "0.1.0",
                                      "bundle": {"name": "fashion-cnn", "precision": "int8", "sha256": "ab" * 32,
                                                 "latency_budget_ms": 50}}, now)
        rows += [("bench", dev, window(s, now - 3 + s, i), now - 3 + s) for s in range(3)]
    store.add_windows(rows)


def fill_day(store, now: float) -> float:
    """86,400 windows of one device (24 h at 1 s), in batches through the store API; returns seconds taken."""
    t0 = time.perf_counter()
    batch = []
    for s in range(86_400):
        ts = now - 86_400 + s
        batch.append(("bench", "day", window(s, ts), ts))
        if len(batch) == 5000:
            store.add_windows(batch)
            batch = []
    if batch:
        store.add_windows(batch)
    return time.perf_counter() - t0


def timed_get(client, url: str, rounds: int) -> dict:
    times = []
    size = 0
    for _ in range(rounds):
        t0 = time.perf_counter()
        r = client.get(url)
        times.append((time.perf_counter() - t0) * 1000)
        r.raise_for_status()
        size = len(r.content)
    return {"median_ms": round(statistics.median(times), 1), "max_ms": round(max(times), 1), "bytes": size,
            "rounds": rounds}


def first_paint(url: str, rounds: int, profile: Path) -> dict:
    from playwright.sync_api import sync_playwright

    ready, fcp = [], []
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, viewport={"width": 1400, "height": 900},
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"])
        page = ctx.new_page()
        for i in range(rounds + 1):  # the first load warms the browser's caches and is not counted
            page.goto(url)
            page.wait_for_selector("body[data-ready-ms]", timeout=30000)
            rows = page.locator("#devices tbody tr").count()
            if i:
                ready.append(float(page.get_attribute("body", "data-ready-ms")))
                fcp.append(page.evaluate("(performance.getEntriesByName('first-contentful-paint')[0] || "
                                         "{startTime: NaN}).startTime"))
        ctx.close()
    return {"table_painted_ms": round(statistics.median(ready), 1), "first_contentful_paint_ms":
            round(statistics.median(fcp), 1), "rows": rows, "rounds": rounds}


def run(work: Path, quick: bool = False) -> dict:
    import httpx

    work.mkdir(parents=True, exist_ok=True)
    store = open_store(work / "fleet.sqlite")
    now = time.time()
    fill_fleet(store, 1000, now)
    fill_s = fill_day(store, now)
    web = WebServer(create_app(store, token="bench"), "127.0.0.1", 0).start()
    try:
        with httpx.Client(base_url=web.url, timeout=30) as c:
            res = {"devices": 1000,
                   "devices_json": timed_get(c, "/api/devices", 5 if quick else 20),
                   "summary_json": timed_get(c, "/api/summary", 5 if quick else 20),
                   "history_24h": timed_get(c, "/api/devices/bench/day/history?range=24h", 5 if quick else 20),
                   "history_rows": 86_400, "history_fill_s": round(fill_s, 1)}
        t0 = time.perf_counter()
        pts = store.history("bench", "day", now - 86_400, now, 720)
        res["history_24h_store_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        res["history_points"] = len(pts)
        if Path(CHROMIUM).exists():
            res["first_paint"] = first_paint(web.url, 3 if quick else 7, work / "profile")
    finally:
        web.stop()
        store.close()
    return res


def table(res: dict):
    """One BENCHMARKS.md table: (title, header, rows) like bench/run.py's RESULTS."""
    def v(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    rows = [["fleet JSON, 1,000 devices (GET /api/devices, median)", f"{res['devices_json']['median_ms']} ms",
             f"<= {TARGETS['devices_json_ms']:g} ms",
             v(res["devices_json"]["median_ms"] <= TARGETS["devices_json_ms"])],
            ["device page 24 h chart query (86,400 1 s windows, median)", f"{res['history_24h']['median_ms']} ms",
             f"<= {TARGETS['history_24h_ms']:g} ms", v(res["history_24h"]["median_ms"] <= TARGETS["history_24h_ms"])]]
    fp = res.get("first_paint")
    if fp:
        rows.append(["dashboard first paint in Chromium, 1,000 rows (table painted, median)",
                     f"{fp['table_painted_ms']} ms (FCP {fp['first_contentful_paint_ms']} ms)",
                     f"<= {TARGETS['first_paint_ms']:g} ms", v(fp["table_painted_ms"] <= TARGETS["first_paint_ms"])])
    return ("Web dashboard (SQLite store, uvicorn on loopback, Debian chromium)", ["figure", "measured", "target",
                                                                                   "verdict"], rows)


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    with tempfile.TemporaryDirectory(prefix="lepton-web-bench-") as d:
        r = run(Path(d), quick)
    r["verdicts"] = {row[0]: row[3] for row in table(r)[2]}
    print(json.dumps(r, indent=2))
