"""Prometheus `/metrics` for the fleet: one gauge per figure, labelled by fleet and device.

Why a custom Collector that reads the store at scrape time, not gauges set by the ingest: every
view reads the store, so a scrape of any monitor worker (or of a web process that ingests nothing)
shows the whole fleet, a forgotten device disappears at the next scrape instead of lingering as a
stale label set, and nothing is kept twice in process memory.

Served two ways: mounted at /metrics by the web app (`metrics_app(store)`), or on its own port with
`serve_metrics(store, "127.0.0.1:9108")` for a monitor started without --web.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable

from lepton_edge.errors import BadInput
from lepton_edge.ui import printable

NAMESPACE = "lepton"
QUANTILES = {"p50": "0.5", "p95": "0.95", "p99": "0.99"}

# name -> (help, DeviceState attribute); one gauge each, labelled fleet and device. Kept to what a
# dashboard or an alert rule uses: at 1,000 devices each gauge is 1,000 samples to format per scrape.
_DEVICE_GAUGES = {
    "device_online": ("1 when the device's retained status says online, 0 when offline (Last Will)", "online"),
    "device_fps": ("Frames per second over the device's last telemetry window", "fps"),
    "device_cpu_percent": ("CPU of the agent process, % of one core (last window)", "cpu_percent"),
    "device_rss_bytes": ("Resident memory of the agent process (last window)", "rss_bytes"),
    "device_temperature_celsius": ("Board temperature where the device has a sensor (last window)",
                                   "temperature_c"),
    "device_dropped_frames": ("Frames the live source dropped in the last window", "dropped"),
    "device_corrupt_frames": ("Corrupt frames in the last window", "corrupt"),
    "device_seq_gaps": ("Telemetry windows lost (sequence gaps per boot), total", "seq_gaps"),
    "device_bad_messages": ("Messages from the device refused as malformed, total", "bad_messages"),
    "device_outbox_dropped": ("Windows the device's bounded outbox had to discard, total", "outbox_dropped"),
    "device_active_alerts": ("Alerts active for the device", "active_alerts"),
    "device_last_seen_timestamp_seconds": ("Unix time of the newest message from the device", "last_seen"),
    "device_latency_budget_ms": ("Latency budget of the device's bundle (from meta)", "latency_budget_ms"),
}


def _num(v) -> float | None:
    if v is None or isinstance(v, str):
        return None
    f = float(v)
    return None if math.isnan(f) else f


def _families(store, extra: Callable[[], dict] | None, stages: tuple[str, ...] | None) -> Iterable:
    """Metric families for one scrape; a store that cannot be read gives store_up 0 and nothing else."""
    from prometheus_client.core import GaugeMetricFamily

    from lepton_edge.fleet.store.base import StoreError

    up = GaugeMetricFamily(f"{NAMESPACE}_store_up", "1 when the fleet store could be read for this scrape")
    try:
        devices = store.devices()
    except StoreError:
        up.add_metric([], 0)
        yield up
        return
    up.add_metric([], 1)
    yield up
    yield from _device_families(devices, stages)
    yield from _fleet_families(devices)
    if extra is not None:
        yield from _ingest_families(extra() or {})


def _device_families(devices: list, stages: tuple[str, ...] | None) -> Iterable:
    """Per-device gauges: the last window's figures, per-stage latency percentiles, bundle and software."""
    from prometheus_client.core import GaugeMetricFamily

    lab = ["fleet", "device"]
    for name, (doc, attr) in _DEVICE_GAUGES.items():
        g = GaugeMetricFamily(f"{NAMESPACE}_{name}", doc, labels=lab)
        for d in devices:
            v = getattr(d, attr)
            v = (1.0 if v else 0.0) if attr == "online" and v is not None else _num(v)
            if v is not None:
                g.add_metric([d.fleet, d.device], v)
        yield g

    lat = GaugeMetricFamily(f"{NAMESPACE}_device_latency_ms",
                            "Per-stage latency percentile over the last window (ms)",
                            labels=lab + ["stage", "quantile"])
    for d in devices:
        for stage, q in sorted(d.latency.items()):
            if stages is not None and stage not in stages:
                continue
            for key, quantile in QUANTILES.items():
                v = _num(q.get(key)) if isinstance(q, dict) else None
                if v is not None:
                    lat.add_metric([d.fleet, d.device, printable(stage)[:64], quantile], v)
    yield lat

    info = GaugeMetricFamily(f"{NAMESPACE}_device_info", "Bundle and software of the device (value 1)",
                             labels=lab + ["bundle", "sha256", "precision", "backend", "software"])
    for d in devices:
        # the device's own strings, printable and short (a CR broke line-splitting scrapers; 60 KB labels)
        info.add_metric([d.fleet, d.device, *(printable(x or "")[:128] for x in (
            d.bundle_name, (d.bundle_sha256 or "")[:12], d.precision, d.backend, d.software))], 1)
    yield info


def _fleet_families(devices: list) -> Iterable:
    """Fleet-level figures and the monitor's totals, from the same rows (one read per scrape)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    fleets: dict[str, list] = {}
    for d in devices:
        fleets.setdefault(d.fleet, []).append(d)
    for name, doc, fn in [
        ("fleet_devices", "Devices known in the fleet", lambda ds: len(ds)),
        ("fleet_online", "Devices online", lambda ds: sum(1 for d in ds if d.online)),
        ("fleet_fps", "Sum of the online devices' fps", lambda ds: sum(d.fps or 0.0 for d in ds if d.online)),
        ("fleet_active_alerts", "Active alerts in the fleet", lambda ds: sum(d.active_alerts for d in ds)),
    ]:
        g = GaugeMetricFamily(f"{NAMESPACE}_{name}", doc, labels=["fleet"])
        for f, ds in sorted(fleets.items()):
            g.add_metric([f], fn(ds))
        yield g

    # Monitor-level totals, as the store counts them (so right with several workers).
    stored = GaugeMetricFamily(f"{NAMESPACE}_monitor_windows_stored", "Telemetry windows in the store")
    stored.add_metric([], sum(d.windows for d in devices))
    yield stored
    for name, doc, attr in [("monitor_duplicates", "Windows refused as duplicates (device, boot_id, seq)",
                             "duplicates"),
                            ("monitor_bad_messages", "Messages refused as malformed (known devices)",
                             "bad_messages")]:
        c = CounterMetricFamily(f"{NAMESPACE}_{name}", doc)
        c.add_metric([], sum(getattr(d, attr) for d in devices))
        yield c


def _ingest_families(counters: dict) -> Iterable:
    """This process's own ingest counters (windows ingested, messages received...), when a monitor runs here."""
    from prometheus_client.core import CounterMetricFamily

    for key, value in sorted(counters.items()):
        v = _num(value) if not isinstance(value, bool) else None
        if v is None or not re.fullmatch(r"[a-z_][a-z0-9_]*", key):
            continue
        c = CounterMetricFamily(f"{NAMESPACE}_monitor_ingest_{key}",
                                f"This monitor process: {key.replace('_', ' ')} since it started")
        c.add_metric([], v)
        yield c


class StoreCollector:
    """A prometheus_client collector over a Store. `extra` returns the running monitor's own counters
    (name -> number, exported as lepton_monitor_ingest_<name>_total); omit it where no monitor runs.
    `stages`: the pipeline stages whose latency is exported (None: every stage the devices report)."""

    def __init__(self, store, extra: Callable[[], dict] | None = None,
                 stages: tuple[str, ...] | None = ("inference",)):
        self.store = store
        self.extra = extra
        self.stages = stages

    def describe(self):
        # Empty: registering must not read the store (a scrape does).
        return []

    def collect(self):
        yield from _families(self.store, self.extra, self.stages)


def collector(store, extra: Callable[[], dict] | None = None) -> StoreCollector:
    return StoreCollector(store, extra)


def registry(store, extra: Callable[[], dict] | None = None):
    """A registry holding only the fleet collector (no process/GC metrics of whoever serves it)."""
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry(auto_describe=False)
    reg.register(StoreCollector(store, extra))
    return reg


def metrics_app(store, extra: Callable[[], dict] | None = None):
    """An ASGI app serving the metrics, for the web app to mount at /metrics."""
    from prometheus_client import make_asgi_app

    return make_asgi_app(registry(store, extra))


def parse_listen(text: str, default_port: int = 9108, what: str = "--metrics", lowest_port: int = 1
                 ) -> tuple[str, int]:
    """'HOST:PORT', '[IPv6]:PORT', ':PORT', 'PORT', 'HOST' or '[IPv6]' -> (host, port); the host defaults to
    127.0.0.1, the port to `default_port`. One parser for --metrics and --web: the web's own read
    `--web 9000` as the host "9000" (which glibc resolves to 0.0.35.40) and `--web ::1` as host ':' port 1."""
    m = re.fullmatch(r"(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9.-]*))(?::(\d{1,5}))?", (text or "").strip())
    if m and m.group(2) and m.group(2).isdigit() and m.group(3) is None:  # 'PORT' alone
        host, port = "127.0.0.1", m.group(2)
    elif m and (m.group(1) or m.group(2) or m.group(3)):
        host, port = m.group(1) or m.group(2) or "127.0.0.1", m.group(3) or str(default_port)
    else:
        host, port = "", "-1"
    if not host or not lowest_port <= int(port) < 65536:
        raise BadInput(f"{what} {text!r}: expected HOST:PORT, :PORT or PORT (e.g. 127.0.0.1:{default_port}; "
                       "an IPv6 address in brackets)")
    return host, int(port)


def serve_metrics(store, listen: str = "127.0.0.1:9108", extra: Callable[[], dict] | None = None,
                  hosts: tuple[str, ...] = ()):
    """Serve the metrics on their own port: a started WebServer (`.port`, `.stop()`).

    Why the dashboard's server and not prometheus_client's own: that one answered any Host (a page the
    operator visits could rebind its name to 127.0.0.1 and read every device's figures) and gave each
    connection a thread with no deadline. This one has the dashboard's guards (fleet/web/guards.py)."""
    from lepton_edge.fleet.web.app import WebServer

    host, port = parse_listen(listen)
    return WebServer(metrics_app(store, extra), host, port, hosts, what="metrics").start()
