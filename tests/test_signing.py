"""lepton_edge/signing.py in the fast tier: keys, the signature file, and every refusal as one line.

Why beside test_bundle_hardening.py: those tests attack the bundle; these pin the signing contract
itself (what a key file may be, what a signature file must hold, which key verifies), so a change
that weakens one check fails here, not in a five-minute agent test.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from lepton_edge.bundle import InputSpec, Manifest, OutputSpec, write_manifest
from lepton_edge.errors import BadInput
from lepton_edge.signing import (
    key_id,
    load_public,
    new_keys,
    read_signature,
    sign,
    verify,
)
from tmpfs import tmpfs


def _bundle(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.onnx").write_bytes(b"\x08model" * 32)
    write_manifest(d, Manifest(name="s", created="2026-01-01", target={"id": "x86-cpu"}, format="onnx",
                               precision="fp32", model_file="model.onnx",
                               inputs=[InputSpec(name="i", shape=[1, 3, 8, 8])],
                               outputs=[OutputSpec(name="o", shape=[1, 2])]))
    return d


def test_new_keys_private_is_owner_only_and_never_overwritten(tmp_path):
    out = tmp_path / "keys"
    out.mkdir()  # an existing, empty directory is fine
    priv, pub = new_keys(out)
    assert priv.stat().st_mode & 0o777 == 0o600
    assert priv.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    before = priv.read_bytes()
    with pytest.raises(BadInput, match="exists; refusing to overwrite a private key"):
        new_keys(out)
    assert priv.read_bytes() == before


def test_key_id_is_the_sha256_prefix_of_the_raw_public_key(tmp_path):
    from cryptography.hazmat.primitives import serialization

    _, pub = new_keys(tmp_path / "k")
    key = load_public(pub)
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key_id(key) == hashlib.sha256(raw).hexdigest()[:16]


def test_public_key_files_that_are_refused(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    with pytest.raises(BadInput, match="trusted key not found: .*missing.pem"):
        load_public(tmp_path / "missing.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key\n")
    with pytest.raises(BadInput, match="junk.pem: not a PEM public key"):
        load_public(junk)
    other = tmp_path / "ec.pem"
    other.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(BadInput, match="ec.pem: not an Ed25519 public key"):
        load_public(other)
    with pytest.raises(BadInput, match="key not found"):
        sign(_bundle(tmp_path / "b"), tmp_path / "nope.pem")
    with pytest.raises(BadInput, match="not an unencrypted PEM private key"):
        sign(_bundle(tmp_path / "b"), junk)


def test_signature_file_contents(tmp_path):
    priv, pub = new_keys(tmp_path / "k")
    b = _bundle(tmp_path / "b")
    with pytest.raises(BadInput, match="is not signed; trusted keys are configured"):
        read_signature(b)
    sig_path = sign(b, priv)
    sig = json.loads(sig_path.read_text())
    assert sig["alg"] == "ed25519" and sig["key_id"] == key_id(load_public(pub))
    kid, raw, when, timed = read_signature(b)
    assert kid == sig["key_id"] and raw == base64.b64decode(sig["signature"]) and len(raw) == 64
    assert when == sig["signed_at"] and abs(when - time.time()) < 60
    assert timed == base64.b64decode(sig["timed_signature"])
    assert verify(b, [pub]) == kid  # a PEM path
    assert verify(b, [str(pub)]) == kid  # a path as text
    assert verify(b, [load_public(pub)]) == kid  # a loaded key
    for bad in ({"alg": "rsa", "key_id": kid, "signature": sig["signature"]}, {"key_id": kid},
                {"key_id": 5, "signature": sig["signature"]}, {"key_id": kid, "signature": "!!not base64!!"}, [],
                *({**sig, "signed_at": w} for w in (-1, 1.5, "1", True, 1 << 40, [1], None)),
                {**sig, "timed_signature": 5}, {k: v for k, v in sig.items() if k != "timed_signature"}):
        sig_path.write_text(json.dumps(bad))
        with pytest.raises(BadInput, match="malformed signature file"):
            read_signature(b)
    sig_path.write_text("{not json")
    with pytest.raises(BadInput):
        read_signature(b)
    sig_path.write_text(json.dumps({"key_id": "f" * 16, "signature": sig["signature"]}))  # alg may be left out
    with pytest.raises(BadInput, match="signed with key 'ffffffffffffffff', which is not trusted here"):
        verify(b, [pub])
    sig_path.write_text(json.dumps({"key_id": kid, "signature": base64.b64encode(b"\0" * 64).decode()}))
    with pytest.raises(BadInput, match="bad signature"):
        verify(b, [pub])


def test_the_signing_time_is_signed_and_a_signature_from_before_signing_times_still_verifies(tmp_path):
    """The time is what the agent's downgrade check reads: whoever can edit the signature file must
    not be able to make an old bundle look newly signed. The untimed signature stays the manifest's
    alone, as earlier versions wrote it, so their agents still verify a bundle signed now."""
    from cryptography.hazmat.primitives import serialization

    from lepton_edge.signing import verified

    priv, pub = new_keys(tmp_path / "k")
    b = _bundle(tmp_path / "b")
    sig_path = sign(b, priv, signed_at=1_000)
    assert verified(b, [pub]).signed_at == 1_000
    sig = json.loads(sig_path.read_text())
    key = serialization.load_pem_private_key(priv.read_bytes(), password=None)
    manifest = (b / "manifest.json").read_bytes()
    load_public(pub).verify(base64.b64decode(sig["signature"]), manifest)  # what an earlier agent checks
    for forged in ({**sig, "signed_at": 2_000},
                   {**sig, "signature": base64.b64encode(key.sign(manifest + b" ")).decode()}):
        sig_path.write_text(json.dumps(forged))
        with pytest.raises(BadInput, match="bad signature"):
            verify(b, [pub])
    # stripped of its time (or from an earlier `sign`): verifies, as signed at time 0
    sig_path.write_text(json.dumps({k: v for k, v in sig.items() if k not in ("signed_at", "timed_signature")}))
    assert verified(b, [pub]) == verified(b, [str(pub)]) and verified(b, [pub]).signed_at == 0
    with pytest.raises(BadInput, match="signing time"):
        sign(b, priv, signed_at=-5)


def test_sign_refuses_a_bundle_whose_files_do_not_match(tmp_path):
    priv, _ = new_keys(tmp_path / "k")
    b = _bundle(tmp_path / "b")
    (b / "model.onnx").write_bytes(b"\x09model" * 32)
    with pytest.raises(BadInput, match="checksum mismatch for model.onnx"):
        sign(b, priv)
    assert not (b / "signature").exists()


def test_keys_and_signatures_never_go_through_a_link_or_read_without_end(tmp_path):
    """`sign` wrote the signature through a `signature` symlink (overwriting the file it named), `keys new`
    put the private key where a dangling `private.pem` link pointed, a key of /dev/zero read until memory
    ran out and a FIFO blocked; a trusted key given as one path (not a list) read '/' as a key file."""
    import os

    priv, pub = new_keys(tmp_path / "k")
    b = _bundle(tmp_path / "b")
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    (b / "signature").symlink_to(victim)
    sign(b, priv)
    assert victim.read_text() == "mine" and not (b / "signature").is_symlink()
    assert verify(b, pub) == verify(b, [pub])  # one key alone, or in a list
    (tmp_path / "k2").mkdir()
    (tmp_path / "k2" / "private.pem").symlink_to(tmp_path / "leaked.pem")
    with pytest.raises(BadInput, match="refusing to overwrite"):
        new_keys(tmp_path / "k2")
    assert not (tmp_path / "leaked.pem").exists()
    (tmp_path / "k3").mkdir()
    (tmp_path / "k3" / "public.pem").symlink_to(victim)
    new_keys(tmp_path / "k3")
    assert victim.read_text() == "mine" and load_public(tmp_path / "k3" / "public.pem")
    os.mkfifo(tmp_path / "fifo.pem")
    for bad, why in (("/dev/zero", "not a regular file"), (tmp_path / "fifo.pem", "not a regular file"),
                     (tmp_path / "k", "not a regular file")):
        with pytest.raises(BadInput, match=why):
            sign(b, bad)
        with pytest.raises(BadInput, match=why):
            load_public(bad)
    big = tmp_path / "big.pem"
    big.write_bytes(b"-" * (1 << 20))
    with pytest.raises(BadInput, match="larger than 64 KB"):
        sign(b, big)


def test_every_refusal_says_exactly_what_and_where(tmp_path):
    """Each message whole (a user reads it on a device's log, and a script may match it), the key files'
    modes, and the size limits at their exact edge."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    def says(fn, *args) -> str:
        with pytest.raises(BadInput) as e:
            fn(*args)
        return str(e.value)

    priv, pub = new_keys(str(tmp_path / "k"))  # a str path too
    assert (priv.stat().st_mode & 0o777, pub.stat().st_mode & 0o777) == (0o600, 0o644)
    assert says(new_keys, tmp_path / "k") == f"{priv} exists; refusing to overwrite a private key"
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_priv, ec_pub = tmp_path / "ec.pem", tmp_path / "ec-pub.pem"
    ec_priv.write_bytes(ec_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    ec_pub.write_bytes(ec_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo))
    b = _bundle(tmp_path / "b")
    assert says(sign, b, ec_priv) == f"{ec_priv}: not an Ed25519 key (make one with `lepton-edge keys new`)"
    assert says(load_public, ec_pub) == f"{ec_pub}: not an Ed25519 public key"
    junk = tmp_path / "junk.pem"
    junk.write_text("x")
    assert says(sign, b, junk).startswith(f"{junk}: not an unencrypted PEM private key (")
    assert says(load_public, junk).startswith(f"{junk}: not a PEM public key (")
    assert says(read_signature, b) == (f"bundle {b} is not signed; trusted keys are configured, so unsigned "
                                       "bundles are refused")
    sig_path = sign(b, priv)
    good = json.loads(sig_path.read_text())
    for bad in ([], {"key_id": good["key_id"], "signature": "!!"}):
        sig_path.write_text(json.dumps(bad))
        assert says(read_signature, b) == f"bundle {b}: malformed signature file"
    sig_path.write_text(json.dumps({"key_id": "f" * 100, "signature": good["signature"]}))
    assert says(verify, b, [pub]) == f"bundle {b}: signed with key {'f' * 64!r}, which is not trusted here"
    sig_path.write_text(json.dumps({"key_id": good["key_id"], "signature": base64.b64encode(b"\0" * 64).decode()}))
    assert says(verify, b, [pub]) == (f"bundle {b}: bad signature "
                                      "(the manifest or its signing time changed after signing)")
    body = json.dumps(good)
    sig_path.write_text(body + " " * (4096 - len(body)))  # the limit itself: read
    assert read_signature(b)[0] == good["key_id"]
    sig_path.write_text(body + " " * (4097 - len(body)))
    assert "over the limit of 4096" in says(read_signature, b)
    pem = priv.read_bytes()
    big = tmp_path / "big.pem"
    big.write_bytes(pem + b"\n" * (64 * 1024 - len(pem)))  # 64 KiB exactly: still a key
    assert sign(b, big).is_file()
    big.write_bytes(pem + b"\n" * (64 * 1024 + 1 - len(pem)))
    assert says(sign, b, big) == f"key {big}: larger than 64 KB"


@pytest.mark.root
def test_signing_a_bundle_on_a_full_disk_is_one_line_and_writes_nothing(tmp_path):
    """The signature could not be written (a full disk): an OSError traceback, exit 1. One line now,
    and the bundle is as it was (no signature, no temporary file beside it)."""
    priv, _ = new_keys(tmp_path / "keys")
    with tmpfs(tmp_path / "disk", "size=256k") as disk:
        b = _bundle(disk / "b")
        with contextlib.suppress(OSError), open(disk / "filler", "wb") as f:
            while True:
                f.write(bytes(4096))
                f.flush()
        before = sorted(p.name for p in b.iterdir())
        with pytest.raises(BadInput, match="cannot write the signature .No space left on device"):
            sign(b, priv)
        assert sorted(p.name for p in b.iterdir()) == before and "signature" not in before


@pytest.mark.root
def test_new_keys_on_a_disk_with_room_for_one_key_leaves_no_half_pair(tmp_path):
    """Room for private.pem but not public.pem: the private key stayed alone, and every later `keys new`
    there refused to overwrite it, space or not. Now neither is left, and the next try makes both."""
    with tmpfs(tmp_path / "disk", "size=64k") as disk:
        (disk / "k").mkdir()
        with contextlib.suppress(OSError), open(disk / "filler", "wb") as f:
            while os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize > 4096:  # one page: one key file
                f.write(bytes(4096))
                f.flush()
        with pytest.raises(OSError):
            new_keys(disk / "k")
        assert os.listdir(disk / "k") == []
        (disk / "filler").unlink()
        priv, pub = new_keys(disk / "k")
        assert priv.is_file() and pub.is_file()


@pytest.mark.root
def test_new_keys_on_a_disk_out_of_inodes_leaves_no_empty_folders(tmp_path):
    """Inodes for the --out folders but none for a key: `keys new` failed and left the folders it had made,
    empty. Now the folders it made go too (and a folder that was there before stays)."""
    with tmpfs(tmp_path / "disk", "size=1m,nr_inodes=4") as disk:
        (disk / "there").mkdir()  # the root and this: two of the four inodes
        with pytest.raises(OSError):
            new_keys(disk / "there" / "a" / "keys")  # two folders made, no inode left for private.pem
        assert os.listdir(disk) == ["there"] and os.listdir(disk / "there") == []
