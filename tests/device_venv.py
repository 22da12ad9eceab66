"""A venv with only the device extra (`pip install -e .[device]`): no torch, no onnx, no TensorFlow.

Why a real venv: "the device side never imports the workstation side" is only true if a device
install runs; in the test venv everything is installed, so a stray `import onnx` passes unnoticed
(issue #12: `inspect` did exactly that). Built once per pyproject.toml (its hash names the
directory under ~/.cache/lepton-edge/); a marker written last says it is complete, and a build
that fails or is interrupted is removed. The editable install follows the working tree, so code
changes need no rebuild. Because the install is editable, the key also holds this checkout's
path: a venv made from another clone (CI clones afresh) would import that clone, or nothing once
it is deleted. Venvs whose checkout no longer exists are removed when a new one is built.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lepton-edge"


def device_venv(timeout: float = 900) -> Path:
    """The venv's directory (bin/python, bin/lepton-edge); builds it when missing. Raises
    RuntimeError with pip's last lines when it cannot be built (no network and no pip cache)."""
    key = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + sys.version.encode()
                         + str(ROOT).encode()).hexdigest()[:12]
    venv = CACHE / f"device-venv-{key}"
    if (venv / ".complete").exists():
        return venv
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".device-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs at once: one builds, the other waits
        if (venv / ".complete").exists():
            return venv
        shutil.rmtree(venv, ignore_errors=True)  # an interrupted build: start again
        _remove_orphans()
        try:
            # the interpreter the tests run on, without the test venv's site-packages
            base = getattr(sys, "_base_executable", sys.executable)
            subprocess.run([base, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
            r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                                "--disable-pip-version-check", "-e", f"{ROOT}[device]"],
                               capture_output=True, text=True, timeout=timeout)
            if r.returncode:
                raise RuntimeError(f"pip install -e .[device] failed: {(r.stdout + r.stderr)[-1500:]}")
        except BaseException:
            shutil.rmtree(venv, ignore_errors=True)  # nothing half made is left behind
            raise
        (venv / ".complete").write_text(f"{key}\n{ROOT}\n")
    return venv

def _remove_orphans() -> None:
    """Device venvs whose checkout is gone (or that predate the path in the marker) are dead weight."""
    for old in CACHE.glob("device-venv-*"):
        lines = (old / ".complete").read_text().splitlines() if (old / ".complete").exists() else []
        if len(lines) < 2 or not lines[1].startswith("/") or not Path(lines[1]).is_dir():
            shutil.rmtree(old, ignore_errors=True)


if __name__ == "__main__":
    print(device_venv())
