"""Which delegate libraries and execution providers a bundle may use on this machine.

Why an allow-list: a delegate is native code loaded into the process, and a bundle is input from
outside (a deploy command names it). So the bundle's manifest may only *name* a delegate by a short
symbolic name ("edgetpu"); the library behind a name comes from local configuration only (the agent's
`[delegates]` table, `run --delegate NAME=PATH`). A name this machine does not know, or anything that
looks like a path, is ignored with a warning rather than refused: delegates are an acceleration the
device chooses, the model runs correctly on the CPU without one, and a fleet mixes devices with and
without the accelerator. Nothing a manifest says is ever passed to `dlopen`.

ONNX execution providers are names too; they are filtered to those this onnxruntime build has,
with no provider options (options can name libraries to load).
"""
from __future__ import annotations

import re
from pathlib import Path

from lepton_edge.errors import BadInput

BUILTIN = ("xnnpack",)  # LiteRT's own CPU delegate: always on, nothing to load
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")


def parse_allowlist(items: dict | list[str] | None, where: str = "--delegate") -> dict[str, str]:
    """{'edgetpu': '/usr/lib/libedgetpu.so.1'} from a config table or 'NAME=PATH' flags; names are
    lower-cased, paths must be absolute (local configuration, but no surprise from the working dir)."""
    if not items:
        return {}
    pairs = items.items() if isinstance(items, dict) else [s.partition("=")[::2] for s in items]
    out: dict[str, str] = {}
    for name, path in pairs:
        name, path = str(name).strip(), str(path).strip()
        if not _NAME.fullmatch(name) or not path:
            raise BadInput(f"{where}: expected NAME=/absolute/path/lib.so with a short name, got {name!r}={path!r}")
        if not Path(path).is_absolute() or "\0" in path:  # (a TOML string may hold a NUL; no path does)
            raise BadInput(f"{where}: delegate {name!r}: the library path must be absolute (and hold no NUL byte), "
                           f"got {path!r}")
        out[name.lower()] = path
    return out


def resolve(named, allowed: dict[str, str] | None) -> tuple[list[str], list[str]]:
    """(library paths to load, warnings) for the delegates a manifest names."""
    allowed = allowed or {}
    libs: list[str] = []
    warnings: list[str] = []
    if named is None:
        return libs, warnings
    if not isinstance(named, list):
        return libs, [f"manifest target.delegates is not a list ({type(named).__name__}); ignored"]
    for d in named[:16]:
        if not isinstance(d, str) or not _NAME.fullmatch(d):
            warnings.append(f"manifest names delegate {str(d)[:80]!r}, not a symbolic name: ignored "
                            "(a bundle never names a library to load)")
            continue
        key = d.lower()
        if key in BUILTIN:
            continue
        if key not in allowed:
            warnings.append(f"manifest names delegate {d!r}, which this machine's configuration does not list: "
                            "running on the CPU")
            continue
        if allowed[key] not in libs:
            libs.append(allowed[key])
    return libs, warnings


def providers(wanted, available: list[str]) -> tuple[list[str], list[str]]:
    """(providers to use, names asked for that this build lacks): names only, never options."""
    names = [p for p in (wanted if isinstance(wanted, list) else []) if isinstance(p, str)][:16]
    use = [p for p in names if p in available]
    return use or ["CPUExecutionProvider"], [p[:80] for p in names if p not in available]
