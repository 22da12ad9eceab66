"""Drive one agent through its life against a real mosquitto and report what happened, as JSON.

    python scripts/arm64/agent_check.py [--frames N] [--timeout S] -- CMD... ({broker} is replaced)

Waits for: status online, meta, two telemetry windows (or N frames), a ping reply; then SIGTERM and
the offline status. Used by scripts/arm64/run.sh (the agent in the arm64 chroot, emulated) and by
bench/footprint_bench.py (native). Exit 1 when a step did not happen within the timeout.

Why the peak RSS comes from /proc/<pid>/status VmHWM: it is the kernel's high-water mark, taken
just before SIGTERM, not a sample. Under qemu-user that pid is the emulator, so the figure includes
qemu's translation cache: an upper bound of the Pi's, not the Pi's.
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from mqtt_broker import Mosquitto  # noqa: E402
from mqtt_helpers import Recorder, command  # noqa: E402


def vm_hwm_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def run(cmd: list[str], fleet: str, device: str, frames: int, timeout: float, windows: int = 2) -> dict:
    res: dict = {"ok": False}
    with tempfile.TemporaryDirectory(prefix="lepton-broker-") as work:
        broker = Mosquitto(Path(work)).start()
        rec = Recorder(broker.port, client_id=f"check-{time.monotonic_ns()}", topic=f"lepton/v1/{fleet}/{device}/#")
        base = f"lepton/v1/{fleet}/{device}"
        argv = [a.replace("{broker}", broker.url) for a in cmd]
        t0 = time.monotonic()
        log = open(Path(work) / "agent.log", "w+")  # noqa: SIM115 - the agent's stdout; read back, closed at the end
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = t0 + timeout

        def until(what: str, pred) -> bool:
            while time.monotonic() < deadline and proc.poll() is None:
                if pred(rec):
                    res[what] = round(time.monotonic() - t0, 2)
                    return True
                time.sleep(0.05)
            res["failed_at"] = what
            return False

        def total_frames(r):
            return sum(t.get("frames", 0) for t in r.of("/telemetry") if isinstance(t, dict))

        try:
            ok = (until("status_online_s",
                        lambda r: any(isinstance(s, dict) and s.get("online") for s in r.of("/status")))
                  and until("meta_s", lambda r: r.of("/meta"))
                  and until("first_frames_window_s", lambda r: total_frames(r) > 0)
                  and until("telemetry_s", lambda r: len(r.of("/telemetry")) >= windows and total_frames(r) >= frames))
            if ok:
                try:
                    reply = command(broker.port, f"{base}/cmd/ping", {"id": "arm64"}, f"{base}/cmd/ping/reply",
                                    timeout=max(5.0, deadline - time.monotonic()))
                    res["ping_ok"] = bool(reply.get("ok"))
                except AssertionError:
                    res["ping_ok"] = False
                hwm = vm_hwm_kb(proc.pid)
                res["peak_rss_mb"] = round(hwm / 1024, 1) if hwm else None
                proc.send_signal(signal.SIGTERM)
                try:
                    res["exit_code"] = proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    res["exit_code"] = None
                res["offline_on_sigterm"] = bool(rec.wait_for(
                    lambda r: any(isinstance(s, dict) and s.get("online") is False for s in r.of("/status")), 10))
            tel = [t for t in rec.of("/telemetry") if isinstance(t, dict)]
            res["windows"] = len(tel)
            res["frames"] = total_frames(rec)
            rss = [t["rss_bytes"] for t in tel if t.get("rss_bytes")]
            res["telemetry_rss_max_mb"] = round(max(rss) / 2**20, 1) if rss else None
            started = [e for e in rec.of("/events") if isinstance(e, dict) and e.get("kind") == "started"]
            res["started_event"] = bool(started)
            if tel and tel[0].get("fps"):
                # the first inference, estimated: the first window's end less the time its frames took
                first = tel[0]
                res["first_inference_est_s"] = round(res["first_frames_window_s"] - first["frames"] / first["fps"], 2)
            res["ok"] = bool(ok and res.get("ping_ok") and res.get("exit_code") == 0 and res.get("offline_on_sigterm"))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            rec.close()
            broker.stop()
            if not res["ok"]:
                log.seek(0)
                res["agent_log_tail"] = log.read()[-3000:]
            log.close()
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fleet", default="arm64")
    ap.add_argument("--device", default="pi-test")
    ap.add_argument("--frames", type=int, default=1)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    res = run(cmd, a.fleet, a.device, a.frames, a.timeout, a.windows)
    print(json.dumps(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
