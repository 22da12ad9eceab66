import json

import pytest

from conftest import run_cli
from lepton_edge import targets
from lepton_edge.errors import BadInput

REQUIRED = {"rpi4", "rpi5", "jetson-orin-nano", "x86-cpu", "cuda-gpu", "generic-arm64"}


def test_builtin_profiles_load_with_budgets():
    ids = set(targets.builtin_ids())
    assert REQUIRED <= ids
    for p in targets.all_profiles():
        assert p.max_model_bytes > 0 and p.ram_budget_bytes > 0 and p.latency_budget_ms > 0 and p.max_opset >= 13
        assert p.device_packages, p.id
        assert len(p.content_hash()) == 64


def test_quantization_follows_the_target():
    # NNCF's default PTQ is tried first where a profile lists it; among onnxruntime's recipes, x86 AVX2
    # without VNNI takes uint8 activations (the fast choice) first, ARM int8 activations (S8S8).
    def first_ort(profile):
        return next(r for r in targets.load(profile).quantization.recipes if not r.startswith("nncf-"))

    assert targets.load("x86-cpu").quantization.recipes[0] == "nncf-default"
    assert first_ort("x86-cpu").startswith("u8-")
    for arm in ("rpi4", "rpi5", "generic-arm64"):
        assert first_ort(arm).startswith("s8-")


def test_user_profile_from_path(tmp_path):
    text = (targets.Path(targets.__file__).parent / "rpi4.toml").read_text().replace('id = "rpi4"', 'id = "my-board"')
    f = tmp_path / "my-board.toml"
    f.write_text(text)
    assert targets.load(str(f)).id == "my-board"


def test_wrong_field_names_field_and_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text((targets.Path(targets.__file__).parent / "rpi4.toml").read_text().replace("threads = 4", 'threads = "four"'))
    with pytest.raises(BadInput, match=r"bad.toml: field 'threads'"):
        targets.load(str(f))
    f.write_text((targets.Path(targets.__file__).parent / "rpi4.toml").read_text().replace('"s8-minmax",', '"s9-minmax",'))
    with pytest.raises(BadInput, match=r"field 'quantization.recipes'"):
        targets.load(str(f))


def test_cli_targets_table_and_json():
    r = run_cli("targets")
    assert r.returncode == 0 and "rpi4" in r.stdout and "jetson-orin-nano" in r.stdout
    r = run_cli("targets", "show", "rpi4", "--json")
    assert json.loads(r.stdout)["arch"] == "aarch64"


def test_cli_unknown_target_suggests():
    r = run_cli("targets", "show", "rpi-4")
    assert r.returncode == 2
    assert "rpi4" in r.stderr and "Traceback" not in r.stderr
