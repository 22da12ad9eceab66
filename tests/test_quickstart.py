import glob
import json
import socket
import tempfile
import time

import pytest
from rich.console import Console

from conftest import run_cli
from lepton_edge.quickstart_fleet import DEVICE, FLEET, fleet_loop


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _our_tmpdirs() -> set[str]:
    return set(glob.glob(f"{tempfile.gettempdir()}/lepton-quickstart-mqtt-*"))


def _device(snapshot: dict) -> dict:
    [dev] = [d for d in snapshot["devices"] if (d["fleet"], d["device"]) == (FLEET, DEVICE)]
    return dev


@pytest.mark.slow
def test_quickstart_json(tmp_path):
    r = run_cli("quickstart", "-o", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    rows = res["exports"]
    assert [(x["target"], x["precision"]) for x in rows] == [("x86-cpu", "fp32"), ("x86-cpu", "int8"), ("rpi4", "int8")]
    fp32, x86, rpi = rows
    assert x86["bytes"] < 0.4 * fp32["bytes"] and rpi["bytes"] < 0.4 * fp32["bytes"]
    for row in rows:
        # (0.98: on an x86 CPU without VNNI, an AVX2-only AMD EPYC, onnxruntime's u8s8 kernels saturated on 8-bit
        # weights, the u8 candidates failed the 0.5 pp accuracy gate, and NNCF's graph passed at agreement 0.9886)
        assert row["accuracy"] > 0.8 and row["agreement"] >= 0.98 and row["latency_ms"] > 0
    for row in (x86, rpi):  # the accuracy gate (0.5 pp against fp32 on the 10,000 test images) held
        assert row["accuracy"] >= fp32["accuracy"] - 0.005, (row, fp32)
    x86_recipes = ("u8-minmax-w7", "u8-percentile-w7", "nncf-default", "nncf-mixed", "s8-minmax-ends",
                   "s8-entropy-ends")
    assert x86["recipe"] in x86_recipes and rpi["recipe"].startswith("s8")  # (a plain candidate, no fallback)
    run = res["device_run"]
    assert run["backend"] == "litert" and run["frames"] == 1000 and run["accuracy"] > 0.8
    # the whole loop: agent -> local mosquitto -> monitor -> store, read back while it ran
    fleet = res["fleet"]
    assert "skipped" not in fleet, fleet
    assert fleet["dashboard_status"] == 200 and fleet["api_status"] == 200
    dev = _device(fleet["snapshot"])
    assert dev["online"] is True and dev["fps"] > 0 and dev["backend"] == "litert" and dev["seq_gaps"] == 0
    assert (tmp_path / "fleet.sqlite").is_file()
    # the text mode's device-run line
    from lepton_edge.quickstart import _demo_video, _run_on_device

    video = _demo_video(tmp_path / "fashion-test.avi", n=300)
    con = Console(record=True, width=200)
    _run_on_device(rpi["bundle"], video, con)
    line = con.export_text()
    assert "device run (litert)" in line and "on 300 video frames" in line
    assert float(line.split("accuracy ")[1].split(",")[0]) > 0.8


def test_fleet_loop_starts_and_stops_its_own_broker(tmp_path, rpi4_bundle, fashion_video):
    video, _ = fashion_video
    before = _our_tmpdirs()
    con = Console(record=True, width=200)
    t0 = time.monotonic()
    r = fleet_loop(rpi4_bundle.bundle.path, video, tmp_path / "out", console=con)
    elapsed = time.monotonic() - t0
    assert "skipped" not in r and "problem" not in r, r
    # while it ran: the device in the fleet table with frames flowing, the dashboard and its API answering
    dev = _device(r["snapshot"])
    assert dev["online"] is True and dev["fps"] > 0 and dev["bundle"] == "fashion-cnn" and dev["precision"] == "int8"
    assert dev["seq_gaps"] == 0 and dev["bad_messages"] == 0
    assert r["dashboard_status"] == 200 and r["api_status"] == 200
    text = con.export_text()
    assert f"{FLEET}/{DEVICE}" in text and f"dashboard: {r['url']}#token=" in text and "--serve" in text
    assert elapsed < 20, f"the loop took {elapsed:.1f} s"
    # the history is in the store under the output directory
    from lepton_edge.fleet.store import open_store

    with open_store(tmp_path / "out" / "fleet.sqlite") as st:
        assert st.device(FLEET, DEVICE).windows >= 3
    # and everything it started is gone: broker, dashboard, the broker's temp directory
    assert not _listening(int(r["broker"].rsplit(":", 1)[1]))
    assert not _listening(int(r["url"].rstrip("/").rsplit(":", 1)[1]))
    assert _our_tmpdirs() <= before


def test_fleet_loop_on_a_given_broker_leaves_it_running(tmp_path, mosquitto, rpi4_bundle, fashion_video):
    video, _ = fashion_video
    r = fleet_loop(rpi4_bundle.bundle.path, video, tmp_path / "out", broker=mosquitto.url, quiet=True)
    assert r["broker"] == mosquitto.url
    assert _device(r["snapshot"])["fps"] > 0
    assert mosquitto.proc.poll() is None and _listening(mosquitto.port)


def test_fleet_loop_without_mosquitto_is_one_line(tmp_path, monkeypatch):
    import lepton_edge.quickstart_fleet as qf

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(qf, "MOSQUITTO_PATHS", ())
    con = Console(record=True, width=200)
    r = fleet_loop(tmp_path / "bundle", tmp_path / "video.avi", tmp_path / "out", console=con)  # never opened
    assert r == {"skipped": r["skipped"]} and "mosquitto is not installed" in r["skipped"]
    assert con.export_text().strip().splitlines() == [f"fleet loop skipped: {r['skipped']}"]
    assert not (tmp_path / "out").exists()  # nothing made before the skip


def test_an_unreachable_broker_is_one_line_before_anything_starts(tmp_path):
    from lepton_edge.errors import BadInput

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: nothing answers there
        with pytest.raises(BadInput, match=f"--broker mqtt://127.0.0.1:{port}: cannot connect"):
            fleet_loop(tmp_path / "no-bundle", tmp_path / "no.avi", tmp_path / "out", broker=f"mqtt://127.0.0.1:{port}")
        r = run_cli("quickstart", "-o", str(tmp_path / "q"), "--broker", f"mqtt://127.0.0.1:{port}", timeout=60)
    assert r.returncode == 2 and "cannot connect" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "q").exists()  # no export ran
