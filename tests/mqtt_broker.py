"""A real mosquitto for tests: started on a free loopback port with its own config and a fresh
persistence directory, stopped (or killed) by the test, restartable on the same port."""
from __future__ import annotations

import getpass
import os
import shutil
import signal
import subprocess
from pathlib import Path

from mjpeg_server import free_port, wait_for_port

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


class Mosquitto:
    def __init__(self, workdir: Path, extra: str = "", port: int | None = None, tls_port: int | None = None):
        self.dir = Path(workdir)
        self.port = port or free_port()
        self.data = self.dir / "data"
        shutil.rmtree(self.data, ignore_errors=True)  # a fresh persistence directory per broker
        self.data.mkdir(parents=True)
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text(
            f"user {getpass.getuser()}\n"  # as root, mosquitto would switch to 'mosquitto' and not write here
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.data}/\n"
            "autosave_interval 1\n"
            "max_queued_messages 100000\n"
            "max_inflight_messages 100\n"
            f"log_dest file {self.dir / 'mosquitto.log'}\nlog_type all\n" + extra)
        self.proc: subprocess.Popen | None = None
        self.url = f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10) -> Mosquitto:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        wait_for_port(self.proc, self.port, "mosquitto", timeout)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM: mosquitto saves its persistence file and exits, as on a service restart."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(timeout=10)
        self.proc = None

    def log(self) -> str:
        f = self.dir / "mosquitto.log"
        return f.read_text() if f.exists() else ""
