"""`lepton-edge run` and `bench` with outputs and sources from outside: an output that is the input, stdout
as it is, a full disk, names that look like globs, image headers past OpenCV's limit, glob loops, videos
whose header lies, manifests whose normalisation contradicts the input, and labels that look like markup.
Each bad input is one line (exit 2); each unusual good one just works. The models are built here."""
from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import run_cli
from test_plain_model_inputs import _mean_onnx
from tmpfs import tmpfs


def _model(tmp_path) -> Path:
    """[1,3,8,8] float -> per-channel mean [1,3]: a 3-class 'classifier' that runs anywhere."""
    p = tmp_path / "m.onnx"
    _mean_onnx(p, TensorProto.FLOAT, [1, 3, 8, 8], [2, 3], [1, 3])
    return p


def _video(path: Path, frames: int = 12) -> Path:
    w = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10, (32, 24))
    for i in range(frames):
        w.write(np.full((24, 32, 3), (i * 20) % 255, np.uint8))
    w.release()
    return path


def _one_line(r, needle: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert needle in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_an_output_that_is_the_source_is_refused_and_the_source_kept(tmp_path):
    """`--save clip.avi -s clip.avi` overwrote the video while it was read (20 frames became 13), and
    `--jsonl clip.avi` replaced it with JSON lines; both outputs one file is refused too."""
    m, clip = _model(tmp_path), _video(tmp_path / "clip.avi")
    before = clip.read_bytes()
    for flag in ("--save", "--jsonl"):
        r = run_cli("run", str(m), "-s", str(clip), "--no-show", flag, str(clip))
        _one_line(r, "that is the source being read")
    r = run_cli("run", str(m), "-s", str(clip), "--no-show", "--save", str(tmp_path / "o.avi"),
                "--jsonl", str(tmp_path / "o.avi"))
    _one_line(r, "the same file as --jsonl")
    assert clip.read_bytes() == before


def test_jsonl_to_stdout_appends_and_sits_beside_the_summary(tmp_path):
    """`--jsonl -` reopened /dev/stdout: `>> app.jsonl` lost the lines already there, `--json` overwrote
    the lines with the summary, and stdout as a socket (journald) failed. A NaN score is JSON null."""
    m, clip = _model(tmp_path), _video(tmp_path / "clip.avi", 3)
    out = tmp_path / "app.jsonl"
    out.write_text('{"old":1}\n')
    exe = Path(sys.executable).parent / "lepton-edge"
    with open(out, "a") as f:
        r = subprocess.run([str(exe), "run", str(m), "-s", str(clip), "--no-show", "--jsonl", "-", "--json"],
                           stdout=f, stderr=subprocess.PIPE, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    text = out.read_text()
    lines = text.splitlines()
    assert lines[0] == '{"old":1}' and sum('"index":' in ln for ln in lines) == 3, text[:500]
    assert '"frames"' in text  # the summary after the lines, not over them
    import socket

    a, b = socket.socketpair()
    with a, b:
        p = subprocess.Popen([str(exe), "run", str(m), "-s", str(clip), "--no-show", "--jsonl", "-"],
                             stdout=a.fileno(), stderr=subprocess.PIPE, text=True)
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        a.close()
        got = b.makefile("rb").read().decode()
    assert sum('"index":' in ln for ln in got.splitlines()) == 3


def test_a_full_disk_or_an_impossible_folder_is_one_line(tmp_path):
    m, clip = _model(tmp_path), _video(tmp_path / "clip.avi", 3)
    _one_line(run_cli("run", str(m), "-s", str(clip), "--no-show", "--jsonl", "/dev/full"), "No space left")
    (tmp_path / "afile").write_text("x")
    _one_line(run_cli("run", str(m), "-s", str(clip), "--no-show", "--save", str(tmp_path / "afile/o.mp4")),
              "cannot make its folder")


def _png_header_only(path: Path, w: int, h: int) -> None:
    """A tiny PNG whose header declares w x h pixels (OpenCV refuses it before decoding)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))


def test_sources_named_like_globs_huge_headers_loops_and_lying_videos(tmp_path):
    """`clip[1].avi` and `[2024] x.png` were read as globs that matched nothing; one PNG declaring
    40000x30000 ended a folder's run with a traceback; `loop/**/*.png` followed links back up without
    end; a video whose header claims 10^9 frames counted millions of corrupt ones; an empty source read
    the working directory; links to images outside a folder were skipped without saying so."""
    m = _model(tmp_path)
    odd = _video(tmp_path / "clip[1].avi", 3)
    r = run_cli("run", str(m), "-s", str(odd), "--no-show", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["frames"] == 3, r.stderr[-2000:]
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    cv2.imwrite(str(imgs / "[2024-01-01] a.png"), np.zeros((8, 8, 3), np.uint8))
    r = run_cli("run", str(m), "-s", str(imgs / "[2024-01-01] a.png"), "--no-show", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["frames"] == 1, r.stderr[-2000:]
    _png_header_only(imgs / "bomb.png", 40000, 30000)
    r = run_cli("run", str(m), "-s", str(imgs), "--no-show", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads(r.stdout)
    assert s["frames"] == 1 and s["source"]["corrupt"] == 1, s
    loop = tmp_path / "loop" / "a"
    loop.mkdir(parents=True)
    cv2.imwrite(str(loop / "0.png"), np.zeros((8, 8, 3), np.uint8))
    (loop / "up").symlink_to("..")
    (loop / "up2").symlink_to("../..")
    r = run_cli("run", str(m), "-s", f"{tmp_path / 'loop'}/**/*.png", "--no-show", "--json", timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout)["frames"] == 1, r.stderr[-2000:]
    farm = tmp_path / "farm"
    farm.mkdir()
    (farm / "x.png").symlink_to(loop / "0.png")
    _one_line(run_cli("run", str(m), "-s", str(farm), "--no-show"), "1 link(s) to images outside the folder")
    _one_line(run_cli("run", str(m), "-s", "", "--no-show", cwd=imgs), "the source is empty")
    liar = _video(tmp_path / "liar.avi", 5)
    data = bytearray(liar.read_bytes())
    i = data.index(b"avih") + 8 + 16  # AVIMAINHEADER.dwTotalFrames
    data[i:i + 4] = struct.pack("<I", 10**9)
    liar.write_bytes(bytes(data))
    r = run_cli("run", str(m), "-s", str(liar), "--no-show", "--json", timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads(r.stdout)
    assert s["frames"] == 5 and s["source"]["corrupt"] <= 400, s


def test_normalisation_and_options_that_contradict_the_input_are_one_line(tmp_path):
    """ImageNet's 3 means on a 1-channel input, `quantization` on a float input, and `--iou -1` were
    numpy or OpenCV tracebacks at the first frame; an ONNX model with no inputs an IndexError."""
    gray = tmp_path / "gray.onnx"
    _mean_onnx(gray, TensorProto.FLOAT, [1, 1, 8, 8], [2, 3], [1, 1])
    folder = tmp_path / "f"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), np.zeros((8, 8, 3), np.uint8))
    _one_line(run_cli("run", str(gray), "-s", str(folder), "--no-show", "--input-spec",
                      "mean=0.485,0.456,0.406;std=0.229,0.224,0.225"), "mean has 3 values for an input of 1 channel")
    _one_line(run_cli("bench", str(gray), "--runs", "3", "--input-spec", "mean=0.4,0.4,0.4"), "mean has 3 values")
    from lepton_edge.bundle import InputSpec
    from lepton_edge.errors import BadInput
    from lepton_edge.runtime.runtime import check_normalisation

    for ok in (InputSpec(name="x", shape=[1, 3, 8, 8], mean=[0.4, 0.4, 0.4], std=[0.2, 0.2, 0.2]),
               InputSpec(name="x", shape=[1, 8, 8, 3], layout="NHWC", mean=[0.4, 0.4, 0.4], std=[0.2]),
               InputSpec(name="x", shape=[1, 8, 8, 3], layout="NHWC", dtype="uint8", scale=1.0, mean=[0.0],
                         quantization={"scale": 0.0078125, "zero_point": 128.0})):
        check_normalisation(ok, "ok")  # ImageNet's per-channel lists and a uint8 input with zero point 128.0
    for bad, why in ((dict(quantization={"scale": 0.1, "zero_point": 0}), "given for a float32 input"),
                     (dict(dtype="uint8", quantization={"foo": 1.0}), "must be {'scale'")):
        with pytest.raises(BadInput, match=re.escape(why)):
            check_normalisation(InputSpec(name="x", shape=[1, 3, 8, 8], **bad), "bad")
    for flag, value in (("--iou", "-1"), ("--conf", "nan")):
        _one_line(run_cli("run", str(gray), "-s", str(folder), "--no-show", flag, value), f"{flag} must be between")
    g = helper.make_graph([helper.make_node("Constant", [], ["y"], value=helper.make_tensor("c", TensorProto.FLOAT,
                                                                                           [1], [1.0]))],
                          "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    none = tmp_path / "none.onnx"
    mdl = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    mdl.ir_version = 8
    onnx.save(mdl, str(none))
    _one_line(run_cli("run", str(none), "-s", str(folder), "--no-show"), "the model has no inputs")


def test_labels_are_text_never_markup(tmp_path):
    """A label `[/]` raised MarkupError in the console lines, and `[background]` vanished from them."""
    m = _model(tmp_path)
    mdl = onnx.load(str(m))
    mdl.metadata_props.add(key="names", value=json.dumps({"0": "[background]", "1": "[/]", "2": "c"}))
    onnx.save(mdl, str(m))
    folder = tmp_path / "f"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), np.full((8, 8, 3), (0, 0, 250), np.uint8))  # red: class 0 first
    r = run_cli("run", str(m), "-s", str(folder), "--no-show", "--every", "0")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "[background]" in r.stdout, r.stdout


def test_a_stream_password_never_reaches_logs_events_or_meta(tmp_path):
    """The camera's password was in the log line, the error, and (source.spec) the agent's retained meta
    and `started` event, which every subscriber and the fleet dashboard read."""
    from lepton_edge.capture.base import redacted
    from lepton_edge.capture.files import ImageFiles

    assert redacted("rtsp://admin:s3cret@10.0.0.9:554/h264") == "rtsp://***@10.0.0.9:554/h264"
    assert redacted("rtsp://admin:p@ss@cam/x@y") == "rtsp://***@cam/x@y"  # FFmpeg splits at the last '@'
    assert redacted("rtsp://cam:554/a@b:c") == "rtsp://cam:554/a@b:c"  # an '@' in the path is no password
    assert redacted("rtspsrc location=rtsp://u:p@cam/x ! decodebin ! appsink") == \
        "rtspsrc location=rtsp://***@cam/x ! decodebin ! appsink"
    assert redacted("http://cam.local/mjpg") == "http://cam.local/mjpg" and redacted("0") == "0"
    assert ImageFiles("http://u:p@x/[1].png", [Path("a.png")]).spec == "http://***@x/[1].png"
    m = _model(tmp_path)
    r = run_cli("run", str(m), "-s", "rtsp://admin:s3cret@127.0.0.1:1/stream", "--no-show", timeout=120)
    assert r.returncode == 2 and "s3cret" not in r.stderr and "***@127.0.0.1" in r.stderr, r.stderr[-2000:]


def test_labels_that_are_not_one_per_class_are_said(tmp_path):
    """Two names for three classes mixed names and numbers in the results without a word."""
    m = _model(tmp_path)
    mdl = onnx.load(str(m))
    mdl.metadata_props.add(key="names", value=json.dumps({"0": "a", "1": "b"}))
    onnx.save(mdl, str(m))
    folder = tmp_path / "f"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), np.zeros((8, 8, 3), np.uint8))
    r = run_cli("run", str(m), "-s", str(folder), "--no-show", "--task", "classify")
    assert r.returncode == 0 and "2 labels for 3 classes" in r.stderr, r.stderr[-2000:]


def test_globs_read_as_the_glob_module_did_without_hidden_files(tmp_path):
    """`frames/**.png` raised pathlib's ValueError (a traceback); pathlib's globs and rglob matched hidden
    files, so macOS's `._a.png` on an SD card became corrupt frames. A pattern part starting with '.' still
    asks for them."""
    from lepton_edge.capture.files import image_files

    frames = tmp_path / "frames"
    (frames / ".thumbs").mkdir(parents=True)
    for n in ("a.png", "._a.png", ".thumbs/t.png", "b.png"):
        cv2.imwrite(str(frames / n), np.zeros((4, 4, 3), np.uint8))
    plain = [frames / "a.png", frames / "b.png"]
    for spec in ("frames/**.png", "frames/*.png", "frames/**/*.png", "frames", "*/[ab].png"):
        got = image_files(str(tmp_path / spec) if spec != "*/[ab].png" else f"{tmp_path}/*/[ab].png")
        assert got == plain, (spec, got)
    assert image_files(f"{frames}/.*.png") == [frames / "._a.png"]


def test_a_video_of_undecodable_frames_fails_and_a_looping_one_starts_again(tmp_path):
    """Past 300 bad frames in a row a looping video starts again (it seeked through the header's whole
    count), and a file that never gave a frame has failed, not ended."""
    from lepton_edge.capture.files import VideoFile

    liar = _video(tmp_path / "liar.avi", 4)
    data = bytearray(liar.read_bytes())
    i = data.index(b"avih") + 8 + 16
    data[i:i + 4] = struct.pack("<I", 10**9)
    liar.write_bytes(bytes(data))
    src = VideoFile(str(liar), loop=True)
    got = [src.read() for _ in range(10)]
    src.close()
    assert all(f is not None for f in got) and src.captured == 10


@pytest.mark.root
def test_save_on_a_disk_that_fills_is_one_line_not_a_cut_video_and_exit_0(tmp_path):
    """OpenCV's writer drops failed writes: `--save` onto a 32 KiB disk exited 0 with the video cut off at
    the disk's size. One line and exit 2 now; the same run with room is exit 0."""
    m, clip = _model(tmp_path), _video(tmp_path / "clip.avi", frames=400)
    with tmpfs(tmp_path / "disk", "size=32k") as disk:
        _one_line(run_cli("run", str(m), "-s", str(clip), "--no-show", "--save", str(disk / "o.avi")),
                  "the video is cut short")
    r = run_cli("run", str(m), "-s", str(clip), "--no-show", "--save", str(tmp_path / "o.avi"))
    assert r.returncode == 0, r.stderr[-2000:]
