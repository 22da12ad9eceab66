"""A real Prometheus for tests (Debian's `prometheus`): started on a free loopback port with a generated
config that scrapes the given targets every second, its TSDB in a temp directory, stopped afterwards."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

from mjpeg_server import free_port

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


class Prometheus:
    def __init__(self, workdir: Path, targets: list[str], metrics_path: str = "/metrics"):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.conf = self.dir / "prometheus.yml"
        self.conf.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: lepton\n"
            f"    metrics_path: {metrics_path}\n"
            f"    static_configs:\n      - targets: {json.dumps(targets)}\n")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> Prometheus:
        self.log = open(self.dir / "prometheus.log", "wb")  # noqa: SIM115 - the server's stdout until stop()
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={self.conf}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {(self.dir / 'prometheus.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("prometheus did not open its port")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()

    def query(self, promql: str) -> list[dict]:
        """Instant query through the HTTP API: the `result` list ([] until the first scrape)."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]["result"]

    def wait_query(self, promql: str, pred, timeout: float = 20.0) -> list[dict]:
        """Poll a query until pred(result) holds (scrapes happen every second)."""
        deadline = time.monotonic() + timeout
        result: list[dict] = []
        while time.monotonic() < deadline:
            try:
                result = self.query(promql)
            except OSError:
                result = []
            if pred(result):
                return result
            time.sleep(0.25)
        return result

    def targets_health(self) -> list[str]:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=5) as r:
            return [t.get("health") for t in json.loads(r.read())["data"]["activeTargets"]]
