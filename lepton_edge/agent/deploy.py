"""Getting a new bundle onto the device safely: fetch, verify, keep, and point `current` at it.

Why each step: everything in a deploy command comes from outside, so every step has a budget
checked before the work. A download has a size cap and a whole-download deadline, follows
redirects only to http(s), and its optional archive sha256 is checked before unpacking. An
archive is read member by member: only regular files the manifest lists, at the sizes it
declares, within the bundle budget, are written (no links, devices, or path outside the
directory). A path on the device is copied the same way: the manifest first, then exactly the
files it lists, never through a symlink. Then the ed25519 signature over the manifest's bytes,
then every file's checksum, then the signing time: a bundle signed before the newest one this
device has run is refused (a replayed old bundle verifies, so the time is the only thing that
tells it from a new one; see signing.py). A restart must come back with the last good bundle, so `current` is
a symlink replaced atomically (os.replace) only after the new model passed its health check,
and `good.json` lists the previous good ones to fall back to. Every failure removes what it
created; leftovers of a crash (a kill -9 mid-download) are removed at the next start.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import socket
import stat
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO

from lepton_edge.bundle import (
    MANIFEST,
    MAX_FILES,
    MAX_MANIFEST_BYTES,
    SIGNATURE,
    Bundle,
    Manifest,
    check_sizes,
    open_inside,
    parse_manifest,
    read_capped,
    read_manifest_bytes,
)
from lepton_edge.errors import BadInput, disk_full
from lepton_edge.telemetry.schema import DeployCommand

GOOD = "good.json"
INCOMING = "incoming"  # state_dir/incoming: where a `path` deploy may read from, unless deploy_paths says
NEWEST_SIGNED = "newest_signed_at"  # the latest signing time of a bundle this device has made current
MAX_SIGNATURE_BYTES = 4096
_BLOCK = 1 << 16


class DeployError(Exception):
    pass


class BundleStore:
    """bundles/<entry>/ holds fetched bundles; `current` (symlink) the one running; good.json the
    good ones, newest first (current included), of which only `keep` besides current are kept."""

    def __init__(self, state_dir: Path, trusted_keys: list[Path], max_bytes: int, *,
                 max_bundle_bytes: int = 1 << 30, keep: int = 2, download_timeout_s: float = 300.0,
                 deploy_dirs: list[Path] | None = None):
        """`deploy_dirs`: where a command's `path` may point (None: anywhere; the agent always passes its
        config's list, state_dir/incoming by default)."""
        self.state = Path(state_dir)
        self.root = self.state / "bundles"
        if self.root.is_symlink():  # (a link to a folder passed mkdir, and _clean_leftovers emptied that folder)
            raise BadInput(f"{self.root} is a symlink: the agent removes whatever it does not keep under bundles/, "
                           "so that is a folder of the state directory; remove the link (or move state_dir)")
        self.root.mkdir(parents=True, exist_ok=True)
        self.current_link = self.state / "current"
        self.good_file = self.state / GOOD
        self.newest_file = self.state / NEWEST_SIGNED
        self.trusted = list(trusted_keys)
        self.max_bytes = max_bytes  # the download (archive) cap
        self.max_bundle_bytes = max_bundle_bytes  # unpacked: all files of a bundle together
        self.keep = keep
        self.download_timeout_s = download_timeout_s
        self.deploy_dirs = None if deploy_dirs is None else [Path(os.path.realpath(d)) for d in deploy_dirs]
        (self.state / INCOMING).mkdir(mode=0o750, exist_ok=True)  # the default deploy directory, ready for scp
        self._verified: dict[Path, dict] = {}  # what fetch() checked, so verify() need not hash it again
        if self.trusted:
            from lepton_edge.signing import load_public

            self._keys = [load_public(k) for k in self.trusted]  # a bad key file fails at start
        self._clean_leftovers()

    @classmethod
    def from_config(cls, cfg) -> BundleStore:
        return cls(cfg.state_dir, cfg.trusted_keys, cfg.max_download_bytes, max_bundle_bytes=cfg.max_bundle_bytes,
                   keep=cfg.keep_bundles, download_timeout_s=cfg.download_timeout_s, deploy_dirs=cfg.deploy_dirs)

    # ---- what is kept -------------------------------------------------------------------------
    def current(self) -> Path | None:
        """The last bundle that passed a deploy's health check, if any."""
        if self.current_link.is_symlink() or self.current_link.exists():
            target = self.current_link.resolve()
            if (target / MANIFEST).is_file():
                return target
        return None

    def candidates(self) -> list[Path]:
        """The bundle directories to try at start, newest good first: current, then the previous
        good ones still on disk. The caller verifies each and falls back to the next."""
        out = []
        cur = self.current()
        if cur is not None:
            out.append(cur)
        for name in self._good():
            p = (self.root / name).resolve()
            if p not in out and (p / MANIFEST).is_file():
                out.append(p)
        return out

    def set_current(self, bundle_dir: Path) -> None:
        """Point `current` at a bundle that passed its health check, record it as good and raise the newest
        signing time; remove good bundles past the `keep` newest previous ones. An OSError (a full disk)
        changes nothing: every file is written beside its place first, then all are renamed into place (a
        rename needs no space). Why: `current` moved first and good.json failed on the full disk after it,
        so the agent replied that the deploy failed while the new bundle served and stayed current."""
        d = Path(bundle_dir).resolve()
        entry = self._entry(d)
        good = [] if entry is None else [entry] + [n for n in self._good() if n != entry]
        keep, drop = good[:self.keep + 1], good[self.keep + 1:]
        when = self._signed_at(d)
        staged: list[tuple[Path, Path]] = []  # (written beside, its place)
        try:
            link = self.current_link.with_name(f".current.{os.getpid()}")
            if link.is_symlink() or link.exists():
                link.unlink()
            os.symlink(d, link)
            staged.append((link, self.current_link))
            if entry is not None:
                staged.append((_beside(self.good_file, json.dumps(keep) + "\n"), self.good_file))
            if when > self._mark():
                staged.append((_beside(self.newest_file, f"{when}\n"), self.newest_file))
            for tmp, final in staged:
                os.replace(tmp, final)
        finally:
            for tmp, _ in staged:
                if tmp.is_symlink() or tmp.exists():
                    tmp.unlink()
        for name in drop:
            shutil.rmtree(self.root / name, ignore_errors=True)

    def discard(self, bundle_dir: Path) -> None:
        """Remove a fetched bundle that was refused (never current or a kept good one)."""
        entry = self._entry(Path(bundle_dir).resolve())
        if entry is None or entry in self._good():
            return
        cur = self.current()
        if cur is not None and self._entry(cur) == entry:
            return
        shutil.rmtree(self.root / entry, ignore_errors=True)

    def _entry(self, d: Path) -> str | None:
        """The name of the directory under bundles/ that holds d, or None when d is elsewhere."""
        root = self.root.resolve()
        if d == root or root not in d.parents:
            return None
        return d.relative_to(root).parts[0]

    def _good(self) -> list[str]:
        try:
            names = json.loads(read_capped(self.good_file, 1 << 16, GOOD))
        except (BadInput, ValueError, RecursionError):
            return []
        if not isinstance(names, list):
            return []
        return [n for n in names if isinstance(n, str) and n and "/" not in n and n not in (".", "..")]

    # ---- the newest signing time run here (refusing replayed old bundles) ---------------------
    def newest_signed_at(self) -> int:
        """The latest signing time of any bundle made current here: the file, or the current
        bundle's own signature (a state directory from before the file), whichever is later."""
        return max(self._mark(), self._signed_at(self.current()))

    def _mark(self) -> int:
        try:
            return int(read_capped(self.newest_file, 64, NEWEST_SIGNED).decode().strip())
        except (BadInput, ValueError, UnicodeDecodeError):
            return 0

    def _signed_at(self, d: Path | None) -> int:
        if d is None or not self.trusted:
            return 0
        from lepton_edge.signing import read_signature

        try:
            return read_signature(d).signed_at or 0
        except BadInput:
            return 0

    def _not_older(self, signed_at: int) -> None:
        """Refuse a bundle signed before the newest this device has run: with a signature that
        never expires, that is how a replayed old (or known-bad) bundle looks."""
        from lepton_edge.signing import utc

        newest = self.newest_signed_at()
        if signed_at >= newest:
            return
        when = "has no signing time (signed by an older lepton-edge)" if not signed_at else \
            f"was signed at {utc(signed_at)}"
        raise BadInput(f"the bundle {when}, before the newest bundle this device has run "
                       f"(signed at {utc(newest)}): refused as a possible replay. To roll back on purpose, "
                       f"sign the older bundle again (lepton-edge sign) and deploy that")

    def _clean_leftovers(self) -> None:
        """Remove what a crash left: partial downloads, half-unpacked or refused bundles (anything
        under bundles/ that is neither current nor a kept good bundle), stray temp links."""
        keep = set(self._good())
        cur = self.current()
        if cur is not None and (entry := self._entry(cur)):
            keep.add(entry)
        for p in self.root.iterdir():
            if p.name in keep:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        for p in self.state.glob(".current.*"):
            p.unlink(missing_ok=True)
        for p in (*self.state.glob(f".{GOOD}.*"), *self.state.glob(f".{NEWEST_SIGNED}.*")):
            p.unlink(missing_ok=True)

    # ---- checking -----------------------------------------------------------------------------
    def verify(self, bundle_dir: Path) -> dict:
        """Signature (when keys are trusted) and checksums; DeployError says which failed."""
        done = self._verified.pop(Path(bundle_dir), None)
        if done is not None:
            return done
        try:
            if self.trusted:
                from lepton_edge.signing import verified

                signed = verified(bundle_dir, self._keys, max_bytes=self.max_bundle_bytes)
                return {"signed_by": signed.key_id, "signed_at": signed.signed_at}
            Bundle.load(bundle_dir, max_bytes=self.max_bundle_bytes)
            return {"signed_by": None}
        except BadInput as e:
            raise DeployError(str(e)) from None

    # ---- fetching -----------------------------------------------------------------------------
    def fetch(self, cmd: DeployCommand) -> Path:
        """The bundle named by the command, in a new directory under bundles/ holding exactly the
        files its manifest lists (plus manifest.json and signature), verified (signature and
        checksums): a refused bundle is removed here, it never stays in bundles/."""
        if bool(cmd.url) == bool(cmd.path):
            raise DeployError("deploy needs exactly one of 'url' or 'path'")
        try:
            dest = Path(tempfile.mkdtemp(prefix=f"{time.strftime('%Y%m%d-%H%M%S')}-", dir=self.root))
        except OSError as e:  # (a disk out of inodes) the same reply as a full disk met later
            raise DeployError(f"cannot store the bundle in {self.root}: {e.strerror or e}") from None
        archive = None
        try:
            if cmd.url:
                archive = dest.with_name(f".{dest.name}.partial")
                self._download(cmd.url, archive, cmd.sha256)
                self._unpack(archive, dest)
            elif cmd.path:  # exactly one of the two (checked above)
                self._from_path(Path(cmd.path), dest, cmd.sha256)
            info = self.verify(dest)
            if self.trusted:
                self._not_older(info["signed_at"])
            self._verified = {dest: info}
            return dest
        except BadInput as e:
            shutil.rmtree(dest, ignore_errors=True)
            raise DeployError(str(e)) from None
        except OSError as e:  # the state directory itself: full disk, read-only, permissions
            shutil.rmtree(dest, ignore_errors=True)
            raise DeployError(f"cannot store the bundle in {self.root}: {e.strerror or e}") from None
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        finally:
            if archive is not None:
                archive.unlink(missing_ok=True)

    def _from_path(self, src: Path, dest: Path, sha256: str | None) -> None:
        """A bundle directory or a .tar.gz on the device, inside one of `deploy_dirs`; a symlink or
        special file is refused as such, without being followed or read."""
        self._check_deploy_dir(src)
        try:
            st = os.lstat(src)
        except OSError:
            raise DeployError(f"path not found on the device: {src}") from None
        if stat.S_ISDIR(st.st_mode):
            self._copy_dir(src, dest)
        elif stat.S_ISREG(st.st_mode):
            if st.st_size > self.max_bytes:
                raise DeployError(f"{src}: {st.st_size} bytes, over max_download_bytes ({self.max_bytes})")
            if sha256 and _sha256_path(src, self.max_bytes) != sha256:
                raise DeployError(f"{src}: sha256 differs from the command's")
            self._unpack(src, dest)
        else:
            raise DeployError(f"{src}: not a bundle (a symlink or special file, not a directory or .tar.gz)")

    def _check_deploy_dir(self, src: Path) -> None:
        """Refuse, before anything is looked at, a path outside the deploy directories (by its real path:
        a link inside one that leads out is outside). The refusal is the same whether or not it exists."""
        if self.deploy_dirs is None:
            return
        real = Path(os.path.realpath(src))
        # `..` refused outright: realpath drops `missing/..` as text where the kernel fails on `missing`, so
        # `incoming/../../etc/ssh/../../…/incoming` passed and the reply told whether /etc/ssh existed
        if (not src.is_absolute() or ".." in src.parts
                or not any(real == d or d in real.parents for d in self.deploy_dirs)):
            where = ", ".join(str(d) for d in self.deploy_dirs) or "none"
            raise DeployError(f"path {str(src)[:200]!r} is outside the directories this device deploys from "
                              f"({where}; deploy_paths in its agent.toml)")

    def _copy_dir(self, src: Path, dest: Path) -> None:
        """manifest.json first (size-capped, validated), then exactly the files it lists, each a
        regular file inside src reached through no symlink, at its declared size."""
        data = read_manifest_bytes(src)
        manifest = parse_manifest(data, str(src / MANIFEST))
        check_sizes(manifest, self.max_bundle_bytes, str(src))
        (dest / MANIFEST).write_bytes(data)
        if os.path.lexists(src / SIGNATURE):
            (dest / SIGNATURE).write_bytes(read_capped(src / SIGNATURE, MAX_SIGNATURE_BYTES, "signature file"))
        for rel, entry in manifest.files.items():
            try:
                fd = open_inside(src, rel)
            except OSError:
                raise DeployError(f"bundle {src}: file {rel} listed in the manifest is missing "
                                  "(or not a regular file inside the bundle)") from None
            with os.fdopen(fd, "rb") as f:
                size = os.fstat(fd).st_size
                if size != entry.size:
                    raise DeployError(f"bundle {src}: checksum mismatch for {rel} (size {size}, the manifest "
                                      f"says {entry.size}); refusing to use it")
                _write_new(dest, rel, f, entry.size)

    def _unpack(self, archive: Path, dest: Path) -> None:
        """Members checked from their headers before anything is written: count, each size and
        the running total within the budget, regular files and directories only; then the
        manifest (read from the archive) must list every file, at its size."""
        try:
            with tarfile.open(archive, "r:*", tarinfo=_CappedTarInfo) as tf:
                members = self._members(tf)
                prefix, manifest, data = self._archive_manifest(tf, members)
                files = self._listed_members(members, prefix, manifest)
                (dest / MANIFEST).write_bytes(data)
                for rel, m in files.items():
                    _write_new(dest, rel, _extract(tf, m), m.size)
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:  # gzip/zlib errors are OSError/EOFError
            if isinstance(e, OSError) and disk_full(e):  # the device's state, not the archive's fault (it read
                raise DeployError(f"no room to unpack {archive.name} in {self.root}: {e.strerror}") from None  # as one)
            why = "; ".join(line.strip("- ") for line in str(e).splitlines() if line.strip())  # tarfile: one per method
            raise DeployError(f"cannot unpack {archive.name}: {why[:200]}") from None

    def _members(self, tf: tarfile.TarFile) -> list[tarfile.TarInfo]:
        members: list[tarfile.TarInfo] = []
        total = 0
        while (m := tf.next()) is not None:
            if len(members) >= MAX_FILES + 16:
                raise DeployError(f"the archive holds more than {MAX_FILES} entries")
            if m.size < 0:  # (a pax size=-N: tarfile's next read goes back to the same header, each time
                # rewinding the gzip stream and inflating all before it: an hour's work from a 1 MB archive)
                raise DeployError(f"the archive's {m.name[:100]!r} has a negative size; refused")
            if not (m.isreg() or m.isdir()):
                raise DeployError(f"the archive holds {m.name[:100]!r}, a link or special file; refused")
            total += m.size
            if m.size > self.max_bundle_bytes or total > self.max_bundle_bytes:
                raise DeployError(f"the archive unpacks to more than the bundle limit of {self.max_bundle_bytes} bytes")
            members.append(m)
        return members

    @staticmethod
    def _archive_manifest(tf: tarfile.TarFile, members: list) -> tuple[str, Manifest, bytes]:
        found = [m for m in members if m.isreg() and (_norm(m.name) == MANIFEST or
                 (_norm(m.name).count("/") == 1 and _norm(m.name).endswith("/" + MANIFEST)))]
        if len(found) != 1:
            raise DeployError("the archive holds no bundle (no manifest.json)" if not found
                              else "the archive holds more than one bundle")
        m = found[0]
        if m.size > MAX_MANIFEST_BYTES:
            raise DeployError(f"manifest.json is {m.size} bytes, over the limit of {MAX_MANIFEST_BYTES}")
        data = _extract(tf, m).read(MAX_MANIFEST_BYTES + 1)
        prefix = _norm(m.name)[: -len(MANIFEST)]
        return prefix, parse_manifest(data, f"archive:{m.name}"), data

    def _listed_members(self, members: list, prefix: str, manifest: Manifest) -> dict[str, tarfile.TarInfo]:
        """rel -> member for each file the manifest lists (+ signature); anything else refused."""
        check_sizes(manifest, self.max_bundle_bytes, "in the archive")
        files: dict[str, tarfile.TarInfo] = {}
        for m in members:
            if m.isdir():
                continue  # nothing is made from a directory entry: files make their own parents
            name = _norm(m.name)
            if not name.startswith(prefix):
                raise DeployError(f"the archive holds {m.name[:100]!r}, outside the bundle's folder")
            rel = name[len(prefix):]
            if rel == MANIFEST:
                continue
            if rel == SIGNATURE and m.size <= MAX_SIGNATURE_BYTES:
                files[rel] = m
                continue
            entry = manifest.files.get(rel)
            if entry is None:
                raise DeployError(f"the archive holds {rel[:100]!r}, which the manifest does not list; refused")
            if entry.size != m.size:
                raise DeployError(f"checksum mismatch for {rel} (size {m.size} in the archive, the manifest "
                                  f"says {entry.size}); refused")
            if rel in files:
                raise DeployError(f"the archive holds {rel[:100]!r} twice")
            files[rel] = m
        missing = sorted(set(manifest.files) - set(files))
        if missing:
            raise DeployError(f"file {missing[0]} listed in the manifest is missing from the archive")
        return files

    def _download(self, url: str, out: Path, sha256: str | None) -> Path:
        """Into `out`, within max_bytes and download_timeout_s (the whole transfer, enforced by a
        watchdog that shuts the socket), following redirects to http(s) only."""
        try:
            scheme = urllib.parse.urlsplit(url).scheme
        except ValueError as e:  # 'http://[::1': urlsplit itself refuses it
            raise DeployError(f"bad url {url[:80]!r}: {e}") from None
        if scheme not in ("http", "https"):
            raise DeployError(f"url must be http(s)://, got {url[:80]!r}")
        h, n = hashlib.sha256(), 0
        watch = _Deadline(self.download_timeout_s)
        opener = urllib.request.build_opener(_HttpOnlyRedirects(), _Http(watch), _Https(watch))
        try:
            with watch, opener.open(url, timeout=min(30.0, self.download_timeout_s)) as r, open(out, "xb") as f:
                length = r.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > self.max_bytes:
                    raise DeployError(f"download is {length} bytes, over max_download_bytes ({self.max_bytes})")
                while block := r.read1(_BLOCK):
                    n += len(block)
                    if n > self.max_bytes:
                        raise DeployError(f"download exceeds max_download_bytes ({self.max_bytes})")
                    if watch.expired():
                        raise TimeoutError()
                    h.update(block)
                    f.write(block)
                if watch.expired():
                    raise TimeoutError()
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            out.unlink(missing_ok=True)
            if watch.expired():
                raise DeployError(f"cannot download {url[:200]}: not finished within download_timeout_s "
                                  f"({self.download_timeout_s:g} s)") from None
            reason = getattr(e, "reason", None) or e or type(e).__name__
            reason = " ".join(str(reason).split())  # urllib's redirect-loop message spans three lines
            raise DeployError(f"cannot download {url[:200]}: {reason[:200]}") from None
        except BaseException:
            out.unlink(missing_ok=True)
            raise
        if sha256 and h.hexdigest() != sha256:
            out.unlink(missing_ok=True)
            raise DeployError(f"downloaded archive sha256 {h.hexdigest()[:16]}… differs from the command's "
                              f"{sha256[:16]}…")
        return out


def _norm(name: str) -> str:
    """'./a/b' -> 'a/b' (tar run in the bundle's directory); other spellings stay as they are
    and simply match no file the manifest lists."""
    while name.startswith("./"):
        name = name[2:]
    return name


MAX_EXTENDED_BYTES = 1 << 20  # pax and GNU long-name headers of one archive, together


class _CappedTarInfo(tarfile.TarInfo):
    """Refuses, before tarfile reads it into memory: a sparse member (GNU's old type or pax GNU.sparse 1.0:
    tarfile reads their maps with no cap), a global pax header (a bundle has none: tarfile merges
    every one into a dict each later member copies, and a 5.7 MB archive of them took the agent to 1.7 GB
    before any signature check), and extended headers past MAX_EXTENDED_BYTES in all (one each was capped,
    their number not: 11 MB of per-member headers held 479 MB)."""

    def _proc_member(self, tf):
        if self.type == tarfile.XGLTYPE:
            raise tarfile.ReadError("a global pax header (a bundle's archive has none)")
        if self.type in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
            seen = getattr(tf, "lepton_extended_bytes", 0) + max(self.size, 0)
            if self.size > MAX_EXTENDED_BYTES or seen > MAX_EXTENDED_BYTES:
                raise tarfile.ReadError(f"extended headers of more than {MAX_EXTENDED_BYTES} bytes")
            tf.lepton_extended_bytes = seen
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise tarfile.ReadError(f"{self.name[:100]!r} is a sparse member (a bundle's archive has none)")
        return super()._proc_member(tf)  # type: ignore[misc]  # tarfile's private hook: not in typeshed

    def _proc_gnusparse_10(self, next, pax_headers, tf):
        """A pax GNU.sparse 1.0 member, whose map tarfile reads from the data with no cap (a 40 KB archive: 16 s and
        190 MB, before any size check): refused as the old GNU sparse type is, in _proc_member (its chain of
        extension headers had no cap either: 356 KB took 322 MB; a truncated one was an IndexError)."""
        raise tarfile.ReadError(f"{next.name[:100]!r} is a sparse member (a bundle's archive has none)")


def _extract(tf: tarfile.TarFile, m: tarfile.TarInfo) -> IO[bytes]:
    """A regular member's contents (tarfile gives None only for links and special files, refused earlier)."""
    f = tf.extractfile(m)
    if f is None:
        raise DeployError(f"the archive's {m.name[:100]!r} is not a regular file")
    return f


def _write_new(dest: Path, rel: str, src: IO[bytes], size: int) -> None:
    """Exactly `size` bytes from src into a new file dest/rel (parents made inside dest)."""
    target = dest / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    left = size
    with open(target, "xb") as f:
        while left > 0 and (block := src.read(min(1 << 20, left))):
            f.write(block)
            left -= len(block)
    if left:
        raise DeployError(f"{rel}: shorter than the {size} bytes the manifest declares")


def _beside(path: Path, text: str) -> Path:
    """`text` in a new temporary file beside `path` (named .<name>.*, which _clean_leftovers removes), synced:
    renamed into place by the caller. Removed again if it cannot be written whole (a full disk)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _sha256_path(path: Path, cap: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            cap -= len(block)
            if cap < 0:
                raise DeployError(f"{path}: grew past max_download_bytes while being hashed")
    return h.hexdigest()


# ---- downloads with a whole-transfer deadline --------------------------------------------------
class _Deadline:
    """Shuts every socket it tracks when the deadline passes, so no read (header or body, trickled
    a byte at a time) can outlive it; per-read socket timeouts cannot promise that."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._end = time.monotonic() + seconds
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._fired = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()

    def expired(self) -> bool:
        return self._fired or time.monotonic() >= self._end

    def track(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.append(sock)
            if self._fired:
                _shut(sock)

    def _fire(self) -> None:
        with self._lock:
            self._fired = True
            for s in self._socks:
                _shut(s)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _tracked(base, watch: _Deadline):
    """An HTTP(S)Connection class whose raw socket the watchdog can shut."""

    class Conn(base):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            create = self._create_connection

            def connect(*args, **kwargs):
                sock = create(*args, **kwargs)
                watch.track(sock)
                return sock

            # http.client's private hook (socket.create_connection unless replaced): not in typeshed
            self._create_connection: Callable[..., socket.socket] = connect

    return Conn


class _Http(urllib.request.HTTPHandler):
    def __init__(self, watch: _Deadline):
        super().__init__()
        self.watch = watch

    def http_open(self, req):
        return self.do_open(_tracked(http.client.HTTPConnection, self.watch), req)


class _Https(urllib.request.HTTPSHandler):
    def __init__(self, watch: _Deadline):
        super().__init__()
        self.watch = watch

    def https_open(self, req):
        # _context: what HTTPSHandler.__init__ stored (private, not in typeshed)
        return self.do_open(_tracked(http.client.HTTPSConnection, self.watch), req,
                            context=self._context)  # type: ignore[attr-defined]


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects to ftp:// by default; a deploy follows http(s) only."""

    max_redirections = 5

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urllib.parse.urlsplit(urllib.parse.urljoin(req.full_url, newurl)).scheme
        if scheme not in ("http", "https"):
            raise urllib.error.URLError(f"redirect to {scheme}:// refused (http(s) only)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def pack(bundle_dir: Path, out: Path) -> Path:
    """A bundle directory as a .tar.gz with the bundle's name as its top folder (operator side).

    Only manifest.json, signature and the files the manifest lists go in: what a device accepts."""
    b = Bundle.load(Path(bundle_dir).resolve(), verify=False)
    names = [MANIFEST] + ([SIGNATURE] if (b.path / SIGNATURE).is_file() else []) + sorted(b.manifest.files)
    with tarfile.open(out, "w:gz") as tf:
        for rel in names:
            tf.add(b.path / rel, arcname=f"{b.path.name}/{rel}", recursive=False)
    return out
