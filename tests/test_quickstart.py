import json

from conftest import run_cli


def test_quickstart_json(tmp_path):
    r = run_cli("quickstart", "-o", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout)
    assert [(x["target"], x["precision"]) for x in rows] == [("x86-cpu", "fp32"), ("x86-cpu", "int8"), ("rpi4", "int8")]
    fp32, x86, rpi = rows
    assert x86["bytes"] < 0.4 * fp32["bytes"] and rpi["bytes"] < 0.4 * fp32["bytes"]
    for row in rows:
        assert row["accuracy"] > 0.8 and row["agreement"] >= 0.99 and row["latency_ms"] > 0
    assert x86["recipe"].startswith("u8") and rpi["recipe"].startswith("s8")
    # the last step of the text mode: the rpi4 bundle through the device-side pipeline on a video
    from rich.console import Console

    from lepton_edge.quickstart import _demo_video, _run_on_device

    video = _demo_video(tmp_path / "fashion-test.avi", n=300)
    con = Console(record=True, width=200)
    _run_on_device(rpi["bundle"], video, con)
    line = con.export_text()
    assert "device run (litert)" in line and "on 300 video frames" in line
    assert float(line.split("accuracy ")[1].split(",")[0]) > 0.8
