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
from lepton_edge.errors import BadInput
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


def _signed(tmp_path: Path, name: str, key: Path, at: int | None) -> Path:
    from lepton_edge.signing import sign

    d = _bundle(tmp_path / name, model=name.encode() * 20)
    if at is None:  # a signature file from before signing times: the manifest's bytes alone
        import base64
        import json

        from cryptography.hazmat.primitives import serialization

        from lepton_edge.signing import key_id

        k = serialization.load_pem_private_key(key.read_bytes(), password=None)
        sig = k.sign((d / "manifest.json").read_bytes())
        (d / "signature").write_text(json.dumps({"alg": "ed25519", "key_id": key_id(k.public_key()),
                                                 "signature": base64.b64encode(sig).decode()}))
    else:
        sign(d, key, signed_at=at)
    return d


def test_a_bundle_signed_before_the_newest_one_run_here_is_refused_as_a_replay(tmp_path):
    """A signature never expires: without the signing time, whoever can publish a deploy could send
    back any bundle ever signed (an old or known-bad model) and it would verify."""
    from lepton_edge.signing import new_keys

    priv, pub = new_keys(tmp_path / "keys")
    old, new, legacy = (_signed(tmp_path, "old", priv, 1_000), _signed(tmp_path, "new", priv, 2_000),
                        _signed(tmp_path, "legacy", priv, None))

    def store() -> BundleStore:
        return BundleStore(tmp_path / "state", [pub], 1 << 20, max_bundle_bytes=1 << 20)

    s = store()
    assert s.newest_signed_at() == 0
    s.set_current(s.fetch(DeployCommand(id="1", path=str(new))))
    assert s.newest_signed_at() == 2_000
    for src, words in ((old, "was signed at 1970-01-01 00:16:40 UTC"),
                       (legacy, "has no signing time (signed by an older lepton-edge)")):
        with pytest.raises(DeployError) as e:
            store().fetch(DeployCommand(id="2", path=str(src)))  # a restart keeps the mark
        assert str(e.value) == (f"the bundle {words}, before the newest bundle this device has run (signed at "
                                "1970-01-01 00:33:20 UTC): refused as a possible replay. To roll back on purpose, "
                                "sign the older bundle again (lepton-edge sign) and deploy that")
        assert sorted(p.name for p in s.root.iterdir()) == [s.current().name]  # nothing of it stays
    again = s.fetch(DeployCommand(id="3", path=str(new)))  # the same signing time: the same bundle again
    s.set_current(again)
    # rolling back on purpose: the old bundle signed again
    s.set_current(s.fetch(DeployCommand(id="4", path=str(_signed(tmp_path, "old-again", priv, 3_000)))))
    assert s.newest_signed_at() == 3_000
    # the mark never goes down: pointing `current` back at an older bundle (a fall back at start) keeps it
    s.set_current(again)
    assert store().newest_signed_at() == 3_000
    with pytest.raises(DeployError, match="possible replay"):
        s.fetch(DeployCommand(id="5", path=str(new)))


def test_a_state_directory_from_before_the_mark_takes_it_from_the_current_bundle(tmp_path):
    """An agent upgraded in place has a `current` but no mark file: the current bundle's own
    signing time is the mark, so the upgrade opens no window for a replay."""
    from lepton_edge.agent.deploy import NEWEST_SIGNED
    from lepton_edge.signing import new_keys

    priv, pub = new_keys(tmp_path / "keys")
    s = BundleStore(tmp_path / "state", [pub], 1 << 20, max_bundle_bytes=1 << 20)
    s.set_current(s.fetch(DeployCommand(id="1", path=str(_signed(tmp_path, "new", priv, 2_000)))))
    (s.state / NEWEST_SIGNED).unlink()
    (s.state / NEWEST_SIGNED).with_name(f".{NEWEST_SIGNED}.123").write_text("9")  # a crash's leftover
    s = BundleStore(tmp_path / "state", [pub], 1 << 20, max_bundle_bytes=1 << 20)
    assert s.newest_signed_at() == 2_000 and not list(s.state.glob(f".{NEWEST_SIGNED}.*"))
    with pytest.raises(DeployError, match="possible replay"):
        s.fetch(DeployCommand(id="2", path=str(_signed(tmp_path, "old", priv, 1_000))))
    # without trusted keys nothing is signed, so there is no mark and no refusal
    plain = BundleStore(tmp_path / "state2", [], 1 << 20, max_bundle_bytes=1 << 20)
    plain.set_current(plain.fetch(DeployCommand(id="3", path=str(tmp_path / "new"))))
    plain.fetch(DeployCommand(id="4", path=str(tmp_path / "old")))


def test_a_path_deploy_reads_only_inside_the_deploy_directories(tmp_path):
    """A command's `path` could name any file on the device: the reply said whether it existed, and its
    sha256 was compared with the command's (a guessed content confirmed). Now a path outside the
    deploy directories is refused, the same way whether or not it exists, before anything is read."""
    allowed = tmp_path / "incoming"
    allowed.mkdir()
    inside = _bundle(allowed / "b")
    elsewhere = _bundle(tmp_path / "elsewhere")
    (allowed / "link").symlink_to(tmp_path / "elsewhere")  # a link inside that leads out
    s = BundleStore(tmp_path / "state", [], 1 << 20, max_bundle_bytes=1 << 20, deploy_dirs=[allowed])
    assert (s.state / "incoming").is_dir()  # the default directory is made, ready for an upload
    assert (s.fetch(DeployCommand(id="1", path=str(inside))) / "model.onnx").is_file()
    said = set()
    for path in (elsewhere, tmp_path / "no-such-bundle", allowed / "link", allowed / ".." / "elsewhere",
                 Path("incoming/b"), Path("/etc/hostname"),
                 # realpath drops `missing/..` as text, the kernel does not: inside by its spelling only
                 allowed / "no-such-dir" / ".." / "b", Path(f"{allowed}/../../../etc/../{allowed}/b")):
        with pytest.raises(DeployError, match="is outside the directories this device deploys from") as e:
            s.fetch(DeployCommand(id="2", path=str(path), sha256="0" * 64))
        said.add(str(e.value).replace(repr(str(path)[:200]), "PATH"))
    assert len(said) == 1  # one message, whatever lies at the path: nothing to learn from it
    assert len(list(s.root.iterdir())) == 1  # (the one fetched above; no refused copy stays)


def test_the_agents_deploy_directories_default_to_incoming_and_must_be_absolute(tmp_path):
    from lepton_edge.agent.config import load

    cfg = load(None, {"state_dir": tmp_path / "s", "device_id": "d"})
    assert cfg.deploy_dirs == [tmp_path / "s" / "incoming"]
    assert load(None, {"deploy_paths": [tmp_path], "device_id": "d"}).deploy_dirs == [tmp_path]
    for bad in (["relative/dir"], ["/"], ["//"], ["/tmp/.."]):
        with pytest.raises(BadInput, match="field 'deploy_paths': .*an absolute directory other than /"):
            load(None, {"deploy_paths": bad, "device_id": "d"})


def test_good_json_entries_that_are_not_plain_names_are_skipped(tmp_path):
    """good.json is the agent's own file, but a crash or a hand edit can leave anything in it: an entry that
    is not a string, or names a path, must never reach a path join (nor crash the start)."""
    import json

    s = _store(tmp_path)
    good = s.fetch(DeployCommand(id="1", path=str(_bundle(tmp_path / "b"))))
    s.set_current(good)
    (s.state / GOOD).write_text(json.dumps([5, None, ["x"], "", ".", "..", "a/b", good.name]))
    assert s._good() == [good.name] and s.candidates() == [good]


def test_a_good_json_past_64_kib_is_not_read(tmp_path):
    """good.json names a few bundles; one past 64 KiB (a disk error, a hand edit) is not parsed at the start
    (its bundles are then not kept as good), while one just under is read as it is."""
    import json

    s = _store(tmp_path)
    good = s.fetch(DeployCommand(id="1", path=str(_bundle(tmp_path / "b"))))
    s.set_current(good)
    pad = ["x" * 1000] * 60  # ~60 KB of names that are not bundles: read, and only the real one kept
    (s.state / GOOD).write_text(json.dumps([*pad, good.name]))
    assert (s.state / GOOD).stat().st_size < 1 << 16 and s._good() == [*pad, good.name]
    (s.state / GOOD).write_text(json.dumps([*pad, *pad[:10], good.name]))
    assert (s.state / GOOD).stat().st_size > 1 << 16 and s._good() == []


@pytest.mark.parametrize("extra, refused", [(0, False), (1, True)])
def test_extended_headers_are_capped_at_exactly_max_extended_bytes(tmp_path, extra, refused):
    """The cap is inclusive: one long-name header of exactly MAX_EXTENDED_BYTES is read (and its member then
    refused as a file the manifest does not list), one byte more is refused as extended headers."""
    import io

    from lepton_edge.agent.deploy import MAX_EXTENDED_BYTES

    archive = tmp_path / "long.tar.gz"  # (gzip: the first method tarfile tries, so its error leads the message)
    with tarfile.open(archive, "w:gz", format=tarfile.GNU_FORMAT) as tf:
        info = tarfile.TarInfo("n" * (MAX_EXTENDED_BYTES - 1 + extra))  # + the NUL: the header's size
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    s = _store(tmp_path)
    s.max_bytes = 4 << 20
    with pytest.raises(DeployError) as e:
        s.fetch(DeployCommand(id="1", path=str(archive)))
    assert ("extended headers of more than" in str(e.value)) == refused, str(e.value)[:300]


def test_an_archive_that_grows_past_the_cap_while_hashed_is_refused(tmp_path):
    """The size is checked with lstat before the hash; a file still being written (or swapped) can be
    larger by the time it is read, and the hash stops at the cap instead of reading without end."""
    import hashlib

    from lepton_edge.agent.deploy import _sha256_path

    f = tmp_path / "b.tar.gz"
    f.write_bytes(b"x" * (3 << 20))
    assert _sha256_path(f, 3 << 20) == hashlib.sha256(f.read_bytes()).hexdigest()  # exactly the cap: read whole
    with pytest.raises(DeployError, match="grew past max_download_bytes while being hashed"):
        _sha256_path(f, (1 << 20) + 5)


def test_a_store_made_without_keep_keeps_what_an_agent_config_keeps(tmp_path):
    """BundleStore's own default is the agent's (keep_bundles): current and the 2 newest good ones before it."""
    from lepton_edge.agent.config import AgentConfig

    s = _store(tmp_path)
    assert s.keep == AgentConfig.model_fields["keep_bundles"].default == 2
    made = [s.fetch(DeployCommand(id=str(i), path=str(_bundle(tmp_path / f"b{i}", b"m%d" % i * 50))))
            for i in range(4)]
    for d in made:
        s.set_current(d)
    assert sorted(p.name for p in s.root.iterdir() if not p.name.startswith(".")) == \
        sorted(d.name for d in made[1:]) + (["current"] if (s.root / "current").exists() else []), \
        list(s.root.iterdir())
    import json

    assert json.loads(s.good_file.read_text()) == [d.name for d in reversed(made[1:])]  # newest first, no more


@pytest.mark.parametrize("entries,refused", [(1016, False), (1017, True)])
def test_an_archive_may_hold_up_to_max_files_plus_16_entries(tmp_path, entries, refused):
    """MAX_FILES (1000) files a bundle may list, and up to 16 more entries for the folders a packer adds; the
    count is taken from the headers before anything is unpacked."""
    import io

    from lepton_edge.bundle import MAX_FILES

    assert MAX_FILES + 16 == 1016
    archive = tmp_path / "many.tar"
    with tarfile.open(archive, "w") as tf:
        for i in range(entries):
            info = tarfile.TarInfo(f"d{i}")
            info.type = tarfile.DIRTYPE
            tf.addfile(info, io.BytesIO(b""))
    s = _store(tmp_path)
    with tarfile.open(archive) as tf:
        if refused:
            with pytest.raises(DeployError, match="more than 1000 entries"):
                s._members(tf)
        else:
            assert len(s._members(tf)) == entries


def test_fetch_refuses_a_command_naming_neither_or_both(tmp_path):
    s = _store(tmp_path)
    for cmd in (DeployCommand.model_construct(id="1", url=None, path=None, sha256=None),
                DeployCommand.model_construct(id="2", url="http://127.0.0.1:1/b.tar.gz", path="/x", sha256=None)):
        with pytest.raises(DeployError) as e:
            s.fetch(cmd)
        assert str(e.value) == "deploy needs exactly one of 'url' or 'path'"
    assert [p for p in s.root.iterdir()] == []


def test_a_leftover_that_cannot_be_removed_does_not_stop_the_store(tmp_path, monkeypatch):
    """What a crash left under bundles/ is removed at start as far as it can be; one file that will not go
    (a read-only mount, an immutable file) must not stop the agent from starting."""
    import os

    _store(tmp_path)  # the folders
    left = tmp_path / "state" / "bundles" / "20260101-000000-abcd"
    left.mkdir()
    (left / "stuck").write_bytes(b"x")
    real = os.unlink

    def unlink(path, *a, **k):
        if str(path).endswith("stuck"):
            raise PermissionError(1, "Operation not permitted", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "unlink", unlink)
    _store(tmp_path)  # starts: the leftover stays, nothing raised
    assert (left / "stuck").exists()


def test_a_download_that_cannot_connect_names_the_url_and_why(tmp_path):
    import socket as so

    with so.socket() as sk:  # a loopback port nothing listens on
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    s = _store(tmp_path)
    url = f"http://127.0.0.1:{port}/b.tar.gz"
    with pytest.raises(DeployError) as e:
        s.fetch(DeployCommand(id="1", url=url))
    assert str(e.value).startswith(f"cannot download {url}: ") and "refused" in str(e.value).lower(), str(e.value)
    assert list(s.root.iterdir()) == []
