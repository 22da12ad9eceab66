"""A real PostgreSQL for tests: initdb + pg_ctl on a free loopback port, in a fresh directory.

PostgreSQL refuses to run as root, so when the tests run as root the server runs as `nobody`
(its data directory chowned to it, outside pytest's root-only tmp tree); otherwise as the user."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from mjpeg_server import free_port, wait_for_port


def pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    cands = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return cands[-1] if cands else None


class Postgres:
    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="lepton-pg-"))
        self.data = self.dir / "data"
        self.as_user = "nobody" if os.geteuid() == 0 else None
        self.url = f"postgresql://lepton@127.0.0.1:{self.port}/postgres"
        self.proc: subprocess.Popen | None = None

    def _run(self, *args: str, **kw) -> subprocess.CompletedProcess:
        cmd = list(args)
        if self.as_user:
            cmd = ["runuser", "-u", self.as_user, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True, **kw)

    def start(self, timeout: float = 30) -> Postgres:
        if self.as_user:
            shutil.chown(self.dir, self.as_user)
            os.chmod(self.dir, 0o700)
        if not self.data.exists():
            self._run(pg_bin("initdb"), "-D", str(self.data), "-U", "lepton", "--auth=trust", "-E", "UTF8",
                      "--no-sync")
        postgres = pg_bin("postgres")
        cmd = [postgres, "-D", str(self.data), "-p", str(self.port), "-c", "listen_addresses=127.0.0.1",
               "-c", f"unix_socket_directories={self.dir}", "-c", "fsync=off", "-c", "max_connections=50",
               "-c", "shared_buffers=64MB"]
        if self.as_user:
            cmd = ["runuser", "-u", self.as_user, "--", *cmd]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        wait_for_port(self.proc, self.port, "postgres", timeout)
        return self

    def stop(self) -> None:
        """Fast shutdown (SIGINT): the server closes every connection, as when a database goes away."""
        if self.proc and self.proc.poll() is None:
            self._run(pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
            self.proc.wait(timeout=30)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
