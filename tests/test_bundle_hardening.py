"""Hostile bundles, manifests, signatures, archives and downloads against the bundle code and the
device's BundleStore (issue 10): each is refused with one line, within its budget, and leaves
nothing behind in the state directory.

The bundles here are small synthetic ones (a manifest over a few bytes standing in for a model):
nothing in this file loads a model, so no export is needed and every test takes well under a second
or two. Downloads go to a real HTTP server on a loopback port.
"""
from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import os
import tarfile
import threading
import time
from pathlib import Path

import pytest

from lepton_edge.agent.deploy import BundleStore, DeployError, pack
from lepton_edge.bundle import Bundle, InputSpec, Manifest, OutputSpec, write_manifest
from lepton_edge.errors import BadInput
from lepton_edge.signing import new_keys, sign, verify
from lepton_edge.telemetry.schema import DeployCommand
from tmpfs import tmpfs

MiB = 1 << 20


def make_bundle(d: Path, model: bytes = b"\x08fake-model" * 64, labels: str = "a\nb\n") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.onnx").write_bytes(model)
    (d / "labels.txt").write_text(labels)
    m = Manifest(name="t", created="2026-01-01", target={"id": "x86-cpu", "threads": 1, "latency_budget_ms": 50.0},
                 format="onnx", precision="int8", model_file="model.onnx", task="classify", labels_file="labels.txt",
                 inputs=[InputSpec(name="input", shape=[1, 1, 28, 28])], outputs=[OutputSpec(name="y", shape=[1, 10])])
    write_manifest(d, m)
    return d


def edit(d: Path, fn) -> Path:
    """Change manifest.json as raw JSON (no re-checksumming): what an attacker writes."""
    raw = json.loads((d / "manifest.json").read_text())
    fn(raw)
    (d / "manifest.json").write_text(json.dumps(raw))
    return d


def store(tmp_path: Path, keys=(), **kw) -> BundleStore:
    kw = {"max_bundle_bytes": 4 * MiB, "download_timeout_s": 5.0} | kw
    return BundleStore(tmp_path / "state", list(keys), kw.pop("max_bytes", 4 * MiB), **kw)


def left_in(s: BundleStore) -> list[str]:
    return sorted(p.name for p in s.root.iterdir())


def add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


# ---- 1: a path deploy copies the manifest's files, never through a symlink --------------------
def test_path_deploy_copies_only_listed_regular_files_and_refuses_root_and_proc(tmp_path):
    s = store(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"x" * 1000)
    b = make_bundle(tmp_path / "b")
    (b / "extra.bin").write_bytes(b"not listed")  # an unlisted file is not carried over
    os.symlink(outside, b / "tree")  # and a symlinked tree is never followed
    p = s.fetch(DeployCommand(id="1", path=str(b)))
    assert sorted(x.name for x in p.iterdir()) == ["labels.txt", "manifest.json", "model.onnx"]

    # a listed file that is a symlink (its size and sha256 even match the target's) is refused
    evil = make_bundle(tmp_path / "evil", model=b"x" * 1000)
    (evil / "model.onnx").unlink()
    os.symlink(outside / "secret", evil / "model.onnx")
    with pytest.raises(DeployError, match="not a regular file inside the bundle"):
        s.fetch(DeployCommand(id="2", path=str(evil)))

    for bad, words in [("/", "not a bundle"), ("/proc/self", "not a bundle"), ("/dev/zero", "not a bundle"),
                       (str(tmp_path / "nope"), "not found")]:
        t = time.monotonic()
        with pytest.raises(DeployError, match=words):
            s.fetch(DeployCommand(id="3", path=bad))
        assert time.monotonic() - t < 0.5, bad
    assert left_in(s) == [p.name]  # the refused ones left nothing


# ---- 2: archives: unpacked size, member kinds and unlisted members, checked before writing ----
def _archive(tmp_path: Path, name: str, extra) -> Path:
    b = make_bundle(tmp_path / f"src-{name}")
    out = tmp_path / f"{name}.tar.gz"
    with tarfile.open(out, "w:gz") as tf:
        for f in ("manifest.json", "model.onnx", "labels.txt"):
            tf.add(b / f, arcname=f"{name}/{f}")
        extra(tf, name)
    return out


def _zeros(tf, name):  # 64 MiB of zeros: about 64 KB compressed, far over the 4 MiB budget
    info = tarfile.TarInfo(f"{name}/zeros.bin")
    info.size = 64 * MiB

    class Zeros(io.RawIOBase):
        def readable(self):
            return True

        def readinto(self, b):
            b[:] = bytes(len(b))
            return len(b)

    tf.addfile(info, io.BufferedReader(Zeros()))


def _symlink(tf, name):
    info = tarfile.TarInfo(f"{name}/link")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    tf.addfile(info)


def _fifo(tf, name):
    info = tarfile.TarInfo(f"{name}/fifo")
    info.type = tarfile.FIFOTYPE
    tf.addfile(info)


@pytest.mark.parametrize("extra, words", [
    (_zeros, "more than the bundle limit"),
    (lambda tf, n: add_bytes(tf, f"{n}/libevil.so", b"\x7fELF"), "does not list"),
    (lambda tf, n: add_bytes(tf, "elsewhere/x", b"1"), "outside the bundle"),
    (_symlink, "link or special file"),
    (_fifo, "link or special file"),
])
def test_archive_is_checked_member_by_member_before_unpacking(tmp_path, extra, words):
    s = store(tmp_path)
    archive = _archive(tmp_path, "b", extra)
    t = time.monotonic()
    with pytest.raises(DeployError, match=words):
        s.fetch(DeployCommand(id="1", path=str(archive)))
    assert time.monotonic() - t < 2
    assert left_in(s) == []


def test_archive_member_count_and_declared_total_capped(tmp_path):
    s = store(tmp_path)
    many = _archive(tmp_path, "m", lambda tf, n: [add_bytes(tf, f"{n}/f{i}", b"") for i in range(1100)])
    with pytest.raises(DeployError, match="more than 1000 entries"):
        s.fetch(DeployCommand(id="1", path=str(many)))
    assert left_in(s) == []


def _pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return f"{n}{body}".encode()


def _raw_tar_gz(path: Path, blocks: list[tuple[str, bytes, bytes | None, int | None]]) -> Path:
    """A .tar.gz written header by header (name, type, data or None, declared size or len(data)): what
    tarfile's writer will not make."""
    import gzip

    with gzip.open(path, "wb") as g:
        for name, typ, data, size in blocks:
            info = tarfile.TarInfo(name)
            info.type, info.size = typ, len(data or b"") if size is None else size
            g.write(info.tobuf(tarfile.USTAR_FORMAT))
            if data:
                g.write(data + b"\0" * (-len(data) % 512))
        g.write(b"\0" * 1024)
    return path


def test_extended_headers_cannot_make_the_agent_hold_gigabytes(tmp_path):
    """Global pax headers: tarfile merges each into a dict every later member copies (a 5.7 MB archive took
    a running agent to 1.7 GB, before any signature check): refused at the first. Per-member pax headers,
    each under 1 MiB, had no cap on their number (11 MB held 479 MB): 1 MiB of them in all."""
    s = store(tmp_path)
    pax = b"".join(_pax_record(f"k{j}", "") for j in range(1000))
    glob = _raw_tar_gz(tmp_path / "global.tar.gz",
                       [(f"g{i}", tarfile.XGLTYPE, pax, None) for i in range(3)] + [("b/", tarfile.DIRTYPE, None, 0)])
    with pytest.raises(DeployError, match="global pax header"):
        s.fetch(DeployCommand(id="1", path=str(glob)))
    big = b"".join(_pax_record(f"k{j}", "v" * 40) for j in range(1500))  # ~76 KB each
    many = _raw_tar_gz(tmp_path / "many.tar.gz", [blk for i in range(20) for blk in (
        (f"b/PaxHeader{i}", tarfile.XHDTYPE, big, None), (f"b/d{i}/", tarfile.DIRTYPE, None, 0))])
    with pytest.raises(DeployError, match="extended headers of more than 1048576 bytes"):
        s.fetch(DeployCommand(id="2", path=str(many)))
    assert left_in(s) == []


def test_a_negative_member_size_is_refused_at_once(tmp_path):
    """A pax `size=-N` sent tarfile back to the same header at every next(), each time rewinding the gzip
    stream and inflating all before it: behind 16 MiB of zeros that took 39 s, behind 1 GiB about an hour,
    with the deploy lock held. (Python 3.11.7's tarfile: CVE-2025-8194.)"""
    s = store(tmp_path, max_bundle_bytes=64 * MiB, max_bytes=64 * MiB)
    comment = _pax_record("comment", "x" * 200_000)
    body = len(comment + _pax_record("size", "-000000"))
    back = 512 + body + (-body % 512) + 512  # from after b/x's header back to the pax header's own
    rec = comment + _pax_record("size", f"-{back:06d}")
    loop = _raw_tar_gz(tmp_path / "loop.tar.gz", [("b/pad.bin", tarfile.REGTYPE, bytes(16 * MiB), None),
                                                  ("b/PaxHeader", tarfile.XHDTYPE, rec, None),
                                                  ("b/x", tarfile.REGTYPE, None, 0)])
    t = time.monotonic()
    with pytest.raises(DeployError, match="negative size"):
        s.fetch(DeployCommand(id="1", path=str(loop)))
    assert time.monotonic() - t < 10 and left_in(s) == []


def _old_gnu_sparse(path: Path, extension_blocks: int) -> Path:
    """A .tar.gz whose one member is an old-GNU sparse file ('S') followed by a chain of extension headers
    (21 map entries each), the last one cut short when `extension_blocks` is 0."""
    info = tarfile.TarInfo("b/model.onnx")
    info.type = tarfile.GNUTYPE_SPARSE
    head = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    head[482] = 1  # isextended: an extension header follows
    head[148:156] = b" " * 8
    head[148:156] = b"%06o\0 " % sum(head[:512])
    ext = bytearray(512)
    for i in range(21):
        ext[i * 24:i * 24 + 24] = b"%011o\0" % 1 + b"%011o\0" % 1
    ext[504] = 1
    with gzip.open(path, "wb") as g:
        g.write(bytes(head))
        if not extension_blocks:
            g.write(bytes(100))  # the chain ends mid-header
        for _ in range(extension_blocks // 1000):
            g.write(bytes(ext) * 1000)
        ext[504] = 0
        g.write(bytes(ext) + bytes(1024))
    return path


def test_sparse_members_are_refused_before_their_maps_are_read(tmp_path):
    """tarfile reads a sparse member's map with no cap: an old-GNU sparse header's chain of extension
    headers (356 KB of archive held 322 MB and 8 s, before any size or signature check; cut short, an
    IndexError reply), a pax GNU.sparse 1.0 map in the data (40 KB: 16 s, 190 MB). A bundle's archive
    has no sparse member (pack() makes none): refused at its header."""
    s = store(tmp_path)
    chain = _old_gnu_sparse(tmp_path / "chain.tar.gz", 20_000)
    cut = _old_gnu_sparse(tmp_path / "cut.tar.gz", 0)
    ten = tmp_path / "gnu10.tar.gz"
    info = tarfile.TarInfo("b/model.onnx")
    info.size = MiB
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": "1000"}
    with gzip.open(ten, "wb") as g:
        g.write(info.tobuf(tarfile.PAX_FORMAT) + b"%d\n" % 10**12 + b"1\n" * 1_000_000)
    for i, archive in enumerate((chain, cut, ten)):
        t = time.monotonic()
        with pytest.raises(DeployError, match="sparse member"):
            s.fetch(DeployCommand(id=str(i), path=str(archive)))
        assert time.monotonic() - t < 2, archive.name
    assert left_in(s) == []


def test_packed_bundle_round_trips_through_the_store(tmp_path):
    s = store(tmp_path)
    b = make_bundle(tmp_path / "b")
    (b / "stray.txt").write_text("the operator's notes")  # pack() carries only what the manifest lists
    p = s.fetch(DeployCommand(id="1", path=str(pack(b, tmp_path / "b.tar.gz"))))
    assert sorted(x.name for x in p.iterdir()) == ["labels.txt", "manifest.json", "model.onnx"]
    assert Bundle.load(p).labels == ["a", "b"]


# ---- 3: the manifest lists every file it holds, model and labels included, all inside ----------
@pytest.mark.parametrize("change, words", [
    (lambda m: m["files"].pop("model.onnx"), "model_file 'model.onnx' is not listed in files"),
    (lambda m: m["files"].pop("labels.txt"), "labels_file 'labels.txt' is not listed in files"),
    (lambda m: m.update(model_file="/etc/passwd"), "relative path inside the bundle"),
    (lambda m: m.update(model_file="../b/model.onnx"), "relative path inside the bundle"),
    (lambda m: m.update(labels_file="a\\labels.txt"), "relative path inside the bundle"),
    (lambda m: m["files"].update({"x\x00y": m["files"]["labels.txt"]}), "relative path inside the bundle"),
    (lambda m: m["files"].update({"../../etc/passwd": m["files"]["labels.txt"]}), "relative path inside"),
])
def test_manifest_paths_inside_and_model_listed(tmp_path, change, words):
    b = edit(make_bundle(tmp_path / "b"), change)
    with pytest.raises(BadInput, match=words):
        Bundle.load(b)


def test_signature_covers_the_model(tmp_path):
    """Today's attack: sign a manifest whose files omit the model, then swap the model."""
    _, pub = new_keys(tmp_path / "keys")
    b = edit(make_bundle(tmp_path / "b"), lambda m: m["files"].pop("model.onnx"))
    with pytest.raises(BadInput, match="not listed in files"):
        sign(b, tmp_path / "keys" / "private.pem")
    # a listed model swapped after signing is caught, and an unlisted file is refused
    good = make_bundle(tmp_path / "good")
    sign(good, tmp_path / "keys" / "private.pem")
    assert verify(good, [pub])
    (good / "plugin.so").write_bytes(b"\x7fELF")
    with pytest.raises(BadInput, match="plugin.so is not listed"):
        verify(good, [pub])
    (good / "plugin.so").unlink()
    (good / "model.onnx").write_bytes(b"\x09fake-model" * 64)  # same size, other bytes
    with pytest.raises(BadInput, match="checksum mismatch for model.onnx"):
        verify(good, [pub])


# ---- 4: declared sizes before hashing --------------------------------------------------------
def test_declared_sizes_are_checked_before_hashing(tmp_path):
    b = make_bundle(tmp_path / "b")
    big = b / "big.bin"
    with open(big, "wb") as f:  # sparse: costs no disk, would cost minutes to hash
        f.truncate(3 << 30)
    edit(b, lambda m: m["files"].update({"big.bin": {"size": 3 << 30, "sha256": "0" * 64}}))
    t = time.monotonic()
    with pytest.raises(BadInput, match="over the bundle limit"):
        Bundle.load(b)
    edit(b, lambda m: m["files"].update({"big.bin": {"size": 10, "sha256": "0" * 64}}))
    with pytest.raises(BadInput, match=r"checksum mismatch for big.bin \(size 3221225472"):
        Bundle.load(b, max_bytes=4 << 30)
    assert time.monotonic() - t < 1.0


# ---- 5: manifest parsing: one line, never a traceback ------------------------------------------
def _set_input(**kw):
    return lambda m: m["inputs"][0].update(kw)


@pytest.mark.parametrize("content, words", [
    (b'{"name": "\xff\xfe"}', "not UTF-8"),
    (b"[" * 100_000, "nested too deeply"),
    (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "nested too deeply"),
    (b"[1, 2]", "not a JSON object"),
    (b" " * (5 * MiB), "over the limit"),
    (_set_input(dtype="complex1024"), "inputs.0.dtype"),
    (_set_input(dtype="object"), "inputs.0.dtype"),
    (_set_input(shape=[1, 1, "28x", 28]), "inputs.0.shape"),
    (_set_input(shape=[1, 3, 20000, 20000]), "over the limit"),
    (_set_input(shape=[1, 1, 0, 28]), "a dimension of 0"),
    (_set_input(shape=[1, 1, True, 28]), "inputs.0.shape"),
    (_set_input(std=[0.0]), "std must not be 0"),
    (lambda m: m["target"].update(threads="lots"), "threads"),
    (lambda m: m["target"].update(threads=100000), "threads"),
    (lambda m: m["target"].update(latency_budget_ms=float("inf")), "latency_budget_ms"),
    (lambda m: m["target"].update(latency_budget_ms=-1), "latency_budget_ms"),
    (lambda m: m["target"].update(execution_providers="CUDAExecutionProvider"), "execution_providers"),
    (lambda m: m["files"]["model.onnx"].update(size="12"), "size"),
    (lambda m: m["files"]["model.onnx"].update(sha256=["x"]), "sha256"),
])
def test_bad_manifests_are_one_line(tmp_path, content, words):
    b = make_bundle(tmp_path / "b")
    if isinstance(content, bytes):
        (b / "manifest.json").write_bytes(content)
    else:
        edit(b, content)
    with pytest.raises(BadInput, match=words) as e:
        Bundle.load(b)
    assert "\n" not in str(e.value) and len(str(e.value)) < 500


def test_manifest_symlink_and_labels_files(tmp_path):
    b = make_bundle(tmp_path / "b")
    (b / "labels.txt").unlink()
    with pytest.raises(BadInput, match="labels file not found"):
        _ = Bundle.load(b, verify=False).labels
    (b / "labels.txt").write_bytes(b"\xff\xfe\x00bin")
    with pytest.raises(BadInput, match="not UTF-8"):
        _ = Bundle.load(b, verify=False).labels
    link = tmp_path / "link"
    link.mkdir()
    os.symlink(b / "manifest.json", link / "manifest.json")
    with pytest.raises(BadInput, match="not a regular file|cannot read"):
        Bundle.load(link)


# ---- 6: signature files --------------------------------------------------------------------
@pytest.mark.parametrize("sig, words", [
    (json.dumps({"alg": "ed25519", "key_id": ["a"], "signature": "AAAA"}).encode(), "malformed signature file"),
    (json.dumps({"alg": "ed25519", "key_id": {"a": {"b": 1}}, "signature": "AAAA"}).encode(), "malformed"),
    (json.dumps({"alg": "ed25519", "key_id": "x", "signature": "!!"}).encode(), "malformed signature file"),
    (json.dumps(["key_id"]).encode(), "malformed signature file"),
    (b'{"key_id":' * 100 + b"1" + b"}" * 100, "malformed signature file"),
    (b"[" * 3000, "nested too deeply"),
    (b"\xff\xfe\x00", "not UTF-8"),
    (b" " * 10_000, "over the limit"),
])
def test_hostile_signature_files_are_one_line(tmp_path, sig, words):
    _, pub = new_keys(tmp_path / "keys")
    b = make_bundle(tmp_path / "b")
    (b / "signature").write_bytes(sig)
    with pytest.raises(BadInput, match=words):
        verify(b, [pub])


def test_signature_is_checked_before_any_file_is_hashed(tmp_path):
    _, pub = new_keys(tmp_path / "keys")
    b = make_bundle(tmp_path / "b")
    sign(b, tmp_path / "keys" / "private.pem")
    with open(b / "big.bin", "wb") as f:
        f.truncate(1 << 30)
    edit(b, lambda m: m["files"].update({"big.bin": {"size": 1 << 30, "sha256": "0" * 64}}))
    t = time.monotonic()
    with pytest.raises(BadInput, match="bad signature"):
        verify(b, [pub])
    assert time.monotonic() - t < 0.5


# ---- 7: the store keeps current + keep_bundles good ones and removes everything else ----------
def test_refused_bundles_are_removed_and_old_ones_pruned(tmp_path):
    _, pub = new_keys(tmp_path / "keys")
    s = store(tmp_path, keys=[pub], keep=2)
    unsigned = make_bundle(tmp_path / "unsigned")
    for i in range(3):
        with pytest.raises(DeployError, match="not signed"):
            s.fetch(DeployCommand(id=f"r{i}", path=str(unsigned)))
    assert left_in(s) == []

    deployed = []
    for i in range(5):
        b = make_bundle(tmp_path / f"g{i}", labels=f"v{i}\n")
        sign(b, tmp_path / "keys" / "private.pem")
        p = s.fetch(DeployCommand(id=f"g{i}", path=str(b)))
        assert s.verify(p)["signed_by"]
        s.set_current(p)
        deployed.append(p)
    assert s.candidates() == deployed[::-1][:3]  # current, then the two previous good ones
    assert left_in(s) == sorted(p.name for p in deployed[-3:])

    # a bundle that verified but failed its health check is discarded; the kept ones are not (g0 signed again:
    # as it was first signed, it could read as signed before g4, the newest run here, and be refused as a replay)
    sign(tmp_path / "g0", tmp_path / "keys" / "private.pem", signed_at=s.newest_signed_at())
    p = s.fetch(DeployCommand(id="h", path=str(tmp_path / "g0")))
    s.discard(p)
    s.discard(deployed[-2])
    assert left_in(s) == sorted(p.name for p in deployed[-3:])


def test_leftovers_of_a_crash_are_removed_at_start(tmp_path):
    s = store(tmp_path)
    good = s.fetch(DeployCommand(id="1", path=str(make_bundle(tmp_path / "b"))))
    s.set_current(good)
    (s.root / ".20260101-000000-abc.partial").write_bytes(b"half a download")  # kill -9 mid-download
    (s.root / "20260101-000000-half").mkdir()  # kill -9 mid-unpack
    (s.root / "20260101-000000-half" / "model.onnx").write_bytes(b"x")
    os.symlink(good, s.state / ".current.12345")
    s2 = store(tmp_path)
    assert left_in(s2) == [good.name] and not (s2.state / ".current.12345").is_symlink()
    assert s2.current() == good and s2.candidates() == [good]


# ---- 8, 9: downloads -------------------------------------------------------------------------
class _Server:
    """A real HTTP server on a loopback port with a few hostile routes."""

    def __init__(self, archive: bytes):
        stop = self.stop = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                try:
                    if self.path == "/b.tar.gz":
                        self._send(archive)
                    elif self.path == "/to-ftp":
                        self.send_response(302)
                        self.send_header("Location", "ftp://127.0.0.1/b.tar.gz")
                        self.end_headers()
                    elif self.path == "/to-ok":
                        self.send_response(301)
                        self.send_header("Location", "/b.tar.gz")
                        self.end_headers()
                    elif self.path.startswith("/hop/"):  # /hop/N redirects N times, then to the archive
                        n = int(self.path.rsplit("/", 1)[1])
                        self.send_response(302)
                        self.send_header("Location", f"/hop/{n - 1}" if n > 1 else "/b.tar.gz")
                        self.end_headers()
                    elif self.path == "/big":  # no Content-Length: the running count must stop it
                        self.send_response(200)
                        self.end_headers()
                        for _ in range(64):
                            self.wfile.write(b"\0" * MiB)
                    elif self.path == "/trickle":
                        self.send_response(200)
                        self.send_header("Content-Length", "1000")
                        self.end_headers()
                        while not stop.wait(0.2):
                            self.wfile.write(b"x")
                            self.wfile.flush()
                except OSError:
                    pass  # the client hung up: what the tests want

            def _send(self, data):
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.srv.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}"
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def close(self):
        self.stop.set()
        self.srv.shutdown()
        self.srv.server_close()


@pytest.fixture
def server(tmp_path):
    archive = pack(make_bundle(tmp_path / "served"), tmp_path / "served.tar.gz").read_bytes()
    srv = _Server(archive)
    srv.sha256 = hashlib.sha256(archive).hexdigest()
    yield srv
    srv.close()


def test_downloads_have_a_deadline_a_size_cap_and_http_only_redirects(tmp_path, server):
    s = store(tmp_path, download_timeout_s=1.5)
    p = s.fetch(DeployCommand(id="ok", url=f"{server.url}/to-ok", sha256=server.sha256))
    assert Bundle.load(p).labels == ["a", "b"]
    for path, words, budget in [("/trickle", "download_timeout_s", 4), ("/to-ftp", "redirect to ftp:// refused", 1),
                                ("/big", "exceeds max_download_bytes", 3)]:
        t = time.monotonic()
        with pytest.raises(DeployError, match=words):
            s.fetch(DeployCommand(id="x", url=server.url + path))
        assert time.monotonic() - t < budget, path
    assert left_in(s) == [p.name]  # no partial download, no unpack directory


def test_a_download_follows_at_most_five_redirects(tmp_path, server):
    """Each redirect is another request the deadline and the size cap must cover: five are followed (a CDN's
    chain), a sixth is refused in one line."""
    s = store(tmp_path)
    assert Bundle.load(s.fetch(DeployCommand(id="5", url=f"{server.url}/hop/5", sha256=server.sha256))).labels
    with pytest.raises(DeployError, match="redirect"):
        s.fetch(DeployCommand(id="6", url=f"{server.url}/hop/6"))


def test_archive_sha256_is_checked_before_unpacking(tmp_path, server):
    s = store(tmp_path)
    with pytest.raises(DeployError, match=r"downloaded archive sha256 [0-9a-f]{16}… differs from the command's "
                                          r"0123456789abcdef…$"):
        s.fetch(DeployCommand(id="x", url=f"{server.url}/b.tar.gz", sha256="0123456789abcdef" * 4))
    with pytest.raises(DeployError, match="differs from the command's"):
        s.fetch(DeployCommand(id="y", path=str(tmp_path / "served.tar.gz"), sha256="0" * 64))
    assert left_in(s) == []


def test_gzip_garbage_and_truncated_archives_are_one_line(tmp_path):
    s = store(tmp_path)
    good = pack(make_bundle(tmp_path / "b"), tmp_path / "b.tar.gz").read_bytes()
    for name, data in [("garbage.tar.gz", os.urandom(5000)), ("cut.tar.gz", good[: len(good) // 2]),
                       ("bomb.tar.gz", gzip.compress(b"\0" * (8 * MiB)))]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DeployError, match="cannot unpack|no bundle"):
            s.fetch(DeployCommand(id="x", path=str(tmp_path / name)))
    assert left_in(s) == []


def test_staging_replaces_only_a_bundle_and_gives_the_umask_mode(tmp_path):
    """A bundle is staged beside its place and moved in: it replaces a bundle, never a folder of the
    user's (that was deleted without a word), and its folder gets the mode the umask gives a new one
    (mkdtemp's 0700 kept a service user out)."""
    import stat

    from lepton_edge.bundle import _umask, check_replaceable, staging

    old = os.umask(0o027)
    try:
        assert _umask() == 0o027
        final = str(tmp_path / "b")  # a str, as a caller may give
        for version in ("1", "2"):  # written, then replaced: it is a bundle
            with staging(final) as d:
                (d / "manifest.json").write_text(version)
        assert (tmp_path / "b" / "manifest.json").read_text() == "2"
        assert stat.S_IMODE((tmp_path / "b").stat().st_mode) == 0o750
        check_replaceable(str(tmp_path / "nothing-there"))
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "thesis.txt").write_text("mine")
        for target in (str(tmp_path / "mine"), tmp_path / "mine"):
            with pytest.raises(BadInput, match="is not a bundle"), staging(target) as d:
                (d / "manifest.json").write_text("3")
        assert (tmp_path / "mine" / "thesis.txt").read_text() == "mine"
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
        (tmp_path / "link").symlink_to(tmp_path / "b")
        with pytest.raises(BadInput) as e:
            check_replaceable(tmp_path / "link")
        assert str(e.value) == (f"{tmp_path / 'link'} is a symbolic link: a bundle is written as a folder of its own; "
                                "remove the link or choose another --out or --name")
    finally:
        os.umask(old)


def test_a_manifest_std_that_is_not_finite_is_refused():
    """std inf made every pixel 0 and NaN every pixel NaN: neither is a normalisation."""
    import pydantic

    from lepton_edge.bundle import InputSpec

    for bad in (float("nan"), float("inf")):
        with pytest.raises(pydantic.ValidationError, match="finite number"):
            InputSpec(name="x", shape=[1, 3, 8, 8], std=[bad])


def test_json_nested_past_the_parser_is_one_line():
    from lepton_edge.bundle import parse_json
    from lepton_edge.errors import BadInput

    with pytest.raises(BadInput) as e:
        parse_json(b"[" * 200_000 + b"]" * 200_000, "m.json", "manifest")
    assert str(e.value) == "m.json: invalid manifest (nested too deeply)"


@pytest.mark.root
def test_a_state_disk_out_of_inodes_refuses_a_deploy_as_a_full_disk(tmp_path):
    """No inode left for the new bundle's folder: an OSError out of fetch(), which the agent replied as
    'OSError: [Errno 28] ...' with an `error` event. It is the full disk's DeployError now, nothing left."""
    src = make_bundle(tmp_path / "src")
    with tmpfs(tmp_path / "state", "size=1m,nr_inodes=16") as state:
        s = BundleStore(state, [], 4 * MiB)
        n = 0
        try:
            while True:
                (state / f"f{n}").touch()
                n += 1
        except OSError:
            pass
        with pytest.raises(DeployError, match="cannot store the bundle in .*: No space left on device"):
            s.fetch(DeployCommand(id="1", path=str(src)))
        assert left_in(s) == []


@pytest.mark.root
def test_an_archive_that_fills_the_disk_as_it_unpacks_is_named_a_full_disk_not_a_broken_archive(tmp_path):
    """The reply said 'cannot unpack b.tar.gz: [Errno 28] ...', which reads as a damaged archive."""
    src = make_bundle(tmp_path / "src", model=os.urandom(600 << 10))
    archive = pack(src, tmp_path / "b.tar.gz")
    with tmpfs(tmp_path / "state", "size=256k") as state:
        s = BundleStore(state, [], 4 * MiB)
        with pytest.raises(DeployError, match=r"^no room to unpack b\.tar\.gz in .*: No space left on device"):
            s.fetch(DeployCommand(id="1", path=str(archive)))
        assert left_in(s) == []
