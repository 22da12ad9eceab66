"""Ed25519 signatures for bundles: `lepton-edge keys new`, `lepton-edge sign`, and the agent's check.

Why sign the manifest and nothing else: the manifest lists the sha256 of every file in the
bundle, so a valid signature over its exact bytes, followed by the checksum check, covers the
whole bundle. The signature file names the key it was made with (the first 16 hex digits of the
sha256 of the raw public key), so a device holding several trusted keys knows which to use.

Why a signing time inside the signed bytes: a signature never expires, so without one anyone who
can publish a deploy could send a device any bundle that was ever signed (an older model, a
known-bad one) and it would verify. The time is signed with the manifest (`_message`) in a second
signature, `timed_signature`, so only a trusted key sets it, and the agent refuses a bundle signed
before the newest it has run (agent/deploy.py). Rolling back on purpose is signing the old bundle
again. Why two signatures: `signature` stays the manifest's alone, as before, so agents of earlier
versions still verify bundles signed now (a fleet is upgraded device by device). A file without
the timed one (from an earlier `sign`, or with it stripped) verifies as signed at time 0, which a
device that has run a timed bundle refuses.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from lepton_edge.bundle import MAX_BUNDLE_BYTES, SIGNATURE, Bundle, parse_json, read_capped, read_manifest_bytes
from lepton_edge.errors import BadInput
from lepton_edge.paths import read_small, write_new, write_replacing

MAX_SIGNATURE_BYTES = 4096  # {"alg", "key_id", "signature"}: about 150 bytes
MAX_KEY_BYTES = 64 * 1024  # an Ed25519 PEM is about 120 bytes; /dev/zero as a key read until memory ran out
MAX_SIGNED_AT = 1 << 40  # seconds since 1970: far past any real clock, and exact in a float and in JSON
_DOMAIN = b"lepton-edge bundle signature v2\0"  # no v1 signature (the bare manifest) can be read as a v2 one


class SignatureFile(NamedTuple):
    """A signature file's fields, checked for shape (not yet verified)."""
    key_id: str
    signature: bytes  # over the manifest's bytes alone
    signed_at: int | None
    timed_signature: bytes | None  # over _message(manifest, signed_at); present exactly when signed_at is


@dataclass(frozen=True)
class Signed:
    """What a verified signature says: which trusted key made it, and when (0: a signature file
    from before signing times; they verify, and sort before every timed one)."""
    key_id: str
    signed_at: int


def utc(signed_at: int) -> str:
    """A signing time as people read it, the same in `sign`'s output and the agent's replay refusal."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(signed_at))


def _message(manifest: bytes, signed_at: int) -> bytes:
    """The bytes the timed signature covers: the domain, the time and the manifest, so the time
    cannot be changed without the key."""
    return _DOMAIN + str(signed_at).encode() + b"\0" + manifest


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise BadInput("signing needs the cryptography package (pip install 'lepton-edge[device]')") from None
    return serialization, ed25519


def key_id(public_key) -> str:
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def new_keys(out: Path) -> tuple[Path, Path]:
    """private.pem (mode 600) and public.pem in `out`; refuses to overwrite a private key."""
    serialization, ed25519 = _crypto()
    out = Path(out)
    made = [p for p in (out, *out.parents) if not os.path.lexists(p)]  # folders this call makes, deepest first
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _write_pair(out, serialization, ed25519)
    except BaseException:  # (a disk with no inode left for the key) no pair, and no empty folder left behind
        for d in made:
            try:
                d.rmdir()
            except OSError:
                break
        raise


def _write_pair(out: Path, serialization, ed25519) -> tuple[Path, Path]:
    priv_path, pub_path = out / "private.pem", out / "public.pem"
    if os.path.lexists(priv_path):  # (a dangling symlink too: writing through it put the key elsewhere)
        raise BadInput(f"{priv_path} exists; refusing to overwrite a private key")
    key = ed25519.Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        write_new(priv_path, priv, 0o600)  # (not by rename: a key another `keys new` just made stays)
    except FileExistsError:
        raise BadInput(f"{priv_path} exists; refusing to overwrite a private key") from None
    try:
        write_replacing(pub_path, pub, 0o644)
    except BaseException:  # (a full disk) half a pair is none: the private key left alone made every later
        priv_path.unlink(missing_ok=True)  # `keys new` there refuse to overwrite it, and it has no public key
        raise
    return priv_path, pub_path


def _load_private(path: Path):
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(read_small(path, MAX_KEY_BYTES, "key"), password=None)
    except (ValueError, TypeError) as e:
        raise BadInput(f"{path}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise BadInput(f"{path}: not an Ed25519 key (make one with `lepton-edge keys new`)")
    return key


def load_public(path: str | Path):
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_public_key(read_small(path, MAX_KEY_BYTES, "trusted key"))
    except ValueError as e:
        raise BadInput(f"{path}: not a PEM public key ({e})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise BadInput(f"{path}: not an Ed25519 public key")
    return key


def exposed(private_key: str | Path) -> str | None:
    """Why a private key file is readable by users other than its owner (None: it is not, or this
    system has no such modes). Why only said, not refused as ssh does: the key may sit on a build
    machine's mount that cannot keep modes, and refusing would stop a release over a warning's worth."""
    try:
        mode = os.stat(private_key).st_mode
    except OSError:
        return None
    if os.name != "posix" or not mode & 0o077:
        return None
    return (f"{private_key} can be read by other users (mode {mode & 0o777:o}): anyone who can read it can sign "
            f"bundles your devices accept; chmod 600 it")


def sign(bundle_dir: str | Path, private_key: str | Path, signed_at: int | None = None) -> Path:
    """Check the bundle's checksums, then write `signature` over its manifest's bytes and the
    signing time (now, unless given: a test's or a release pipeline's fixed time)."""
    data = read_manifest_bytes(Path(bundle_dir))
    b = Bundle.from_bytes(Path(bundle_dir), data)  # refuses a bundle whose files do not match its manifest
    key = _load_private(Path(private_key))
    when = int(time.time()) if signed_at is None else signed_at
    if isinstance(when, bool) or not isinstance(when, int) or not 0 <= when < MAX_SIGNED_AT:
        raise BadInput(f"signing time {signed_at!r}: not a whole number of seconds since 1970")
    sig = {"alg": "ed25519", "key_id": key_id(key.public_key()),
           "signature": base64.b64encode(key.sign(data)).decode(), "signed_at": when,
           "timed_signature": base64.b64encode(key.sign(_message(data, when))).decode()}
    out = b.path / SIGNATURE
    try:
        write_replacing(out, (json.dumps(sig) + "\n").encode())  # replaces a symlink there, never writes through it
    except OSError as e:  # a full disk, a read-only bundle folder: one line (it was a traceback, exit 1)
        raise BadInput(f"{out}: cannot write the signature ({e.strerror or e})") from None
    return out


def read_signature(bundle_dir: Path) -> SignatureFile:
    """The bundle's signature file's fields, or one BadInput line."""
    p = Path(bundle_dir)
    sig_file = p / SIGNATURE
    if not os.path.lexists(sig_file):
        raise BadInput(f"bundle {p} is not signed; trusted keys are configured, so unsigned bundles are refused")
    sig = parse_json(read_capped(sig_file, MAX_SIGNATURE_BYTES, "signature file"), str(sig_file), "signature file")
    if not (isinstance(sig, dict) and isinstance(sig.get("key_id"), str) and isinstance(sig.get("signature"), str)
            and sig.get("alg", "ed25519") == "ed25519"):
        raise BadInput(f"bundle {p}: malformed signature file")
    when, timed = sig.get("signed_at"), sig.get("timed_signature")
    if (when is None) != (timed is None) or (when is not None and (
            isinstance(when, bool) or not isinstance(when, int) or not 0 <= when < MAX_SIGNED_AT
            or not isinstance(timed, str))):
        raise BadInput(f"bundle {p}: malformed signature file (signed_at)")
    try:
        raw = base64.b64decode(sig["signature"], validate=True)
        raw_timed = base64.b64decode(timed, validate=True) if timed is not None else None
    except ValueError:
        raise BadInput(f"bundle {p}: malformed signature file") from None
    return SignatureFile(sig["key_id"][:64], raw, when, raw_timed)


def verify(bundle_dir: str | Path, trusted: list, max_bytes: int = MAX_BUNDLE_BYTES) -> str:
    """Raise BadInput unless the bundle is signed by one of the trusted public keys (loaded
    objects or PEM paths) and every file matches the manifest. Returns the key id."""
    return verified(bundle_dir, trusted, max_bytes).key_id


def verified(bundle_dir: str | Path, trusted: list, max_bytes: int = MAX_BUNDLE_BYTES) -> Signed:
    """`verify`, returning the key id and the signing time.

    Order matters: the signature is checked over the exact manifest bytes first, and the files
    are checked against those same bytes, so nothing an unsigned manifest declares gets hashed.
    """
    from cryptography.exceptions import InvalidSignature

    p = Path(bundle_dir)
    if isinstance(trusted, (str, Path)):  # one key given alone (iterating a str read '/' as a key)
        trusted = [trusted]
    keys = [load_public(k) if isinstance(k, (str, Path)) else k for k in trusted]
    sig = read_signature(p)
    kid = sig.key_id
    key = {key_id(k): k for k in keys}.get(kid)
    if key is None:
        raise BadInput(f"bundle {p}: signed with key {kid!r}, which is not trusted here")
    data = read_manifest_bytes(p)
    try:
        key.verify(sig.signature, data)
        if sig.signed_at is not None and sig.timed_signature is not None:
            key.verify(sig.timed_signature, _message(data, sig.signed_at))
    except InvalidSignature:
        raise BadInput(f"bundle {p}: bad signature (the manifest or its signing time changed after signing)") from None
    Bundle.from_bytes(p, data, max_bytes=max_bytes)  # and the files must match the signed manifest
    return Signed(kid, sig.signed_at or 0)
