"""BundleStore's bookkeeping where tests/test_bundle_hardening.py does not reach: a `current` that is
not (or no longer) in good.json, a crash that left many leftovers, the one-line refusals the fleet reads
in a deploy reply, and the download deadline shutting the sockets it tracks. Real files in tmp_path,
a real socket pair; no network, no model."""
from __future__ import annotations

import socket
import tarfile
import threading
from pathlib import Path

import pytest

from lepton_edge.agent.deploy import GOOD, BundleStore, DeployError, _Deadline
from lepton_edge.bundle import InputSpec, Manifest, OutputSpec, write_manifest
from lepton_edge.telemetry.schema import DeployCommand


def _bundle(d: Path, model: bytes = b"model" * 20) -> Path:
    d.mkdir(parents=True)
    (d / "model.onnx").write_bytes(model)
    write_manifest(d, Manifest(name="t", created="2026-01-01", target={"id": "x86-cpu"}, format="onnx",
                               precision="fp32", model_file="model.onnx", inputs=[InputSpec(name="x", shape=[1, 4])],
                               outputs=[OutputSpec(name="y", shape=[1, 2])]))
    return d


def _store(tmp_path: Path) -> BundleStore:
    return BundleStore(tmp_path / "state", [], 1 << 20, max_bundle_bytes=1 << 20, download_timeout_s=5.0)


def test_a_current_bundle_outside_the_store_is_the_first_candidate(tmp_path):
    """The agent's configured bundle can be current without being in bundles/ or good.json."""
    outside = _bundle(tmp_path / "configured")
    s = _store(tmp_path)
    s.set_current(outside)
    assert s.candidates() == [outside.resolve()]


def test_discard_never_removes_the_current_bundle_even_when_good_json_is_lost(tmp_path):
    s = _store(tmp_path)
    p = s.fetch(DeployCommand(id="1", path=str(_bundle(tmp_path / "b"))))
    s.set_current(p)
    (s.state / GOOD).unlink()  # a crash, or an operator, removed the list of good bundles
    s.discard(p)
    assert (p / "manifest.json").is_file() and s.current() == p


def test_every_leftover_of_a_crash_is_removed_whatever_the_directory_order(tmp_path):
    s = _store(tmp_path)
    good = s.fetch(DeployCommand(id="1", path=str(_bundle(tmp_path / "b"))))
    s.set_current(good)
    for i in range(40):
        (s.root / f"20260101-0000{i:02d}-half").mkdir()
        (s.root / f".20260101-0000{i:02d}-x.partial").write_bytes(b"half")
    s2 = _store(tmp_path)
    assert sorted(p.name for p in s2.root.iterdir()) == [good.name]


def test_a_packed_bundle_with_another_sha256_is_refused_in_one_line(tmp_path):
    src = _bundle(tmp_path / "b")
    packed = tmp_path / "b.tar.gz"
    with tarfile.open(packed, "w:gz") as tf:
        for f in sorted(src.iterdir()):
            tf.add(f, arcname=f.name)
    s = _store(tmp_path)
    with pytest.raises(DeployError) as e:
        s.fetch(DeployCommand(id="1", path=str(packed), sha256="0" * 64))
    assert str(e.value) == f"{packed}: sha256 differs from the command's"
    assert list(s.root.iterdir()) == []


def test_a_file_of_another_size_is_refused_in_one_line_by_a_path_deploy(tmp_path):
    src = _bundle(tmp_path / "b")
    (src / "model.onnx").write_bytes(b"grown" * 30)
    s = _store(tmp_path)
    with pytest.raises(DeployError) as e:
        s.fetch(DeployCommand(id="1", path=str(src)))
    assert str(e.value) == (f"bundle {src}: checksum mismatch for model.onnx (size 150, the manifest says 100); "
                            "refusing to use it")
    assert list(s.root.iterdir()) == []


def test_the_deadline_shuts_the_sockets_it_tracks(tmp_path):
    a, b = socket.socketpair()
    try:
        a.settimeout(5)
        got = {}
        with _Deadline(0.05) as d:
            d.track(a)
            reader = threading.Thread(target=lambda: got.setdefault("data", a.recv(10)))
            reader.start()
            reader.join(5)
            assert not reader.is_alive(), "a read outlived the deadline"
            assert got["data"] == b"" and d.expired()
            late, other = socket.socketpair()
            d.track(late)  # tracked after it fired: shut at once
            assert late.recv(10) == b""
            late.close()
            other.close()
    finally:
        a.close()
        b.close()
