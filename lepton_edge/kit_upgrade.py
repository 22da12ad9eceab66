"""install.sh's upgrade check: an agent.toml kept from the last install must take this kit's bundle.

Why: install.sh keeps the operator's agent.toml on an upgrade but replaces the kit's bundle and keys.
A kit without a signature, installed over a config with `trusted_keys`, installed fine and left an
agent that refused its own bundle at every start (the old bundle already removed: a restart loop).
A signed kit over a config without `trusted_keys` said "the device then trusts only this key's
bundles" and left the device taking unsigned deploys. Run by the kit's new venv (its own lepton_edge
reads the config) after the venv is built and before anything on the system changes:

    python -m lepton_edge.kit_upgrade KEPT_AGENT_TOML KIT_BUNDLE KIT_TRUSTED_DIR [ROOT]

Exit 1 with one `install.sh:` line: the upgrade would leave an agent that cannot start. Exit 0, with a
warning line where the kept config trusts less than the kit says.
"""
from __future__ import annotations

import sys
from pathlib import Path

ETC_TRUSTED = "/etc/lepton-edge/trusted"  # where install.sh puts the kit's trusted/ (kit.py writes these paths)


def problem(kept: Path, bundle: Path, kit_trusted: Path, root: str = "") -> tuple[str, str] | None:
    """("refuse" | "warn", the line) for a kept config that does not fit this kit, or None."""
    from lepton_edge.agent.config import load
    from lepton_edge.errors import LeptonError

    try:
        cfg = load(kept, {})
    except LeptonError as e:
        return "refuse", (f"the kept {kept} does not load with this kit's agent ({e}); fix it, or move it away "
                          "to take the kit's agent.toml; nothing was changed")
    if not cfg.trusted_keys:
        if kit_trusted.is_dir() and any(kit_trusted.iterdir()):
            names = ", ".join(f'"{ETC_TRUSTED}/{p.name}"' for p in sorted(kit_trusted.iterdir()))
            return "warn", (f"warning: this kit is signed, but the kept {kept} has no trusted_keys, so the device "
                            f"still runs unsigned bundles; add `trusted_keys = [{names}]` to it")
        return None
    keys = [_as_installed(Path(k), kit_trusted, root) for k in cfg.trusted_keys]
    from lepton_edge import signing

    try:
        signing.verify(bundle, keys)
    except LeptonError as e:
        return "refuse", (f"the kept {kept} runs only bundles signed by its trusted_keys, and this kit's bundle "
                          f"fails that ({e}); build the kit with --key and one of those keys, or change trusted_keys; "
                          "nothing was changed")
    return None


def _as_installed(key: Path, kit_trusted: Path, root: str) -> Path:
    """A trusted key as it will be once the kit is installed: the kit's own copy where install.sh puts one
    (the kit replaces it), else the file on this system (under the test root, when one is set). A relative key
    was read from the kept file's folder, under the root already: seen from the device, it is that path less it."""
    top = root.rstrip("/")
    if top and str(key).startswith(top + "/"):
        key = Path(str(key)[len(top):])
    if str(key.parent) == ETC_TRUSTED and (kit_trusted / key.name).is_file():
        return kit_trusted / key.name
    return Path(root + str(key)) if root and key.is_absolute() else key


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4):
        print("usage: python -m lepton_edge.kit_upgrade KEPT_AGENT_TOML KIT_BUNDLE KIT_TRUSTED_DIR [ROOT]",
              file=sys.stderr)
        return 2
    found = problem(Path(argv[0]), Path(argv[1]), Path(argv[2]), argv[3] if len(argv) == 4 else "")
    if found is None:
        return 0
    level, line = found
    print(f"install.sh: {line}", file=sys.stderr)
    return 1 if level == "refuse" else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
