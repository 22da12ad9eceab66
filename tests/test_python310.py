"""`requires-python = ">=3.10"` is true: the Jetson profile's OS (JetPack 6, Ubuntu 22.04) has Python 3.10
and its device kit installs this package there. Nothing in the code needs a newer Python (vermin reads
every module), and TOML is read with tomli where the stdlib has no tomllib."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_requires_python_and_the_tomli_fallback_are_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.10"
    assert any(d.replace(" ", "").startswith("tomli") and "python_version<'3.11'" in d.replace(" ", "")
               for d in project["dependencies"]), project["dependencies"]


@pytest.mark.slow
def test_no_module_needs_a_python_newer_than_310():
    vermin = str(Path(sys.executable).parent / "vermin")
    r = subprocess.run([vermin, "--no-tips", "--violations", "-t=3.10-", "--eval-annotations",
                        "lepton_edge", "targets", "exporters"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


# Python 3.10 as far as TOML goes: the stdlib's tomllib cannot be imported.
WITHOUT_TOMLLIB = """
import sys
sys.modules["tomllib"] = None
from lepton_edge import targets, tomlfile
from lepton_edge.errors import BadInput
from lepton_edge.fleet.alerts import load_rules
assert tomlfile.tomllib.__name__ == "tomli", tomlfile.tomllib
assert targets.load("rpi4").runtime == "litert" and len(targets.all_profiles()) >= 6
assert load_rules(sys.argv[1]).offline_after_s == 30
try:
    targets.load(sys.argv[2])
except BadInput as e:
    print(e)
"""


def test_profiles_and_alert_rules_load_with_tomli_when_tomllib_is_missing(tmp_path):
    rules = tmp_path / "alerts.toml"
    rules.write_text("[alerts]\noffline_after_s = 30\n")
    broken = tmp_path / "broken.toml"
    broken.write_text("id = \n")
    r = subprocess.run([sys.executable, "-c", WITHOUT_TOMLLIB, str(rules), str(broken)], capture_output=True,
                       text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith(f"{broken}: not valid TOML (") and r.stdout.count("\n") == 1, r.stdout
