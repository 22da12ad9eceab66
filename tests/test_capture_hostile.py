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
