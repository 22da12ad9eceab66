"""Prometheus /metrics: gauges labelled by fleet and device, read from the store at scrape time,
scraped by a REAL Prometheus server on loopback and queried back through its HTTP API."""
from __future__ import annotations

import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleet_views_data import add_device, small_fleet
from lepton_edge.errors import BadInput
from lepton_edge.fleet.metrics import parse_listen, serve_metrics
from lepton_edge.fleet.store import open_store
from mjpeg_server import free_port


@pytest.fixture
def store(tmp_path):
    s = open_store(tmp_path / "fleet.sqlite")
    yield s
    s.close()


def scrape(url: str) -> dict[tuple, float]:
    """{(name, frozenset(labels)): value} of one scrape, as Prometheus parses the text format."""
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def val(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())))


def test_metrics_endpoint_reads_the_store_at_scrape_time(store):
    small_fleet(store)
    server = serve_metrics(store, f"127.0.0.1:{free_port()}")
    url = f"http://127.0.0.1:{server.port}/metrics"
    try:
        s = scrape(url)
        assert val(s, "lepton_store_up") == 1
        assert val(s, "lepton_device_fps", fleet="lab", device="cam-ok") == 30.0
        assert val(s, "lepton_device_online", fleet="yard", device="cam-off") == 0
        assert val(s, "lepton_device_online", fleet="lab", device="cam-ok") == 1
        assert val(s, "lepton_device_latency_ms", fleet="lab", device="cam-slow", stage="inference",
                   quantile="0.95") == 80.0
        assert val(s, "lepton_device_latency_ms", fleet="lab", device="cam-slow", stage="inference",
                   quantile="0.99") == pytest.approx(96.0)
        assert val(s, "lepton_device_latency_budget_ms", fleet="lab", device="cam-slow") == 50.0
        assert val(s, "lepton_device_seq_gaps", fleet="yard", device="cam-gaps") == 2
        assert val(s, "lepton_device_active_alerts", fleet="lab", device="cam-slow") == 1
        assert val(s, "lepton_device_temperature_celsius", fleet="lab", device="cam-ok") == 51.0
        assert val(s, "lepton_device_rss_bytes", fleet="lab", device="cam-ok") == 150 * 2**20
        assert val(s, "lepton_fleet_devices", fleet="yard") == 2
        assert val(s, "lepton_monitor_windows_stored") == 3 + 3 + 3 + 4
        assert ("lepton_monitor_duplicates_total", frozenset()) in s
        # No collector of the serving process leaks in (GC, process): only the fleet's metrics.
        assert all(name.startswith("lepton_") for name, _ in s)
        # Every scrape reads the store: a device added or forgotten shows at the next scrape.
        add_device(store, "lab", "cam-new", fps=12.0)
        store.forget("yard", "cam-off")
        s = scrape(url)
        assert val(s, "lepton_device_fps", fleet="lab", device="cam-new") == 12.0
        assert val(s, "lepton_device_online", fleet="yard", device="cam-off") is None
    finally:
        server.stop()


def test_real_prometheus_scrapes_the_fleet_and_promql_returns_each_fps(store, prometheus):
    now = small_fleet(store)
    server = serve_metrics(store, f"127.0.0.1:{free_port()}")
    try:
        prom = prometheus([f"127.0.0.1:{server.port}"])
        want = {("lab", "cam-ok"): 30.0, ("lab", "cam-slow"): 9.5, ("yard", "cam-off"): 25.0,
                ("yard", "cam-gaps"): 28.0}
        result = prom.wait_query("lepton_device_fps", lambda r: len(r) == len(want), timeout=30)
        got = {(r["metric"]["fleet"], r["metric"]["device"]): float(r["value"][1]) for r in result}
        assert got == want, (got, prom.targets_health())
        assert all(r["metric"]["job"] == "lepton" for r in result)
        # PromQL over the labels: the fleet's total fps of online devices, the devices over budget.
        total = prom.wait_query('sum by (fleet) (lepton_device_fps * on(fleet, device) lepton_device_online)',
                                lambda r: len(r) == 2, timeout=10)
        assert {r["metric"]["fleet"]: float(r["value"][1]) for r in total} == {"lab": 39.5, "yard": 28.0}
        over = prom.wait_query('lepton_device_latency_ms{stage="inference",quantile="0.95"} '
                               '> on(fleet, device) group_left lepton_device_latency_budget_ms',
                               lambda r: len(r) == 1, timeout=10)
        assert [r["metric"]["device"] for r in over] == ["cam-slow"]
        # A value that changes in the store shows up in Prometheus after the next scrapes.
        add_device(store, "lab", "cam-ok", fps=31.5, windows=4, now=now + 1)
        updated = prom.wait_query('lepton_device_fps{device="cam-ok"}',
                                  lambda r: r and float(r[0]["value"][1]) == 31.5, timeout=15)
        assert updated and float(updated[0]["value"][1]) == 31.5
    finally:
        server.stop()


def test_the_metrics_port_answers_only_loopback_names_and_drops_a_connection_that_never_sends(store):
    """prometheus_client's own server answered any Host (a page rebinding its domain to 127.0.0.1 read every
    device's figures) and held a thread for each connection that never finished its request."""
    import socket

    from lepton_edge.fleet.web import guards

    small_fleet(store)
    server = serve_metrics(store, f"127.0.0.1:{free_port()}", hosts=("prom.example",))
    try:
        def get(host: str) -> tuple[int, bytes]:
            req = urllib.request.Request(f"http://127.0.0.1:{server.port}/metrics", headers={"Host": host})
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as e:
                return e.code, e.read()

        assert get("evil.example")[0] == 421 and b"lepton_device_fps" not in get("evil.example")[1]
        for name in ("localhost:9108", f"127.0.0.1:{server.port}", "prom.example"):
            status, body = get(name)
            assert status == 200 and b"lepton_device_fps" in body, name
        guards.HEADER_TIMEOUT_S, old = 0.5, guards.HEADER_TIMEOUT_S
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n")  # and never the end of the headers
                s.settimeout(5)
                assert s.recv(1024) == b""  # closed by the server, well before the client's own timeout
        finally:
            guards.HEADER_TIMEOUT_S = old
    finally:
        server.stop()


def test_listen_address_is_checked_before_binding():
    assert parse_listen("127.0.0.1:9108") == ("127.0.0.1", 9108)
    assert parse_listen(":9200") == ("127.0.0.1", 9200)
    assert parse_listen("9300") == ("127.0.0.1", 9300)
    assert parse_listen("[::1]:9108") == ("::1", 9108)
    for bad in ("", "host:", "127.0.0.1:99999", "a b:1", "127.0.0.1:80:80", "::1", ":0"):
        with pytest.raises(BadInput, match="--metrics"):
            parse_listen(bad)


def test_the_web_dashboards_listen_address_reads_as_the_metrics_one():
    """`--web 9000` was the host "9000" (glibc resolves it to 0.0.35.40) on port 8080, and `--web ::1` the
    host ':' on port 1; one parser now, with the web's own default port and 0 for any free one."""
    from lepton_edge.fleet.cli import parse_listen as web

    assert web("9000") == ("127.0.0.1", 9000) and web(":9001") == ("127.0.0.1", 9001)
    assert web("0.0.0.0") == ("0.0.0.0", 8080) and web("0.0.0.0:0") == ("0.0.0.0", 0)
    assert web("[::1]") == ("::1", 8080) and web("[::1]:9002") == ("::1", 9002)
    for bad in ("::1", "", "99999", "x y", "h:70000"):
        with pytest.raises(BadInput, match="--web"):
            web(bad)


def test_port_in_use_is_one_line(store):
    server = serve_metrics(store, f"127.0.0.1:{free_port()}")
    try:
        with pytest.raises(BadInput, match="metrics could not listen on 127.0.0.1"):
            serve_metrics(store, f"127.0.0.1:{server.port}")
    finally:
        server.stop()


def test_monitor_cli_serves_metrics_without_web(mosquitto, tmp_path):
    """`monitor --metrics HOST:PORT` (no --web): a real agent-shaped device on a real broker shows up in
    /metrics, with this monitor's own ingest counters beside the store's figures."""
    import json
    import os
    import subprocess
    import sys

    import paho.mqtt.client as mqtt

    from fleet_views_data import meta, window
    from lepton_edge.telemetry.schema import Status
    from lepton_edge.telemetry.topics import Topics

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lepton_edge.fleet.cli", "monitor", "--broker", mosquitto.url,
                             "--store", str(tmp_path / "fleet.sqlite"), "--metrics", f"127.0.0.1:{port}",
                             "--no-tui", "--seconds", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "COLUMNS": "200"})
    dev = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pi-9")
    try:
        dev.connect("127.0.0.1", mosquitto.port)
        dev.loop_start()
        t = Topics("lab", "pi-9")
        dev.publish(t.status, Status(online=True, boot_id="b9").model_dump_json(), qos=1, retain=True)
        dev.publish(t.meta, json.dumps(meta("b9")), qos=1, retain=True)
        url = f"http://127.0.0.1:{port}/metrics"
        deadline = time.monotonic() + 20
        s: dict = {}
        seq = 0
        while time.monotonic() < deadline:
            dev.publish(t.telemetry, json.dumps(window("b9", seq, 24.0, 10.0)), qos=1)
            seq += 1
            try:
                s = scrape(url)
            except OSError:
                s = {}
            if val(s, "lepton_device_fps", fleet="lab", device="pi-9") == 24.0:
                break
            time.sleep(0.2)
        assert val(s, "lepton_device_fps", fleet="lab", device="pi-9") == 24.0, proc.stderr.read1() if \
            proc.poll() is not None else s
        assert val(s, "lepton_device_online", fleet="lab", device="pi-9") == 1
        assert val(s, "lepton_monitor_ingest_stored_total") >= 1
        assert val(s, "lepton_monitor_ingest_received_total") >= 3
    finally:
        dev.loop_stop()
        dev.disconnect()
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_monitor_cli_bad_metrics_address_is_one_line(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "lepton_edge.fleet.cli", "monitor", "--broker", "mqtt://127.0.0.1:1",
                        "--store", str(tmp_path / "f.sqlite"), "--metrics", "127.0.0.1:99999", "--no-tui"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--metrics" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "f.sqlite").exists()  # checked before the store was created


def test_device_strings_in_labels_are_printable_and_short(tmp_path):
    """A CR in a bundle name split the scrape for line-based readers; a 60 KB software string was a 60 KB
    label on every scrape."""
    from prometheus_client import generate_latest

    from fleet_views_data import meta
    from lepton_edge.fleet.metrics import registry

    st = open_store(tmp_path / "m.sqlite")
    add_device(st, "lab", "odd")
    st.set_meta("lab", "odd", meta("boot-odd", bundle="a\rb\x1b[2J\u202ec"), time.time())
    st.set_status("lab", "odd", {"v": 1, "online": True, "boot_id": "boot-odd", "version": "V" * 60_000}, time.time())
    text = generate_latest(registry(st)).decode()
    line = next(ln for ln in text.splitlines() if ln.startswith("lepton_device_info{") and 'device="odd"' in ln)
    assert "\r" not in text and "\x1b" not in text and "\u202e" not in text
    assert 'bundle="a?b?[2J?c"' in line and len(line) < 1000, line[:300]
    st.close()
