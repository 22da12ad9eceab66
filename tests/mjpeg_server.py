"""A real live stream for tests: MJPEG over HTTP (multipart/x-mixed-replace), as IP cameras serve it.

It can be stopped (every open connection is closed, as when a camera reboots) and started again
on the same port, so reconnect behaviour is tested against a real network stream and FFmpeg.
"""
from __future__ import annotations

import http.server
import socket
import socketserver
import threading
import time

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(proc, port: int, what: str, timeout: float) -> None:
    """Until a server process started by a test listens on 127.0.0.1:port; its stderr if it dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not open its port")


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class MjpegServer:
    def __init__(self, frames: list, fps: float = 50.0, port: int | None = None, mode: str = "ok",
                 stall_after: int = 0):
        """mode: "ok" serves JPEG frames; "garbage" serves random bytes as the parts (a broken camera);
        "stall": after `stall_after` frames the first connection stops sending without closing
        (a hung camera), later connections are served normally."""
        self.frames, self.fps, self.port = frames, fps, port or free_port()
        self.mode, self.stall_after = mode, stall_after
        self.connections = 0
        self.url = f"http://127.0.0.1:{self.port}/stream.mjpg"
        self.sent = 0
        self._run = threading.Event()
        self._srv = None

    def _handler(self):
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                import cv2

                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                i = 0
                owner.connections += 1
                stall = owner.mode == "stall" and owner.connections == 1
                rng = np.random.default_rng(owner.connections)
                try:
                    while owner._run.is_set():
                        if stall and i >= owner.stall_after:
                            time.sleep(0.05)  # connection open, nothing sent
                            continue
                        frame = owner.frames[i % len(owner.frames)]
                        if owner.mode == "garbage":
                            data = rng.integers(0, 256, 4000, dtype=np.uint8).tobytes()
                        elif isinstance(frame, bytes):  # a part sent as it is (a crafted JPEG)
                            data = frame
                        else:
                            ok, buf = cv2.imencode(".jpg", owner.frames[i % len(owner.frames)],
                                                   [cv2.IMWRITE_JPEG_QUALITY, 95])
                            data = buf.tobytes()
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                                         % len(data) + data + b"\r\n")
                        owner.sent += 1
                        i += 1
                        time.sleep(1 / owner.fps)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        return Handler

    def start(self) -> MjpegServer:
        self._run.set()
        self._srv = _Server(("127.0.0.1", self.port), self._handler())
        threading.Thread(target=self._srv.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._run.clear()
        if self._srv is not None:
            self._srv.shutdown()
            self._srv.server_close()
            self._srv = None
