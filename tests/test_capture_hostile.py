"""Frame sources against hostile inputs, with real OpenCV and FFmpeg: a camera stream with one poisoned frame,
images and videos that declare more pixels than a device holds, files that make FFmpeg read other files, device
files, and specs the file system refuses. Each costs one counted frame or one BadInput line, never a hung
`run`, gigabytes of memory or a file outside the source."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from lepton_edge.capture import open_source
from lepton_edge.errors import BadInput
from mjpeg_server import MjpegServer


def _jpeg(h: int = 64, w: int = 64) -> bytes:
    import cv2

    return cv2.imencode(".jpg", np.full((h, w, 3), 128, np.uint8))[1].tobytes()


def _claims_size(jpeg: bytes, h: int, w: int) -> bytes:
    """The same JPEG with its frame header (SOF0) claiming h x w pixels."""
    i = jpeg.index(b"\xff\xc0")
    return jpeg[:i + 5] + h.to_bytes(2, "big") + w.to_bytes(2, "big") + jpeg[i + 9:]


def _png_bomb(path: Path, side: int) -> None:
    """A 1-bit grey PNG of side x side pixels, all black: a few KB on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    row = b"\0" * (1 + (side + 7) // 8)
    c = zlib.compressobj(9)
    body = b"".join(c.compress(row) for _ in range(side)) + c.flush()
    ihdr = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def test_one_poisoned_frame_in_a_camera_stream_is_a_corrupt_frame_not_the_end_of_capture():
    """A 675-byte JPEG claiming 65000x65000 made OpenCV raise in the reader thread: the thread died, the source
    still said `streaming`, and `run` waited for ever."""
    good = _jpeg()
    srv = MjpegServer([good] * 5 + [_claims_size(good, 65000, 65000)] + [good] * 50, fps=100).start()
    src = open_source(srv.url, policy="every-frame")
    try:
        got = 0
        deadline = time.monotonic() + 20
        while got < 20 and time.monotonic() < deadline:
            if src.read(timeout=5) is not None:
                got += 1
        assert got == 20 and src.corrupt >= 1 and src.failure is None, (got, src.corrupt, src.failure)
    finally:
        src.close()
        srv.stop()


def test_an_image_past_the_pixel_budget_is_skipped_without_its_gigabytes(tmp_path):
    """A 124 KB PNG of 32000x32000 took 6.1 GB and 28 s; OpenCV's own limit (2^30 pixels) let it through.
    lepton_edge sets OpenCV's budget to 100 MP before OpenCV loads (a fresh process, as `run` is)."""
    import cv2

    folder = tmp_path / "imgs"
    folder.mkdir()
    _png_bomb(folder / "a-bomb.png", 20_000)  # 400 MP, under OpenCV's own limit
    cv2.imwrite(str(folder / "b-ok.png"), np.zeros((8, 8, 3), np.uint8))
    code = ("import json, lepton_edge, os\n"
            "from lepton_edge.capture import open_source\n"
            f"s = open_source({str(folder)!r})\n"
            "n = 0\n"
            "while s.read() is not None: n += 1\n"
            # VmHWM, not ru_maxrss: after fork and exec ru_maxrss starts at the parent's (pytest's) peak
            "hwm = next(int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM'))\n"
            "print(json.dumps({'frames': n, 'corrupt': s.corrupt, 'budget': os.environ['OPENCV_IO_MAX_IMAGE_PIXELS'],"
            " 'rss_mb': hwm // 1024}))\n")
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["frames"] == 1 and out["corrupt"] == 1 and out["budget"] == "100000000", out
    assert out["rss_mb"] < 700, out  # 400 MP decoded would be 1.2 GB as BGR


def test_a_video_whose_frames_are_past_the_budget_is_refused_at_open(tmp_path, fashion_video):
    video, _ = fashion_video
    code = ("from lepton_edge.capture import open_source\nfrom lepton_edge.errors import BadInput\n"
            f"try:\n    open_source({str(video)!r})\nexcept BadInput as e:\n    print(e)\n")
    env = {**os.environ, "OPENCV_IO_MAX_IMAGE_PIXELS": "1000"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert "over the budget of 1,000 pixels" in r.stdout and "cannot open video" in r.stdout, r.stdout + r.stderr


def test_a_device_file_is_refused_at_once(tmp_path):
    """`--source /dev/ptmx` (or a cam.mp4 linking to it) blocked in read for ever, and SIGTERM did not end it."""
    (tmp_path / "cam.mp4").symlink_to("/dev/ptmx")
    for spec in ("/dev/ptmx", str(tmp_path / "cam.mp4"), "/dev/null"):
        t = time.monotonic()
        with pytest.raises(BadInput, match="not a regular file"):
            open_source(spec)
        assert time.monotonic() - t < 2


def test_files_that_make_ffmpeg_read_other_files_are_refused(tmp_path, fashion_video, monkeypatch):
    """A local HLS playlist played a video from outside its folder; a relative spec starting `concat:` was
    FFmpeg's concat protocol over another file; `f%03d.bin` was an image-sequence pattern over other files."""
    import cv2

    video, _ = fashion_video
    pl = tmp_path / "pl"
    pl.mkdir()
    for name, body in (("abs.m3u8", str(video)), ("rel.m3u8", os.path.relpath(video, pl)),
                       ("url.m3u8", f"file://{video}")):
        (pl / name).write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n{body}\n#EXT-X-ENDLIST\n")
        with pytest.raises(BadInput, match="a playlist, which names other files"):
            open_source(str(pl / name))
    cwd = tmp_path / "cwd"
    (cwd / f"concat:{video.parent}").mkdir(parents=True)
    (cwd / f"concat:{video.parent}" / video.name).write_text("x\n")
    monkeypatch.chdir(cwd)
    with pytest.raises(BadInput, match="cannot open video"):
        open_source(f"concat:{video}")
    seq = tmp_path / "seq"
    seq.mkdir()
    (seq / "f%03d.bin").write_text("garbage\n")
    for i in range(3):
        cv2.imwrite(str(seq / f"f{i:03d}.png"), np.zeros((8, 8, 3), np.uint8))
        (seq / f"f{i:03d}.png").rename(seq / f"f{i:03d}.bin")
    with pytest.raises(BadInput, match="cannot open video"):
        open_source(str(seq / "f%03d.bin"))
    # FFmpeg's own image2 reader takes such a name as a pattern when its extension is an image one it knows
    # and lepton_edge does not (.jps): the folder's f001.jps... were read, never named nor checked
    for i in range(1, 4):
        (seq / f"f{i:03d}.jps").write_bytes(_jpeg())
    (seq / "f%03d.jps").write_text("not a video\n" * 10)
    with pytest.raises(BadInput, match="reads as an image-sequence pattern"):
        open_source(str(seq / "f%03d.jps"))


def test_specs_the_file_system_refuses_are_one_line(tmp_path):
    """1,200 nested file:// prefixes recursed past Python's limit, a 300-character name was ENAMETOOLONG from
    pathlib: tracebacks, not a line."""
    for spec, words in (("file://" * 1200 + "/x.png", "a file:// URL holds a path, not another URL"),
                        ("a" * 300, "File name too long")):
        with pytest.raises(BadInput, match=words) as e:
            open_source(spec)
        assert "\n" not in str(e.value)


def test_a_skipped_file_is_named_without_its_terminal_escapes(tmp_path, caplog):
    """A file named `evil\\n\\e[2J\\e]0;pwned\\a.png` on a hostile SD card cleared the operator's screen and set the
    terminal's title through the skip line."""
    name = "evil\n\x1b[2J\x1b]0;pwned\x07.png"
    (tmp_path / name).write_bytes(b"x")
    src = open_source(str(tmp_path))
    with caplog.at_level(logging.INFO, logger="lepton_edge.capture.files"):
        assert src.read() is None and src.corrupt == 1
    line = next(r.getMessage() for r in caplog.records if "skipped" in r.getMessage())
    assert "\x1b" not in line and "\x07" not in line and "\\x1b[2J" in line


def test_a_program_that_imports_cv2_first_is_told_that_opencvs_own_budget_holds(tmp_path):
    """OpenCV reads its budget once, at import: after `import cv2; import lepton_edge` an 11000x11000 PNG decoded
    whole while the budget was said to be 100 MP. Now the budget reported is OpenCV's, with one warning."""
    code = ("import cv2, logging\nlogging.basicConfig()\nimport lepton_edge\n"
            "from lepton_edge.capture.opencv import cv2 as c, max_pixels\nc()\nprint(max_pixels())\n")
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert r.stdout.split() == [str(1 << 30)], r.stdout + r.stderr
    assert r.stderr.count("cv2 was imported before lepton_edge") == 1, r.stderr


def _mjpeg_avi(path: Path, frames: list[bytes], w: int, h: int) -> None:
    """An MJPEG AVI whose header says w x h and whose frames are the JPEGs given, whatever their own size."""
    import struct

    def chunk(tag: bytes, data: bytes) -> bytes:
        return tag + struct.pack("<I", len(data)) + data + (b"\0" if len(data) % 2 else b"")

    def lst(kind: bytes, data: bytes) -> bytes:
        return b"LIST" + struct.pack("<I", len(data) + 4) + kind + data

    n = len(frames)
    avih = struct.pack("<IIIIIIIIII4I", 100_000, 0, 0, 0x10, n, 0, 1, 0, w, h, 0, 0, 0, 0)
    strh = b"vids" + b"MJPG" + struct.pack("<IHHIIIIIIIIhhhh", 0, 0, 0, 0, 1, 10, 0, n, 0, 0xFFFFFFFF, 0, 0, 0, w, h)
    strf = struct.pack("<IiiHH4sIiiII", 40, w, h, 1, 24, b"MJPG", w * h * 3, 0, 0, 0, 0)
    movi, idx, off = b"", b"", 4
    for f in frames:
        c = chunk(b"00dc", f)
        idx += b"00dc" + struct.pack("<III", 0x10, off, len(f))
        off += len(c)
        movi += c
    body = (b"AVI " + lst(b"hdrl", chunk(b"avih", avih) + lst(b"strl", chunk(b"strh", strh) + chunk(b"strf", strf)))
            + lst(b"movi", movi) + chunk(b"idx1", idx))
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


def test_a_huge_frame_in_the_middle_of_an_mjpeg_file_is_a_corrupt_frame_not_its_memory(tmp_path):
    """The budget was checked at open only, against the header's size: a 64x48 file whose third frame was
    16000x16000 held 0.8 GB in FFmpeg's decoder. MJPEG frames are now decoded by OpenCV, under the budget."""
    import cv2

    small = _jpeg(48, 64)
    big = cv2.imencode(".jpg", np.zeros((10_000, 11_000), np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 5])[1].tobytes()
    video = tmp_path / "mid.avi"
    _mjpeg_avi(video, [small, small, big, small, small], 64, 48)
    code = ("import json, sys, lepton_edge\nfrom lepton_edge.capture import open_source\n"
            f"s = open_source({str(video)!r})\nn = 0\n"
            "while s.read() is not None: n += 1\n"
            "hwm = next(int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM')) // 1024\n"
            "print(json.dumps({'frames': n, 'corrupt': s.corrupt, 'hwm_mb': hwm}))\n")
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["frames"] == 4 and out["corrupt"] == 1 and out["hwm_mb"] < 150, out


def test_a_nul_in_a_video_source_is_one_line():
    """os.stat raises ValueError on an embedded NUL (an agent.toml `source = "a\\u0000.mp4"`): a bare
    ValueError, where Path.exists() used to say the source was not found."""
    from lepton_edge.capture import open_source
    from lepton_edge.errors import BadInput

    with pytest.raises(BadInput, match="source not found"):
        open_source("clip\x00.mp4")



def _serve(handler):
    """A threaded HTTP server on a free loopback port serving `handler` (one of the tests' cameras), running."""
    import http.server
    import socketserver
    import threading

    from mjpeg_server import free_port

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True

    srv = Server(("127.0.0.1", free_port()), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


class _EndlessPart:
    """An HTTP MJPEG camera that sends three good parts, then one part that never ends: a part header (with no
    Content-Length, or one of 2 GB), then zeros until the client hangs up."""

    def __init__(self, length: bytes = b""):
        import http.server


        good = _jpeg()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                zeros = b"\0" * (1 << 20)
                try:
                    for _ in range(3):
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                                         % len(good) + good + b"\r\n")
                    self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\n" + length + b"\r\n" + good[:-2])
                    while True:
                        self.wfile.write(zeros)
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        self.srv = _serve(Handler)
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}/stream.mjpg"

    def stop(self):
        self.srv.shutdown()
        self.srv.server_close()


@pytest.mark.parametrize("length", [b"", b"Content-Length: 2000000000\r\n"], ids=["no-length", "2-GB-length"])
def test_an_endless_mjpeg_part_ends_the_source_in_one_line_not_in_gigabytes(length):
    """FFmpeg's mpjpeg demuxer buffered a part without a Content-Length until the boundary came: one endless
    part held 1.4 GB within the 5 s read timeout, again after every reconnect, and the good frames before it
    kept the source `streaming` for ever. A part now holds at most the frame budget's pixels in bytes (100 MB),
    and a larger one fails the source with that line."""
    cam = _EndlessPart(length)
    code = ("import json, time, lepton_edge\nfrom lepton_edge.capture import open_source\n"
            f"s = open_source({cam.url!r}, policy='every-frame', max_reconnects=1)\n"
            "n, t = 0, time.monotonic()\n"
            "while not s.closed and time.monotonic() - t < 20:\n"
            "    n += s.read(timeout=1) is not None\n"
            "hwm = next(int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM')) // 1024\n"
            "print(json.dumps({'frames': n, 'state': s.state.value, 'failure': s.failure, 'hwm_mb': hwm}))\n"
            "s.close()\n")
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    finally:
        cam.stop()
    out = json.loads(r.stdout.strip().splitlines()[-1])
    # (the 3 good frames: the consumer may not read each before the source fails and closes)
    assert 1 <= out["frames"] <= 3 and out["state"] == "failed", out
    assert out["failure"].startswith("a part of the MJPEG stream") and "100,000,000 bytes" in out["failure"], out
    assert "\n" not in out["failure"] and out["hwm_mb"] < 450, out  # (the part: 100 MB; Python, numpy, cv2: ~70)


def test_mjpeg_over_http_keeps_its_frames_and_its_credentials():
    """The MJPEG reader that replaced FFmpeg's for http:// cameras: every frame of a plain camera, in order, and
    Basic credentials from the URL (as FFmpeg took them), never in the spec shown."""
    import base64
    import http.server


    good = _jpeg()
    seen: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            if self.headers.get("Authorization") != "Basic " + base64.b64encode(b"cam:p@ss").decode():
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="cam"')
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", 'multipart/x-mixed-replace;boundary="--frame"')
            self.end_headers()
            try:
                for _ in range(200):  # LF-only part headers, no Content-Length: the boundary ends each part
                    self.wfile.write(b"----frame\nContent-Type: image/jpeg\n\n" + good + b"\n")
                    time.sleep(0.01)
            except OSError:
                pass

        def log_message(self, *args):
            pass

    srv = _serve(Handler)
    src = open_source(f"http://cam:p%40ss@127.0.0.1:{srv.server_address[1]}/video", policy="every-frame")
    try:
        got = [src.read(timeout=10) for _ in range(20)]
        assert all(f is not None and f.image.shape == (64, 64, 3) for f in got), src.status()
        assert [f.index for f in got] == list(range(20)) and src.corrupt == 0, src.status()
        assert "p@ss" not in src.spec and "p%40ss" not in src.spec and seen[0] is None and seen[-1], (src.spec, seen)
    finally:
        src.close()
        srv.shutdown()
        srv.server_close()


def test_a_truncated_jpeg_in_a_folder_leaves_log_json_stderr_json_only(tmp_path):
    """libjpeg wrote 'Premature end of JPEG file' straight to file descriptor 2 for a cut-off JPEG in a folder
    source: a bare line between `run --log-json`'s records, whose stderr must be JSON lines only."""
    import cv2
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from conftest import run_cli

    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(784, 10)).astype(np.float32), "W")
    g = helper.make_graph([helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "W"], ["y"])],
                          "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 28, 28])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "tiny.onnx"))
    frames = tmp_path / "frames"
    frames.mkdir()
    jpeg = cv2.imencode(".jpg", np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8))[1].tobytes()
    (frames / "a-cut.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    (frames / "b-whole.jpg").write_bytes(jpeg)
    r = run_cli("--log-json", "run", str(tmp_path / "tiny.onnx"), "--source", str(frames), "--input-spec",
                "layout=NCHW;color=GRAY;size=28x28;scale=1/255", "--task", "classify", "--no-show", timeout=120)
    assert r.returncode == 0, r.stderr
    for line in r.stderr.splitlines():
        try:
            json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON line on --log-json's stderr: {line!r}")
    summary = [x["summary"] for x in map(json.loads, r.stderr.splitlines()) if "summary" in x]
    assert summary and summary[0]["frames"] == 2, r.stderr


def test_a_huge_frame_later_in_an_http_mjpeg_stream_is_a_corrupt_frame_not_its_memory():
    """The pixel budget was checked when a stream opened: a camera whose first connection sent JPEG-looking junk
    made the source hand every later frame to FFmpeg's own decoder, where a 10000x11000 frame mid-stream was
    decoded whole. Every part of an HTTP MJPEG stream is now decoded by OpenCV, under the budget."""
    import http.server

    import cv2


    small = _jpeg()
    big = cv2.imencode(".jpg", np.zeros((10_000, 11_000), np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 5])[1].tobytes()
    junk = b"\xff\xd8\xff\xe0" + np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    connections = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            connections.append(1)
            parts = [junk] * 5 if len(connections) == 1 else [small] * 5 + [big] + [small] * 200
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
            self.end_headers()
            try:
                for p in parts:
                    self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(p)
                                     + p + b"\r\n")
                    time.sleep(0.02)
            except OSError:
                pass

        def log_message(self, *args):
            pass

    srv = _serve(Handler)
    url = f"http://127.0.0.1:{srv.server_address[1]}/video"
    code = ("import json, time, lepton_edge\nfrom lepton_edge.capture import open_source\n"
            f"s = open_source({url!r}, policy='every-frame', max_backoff=0.5)\n"
            "n, t = 0, time.monotonic()\n"
            "while n < 30 and time.monotonic() - t < 30:\n"
            "    n += s.read(timeout=1) is not None\n"
            "hwm = next(int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM')) // 1024\n"
            "print(json.dumps({'frames': n, 'corrupt': s.corrupt, 'hwm_mb': hwm}))\n"
            "s.close()\n")
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    finally:
        srv.shutdown()
        srv.server_close()
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["frames"] == 30 and out["corrupt"] >= 2 and out["hwm_mb"] < 120, out  # (the junk connection, the
    # huge frame; FFmpeg's decode of it took the process to 175 MB, 68 MB without)
