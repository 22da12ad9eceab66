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
