"""`lepton-edge kit`: the offline install kit, and install.sh's refusals (run here, on x86_64).

The kit's wheels come from PyPI the first time and from ~/.cache/lepton-edge/wheels/ after that.
The full install on arm64 is scripts/arm64/run.sh (`make test-arm64`), which needs root and minutes.
"""
from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import tomllib

from lepton_edge import kit
from lepton_edge.errors import BadInput

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    from lepton_edge.signing import new_keys

    return new_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def rpi4_kit(rpi4_bundle, keys, tmp_path_factory):
    out = tmp_path_factory.mktemp("kit") / "pi-kit.tar.gz"
    settings = kit.AgentSettings(broker="mqtt://10.0.0.5:1883", fleet="lab", device_id="pi-7", source="0")
    rep = kit.build(_path(rpi4_bundle), out, target="rpi4", key=keys[0], settings=settings)
    return rep


def _path(exported) -> Path:
    return Path(exported.bundle.path)


def _extract(archive: Path, dest: Path) -> Path:
    with tarfile.open(archive) as t:
        t.extractall(dest, filter="data")
    (root,) = list(dest.iterdir())
    return root


def _install(kit_dir: Path, root: Path, *args):
    return subprocess.run(["bash", str(kit_dir / "install.sh"), *args], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "LEPTON_EDGE_ROOT": str(root)})


def test_rpi4_kit_holds_the_bundle_and_only_the_litert_runtime(rpi4_kit, keys, tmp_path):
    assert rpi4_kit.runtime == "ai-edge-litert" and rpi4_kit.platform == "cp311-manylinux_2_36_aarch64"
    d = _extract(rpi4_kit.output, tmp_path)
    wheels = sorted(p.name for p in (d / "wheels").iterdir())
    assert any(w.startswith("ai_edge_litert-2.3.0-cp311") and "aarch64" in w for w in wheels)
    assert not any(w.startswith("onnxruntime") for w in wheels), wheels  # a TFLite bundle gets no onnxruntime
    assert all(w.endswith("-none-any.whl") or "aarch64" in w for w in wheels), wheels
    # the project wheel: device-only, no zoo weights (the workstation install keeps them)
    own = next(d / "wheels" / w for w in wheels if w.startswith("lepton_edge-"))
    names = zipfile.ZipFile(own).namelist()
    assert "lepton_edge/runtime/litert.py" in names and "lepton_edge/targets/rpi4.toml" in names
    assert not [n for n in names if "zoo/weights/" in n or n.endswith(".pt")]
    assert (REPO / "lepton_edge/zoo/weights/fashion-cnn.pt").exists()
    # SHA256SUMS names every other file, with the right digest
    sums = dict(reversed(line.split("  ", 1)) for line in (d / "SHA256SUMS").read_text().splitlines())
    files = {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()} - {"SHA256SUMS"}
    assert set(sums) == files
    assert sums["bundle/model.tflite"] == hashlib.sha256((d / "bundle/model.tflite").read_bytes()).hexdigest()
    # agent.toml from the flags, valid for the agent; the bundle signed, the public key trusted
    from lepton_edge.agent.config import AgentConfig
    from lepton_edge.signing import verify

    cfg = AgentConfig.model_validate(tomllib.loads((d / "agent.toml").read_text()))
    assert (cfg.broker, cfg.fleet, cfg.device_id) == ("mqtt://10.0.0.5:1883", "lab", "pi-7")
    assert cfg.trusted_keys == [Path("/etc/lepton-edge/trusted/kit-signer.pem")]
    assert verify(d / "bundle", [d / "trusted/kit-signer.pem"])
    assert (d / "lepton-edge-agent.service").read_text() == (
        REPO / "examples/raspberry_pi/lepton-edge-agent.service").read_text()
    reqs = (d / "requirements.txt").read_text().split()
    assert "ai-edge-litert==2.3.0" in reqs and not any(r.startswith("onnxruntime") for r in reqs)


def test_install_sh_refuses_the_wrong_architecture_and_changes_nothing(rpi4_kit, tmp_path):
    if platform.machine() == "aarch64":
        pytest.skip("this host is aarch64: the kit fits it")
    d = _extract(rpi4_kit.output, tmp_path / "x")
    root = tmp_path / "root"
    root.mkdir()
    r = _install(d, root)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "for aarch64" in lines[0] and platform.machine() in lines[0], r.stderr
    assert list(root.iterdir()) == []


def _reseal(d: Path, rel: str) -> None:
    """Recompute one file's line in SHA256SUMS (to reach the checks after the checksum)."""
    digest = hashlib.sha256((d / rel).read_bytes()).hexdigest()
    text = (d / "SHA256SUMS").read_text()
    (d / "SHA256SUMS").write_text(re.sub(rf"^\w+  {re.escape(rel)}$", f"{digest}  {rel}", text, flags=re.M))


def test_install_sh_refuses_the_wrong_python(rpi4_kit, tmp_path):
    d = _extract(rpi4_kit.output, tmp_path / "x")
    s = (d / "install.sh").read_text()
    (d / "install.sh").write_text(s.replace("KIT_ARCH=aarch64", f"KIT_ARCH={platform.machine()}")
                                  .replace("KIT_PYTHON=3.11", "KIT_PYTHON=3.99"))
    _reseal(d, "install.sh")
    root = tmp_path / "root"
    root.mkdir()
    r = _install(d, root)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "for Python 3.99" in r.stderr and "this machine has Python" in r.stderr
    assert list(root.iterdir()) == []


@pytest.mark.parametrize("tamper", ["changed-file", "added-wheel"])
def test_install_sh_refuses_a_tampered_kit(rpi4_kit, tmp_path, tamper):
    d = _extract(rpi4_kit.output, tmp_path / "x")
    if tamper == "changed-file":
        with open(d / "bundle" / "labels.txt", "a") as f:
            f.write("x\n")
        want = "checksum mismatch"
    else:
        shutil.copy(next((d / "wheels").glob("paho_mqtt-*.whl")), d / "wheels" / "evil-1.0-py3-none-any.whl")
        want = "is not in SHA256SUMS"
    root = tmp_path / "root"
    root.mkdir()
    r = _install(d, root, "--check")
    assert r.returncode == 1 and want in r.stderr and "refusing" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert list(root.iterdir()) == []


def test_a_profile_without_wheels_for_its_platform_fails_at_kit_time(int8_bundle, tmp_path):
    # onnxruntime-gpu has no aarch64 wheel on PyPI (JetPack's come from NVIDIA): say so now, not on the board
    out = tmp_path / "jetson.tar.gz"
    with pytest.raises(BadInput, match=r"onnxruntime-gpu==1\.23\.0 for aarch64 \(CPython 3\.10, glibc <= 2\.35\)"):
        kit.build(_path(int8_bundle), out, target="jetson-orin-nano")
    assert not out.exists() and not list(tmp_path.glob(".kit-*"))


def test_kit_cli_bad_flags_are_one_line(rpi4_bundle, tmp_path):
    cases = [
        (["--broker", "http://x"], "--broker"),
        (["--fleet", "a/b"], "--fleet"),
        (["--ca-file", str(tmp_path / "nope.pem")], "not a file"),
        (["-o", str(tmp_path / "kit.zip")], ".tar.gz"),
    ]
    for extra, want in cases:
        args = [sys.executable, "-m", "lepton_edge.kit_cli", str(_path(rpi4_bundle)),
                "-o", str(tmp_path / "k.tar.gz"), *extra]
        r = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, (extra, r.stderr)
        assert want in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not list(tmp_path.glob("*.tar.gz")) and not list(tmp_path.glob(".kit-*"))


def test_a_manifest_target_never_names_a_profile_file(rpi4_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(_path(rpi4_bundle), b)
    m = (b / "manifest.json").read_text()
    (b / "manifest.json").write_text(m.replace('"id": "rpi4"', '"id": "/etc/evil.toml"', 1))
    with pytest.raises(BadInput, match="pass --target"):
        kit.build(b, tmp_path / "k.tar.gz")


def test_split_device_extras():
    from importlib import metadata

    reqs = [r for d in metadata.distributions(name="lepton-edge") if d.read_text("WHEEL") for r in d.requires]
    onnx = {kit._req_name(r) for r in reqs if 'extra == "device-onnx"' in r}
    litert = {kit._req_name(r) for r in reqs if 'extra == "device-litert"' in r}
    assert "onnxruntime" in onnx and "ai-edge-litert" not in onnx
    assert "ai-edge-litert" in litert and "onnxruntime" not in litert
    assert any(r.startswith("lepton-edge[device-litert,device-onnx]") for r in reqs if 'extra == "device"' in r)


def test_a_failed_install_removes_its_half_built_venv(rpi4_kit, tmp_path):
    """install.sh's EXIT trap read a `local` of the function that had returned: under `set -u` it stopped
    at that name, so a failed pip install left its venv behind and never said the old install stood.
    Here the kit's arm64 wheels cannot install on this x86 host (the kit is resealed to pass the arch check)."""
    if platform.machine() == "aarch64":
        pytest.skip("this host is aarch64: the kit's wheels would install")
    d = _extract(rpi4_kit.output, tmp_path / "x")
    s = (d / "install.sh").read_text()
    (d / "install.sh").write_text(s.replace("KIT_ARCH=aarch64", f"KIT_ARCH={platform.machine()}")
                                  .replace("KIT_PYTHON=3.11", "KIT_PYTHON={}.{}".format(*_system_python())))
    _reseal(d, "install.sh")
    root = tmp_path / "root"
    root.mkdir()
    r = subprocess.run(["bash", str(d / "install.sh")], capture_output=True, text=True, timeout=300,
                       env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "LEPTON_EDGE_ROOT": str(root)})
    assert r.returncode != 0 and "unbound variable" not in r.stderr, r.stderr[-2000:]
    assert "failed; the previous install (if any) is unchanged" in r.stderr, r.stderr[-2000:]
    assert list((root / "opt/lepton-edge").glob("venv-*")) == [], "the half-built venv stayed"


def _system_python() -> tuple[int, int]:
    out = subprocess.run(["/usr/bin/python3", "-c", "import sys; print(*sys.version_info[:2])"],
                         capture_output=True, text=True, timeout=30).stdout.split()
    return int(out[0]), int(out[1])


def test_kit_refuses_what_would_reach_outside_its_files(rpi4_bundle, tmp_path):
    """A `signature` symlink shipped the file it pointed at; a name with a newline became a command in
    install.sh; -o a folder or a path inside the bundle gave tracebacks (the latter copied the bundle
    into itself); a port the agent refuses was accepted."""
    b = tmp_path / "b"
    shutil.copytree(_path(rpi4_bundle), b)
    (tmp_path / "secret.txt").write_text("SECRET")
    (b / "signature").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(BadInput, match="signature: a symlink"):
        kit.build(b, tmp_path / "k.tar.gz")
    (b / "signature").unlink()
    (tmp_path / "dir.tar.gz").mkdir()
    cases = [(tmp_path / "x\ntouch PWNED #.tar.gz", "may hold letters"), (tmp_path / "my kit.tar.gz", "may hold"),
             (tmp_path / "dir.tar.gz", "exists and is not a file"), (b / "k.tar.gz", "inside the bundle")]
    for out, want in cases:
        with pytest.raises(BadInput, match=want):
            kit.build(b, out)
    for broker in ("mqtt://h:abc", "mqtt://h:99999"):
        with pytest.raises(BadInput, match="bad port"):
            kit.build(b, tmp_path / "k.tar.gz", settings=kit.AgentSettings(broker=broker))
    assert [p.name for p in tmp_path.glob("*.tar.gz*")] == ["dir.tar.gz"] and (tmp_path / "dir.tar.gz").is_dir()
    assert not list(tmp_path.glob(".kit-*")) and not list(b.glob(".kit-*"))


def test_tls_files_of_one_base_name_stay_apart_and_the_key_stays_private(rpi4_bundle, tmp_path):
    """tlsA/cert.pem as the CA and tlsB/cert.pem as the client certificate were one file in the kit (the CA
    dropped); a name with a space failed install.sh's own check; the client key was 0644 in the archive."""
    for d, body in (("tlsA", "CA"), ("tlsB", "CLIENT")):
        (tmp_path / d).mkdir()
        (tmp_path / d / "cert.pem").write_text(body)
    (tmp_path / "tlsB" / "my key.pem").write_text("KEY")
    (tmp_path / "tlsB" / "my key.pem").chmod(0o600)
    settings = kit.AgentSettings(broker="mqtts://u:p@h:8883", ca_file=tmp_path / "tlsA/cert.pem",
                                 cert_file=tmp_path / "tlsB/cert.pem", key_file=tmp_path / "tlsB/my key.pem")
    rep = kit.build(_path(rpi4_bundle), tmp_path / "tls-kit.tar.gz", settings=settings)
    assert rep.output.stat().st_mode & 0o077 == 0  # credentials inside: not world-readable
    with tarfile.open(rep.output) as t:
        modes = {m.name.split("/", 1)[1]: m.mode for m in t.getmembers() if m.isfile()}
    assert modes["tls/client.key"] == 0o600 and modes["agent.toml"] == 0o600
    d = _extract(rep.output, tmp_path / "x")
    assert (d / "tls/ca.crt").read_text() == "CA" and (d / "tls/client.crt").read_text() == "CLIENT"
    cfg = tomllib.loads((d / "agent.toml").read_text())
    assert (cfg["ca_file"], cfg["cert_file"], cfg["key_file"]) == (
        "/etc/lepton-edge/tls/ca.crt", "/etc/lepton-edge/tls/client.crt", "/etc/lepton-edge/tls/client.key")
    root = tmp_path / "root"
    root.mkdir()
    r = _install(d, root, "--check")  # past the checksum and listed-files checks, to the architecture
    assert "SHA256SUMS" not in r.stderr and ("for aarch64" in r.stderr or r.returncode == 0), r.stderr


def test_kit_flags_and_python_api_values_are_checked_in_one_line(rpi4_bundle, tmp_path):
    """`--glibc 9.99` made the tag manylinux_9_99; glibc as a float or settings as a dict were bare
    AttributeErrors; `--fleet a/b` said "(letters, digits, '-', '-', ...)" (its '_' replaced)."""
    for value, what in (("9.99", "glibc"), ("2.x", "glibc"), ("2.11", "python")):
        with pytest.raises(BadInput, match=rf"--{what} '{re.escape(value)}': expected"):
            kit._version(value, what)
    with pytest.raises(BadInput, match="must be text"):
        kit._version(2.30, "glibc")  # a float 2.30 is 2.3: refused, not read as glibc 2.3
    with pytest.raises(BadInput, match="settings must be a kit.AgentSettings, got dict"):
        kit.build(_path(rpi4_bundle), tmp_path / "k.tar.gz", settings={"broker": "mqtt://x"})
    with pytest.raises(BadInput) as e:
        kit.AgentSettings(fleet="a/b").validate()
    assert str(e.value).startswith("--fleet: ") and "'_'" in str(e.value) and "Value error" not in str(e.value)


def _host_kit(d: Path, bundle: Path, signer: Path, wheel_dir: Path) -> None:
    """A kit for this host (its arch, /usr/bin/python3) around `bundle`, signed by `signer`'s key: the real
    install.sh and project wheel; the wheel's dependencies come from this venv through PYTHONPATH."""
    from cryptography.hazmat.primitives import serialization

    from lepton_edge.bundle import sha256_file
    from lepton_edge.signing import _load_private, sign

    shutil.copytree(bundle, d / "bundle")
    sign(d / "bundle", signer)
    (d / "trusted").mkdir()
    (d / "trusted/kit-signer.pem").write_bytes(_load_private(signer).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    own = kit.build_device_wheel(wheel_dir)
    (d / "wheels").mkdir()
    shutil.move(str(own), d / "wheels" / own.name)
    (d / "requirements.txt").write_text("\n")
    (d / "agent.toml").write_text(kit.AgentSettings().render(["kit-signer.pem"]))
    (d / kit.UNIT_NAME).write_text(kit.unit_file())
    (d / "install.sh").write_text(kit._template("install.sh").replace("@KIT_ARCH@", platform.machine())
                                  .replace("@KIT_PYTHON@", "{}.{}".format(*_system_python()))
                                  .replace("@KIT_NAME@", "k").replace("@KIT_WHEEL@", own.name))
    files = sorted(p for p in d.rglob("*") if p.is_file())
    (d / "SHA256SUMS").write_text("".join(f"{sha256_file(p)}  {p.relative_to(d).as_posix()}\n" for p in files))


def test_a_failed_upgrade_leaves_the_trusted_keys_its_bundle_needs(tmp_path):
    """install.sh wrote the kit's trusted keys before the switch; an upgrade that failed after that (here
    the venv is a folder an operator made, which the switch refuses; a full disk while the bundle is
    copied alike) said "the previous install is unchanged" and left the old bundle under the new kit's
    key, so the agent refused it at its next start. Now the keys change only with the bundle."""
    import sysconfig

    from lepton_edge.errors import LeptonError
    from lepton_edge.signing import new_keys, sign, verify
    from test_agent_tiny import _tiny

    if _system_python()[:2] != sys.version_info[:2]:
        pytest.skip("the kit's venv borrows this venv's packages: /usr/bin/python3 must be the same minor version")
    (a_priv, a_pub), (b_priv, _) = new_keys(tmp_path / "ka"), new_keys(tmp_path / "kb")
    root = tmp_path / "root"
    etc, state = root / "etc/lepton-edge", root / "var/lib/lepton-edge"
    (etc / "trusted").mkdir(parents=True)
    shutil.copy(a_pub, etc / "trusted/kit-signer.pem")
    (etc / "agent.toml").write_text(kit.AgentSettings().render(["kit-signer.pem"]))
    _tiny(state / "kit-bundle", 1)
    sign(state / "kit-bundle", a_priv)
    (root / "opt/lepton-edge/venv").mkdir(parents=True)  # a venv made by hand: a folder, not install.sh's link
    d = tmp_path / "kit"
    d.mkdir()
    _host_kit(d, _tiny(tmp_path / "new", 2), b_priv, tmp_path)  # the next kit is signed by a rotated key
    r = subprocess.run(["bash", str(d / "install.sh")], capture_output=True, text=True, timeout=300,
                       env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "LEPTON_EDGE_ROOT": str(root),
                            "PYTHONPATH": sysconfig.get_paths()["purelib"]})
    assert r.returncode == 1 and "the previous install is unchanged" in r.stderr, r.stderr[-2000:]
    assert (etc / "trusted/kit-signer.pem").read_bytes() == a_pub.read_bytes()
    try:
        verify(state / "kit-bundle", [etc / "trusted/kit-signer.pem"])
    except LeptonError as e:
        pytest.fail(f"the previous install's bundle no longer verifies: {e}")
    assert sorted(p.name for p in (root / "opt/lepton-edge").iterdir()) == ["venv"]  # nothing half-built left
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # (mv's own line too, before)
    assert sorted(p.name for p in state.iterdir()) == ["kit-bundle"]


@pytest.mark.parametrize("odd", ["linked-wheel", "fifo"])
def test_install_sh_refuses_a_link_or_a_fifo_in_the_kit(tmp_path, odd):
    """The check for files SHA256SUMS does not name looked at `-type f` only: a wheel linked into wheels/
    (an archive's symlink member) passed `--check` and would be offered to pip; a FIFO passed too (one named in
    SHA256SUMS blocks sha256sum for ever)."""
    from lepton_edge.signing import new_keys
    from test_agent_tiny import _tiny

    d = tmp_path / "kit"
    d.mkdir()
    _host_kit(d, _tiny(tmp_path / "b", 1), new_keys(tmp_path / "k")[0], tmp_path)
    own = next((d / "wheels").glob("*.whl"))
    if odd == "linked-wheel":
        shutil.copy(own, tmp_path / "paho_mqtt-99.0-py3-none-any.whl")
        (d / "wheels" / "paho_mqtt-99.0-py3-none-any.whl").symlink_to(tmp_path / "paho_mqtt-99.0-py3-none-any.whl")
        name = "wheels/paho_mqtt-99.0-py3-none-any.whl"
    else:
        os.mkfifo(d / "bundle" / "model.fifo")
        name = "bundle/model.fifo"
    root = tmp_path / "root"
    root.mkdir()
    r = _install(d, root, "--check")
    assert r.returncode == 1 and f"{name} is not a regular file" in r.stderr and "refusing" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert list(root.iterdir()) == []


def test_kit_never_runs_a_pip_py_from_the_working_directory(tmp_path):
    """`python -m pip download` puts the working directory first on sys.path: `lepton-edge kit` run from a
    folder holding a pip.py ran that file (and then said no wheel could be found)."""
    from test_agent_tiny import _tiny

    b = _tiny(tmp_path / "b", 1)
    here = tmp_path / "cwd"
    here.mkdir()
    marker = tmp_path / "RAN"
    (here / "pip.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nraise SystemExit(1)\n")
    exe = Path(sys.executable).parent / "lepton-edge"
    r = subprocess.run([str(exe), "kit", str(b), "--target", "rpi4", "-o", "k.tar.gz"], capture_output=True,
                       text=True, timeout=900, cwd=here, env={**os.environ, "COLUMNS": "200"})
    assert not marker.exists(), "pip.py from the working directory ran"
    assert r.returncode == 0 and (here / "k.tar.gz").is_file(), r.stderr[-2000:]


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: needs root")
def test_a_kit_folder_too_small_for_the_wheels_says_the_disk_is_full(tmp_path):
    """pip failed on a full disk while it copied the wheels into the kit: the kit said "no wheel of a
    requirement for aarch64 ...: ERROR: Exception:" (after a second try at the index), as if the platform
    had none. It is the full disk's line now, with nothing left beside -o."""
    from test_agent_tiny import _tiny

    bundle = _tiny(tmp_path / "tiny", 1)
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(out)], check=True, capture_output=True)
    try:
        with pytest.raises(BadInput, match=r"cannot write the kit \(No space left on device\)"):
            kit.build(bundle, out / "pi.tar.gz", target="rpi4")
        assert os.listdir(out) == []
    finally:
        subprocess.run(["umount", "-l", str(out)], capture_output=True)
