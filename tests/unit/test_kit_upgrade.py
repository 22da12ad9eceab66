"""install.sh's upgrade check (lepton_edge/kit_upgrade.py): an agent.toml kept from the last install against
the new kit's bundle and keys. Real keys, real signed bundles, the real config loader; no install."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lepton_edge.bundle import InputSpec, Manifest, OutputSpec, write_manifest
from lepton_edge.kit_upgrade import ETC_TRUSTED, main, problem
from lepton_edge.signing import new_keys, sign


def _kit(tmp_path: Path, key: Path | None) -> tuple[Path, Path]:
    """(bundle, trusted/) of a kit: signed with `key` (its public key in trusted/ as kit-signer.pem) or not."""
    b = tmp_path / "kit" / "bundle"
    b.mkdir(parents=True)
    (b / "model.onnx").write_bytes(b"model" * 20)
    write_manifest(b, Manifest(name="t", created="2026-01-01", target={"id": "rpi4"}, format="onnx", precision="fp32",
                               model_file="model.onnx", inputs=[InputSpec(name="x", shape=[1, 4])],
                               outputs=[OutputSpec(name="y", shape=[1, 2])]))
    trusted = tmp_path / "kit" / "trusted"
    if key is not None:
        sign(b, key)
        trusted.mkdir()
        shutil.copy(key.with_name("public.pem"), trusted / "kit-signer.pem")
    return b, trusted


def _config(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "etc" / "agent.toml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text('fleet = "lab"\ndevice_id = "pi-1"\n' + body)
    return p


def test_an_unsigned_kit_over_a_config_that_trusts_keys_is_refused(tmp_path, capsys):
    """It installed, and the agent then refused its own bundle at every start (a restart loop)."""
    b, trusted = _kit(tmp_path, None)
    root = tmp_path / "root"  # the last install's key, where install.sh put it
    (root / ETC_TRUSTED.lstrip("/")).mkdir(parents=True)
    new_keys(tmp_path / "old")
    shutil.copy(tmp_path / "old" / "public.pem", root / ETC_TRUSTED.lstrip("/") / "kit-signer.pem")
    kept = _config(tmp_path, f'trusted_keys = ["{ETC_TRUSTED}/kit-signer.pem"]\n')
    level, line = problem(kept, b, trusted, str(root))
    assert level == "refuse" and "is not signed" in line and "nothing was changed" in line
    assert main([str(kept), str(b), str(trusted), str(root)]) == 1
    assert capsys.readouterr().err.startswith("install.sh: the kept ")


def test_a_kit_signed_by_another_key_is_refused_and_one_signed_by_a_trusted_key_passes(tmp_path):
    priv, _ = new_keys(tmp_path / "k1")
    other, other_pub = new_keys(tmp_path / "k2")
    b, trusted = _kit(tmp_path, priv)  # the kit brings k1 as trusted/kit-signer.pem
    kept = _config(tmp_path, f'trusted_keys = ["{other_pub}"]\n')  # the device trusts k2 only
    level, line = problem(kept, b, trusted)
    assert level == "refuse" and "not trusted here" in line
    # the device trusts the kit's own key path: the kit's copy (which replaces it) verifies the bundle
    assert problem(_config(tmp_path, f'trusted_keys = ["{ETC_TRUSTED}/kit-signer.pem"]\n'), b, trusted) is None
    # under a test root, a key elsewhere is read below it
    root = tmp_path / "root"
    (root / "keys").mkdir(parents=True)
    shutil.copy(tmp_path / "k1" / "public.pem", root / "keys" / "device.pem")
    assert problem(_config(tmp_path, 'trusted_keys = ["/keys/device.pem"]\n'), b, trusted, str(root)) is None


def test_a_signed_kit_over_a_config_that_trusts_no_key_warns(tmp_path, capsys):
    """`--key` said the device then trusts only this key's bundles; the kept config still took unsigned ones."""
    priv, _ = new_keys(tmp_path / "k1")
    b, trusted = _kit(tmp_path, priv)
    kept = _config(tmp_path, "")
    level, line = problem(kept, b, trusted)
    assert level == "warn" and f'trusted_keys = ["{ETC_TRUSTED}/kit-signer.pem"]' in line
    assert main([str(kept), str(b), str(trusted)]) == 0 and "warning: this kit is signed" in capsys.readouterr().err
    unsigned_b, no_trusted = _kit(tmp_path / "u", None)
    assert problem(kept, unsigned_b, no_trusted) is None  # unsigned over unsigned: as before


@pytest.mark.parametrize("body", ["windw_s = 5\n", "threads = 0\n", "[agent\n"])
def test_a_kept_config_the_new_agent_cannot_load_is_refused_before_anything_changes(tmp_path, body):
    b, trusted = _kit(tmp_path, None)
    level, line = problem(_config(tmp_path, body), b, trusted)
    assert level == "refuse" and "does not load with this kit's agent" in line and "\n" not in line


def test_a_relative_trusted_key_is_the_one_beside_the_kept_config(tmp_path, monkeypatch):
    """`trusted_keys = ["trusted/kit-signer.pem"]` in /etc/lepton-edge/agent.toml names the kit's key, for
    the agent (working directory /) and for this check (run from the kit's folder) alike."""
    priv, _ = new_keys(tmp_path / "k1")
    b, trusted = _kit(tmp_path, priv)
    root = tmp_path / "root"
    kept = root / ETC_TRUSTED.lstrip("/").rsplit("/", 1)[0] / "agent.toml"  # <root>/etc/lepton-edge/agent.toml
    kept.parent.mkdir(parents=True)
    kept.write_text('fleet = "lab"\ndevice_id = "pi-1"\ntrusted_keys = ["trusted/kit-signer.pem"]\n')
    monkeypatch.chdir(tmp_path / "kit")
    assert problem(kept, b, trusted, str(root)) is None
    other, _ = new_keys(tmp_path / "k2")
    b2, trusted2 = _kit(tmp_path / "second", other)  # a kit signed by another key, which it does not bring
    shutil.rmtree(trusted2)
    level, line = problem(kept, b2, trusted2, str(root))
    assert level == "refuse" and "nothing was changed" in line
