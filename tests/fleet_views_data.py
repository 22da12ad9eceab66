"""A small fleet written into a real store through the monitor's write API (the payloads the agent
sends), for the tests of the views: terminal dashboard, fleet CLI, Prometheus, Home Assistant."""
from __future__ import annotations

import time

from lepton_edge.fleet.store.base import Alert
from lepton_edge.telemetry.schema import Event, Status, Telemetry


def meta(boot_id: str, bundle: str = "fashion-cnn", window_s: float = 2.0, budget: float | None = 50.0) -> dict:
    b = {"name": bundle, "version": "1", "format": "onnx", "precision": "int8", "target": "x86-cpu",
         "sha256": "ab" * 32, "backend": "onnxruntime", "threads": 2, "path": "/opt/bundle"}
    if budget is not None:
        b["latency_budget_ms"] = budget
    return {"v": 1, "ts": time.time(), "boot_id": boot_id, "software": "0.1.0", "bundle": b,
            "source": "video.avi", "window_s": window_s, "telemetry": True,
            "hardware": {"machine": "x86_64", "system": "Linux", "python": "3.11", "node": "box"}}


def window(boot_id: str, seq: int, fps: float, p95: float, *, temp: float | None = 51.0, ts: float | None = None,
           dropped: int = 0) -> dict:
    lat = {"capture": {"p50": 0.2, "p95": 0.4, "p99": 0.5, "max": 0.9},
           "inference": {"p50": p95 * 0.7, "p95": p95, "p99": p95 * 1.2, "max": p95 * 1.5}}
    return Telemetry(ts=ts or time.time(), boot_id=boot_id, seq=seq, window_s=2.0, frames=int(fps * 2), fps=fps,
                     dropped=dropped, latency_ms=lat, cpu_percent=37.5, rss_bytes=150 * 2**20, temperature_c=temp,
                     bundle={"name": "fashion-cnn"}).model_dump()


def add_device(store, fleet: str, device: str, *, online: bool = True, fps: float = 30.0, p95: float = 12.0,
               windows: int = 3, skip: tuple[int, ...] = (), budget: float | None = 50.0, temp: float | None = 51.0,
               now: float | None = None) -> None:
    now = now or time.time()
    boot = f"boot-{device}"
    store.set_status(fleet, device, Status(online=True, boot_id=boot, version="0.1.0").model_dump(), now - 30)
    store.set_meta(fleet, device, meta(boot, budget=budget), now - 30)
    for seq in range(windows):
        if seq in skip:
            continue
        t = now - 2 * (windows - seq)
        store.add_window(fleet, device, window(boot, seq, fps, p95, temp=temp, ts=t, dropped=seq), t)
    if not online:
        store.set_status(fleet, device, {"v": 1, "online": False, "boot_id": boot, "ts": now}, now)


def small_fleet(store, now: float | None = None) -> float:
    """lab/cam-ok (fine), lab/cam-slow (p95 over budget, an active alert), yard/cam-off (offline),
    yard/cam-gaps (two windows lost). Returns the `now` used."""
    now = now or time.time()
    add_device(store, "lab", "cam-ok", fps=30.0, p95=12.0, now=now)
    add_device(store, "lab", "cam-slow", fps=9.5, p95=80.0, now=now)
    add_device(store, "yard", "cam-off", online=False, fps=25.0, p95=14.0, now=now)
    add_device(store, "yard", "cam-gaps", fps=28.0, p95=11.0, windows=6, skip=(2, 3), now=now)
    store.add_event("lab", "cam-slow", Event(boot_id="boot-cam-slow", kind="rollback", level="warning",
                                             message="health check failed; rolled back").model_dump(), now)
    store.upsert_alert(Alert(fleet="lab", device="cam-slow", rule="latency", severity="critical",
                             message="inference p95 80.0 ms over the 50 ms budget", started=now - 5, value=80.0,
                             threshold=50.0))
    return now
