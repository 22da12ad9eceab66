"""A real RTSP camera for tests: GStreamer's RTSP server (Debian's gir1.2-gst-rtsp-server-1.0, run
by the system python3 with python3-gi) streaming JPEG images over RTP, as IP cameras do.

It runs in its own process, so a test can kill it (the camera reboots) and start it again on the
same port, and the client side is the project's own capture: OpenCV's FFmpeg RTSP reader.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SYSTEM_PYTHON = "/usr/bin/python3"


def available() -> str | None:
    """None when an RTSP server can run here, else why not."""
    if not Path(SYSTEM_PYTHON).exists():
        return "no system python3"
    probe = ("import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0'); "
             "from gi.repository import Gst, GstRtspServer; Gst.init(None); "
             "assert all(Gst.ElementFactory.find(e) for e in ('appsrc', 'jpegparse', 'rtpjpegpay'))")
    r = subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True, text=True)
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["unknown"])[-1]


class RtspServer:
    """Streams `folder/img*.jpg` in a loop, live at `fps`, on rtsp://127.0.0.1:PORT/live."""

    def __init__(self, folder: Path, port: int, fps: int = 30):
        self.folder, self.port, self.fps = Path(folder), port, fps
        self.url = f"rtsp://127.0.0.1:{port}/live"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 15) -> RtspServer:
        from mjpeg_server import wait_for_port  # not at the top: the system python3 runs this file too

        self.proc = subprocess.Popen([SYSTEM_PYTHON, __file__, str(self.folder), str(self.port), str(self.fps)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        wait_for_port(self.proc, self.port, "RTSP server", timeout)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # a camera losing power: no goodbye
            self.proc.wait(timeout=10)
        self.proc = None


def _serve(folder: str, port: str, fps: str) -> None:  # runs under the system python3
    """A live source: appsrc stamps each JPEG with the clock as it is pushed, one per 1/fps."""
    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtspServer

    Gst.init(None)
    jpegs = [p.read_bytes() for p in sorted(Path(folder).glob("img*.jpg"))]
    period = 1.0 / int(fps)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(port)
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(f"( appsrc name=src is-live=true do-timestamp=true format=time "
                       f"caps=image/jpeg,framerate={fps}/1 ! jpegparse ! rtpjpegpay name=pay0 pt=26 )")
    factory.set_shared(True)

    def configure(_factory, media):
        src = media.get_element().get_child_by_name("src")
        state = {"i": 0, "next": time.monotonic()}

        def need_data(appsrc, _length):
            state["next"] += period
            time.sleep(max(0.0, state["next"] - time.monotonic()))
            buf = Gst.Buffer.new_wrapped(jpegs[state["i"] % len(jpegs)])
            state["i"] += 1
            appsrc.emit("push-buffer", buf)

        src.connect("need-data", need_data)

    factory.connect("media-configure", configure)
    server.get_mount_points().add_factory("/live", factory)
    server.attach(None)
    GLib.MainLoop().run()


if __name__ == "__main__":
    _serve(*sys.argv[1:4])
