"""systemd's notify protocol (sd_notify), written out: READY=1, WATCHDOG=1, STATUS=..., STOPPING=1.

Why our own twenty lines: the protocol is one datagram of `KEY=value` lines to the AF_UNIX socket
named by $NOTIFY_SOCKET (a path, or '@name' for the abstract namespace); the python-systemd
bindings need libsystemd headers to build and are not on PyPI as wheels, and a device install
must stay small. Nothing here ever raises: a notification that cannot be sent must not stop the
agent, and without $NOTIFY_SOCKET (not under systemd, or not Type=notify) every call does nothing.
"""
from __future__ import annotations

import os
import socket
from collections.abc import Mapping


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None):
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        if addr.startswith("@"):  # abstract namespace: a leading NUL byte instead of '@'
            addr = "\0" + addr[1:]
        self.address = addr if addr.startswith(("/", "\0")) else None  # anything else is not ours to use
        self.watchdog_s = _watchdog_s(env)
        self.sent: list[str] = []  # what went out (for logs and tests); bounded below
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send one datagram; True when it went out."""
        if self.address is None:
            return False
        msg = "\n".join(lines)
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(msg.encode("utf-8", "replace"), self.address)
        except OSError:
            return False
        if len(self.sent) >= 1000:
            del self.sent[:500]
        self.sent.append(msg)
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([f"STATUS={_line(status)}"] if status else []))

    def watchdog(self, status: str | None = None) -> bool:
        return self.notify("WATCHDOG=1", *([f"STATUS={_line(status)}"] if status else []))

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={_line(status)}")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={_line(status)}"] if status else []))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _line(s: str) -> str:
    """STATUS= is one line: a newline would start another KEY=value."""
    return " ".join(str(s).split())[:200]


def _watchdog_s(env) -> float | None:
    """Seconds between pings systemd expects at most ($WATCHDOG_USEC), or None when no watchdog is
    set or it is meant for another process ($WATCHDOG_PID names someone else)."""
    pid = env.get("WATCHDOG_PID")
    if pid and pid.strip() != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1e6 if usec > 0 else None


def agent_log(stream=None):
    """The agent's log function: one plain line per message on stderr.

    Why not rich's console: under systemd stderr is the journal, which stamps each line itself and
    keeps one entry per line, so a message wrapped at 140 columns (or carrying a newline from a
    payload) would become several entries; and rich reads '[...]' in a message as markup, where a
    command's text such as '[/x]' raises an exception inside the logger. On a terminal the line
    gets a time stamp, as before."""
    import sys
    import time

    def log(message: str) -> None:
        out = stream or sys.stderr
        line = " ".join(str(message).split())
        if len(line) > 1000:
            line = line[:1000] + "..."
        try:
            if out.isatty():
                line = f"{time.strftime('%H:%M:%S')} {line}"
            out.write(line + "\n")
            out.flush()
        except (OSError, ValueError):  # a closed or broken stderr must not stop the agent
            pass

    return log
