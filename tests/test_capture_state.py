"""Capture with an explicit state (issue #13 point 3) and sources that register themselves (point 1).

Real parts throughout: an MJPEG camera over HTTP (tests/mjpeg_server.py) that is switched off and
on, OpenCV's FFmpeg reader, a real mosquitto and agent, a real video file, and a third-party
source installed as a distribution (a dist-info with an entry point) in a subprocess.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from lepton_edge.capture import BufferPolicy, SourceState, open_source
from lepton_edge.errors import BadInput
from mjpeg_server import MjpegServer


def _frames() -> list[np.ndarray]:
    return [np.full((56, 56, 3), 40 * i, np.uint8) for i in range(5)]


def _until(pred, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    return pred()


def test_a_stream_that_drops_and_comes_back_walks_the_states(caplog):
    """connecting -> streaming -> reconnecting -> streaming -> ended, each transition logged and told to
    listeners, plus one "reconnect" update when frames flow again."""
    srv = MjpegServer(_frames(), fps=50).start()
    updates = []
    caplog.set_level(logging.DEBUG, logger="lepton_edge.capture")  # transitions log at debug (--verbose)
    try:
        src = open_source(srv.url, max_backoff=0.5)
        src.add_listener(updates.append)
        assert src.read(timeout=10) is not None and src.state is SourceState.STREAMING
        srv.stop()  # the camera loses power
        assert _until(lambda: src.state is SourceState.RECONNECTING), src.status()
        assert src.read(timeout=0.3) is None and not src.closed  # waiting through it, not ended
        srv.start()  # and is back on the same address
        assert _until(lambda: src.read(timeout=0.5) is not None, 30)
        assert src.state is SourceState.STREAMING and src.reconnects >= 1
        src.close()
    finally:
        srv.stop()
    assert src.state is SourceState.ENDED and src.closed
    states = [(u.previous.value, u.state.value) for u in updates if u.kind == "state"]
    # the listener came after the open: the first transition may have happened before it
    assert states[-3:] == [("streaming", "reconnecting"), ("reconnecting", "streaming"), ("streaming", "ended")]
    back = [u for u in updates if u.kind == "reconnect"]
    assert len(back) == 1 and back[0].count >= 1 and back[0].down_s > 0
    logged = [r.getMessage() for r in caplog.records]
    assert any("streaming -> reconnecting" in m for m in logged) and any("reconnecting -> streaming" in m
                                                                          for m in logged), logged


def test_newest_frame_decodes_only_the_frames_it_delivers():
    """A 50 fps camera read ten times a second: every frame is grabbed, only the ten used are decoded
    (JPEG packets grabbed raw, decoded on demand); the rest are dropped undecoded. Every-frame on the
    same camera decodes and delivers every frame it grabs and drops none."""
    srv = MjpegServer(_frames(), fps=50).start()
    try:
        src = open_source(srv.url)
        assert src.policy is BufferPolicy.NEWEST_FRAME  # today's default for live sources
        for _ in range(10):
            assert src.read(timeout=10) is not None
            time.sleep(0.1)  # a slow model
        src.close()
        assert src.captured == 10
        assert src.grabbed >= 30, src.status()  # ~50 fps for > 1 s
        assert src.decoded <= src.captured + 1  # at most one decoded for a read that was just ending
        assert src.dropped >= src.grabbed - src.decoded - 1 and src.dropped >= 20

        every = open_source(srv.url, policy="every-frame")
        got = [every.read(timeout=10) for _ in range(40)]
        every.close()
        assert all(f is not None for f in got) and [f.index for f in got] == list(range(40))
        assert every.dropped == 0 and every.decoded == every.grabbed, every.status()
    finally:
        srv.stop()


class _JpegLookingGarbage:
    """An HTTP MJPEG camera whose parts start like a JPEG (SOI, APP0) and are random bytes after."""

    def __init__(self):
        import http.server
        import socketserver

        from mjpeg_server import free_port

        junk = b"\xff\xd8\xff\xe0" + np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                try:
                    while True:
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                                         % len(junk) + junk + b"\r\n")
                        time.sleep(0.02)
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        port = free_port()
        self.srv = Server(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{port}/stream.mjpg"
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def stop(self):
        self.srv.shutdown()
        self.srv.server_close()


@pytest.mark.slow
def test_jpeg_looking_garbage_still_fails_the_source():
    """Grabbing JPEG packets undecoded must not hide a camera whose JPEGs never decode: the source
    goes back to FFmpeg decoding every frame, and with max_reconnects it fails with the reason."""
    cam = _JpegLookingGarbage()
    try:
        src = open_source(cam.url, max_backoff=1.0, max_reconnects=2)
        t0 = time.monotonic()
        assert src.read(timeout=45) is None
        assert src.state is SourceState.FAILED and "no decodable frame" in src.failure, src.status()
        assert time.monotonic() - t0 < 45 and src.captured == 0 and src.corrupt >= 2
        src.close()
    finally:
        cam.stop()


def test_the_agent_publishes_a_reconnect_through_mosquitto(mosquitto, int8_bundle, tmp_path):
    """The source's status callbacks become events on .../events: losing the camera (source_state,
    warning) and getting it back (source_reconnected)."""
    from lepton_edge.agent.config import AgentConfig
    from lepton_edge.agent.service import Agent
    from mqtt_helpers import Recorder

    srv = MjpegServer(_frames(), fps=30).start()
    rec = Recorder(mosquitto.port)
    cfg = AgentConfig(broker=mosquitto.url, fleet="f1", device_id="cam1", bundle=int8_bundle.bundle.path,
                      source=srv.url, window_s=0.5, state_dir=tmp_path / "state", max_backoff_s=1)
    agent = Agent(cfg, log=lambda line: None)
    t = threading.Thread(target=agent.run, kwargs={"install_signals": False}, name="test:agent")
    t.start()
    try:
        def events(kind):
            return [e for e in rec.of("/cam1/events") if isinstance(e, dict) and e.get("kind") == kind]

        assert rec.wait_for(lambda r: events("started")), rec.messages[-5:]
        assert rec.wait_for(lambda r: any(m.get("frames") for m in r.of("/cam1/telemetry")))
        srv.stop()
        lost = rec.wait_for(lambda r: events("source_state"), 30)
        assert lost and lost[0]["level"] == "warning" and lost[0]["data"]["state"] == "reconnecting", lost
        srv.start()
        back = rec.wait_for(lambda r: events("source_reconnected"), 40)
        assert back and back[0]["data"]["reconnects"] >= 1 and back[0]["data"]["source"] == srv.url, back
    finally:
        agent.stop()
        t.join(30)
        rec.close()
        srv.stop()
    assert not t.is_alive()


PLUGIN = '''
import time

import numpy as np
from pydantic import Field

from lepton_edge.capture import Source, SourceOptions, SourceState


class CountOptions(SourceOptions):
    shade: int = Field(default=255, ge=0, le=255)


class Countdown(Source):
    """count://N: N frames, alternately black and `shade`."""

    kind = "countdown"
    schemes = ("count",)
    Options = CountOptions

    def __init__(self, spec, n, shade, policy=None):
        super().__init__(spec, policy)
        self.n, self.shade = n, shade
        self._set_state(SourceState.STREAMING)

    @classmethod
    def from_spec(cls, spec, options):
        return cls(spec, int(spec.split("://", 1)[1]), options.shade, options.policy)

    def read(self, timeout=None):
        if self.captured >= self.n or self.closed:
            self._set_state(SourceState.ENDED)
            return None
        t0 = time.perf_counter()
        return self._frame(np.full((28, 28, 3), self.shade * (self.captured % 2), np.uint8), t0)
'''


def _dist(site: Path, name: str, entry_points: str, module: str | None = None) -> None:
    if module is not None:
        (site / f"{name}.py").write_text(module)
    info = site / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[lepton_edge.sources]\n{entry_points}\n")


def test_a_source_from_another_package_plugs_in_through_an_entry_point(int8_bundle, tmp_path):
    """`count://7` is opened by a class from a distribution installed beside lepton-edge (its dist-info
    declares the entry point), and `run` classifies its frames. A plug-in that does not import, and a
    scheme nobody registered, are one line and exit 2."""
    site = tmp_path / "site"
    site.mkdir()
    _dist(site, "countsrc", "count = countsrc:Countdown", PLUGIN)
    _dist(site, "brokensrc", "broken = no_such_module_here:Nothing")
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "COLUMNS": "200"}
    exe = str(Path(sys.executable).parent / "lepton-edge")

    def run(source: str) -> subprocess.CompletedProcess:
        return subprocess.run([exe, "run", str(int8_bundle.bundle.path), "-s", source, "--no-show", "--json"],
                              capture_output=True, text=True, timeout=120, env=env)

    r = run("count://7")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["frames"] == 7 and summary["source"]["kind"] == "countdown", summary
    for source, words in [("broken://x", "does not load"), ("nosuch://x", "unknown source scheme")]:
        r = run(source)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, (source, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    # the plug-in's own options are validated by its model, in a process that has it installed
    code = ("from lepton_edge.capture import open_source\n"
            "s = open_source('count://2', shade=9, max_backoff=3)\n"  # max_backoff: a live option, not its
            "print(s.kind, [int(f.image.max()) for f in s])\n"
            "try:\n    open_source('count://2', shade=999)\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert "countdown [0, 9]" in r.stdout and "BadInput source 'count://2': shade:" in r.stdout, r.stdout


def test_file_sources_end_and_read_only_what_was_named(fashion_video, tmp_path):
    """A video file: streaming, then ended after its last frame; newest-frame does not apply to it. A
    folder: a symlink inside it to an image elsewhere is not read. Bad options: one BadInput line."""
    import cv2

    path, _labels = fashion_video
    src = open_source(str(path))
    assert src.state is SourceState.STREAMING and src.policy is BufferPolicy.EVERY_FRAME
    n = sum(1 for _ in src)
    assert n > 0 and src.state is SourceState.ENDED and src.captured == n == src.decoded
    with pytest.raises(BadInput, match="newest-frame does not apply"):
        open_source(str(path), policy="newest-frame")
    with pytest.raises(BadInput, match="unknown option"):
        open_source(str(path), colour="blue")
    with pytest.raises(BadInput, match="max_backoff"):
        open_source("http://127.0.0.1:9/x", max_backoff=-1)

    outside, folder = tmp_path / "outside", tmp_path / "frames"
    outside.mkdir()
    folder.mkdir()
    img = np.full((8, 8, 3), 7, np.uint8)
    cv2.imwrite(str(folder / "a.png"), img)
    cv2.imwrite(str(outside / "secret.png"), img)
    (folder / "b.png").symlink_to(outside / "secret.png")
    (folder / "elsewhere").symlink_to(outside, target_is_directory=True)
    got = [f.path for f in open_source(str(folder))]
    assert got == [str(folder / "a.png")]
    with pytest.raises(BadInput, match="unknown source scheme"):
        open_source("python://os.system")


def test_the_newest_frame_buffer_wants_a_frame_only_while_a_consumer_waits():
    """The policy's decision, without a camera: nobody waiting -> not wanted (the frame is dropped
    undecoded); a consumer waiting -> wanted once, then not until it waits again; a frame left by a
    consumer that gave up is stale. Every-frame wants all of them and keeps their order."""
    from lepton_edge.capture.buffers import EveryFrame, NewestFrame

    stop = threading.Event()
    buf = NewestFrame()
    assert not buf.wanted()
    got: list = []
    t = threading.Thread(target=lambda: got.append(buf.take(timeout=10)))
    t.start()
    assert _until(buf.wanted, 5)
    buf.offer("frame-1", stop)
    t.join(5)
    assert got == ["frame-1"] and not buf.wanted()
    assert buf.take(timeout=0.05) is None  # timed out: nothing was offered meanwhile
    buf.offer("late", stop)  # decoded for a consumer that has gone
    assert buf.discard_stale() and not buf.discard_stale()
    buf.close()
    assert buf.take(timeout=None) is None  # closed: no wait

    every = EveryFrame(backlog=3)
    for i in range(3):
        assert every.wanted()
        every.offer(i, stop)
    blocked = threading.Thread(target=every.offer, args=(3, stop))
    blocked.start()
    time.sleep(0.3)
    assert blocked.is_alive()  # the backlog is full: the reader waits instead of dropping
    assert [every.take(timeout=1) for _ in range(4)] == [0, 1, 2, 3]
    blocked.join(5)
    assert BufferPolicy("newest-frame").handover == 1 and BufferPolicy("every-frame").handover == 4
