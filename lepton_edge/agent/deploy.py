"""Getting a new bundle onto the device safely: fetch, verify, keep, and point `current` at it.

Why each step: a download can be cut or tampered with (size cap, optional archive sha256, then
the ed25519 signature over the manifest and every file's checksum); an archive can try to write
outside its directory (tarfile's "data" filter refuses that); and a restart must come back with
the last good bundle, so `current` is a symlink replaced atomically (os.replace) only after the
new model passed its health check.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from lepton_edge.bundle import MANIFEST, Bundle, sha256_file
from lepton_edge.errors import BadInput
from lepton_edge.telemetry.schema import DeployCommand


class DeployError(Exception):
    pass


class BundleStore:
    def __init__(self, state_dir: Path, trusted_keys: list[Path], max_bytes: int):
        self.root = Path(state_dir) / "bundles"
        self.root.mkdir(parents=True, exist_ok=True)
        self.current_link = Path(state_dir) / "current"
        self.trusted = list(trusted_keys)
        self.max_bytes = max_bytes
        if self.trusted:
            from lepton_edge.signing import load_public

            self._keys = [load_public(k) for k in self.trusted]  # a bad key file fails at start

    def current(self) -> Path | None:
        """The last bundle that passed a deploy's health check, if any."""
        if self.current_link.is_symlink() or self.current_link.exists():
            target = self.current_link.resolve()
            if (target / MANIFEST).is_file():
                return target
        return None

    def set_current(self, bundle_dir: Path) -> None:
        tmp = self.current_link.with_name(f".current.{os.getpid()}")
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(Path(bundle_dir).resolve(), tmp)
        os.replace(tmp, self.current_link)

    def verify(self, bundle_dir: Path) -> dict:
        """Signature (when keys are trusted) and checksums; DeployError says which failed."""
        try:
            if self.trusted:
                from lepton_edge.signing import verify

                key = verify(bundle_dir, self._keys)
                return {"signed_by": key}
            Bundle.load(bundle_dir)
            return {"signed_by": None}
        except BadInput as e:
            raise DeployError(str(e)) from None

    def fetch(self, cmd: DeployCommand) -> Path:
        """The bundle named by the command, unpacked into a new directory under bundles/."""
        if bool(cmd.url) == bool(cmd.path):
            raise DeployError("deploy needs exactly one of 'url' or 'path'")
        dest = Path(tempfile.mkdtemp(prefix=f"{time.strftime('%Y%m%d-%H%M%S')}-", dir=self.root))
        try:
            if cmd.url:
                archive = self._download(cmd.url, dest.with_suffix(".tar.gz"), cmd.sha256)
                try:
                    self._unpack(archive, dest)
                finally:
                    archive.unlink(missing_ok=True)
            else:
                src = Path(cmd.path)
                if src.is_dir():
                    shutil.copytree(src, dest, dirs_exist_ok=True)
                elif src.is_file():
                    if cmd.sha256 and sha256_file(src) != cmd.sha256:
                        raise DeployError(f"{src}: sha256 differs from the command's")
                    self._unpack(src, dest)
                else:
                    raise DeployError(f"path not found on the device: {src}")
            return self._bundle_root(dest)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise

    def discard(self, bundle_dir: Path) -> None:
        d = Path(bundle_dir).resolve()
        if self.root.resolve() in d.parents and d != self.current():
            top = next(p for p in [d, *d.parents] if p.parent == self.root.resolve())
            shutil.rmtree(top, ignore_errors=True)

    def _download(self, url: str, out: Path, sha256: str | None) -> Path:
        if not url.startswith(("http://", "https://")):
            raise DeployError(f"url must be http(s)://, got {url[:80]!r}")
        h = hashlib.sha256()
        n = 0
        try:
            with urllib.request.urlopen(url, timeout=30) as r, open(out, "wb") as f:
                while block := r.read(1 << 20):
                    n += len(block)
                    if n > self.max_bytes:
                        raise DeployError(f"download exceeds max_download_bytes ({self.max_bytes})")
                    h.update(block)
                    f.write(block)
        except (urllib.error.URLError, OSError, ValueError) as e:
            out.unlink(missing_ok=True)
            reason = getattr(e, "reason", None) or e
            raise DeployError(f"cannot download {url}: {reason}") from None
        if sha256 and h.hexdigest() != sha256:
            out.unlink(missing_ok=True)
            raise DeployError(f"downloaded archive sha256 {h.hexdigest()[:16]}… differs from the command's "
                              f"{sha256[:16]}…")
        return out

    @staticmethod
    def _unpack(archive: Path, dest: Path) -> None:
        try:
            with tarfile.open(archive, "r:*") as tf:
                tf.extractall(dest, filter="data")
        except (tarfile.TarError, OSError) as e:
            raise DeployError(f"cannot unpack {archive.name}: {e}") from None

    @staticmethod
    def _bundle_root(dest: Path) -> Path:
        if (dest / MANIFEST).is_file():
            return dest
        found = [p.parent for p in dest.rglob(MANIFEST)]
        if len(found) != 1:
            raise DeployError("the archive holds no bundle (no manifest.json)" if not found
                              else "the archive holds more than one bundle")
        return found[0]


def pack(bundle_dir: Path, out: Path) -> Path:
    """A bundle directory as a .tar.gz with the bundle's name as its top folder (operator side)."""
    with tarfile.open(out, "w:gz") as tf:
        tf.add(bundle_dir, arcname=Path(bundle_dir).name)
    return out

