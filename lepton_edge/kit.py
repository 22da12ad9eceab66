"""Offline install kit: one archive that puts a bundle and exactly the software it needs on a device.

Why a kit: a Pi in a field often has no network, and `pip install lepton-edge[device]` would pull
both runtimes (about 100 MB of wheels) whatever the bundle needs. The kit holds the bundle, a
device-only wheel of this project (no zoo weights), the target's platform wheels of just the
bundle's runtime, install.sh, the systemd unit, an agent.toml filled from flags and SHA256SUMS.

Layout of the archive (one top-level directory, so `tar xf` never scatters files):
    <name>/install.sh  SHA256SUMS  KIT.json  requirements.txt  agent.toml  lepton-edge-agent.service
    <name>/bundle/...  wheels/*.whl  [trusted/*.pem]  [tls/*]
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from importlib import metadata, resources
from importlib.util import find_spec
from pathlib import Path

from lepton_edge.bundle import sha256_file
from lepton_edge.errors import BadInput
from lepton_edge.targets import package_key

DIST = "lepton-edge"
UNIT_NAME = "lepton-edge-agent.service"
# What a device never needs to run a bundle: the zoo's training checkpoints (most of the wheel's bytes).
DEVICE_WHEEL_EXCLUDE = ("lepton_edge/zoo/weights/",)
# Subpackages the build maps from other source folders (pyproject package-dir); an editable install
# resolves them outside lepton_edge/, so the device wheel looks them up by name.
MAPPED_PACKAGES = ("exporters", "targets")
RUNTIME_PACKAGE = {"onnx": "onnxruntime", "tflite": "ai-edge-litert"}
DEVICE_EXTRA = {"onnx": "device-onnx", "tflite": "device-litert"}
MAX_TLS_FILE_BYTES = 64 * 1024
PIP_TIMEOUT_S = 900


@dataclass(frozen=True)
class Platform:
    """The device's wheel tags: CPU arch, the oldest glibc it promises, CPython minor version.

    Why derived here and not in the profile: profiles describe models and budgets; the OS image is
    a fact of the board family (Raspberry Pi OS / Debian bookworm: glibc 2.36, Python 3.11;
    JetPack 6 / Ubuntu 22.04: glibc 2.35, Python 3.10). --glibc / --python override it.
    """

    arch: str
    glibc: tuple[int, int] = (2, 36)
    python: tuple[int, int] = (3, 11)

    @property
    def key(self) -> str:
        return f"cp{self.python[0]}{self.python[1]}-manylinux_{self.glibc[0]}_{self.glibc[1]}_{self.arch}"

    def tags(self) -> list[str]:
        """manylinux_2_<glibc>..manylinux_2_17 (+ manylinux2014): every wheel this glibc can load."""
        tags = [f"manylinux_2_{m}_{self.arch}" for m in range(self.glibc[1], 16, -1)]
        return tags + [f"manylinux2014_{self.arch}"]


OS_DEFAULTS = {"jetson-orin-nano": ((2, 35), (3, 10))}


def platform_for(profile, glibc: str | None = None, python: str | None = None) -> Platform:
    g, py = OS_DEFAULTS.get(profile.id, ((2, 36), (3, 11)))
    return Platform(profile.arch, _version(glibc, "glibc") if glibc else g,
                    _version(python, "python") if python else py)


def _version(s: str, what: str) -> tuple[int, int]:
    if not isinstance(s, str):  # (2.30 as a float is 2.3: the wrong tag, built without a word)
        raise BadInput(f"--{what} must be text such as {'2.36' if what == 'glibc' else '3.11'}, got {s!r}")
    m = re.fullmatch(r"(\d)\.(\d{1,2})", s.strip())
    if not m or (what == "glibc" and m[1] != "2") or (what == "python" and m[1] != "3"):
        raise BadInput(f"--{what} {s!r}: expected {'2.MINOR, e.g. 2.36' if what == 'glibc' else '3.MINOR, e.g. 3.11'}")
    return int(m[1]), int(m[2])


# ---------------------------------------------------------------- requirements
def _req_name(req: str) -> str:
    return package_key(re.split(r"[\s\[<>=!~;(]", req.strip(), maxsplit=1)[0])


def device_requirements(fmt: str, device_packages: dict[str, str], requires: list[str]) -> list[str]:
    """The pip requirement lines for a bundle of format `fmt`: the project's own dependencies plus its
    device extra for that runtime, pinned to the profile's versions where it lists them. A profile
    that names a variant of the runtime (onnxruntime-gpu on a Jetson) gets that instead."""
    extra = DEVICE_EXTRA[fmt]
    runtime = RUNTIME_PACKAGE[fmt]
    pins = {package_key(k): v for k, v in device_packages.items()}  # PEP 503, as _req_name and pip compare
    variant = next((k for k in pins if k != runtime and k.startswith(runtime + "-")), None)
    lines: list[str] = []
    for r in requires:
        spec, _, marker = r.partition(";")
        marker = marker.strip()
        if marker and marker.replace(" ", "").replace("'", '"') != f'extra=="{extra}"':
            continue  # another extra (export, fleet...) or an environment marker: not for a device
        name = _req_name(spec)
        if name == runtime and variant:
            name = variant
        lines.append(f"{name}=={pins[name]}" if name in pins else spec.strip())
    if not any(_req_name(x) in (runtime, variant) for x in lines):
        raise BadInput(f"the installed {DIST} metadata has no [{extra}] extra; reinstall it (pip install -e .)")
    return sorted(set(lines), key=str.lower)


# ---------------------------------------------------------------- the device wheel
def _package_roots() -> list[tuple[str, Path]]:
    """(import path prefix, folder) for lepton_edge and the subpackages mapped from elsewhere."""
    root = Path(find_spec("lepton_edge").origin).parent
    roots = [("lepton_edge", root)]
    for sub in MAPPED_PACKAGES:
        spec = find_spec(f"lepton_edge.{sub}")
        where = Path(spec.origin).parent if spec and spec.origin else None
        if where and where != root / sub:
            roots.append((f"lepton_edge/{sub}", where))
    return roots


def _wheel_files() -> dict[str, Path]:
    files: dict[str, Path] = {}
    for prefix, folder in _package_roots():
        for p in sorted(folder.rglob("*")):
            rel = f"{prefix}/{p.relative_to(folder).as_posix()}"
            if (not p.is_file() or "__pycache__" in p.parts or p.suffix in (".pyc", ".pyo")
                    or any(rel.startswith(x) for x in DEVICE_WHEEL_EXCLUDE)):
                continue
            files.setdefault(rel, p)
    return files


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _installed() -> metadata.Distribution:
    """The installed distribution; a stale `lepton_edge.egg-info` left in a source tree (the current
    directory is on sys.path) must not stand in for it, so a .dist-info (it has a WHEEL file) wins."""
    dists = list(metadata.distributions(name=DIST))
    if not dists:
        raise BadInput(f"{DIST} is not installed as a package (pip install -e .); cannot build its wheel")
    return next((d for d in dists if d.read_text("WHEEL") is not None), dists[0])


def build_device_wheel(out_dir: Path) -> Path:
    """A wheel of the installed package minus the zoo weights, written from the installed files.

    Why not `pip wheel .`: that needs the source tree and ships zoo/weights/*.pt; a workstation that
    installed from PyPI has no source tree. Timestamps are fixed so the same code gives the same bytes.
    """
    dist = _installed()
    version = dist.version
    info = f"lepton_edge-{version}.dist-info"
    entries: list[tuple[str, bytes]] = [(rel, p.read_bytes()) for rel, p in sorted(_wheel_files().items())]
    meta = dist.read_text("METADATA") or f"Metadata-Version: 2.1\nName: {DIST}\nVersion: {version}\n"
    entries += [
        (f"{info}/METADATA", meta.encode()),
        (f"{info}/WHEEL",
         b"Wheel-Version: 1.0\nGenerator: lepton-edge kit\nRoot-Is-Purelib: true\nTag: py3-none-any\n"),
        (f"{info}/entry_points.txt", (dist.read_text("entry_points.txt") or "").encode()),
        (f"{info}/top_level.txt", b"lepton_edge\n"),
    ]
    record = "".join(f"{n},{_record_hash(d)},{len(d)}\n" for n, d in entries) + f"{info}/RECORD,,\n"
    entries.append((f"{info}/RECORD", record.encode()))
    out = out_dir / f"lepton_edge-{version}-py3-none-any.whl"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries:
            zi = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            zi.external_attr = 0o644 << 16
            zi.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(zi, data)
    return out


def wheel_requires(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


# ---------------------------------------------------------------- platform wheels
def wheel_cache(plat: Platform) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lepton-edge" / "wheels" / plat.key


def _pip_download(reqs: Path, dest: Path, plat: Platform, cache: Path, offline: bool) -> subprocess.CompletedProcess:
    """pip runs in `dest` (this kit's own folder, wheels only): `python -m` puts its working directory first on
    sys.path, so `lepton-edge kit` run from a folder holding a pip.py ran that file instead of pip."""
    reqs, dest, cache = reqs.absolute(), dest.absolute(), cache.absolute()
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-input", "-q",
           "--only-binary=:all:", "--implementation", "cp", "--python-version", "{}.{}".format(*plat.python),
           "--abi", "cp{}{}".format(*plat.python), "-d", str(dest), "-r", str(reqs), "--find-links", str(cache)]
    for t in plat.tags():
        cmd += ["--platform", t]
    if offline:
        cmd.append("--no-index")
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, cwd=dest)
    except subprocess.TimeoutExpired:
        raise BadInput(f"downloading the {plat.key} wheels took over {PIP_TIMEOUT_S} s; check the network") from None


def download_wheels(requirements: list[str], dest: Path, plat: Platform) -> list[Path]:
    """Exactly the wheels `requirements` resolve to on `plat`, into dest; from the cache when it has
    them all, else from the index (the cache then keeps them). A package with no wheel for the
    platform fails here, naming it, instead of on the device."""
    cache = wheel_cache(plat)
    cache.mkdir(parents=True, exist_ok=True)
    reqs = dest.parent / "requirements.txt"
    reqs.write_text("\n".join(requirements) + "\n")
    dest.mkdir(parents=True, exist_ok=True)
    r = _pip_download(reqs, dest, plat, cache, offline=True)
    if r.returncode != 0:
        for f in dest.iterdir():
            f.unlink()
        _disk_full(r.stderr)
        r = _pip_download(reqs, dest, plat, cache, offline=False)
    if r.returncode != 0:
        _disk_full(r.stderr)
        m = re.search(r"(?:No matching distribution found for|Could not find a version that satisfies the "
                      r"requirement) (\S+)", r.stderr)
        what = m[1] if m else "a requirement"
        last = ([line for line in r.stderr.splitlines() if line.startswith("ERROR")][-1:]
                or r.stderr.strip().splitlines()[-1:])
        raise BadInput(f"no wheel of {what} for {plat.arch} (CPython {plat.python[0]}.{plat.python[1]}, glibc <= "
                       f"{plat.glibc[0]}.{plat.glibc[1]}): {' '.join(last)[:300]}")
    wheels = sorted(dest.glob("*.whl"))
    for w in wheels:
        if not (cache / w.name).exists():
            shutil.copy2(w, cache / w.name)
    return wheels


def _disk_full(stderr: str) -> None:
    """pip failed because the kit's folder (or pip's own temporary one) is full: the OSError build() reports as
    such. Why: it read "no wheel of a requirement for aarch64 ...: ERROR: Exception:", after a second try
    at the index, as if the platform had no wheel."""
    m = re.search(r"OSError: \[Errno (28|122)\] ([^:\n]+)", stderr)
    if m:
        raise OSError(int(m[1]), m[2].strip())


# ---------------------------------------------------------------- agent.toml
def _toml_str(s: str) -> str:
    """`s` as a TOML basic string. Not json.dumps: JSON escapes a character past U+FFFF (an emoji in a
    video's name) as a surrogate pair, which TOML refuses, so the device's agent could not read the
    agent.toml the kit had built. Here only the quote, the backslash and control characters are escaped;
    everything else is written as itself (the file is UTF-8)."""
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        elif 0xD800 <= ord(ch) <= 0xDFFF:  # a lone surrogate (from undecodable bytes in a name): no TOML for it
            raise BadInput(f"{s!r}: not valid Unicode text (a lone surrogate); rename the file")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


@dataclass
class AgentSettings:
    broker: str = "mqtt://localhost:1883"
    fleet: str = "default"
    device_id: str | None = None  # None: the agent picks the hostname (or machine id) on the device
    source: str = "0"
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    extra_trusted: list[str] = field(default_factory=list)

    def validate(self) -> None:
        """The agent's own schema checks the values now, so a typo fails here and not on the Pi."""
        from pydantic import ValidationError

        from lepton_edge.agent.config import AgentConfig

        data = {"broker": self.broker, "fleet": self.fleet, "source": self.source}
        if self.device_id is not None:
            data["device_id"] = self.device_id
        try:
            AgentConfig.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            flag = str(err["loc"][0]).replace("_", "-")
            raise BadInput(f"--{flag}: {err['msg'].removeprefix('Value error, ')}") from None
        if not re.match(r"^(mqtts?|wss?)://[^\s/]+", self.broker):
            raise BadInput(f"--broker {self.broker!r}: expected mqtt://host:port (or mqtts://, ws://, wss://)")
        from lepton_edge.telemetry.broker import parse_broker

        parse_broker(self.broker)  # the agent's own parser: a bad port fails here, not in a restart loop on the Pi
        for flag, p in (("--ca-file", self.ca_file), ("--cert-file", self.cert_file), ("--key-file", self.key_file)):
            if p is not None and not Path(p).is_file():
                raise BadInput(f"{flag} {p}: not a file")
            if p is not None and Path(p).stat().st_size > MAX_TLS_FILE_BYTES:
                raise BadInput(f"{flag} {p}: larger than {MAX_TLS_FILE_BYTES // 1024} KB; not a PEM file")

    def tls_files(self) -> list[tuple[str, Path, str, int]]:
        """(agent.toml key, the operator's file, its name in the kit's tls/ and on the device, mode) of each
        TLS file given. Why fixed names: two files of one base name (tlsA/cert.pem, tlsB/cert.pem) were
        one file in the kit, and a name with a space or a newline is not a name install.sh should read."""
        given = (("ca_file", self.ca_file, "ca.crt", 0o644), ("cert_file", self.cert_file, "client.crt", 0o644),
                 ("key_file", self.key_file, "client.key", 0o600))
        return [(k, Path(p), name, mode) for k, p, name, mode in given if p is not None]

    def render(self, trusted: list[str]) -> str:
        lines = ["# Written by `lepton-edge kit`; install.sh keeps an existing /etc/lepton-edge/agent.toml.",
                 f"broker = {_toml_str(self.broker)}", f"fleet = {_toml_str(self.fleet)}"]
        if self.device_id is not None:
            lines.append(f"device_id = {_toml_str(self.device_id)}")
        else:
            lines.append("# device_id: not set, the agent uses the hostname (or /etc/machine-id)")
        lines += [f"source = {_toml_str(self.source)}",
                  'state_dir = "/var/lib/lepton-edge"',
                  'bundle = "/var/lib/lepton-edge/kit-bundle"  # a bundle deployed later, kept in state_dir, wins']
        for key, _p, name, _mode in self.tls_files():
            lines.append(f"{key} = {_toml_str('/etc/lepton-edge/tls/' + name)}")
        if trusted:
            keys = ", ".join(_toml_str(f"/etc/lepton-edge/trusted/{t}") for t in trusted)
            lines.append(f"trusted_keys = [{keys}]")
        return "\n".join(lines) + "\n"


def _check_rendered(text: str, settings: AgentSettings) -> None:
    """The agent.toml as the device will read it: valid TOML giving back the values the flags gave."""
    from lepton_edge import tomlfile

    data = tomlfile.loads(text, "the kit's agent.toml", "agent config")
    for key in ("broker", "fleet", "source", "device_id"):
        if getattr(settings, key) is not None and data.get(key) != getattr(settings, key):
            raise BadInput(f"the kit's agent.toml would not give back --{key.replace('_', '-')} as given")


# ---------------------------------------------------------------- the kit
def _template(name: str) -> str:
    return (resources.files("lepton_edge") / "kit_files" / name).read_text()


def unit_file() -> str:
    """The systemd unit. kit_files/ holds a symlink to examples/raspberry_pi/'s (the one documented and
    hardened): one source in the repository, and a wheel build copies the file it points to."""
    return _template(UNIT_NAME)


@dataclass
class KitReport:
    output: Path
    target: str
    platform: str
    runtime: str
    wheels: list[str]
    wheels_bytes: int
    kit_bytes: int
    signed_by: str | None

    def as_dict(self) -> dict:
        d = self.__dict__.copy()
        d["output"] = str(self.output)
        return d


def build(bundle: Path, output: Path, target: str | None = None, key: Path | None = None,
          settings: AgentSettings | None = None, glibc: str | None = None, python: str | None = None) -> KitReport:
    """Write the kit archive for `bundle` to `output`; on any failure nothing is left behind."""
    from lepton_edge import targets
    from lepton_edge.bundle import Bundle, read_manifest_bytes

    settings = settings or AgentSettings()
    if not isinstance(settings, AgentSettings):
        raise BadInput(f"settings must be a kit.AgentSettings, got {type(settings).__name__}")
    bundle = Path(bundle)
    if not (bundle / "manifest.json").is_file():
        raise BadInput(f"{bundle}: not a bundle directory (no manifest.json)")
    b = Bundle.from_bytes(bundle, read_manifest_bytes(bundle))  # checksums first: never ship a broken bundle
    fmt = b.manifest.format
    if fmt not in RUNTIME_PACKAGE:
        raise BadInput(f"{bundle}: format {fmt!r} has no device runtime")
    if target is None:
        # the manifest is input: its target id may only name a built-in profile, never a file
        target = b.manifest.target.get("id")
        if not isinstance(target, str) or target not in targets.builtin_ids():
            raise BadInput(f"{bundle}: its target {str(target)[:64]!r} is not a built-in profile; pass --target")
    profile = targets.load(target)
    plat = platform_for(profile, glibc, python)
    settings.validate()
    output = Path(output).expanduser()
    name = _kit_name(output, bundle)
    files = _bundle_files(bundle)

    try:
        return _build(bundle, output, name, files, key, settings, fmt, profile, plat, b)
    except OSError as e:  # a full disk, a quota, a mount gone read-only: one line (it was a traceback, exit 1)
        raise BadInput(f"-o {output}: cannot write the kit ({e.strerror or e})") from None


def _build(bundle, output, name, files, key, settings, fmt, profile, plat, b) -> KitReport:
    """build()'s work, in a work folder beside `output` that goes whatever happens."""
    with tempfile.TemporaryDirectory(prefix=".kit-", dir=output.parent) as tmp:
        root = Path(tmp) / name
        root.mkdir()
        for rel in files:  # regular files only, each read without following a link (_bundle_files)
            (root / "bundle" / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bundle / rel, root / "bundle" / rel, follow_symlinks=False)
        signed_by = None
        trusted: list[str] = []
        if key is not None:
            from lepton_edge import signing

            signing.sign(root / "bundle", key)
            pub = signing._load_private(Path(key)).public_key()
            signed_by = signing.key_id(pub)
            from cryptography.hazmat.primitives import serialization

            (root / "trusted").mkdir()
            (root / "trusted" / "kit-signer.pem").write_bytes(pub.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
            trusted.append("kit-signer.pem")
        for _key, p, tls_name, mode in settings.tls_files():
            (root / "tls").mkdir(exist_ok=True)
            shutil.copyfile(p, root / "tls" / tls_name)
            (root / "tls" / tls_name).chmod(mode)  # the client key stays private in the archive too
        wheels_dir = root / "wheels"
        wheels_dir.mkdir()
        own = build_device_wheel(Path(tmp))
        reqs = device_requirements(fmt, profile.device_packages, wheel_requires(own))
        wheels = download_wheels(reqs, wheels_dir, plat)
        shutil.move(str(own), wheels_dir / own.name)
        wheels.append(wheels_dir / own.name)
        text = settings.render(trusted)
        _check_rendered(text, settings)
        (root / "agent.toml").write_bytes(text.encode())
        secret = settings.key_file is not None or "@" in settings.broker.split("://", 1)[-1].split("/", 1)[0]
        if secret:  # a client key or broker credentials: the config and the archive are not world-readable
            (root / "agent.toml").chmod(0o600)
        (root / UNIT_NAME).write_text(unit_file())
        script = (_template("install.sh").replace("@KIT_ARCH@", plat.arch)
                  .replace("@KIT_PYTHON@", "{}.{}".format(*plat.python)).replace("@KIT_NAME@", name)
                  .replace("@KIT_WHEEL@", own.name))
        (root / "install.sh").write_text(script)
        (root / "install.sh").chmod(0o755)
        info = {"kit_schema": 1, "bundle": b.manifest.name, "bundle_version": b.manifest.version,
                "target": profile.id, "platform": plat.key, "runtime": RUNTIME_PACKAGE[fmt],
                "requirements": reqs, "signed_by": signed_by}
        (root / "KIT.json").write_text(json.dumps(info, indent=2) + "\n")
        files = sorted(p for p in root.rglob("*") if p.is_file())
        sums = "".join(f"{sha256_file(p)}  {p.relative_to(root).as_posix()}\n" for p in files)
        (root / "SHA256SUMS").write_text(sums)
        part = Path(tmp) / "kit.tar.gz"
        with tarfile.open(part, "w:gz", compresslevel=1) as tar:
            tar.add(root, arcname=name, filter=_tar_filter)
        wheels_bytes = sum(w.stat().st_size for w in wheels)
        part.chmod(0o600 if secret else 0o644)
        os.replace(part, output)
    return KitReport(output, profile.id, plat.key, RUNTIME_PACKAGE[fmt], [w.name for w in wheels], wheels_bytes,
                     output.stat().st_size, signed_by)


# A kit's name is its folder on the device, pasted into install.sh and the command the summary prints:
# no space, quote, `$`, newline or slash can be in it.
_KIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


def _kit_name(output: Path, bundle: Path) -> str:
    """The kit's name from `-o`, after the output's checks: a .tar.gz in an existing folder, not a
    folder itself, not inside the bundle it packs (copying a folder into itself never ends)."""
    if not output.name.endswith((".tar.gz", ".tgz")):
        raise BadInput(f"-o {output}: the kit is a .tar.gz archive")
    if not output.parent.is_dir():
        raise BadInput(f"-o {output}: folder {output.parent} does not exist")
    from lepton_edge.paths import check_output_dir

    # a folder of /proc or /sys, a read-only mount, one this user cannot write: one line (the work folder's
    # mkdtemp there was a traceback, exit 1)
    check_output_dir(output.parent, "-o")
    if output.is_dir() or (output.exists() and not output.is_file()):
        raise BadInput(f"-o {output}: exists and is not a file")
    if output.resolve().is_relative_to(bundle.resolve()):
        raise BadInput(f"-o {output}: inside the bundle {bundle}; write the kit elsewhere")
    name = output.name.removesuffix(".tar.gz").removesuffix(".tgz")
    if not _KIT_NAME.fullmatch(name):
        raise BadInput(f"-o {output.name!r}: a kit's name (its folder on the device) may hold letters, digits, "
                       "'.', '_', '+' and '-' only, starting with a letter or digit")
    return name


def _bundle_files(bundle: Path) -> list[Path]:
    """Every file of the bundle, relative to it; one line for a symlink or anything not a regular file.
    Why: the checksums cover the manifest's files, but `signature` is outside them, and copying followed
    a link: `signature -> ~/.ssh/id_ed25519` shipped that file in the kit."""
    out = []
    for dirpath, dirnames, filenames in os.walk(bundle):
        d = Path(dirpath)
        dirnames[:] = [n for n in dirnames if n != "__pycache__"]
        for n in dirnames + filenames:
            p = d / n
            if p.is_symlink() or not (p.is_dir() or p.is_file()):
                raise BadInput(f"{p}: {'a symlink' if p.is_symlink() else 'not a regular file'}; "
                               "a bundle holds regular files only")
        out += [(d / n).relative_to(bundle) for n in filenames]
    return sorted(out)


def _tar_filter(ti: tarfile.TarInfo) -> tarfile.TarInfo:
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    ti.mtime = 0 if ti.isdir() else ti.mtime
    return ti


def summary(rep: KitReport) -> str:
    buf = io.StringIO()
    buf.write(f"kit: {rep.output} ({rep.kit_bytes / 1e6:.1f} MB) for {rep.target} [{rep.platform}], "
              f"runtime {rep.runtime}, {len(rep.wheels)} wheels ({rep.wheels_bytes / 1e6:.1f} MB)"
              + (f", bundle signed by {rep.signed_by}" if rep.signed_by else "") + "\n")
    name = rep.output.name.removesuffix(".tar.gz").removesuffix(".tgz")
    buf.write(f"on the device, offline:  tar xf {shlex.quote(rep.output.name)} && sudo ./{name}/install.sh\n")
    return buf.getvalue()
