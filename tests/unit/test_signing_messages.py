"""The one-line refusals of signing.py as a device operator reads them (in the agent's log and in a
deploy reply): which key is missing, which signature file is malformed, which key signed a bundle no
trusted key matches; and the signature file's size cap, exactly at its limit. tests/test_signing.py
matches these by substring only. Real keys and a tiny bundle in tmp_path."""
from __future__ import annotations

import json

import pytest

from lepton_edge.bundle import InputSpec, Manifest, OutputSpec, write_manifest
from lepton_edge.errors import BadInput
from lepton_edge.signing import key_id, load_public, new_keys, read_signature, sign, verify


def _bundle(tmp_path):
    b = tmp_path / "bundle"
    b.mkdir()
    (b / "model.onnx").write_bytes(b"m" * 10)
    write_manifest(b, Manifest(name="t", created="2026-01-01", target={"id": "x86-cpu"}, format="onnx",
                               precision="fp32", model_file="model.onnx", inputs=[InputSpec(name="x", shape=[1, 4])],
                               outputs=[OutputSpec(name="y", shape=[1, 2])]))
    return b


@pytest.fixture
def signed(tmp_path):
    b = _bundle(tmp_path)
    priv, pub = new_keys(tmp_path / "keys")
    sign(b, priv)
    return b, pub


def test_a_missing_trusted_key_names_its_path(tmp_path):
    with pytest.raises(BadInput) as e:
        load_public(tmp_path / "nope.pem")
    assert str(e.value) == f"trusted key not found: {tmp_path / 'nope.pem'}"


def test_a_key_file_that_is_not_pem_names_its_path(tmp_path):
    f = tmp_path / "key.pem"
    f.write_text("not a key")
    with pytest.raises(BadInput) as e:
        load_public(f)
    assert str(e.value).startswith(f"{f}: not a PEM public key (") and str(e.value).endswith(")")


@pytest.mark.parametrize("sig", [{"alg": "rsa", "key_id": "k", "signature": "AA=="},
                                 {"key_id": "k", "signature": "not base64!"}])
def test_a_malformed_signature_file_is_one_line(signed, sig):
    b, pub = signed
    (b / "signature").write_text(json.dumps(sig))
    with pytest.raises(BadInput) as e:
        verify(b, [pub])
    assert str(e.value) == f"bundle {b}: malformed signature file"


def test_a_bundle_signed_by_an_unknown_key_names_that_key(signed, tmp_path):
    b, _ = signed
    _, other = new_keys(tmp_path / "other")
    kid = json.loads((b / "signature").read_text())["key_id"]
    assert kid != key_id(load_public(other))
    with pytest.raises(BadInput) as e:
        verify(b, [other])
    assert str(e.value) == f"bundle {b}: signed with key {kid!r}, which is not trusted here"


def test_the_signature_file_is_capped_at_its_limit(signed):
    """4096 bytes, the cap the device's deploy path (agent/deploy.py) also applies: written out, not
    imported, so a change of the cap is a decision a test notices."""
    MAX_SIGNATURE_BYTES = 4096
    b, _ = signed
    sig = json.loads((b / "signature").read_text())
    pad = MAX_SIGNATURE_BYTES - len(json.dumps(sig | {"pad": ""}))
    (b / "signature").write_text(json.dumps(sig | {"pad": "x" * pad}))
    assert (b / "signature").stat().st_size == MAX_SIGNATURE_BYTES
    assert read_signature(b)[0] == sig["key_id"]
    (b / "signature").write_text(json.dumps(sig | {"pad": "x" * (pad + 1)}))
    with pytest.raises(BadInput, match="signature file"):
        read_signature(b)


def test_a_key_made_between_the_check_and_the_write_is_never_replaced(tmp_path, monkeypatch):
    """Two `keys new` at once both passed the "private.pem exists?" check, and the second's rename replaced
    the key the first had already made (and printed). Played here by a check that sees nothing: the key
    already there stays byte for byte, no temporary file is left, and the refusal is the usual line.
    A dangling link at private.pem is refused the same way (a write through it would put the key elsewhere)."""
    import os

    from lepton_edge import signing

    priv, _ = new_keys(tmp_path / "k")
    first = priv.read_bytes()
    monkeypatch.setattr(signing.os.path, "lexists", lambda p: False)
    with pytest.raises(BadInput) as e:
        new_keys(tmp_path / "k")
    assert str(e.value) == f"{priv} exists; refusing to overwrite a private key"  # the usual line, word for word
    assert priv.read_bytes() == first and (priv.stat().st_mode & 0o777) == 0o600
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["private.pem", "public.pem"]
    (tmp_path / "d").mkdir()
    os.symlink(tmp_path / "elsewhere.pem", tmp_path / "d" / "private.pem")
    monkeypatch.undo()
    with pytest.raises(BadInput) as e:
        new_keys(tmp_path / "d")
    assert str(e.value) == f"{tmp_path / 'd' / 'private.pem'} exists; refusing to overwrite a private key"
    assert not (tmp_path / "elsewhere.pem").exists()


def test_without_hard_links_a_new_file_is_created_exclusively(tmp_path, monkeypatch):
    """Where the file system has no hard links (os.link fails with EPERM), write_new creates the file
    exclusively instead: written whole with its mode when the name is free, refused when it is not."""
    import os

    from lepton_edge.paths import write_new

    def no_links(*a, **k):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    write_new(tmp_path / "a.pem", b"key", 0o600)
    assert (tmp_path / "a.pem").read_bytes() == b"key" and ((tmp_path / "a.pem").stat().st_mode & 0o777) == 0o600
    with pytest.raises(FileExistsError):
        write_new(tmp_path / "a.pem", b"other")
    assert (tmp_path / "a.pem").read_bytes() == b"key" and [p.name for p in tmp_path.iterdir()] == ["a.pem"]


def test_a_private_key_others_can_read_is_named_with_its_mode(tmp_path):
    """`sign` warns with this line; an owner-only key, and a path that cannot be read, say nothing."""
    from lepton_edge.signing import exposed

    priv, _ = new_keys(tmp_path / "k")
    assert exposed(priv) is None
    for mode in (0o640, 0o604, 0o644):
        priv.chmod(mode)
        why = exposed(priv)
        assert why == (f"{priv} can be read by other users (mode {mode:o}): anyone who can read it can sign bundles "
                       "your devices accept; chmod 600 it")
    assert exposed(tmp_path / "missing.pem") is None


@pytest.mark.parametrize("when", [0, "last"])
def test_the_first_and_last_signing_times_sign_and_verify(tmp_path, when):
    """The range is 0 <= signed_at < MAX_SIGNED_AT on both sides: a release pipeline's fixed time 0
    (reproducible builds) signs and reads back, as does the last second before the limit."""
    from lepton_edge.signing import MAX_SIGNED_AT, verified

    when = MAX_SIGNED_AT - 1 if when == "last" else when
    b = _bundle(tmp_path)
    priv, pub = new_keys(tmp_path / "keys")
    sign(b, priv, signed_at=when)
    assert read_signature(b)[2] == when
    assert verified(b, [pub]).signed_at == when
    with pytest.raises(BadInput, match="signing time"):
        sign(b, priv, signed_at=MAX_SIGNED_AT)
