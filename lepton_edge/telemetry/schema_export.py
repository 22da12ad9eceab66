"""`python -m lepton_edge.telemetry.schema_export [--check] [DIR]`: a JSON Schema for every wire payload.

Why generated, and shipped in the repository (docs/schemas/): a third-party consumer (a dashboard,
a rules engine, a stock MQTT tool) validates what it reads without importing Python, and
generating the files from the models in `schema.py` means they cannot say something the code does
not. `--check` exits 1 naming each file that differs from what the models generate (a test runs
it), so a model that changes without the files being regenerated fails at once.

What a device sends is described as it is serialized (`mode="serialization"`: every field the
agent writes, nulls included); what a device accepts (commands) as it is validated (unknown
fields refused, bounds enforced). Each schema names its topic (`x-topic`, from `topics.Topics`).
"""
from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Literal

from lepton_edge.telemetry.schema import COMMANDS, PAYLOADS
from lepton_edge.telemetry.topics import MONITOR_ALERTS, Topics

DEFAULT_DIR = Path("docs/schemas")
DIALECT = "https://json-schema.org/draft/2020-12/schema"
_PATTERN = Topics("{fleet}", "{device}")  # topics with placeholders: the tree a payload travels in

# The topic each payload is published on; commands go to cmd/<verb>, every reply to cmd/<verb>/reply.
TOPIC: dict[str, Callable[[Topics], str]] = {
    "status": lambda t: t.status, "meta": lambda t: t.meta, "telemetry": lambda t: t.telemetry,
    "event": lambda t: t.events, "reply": lambda t: t.reply("{verb}"),
    **{f"command-{verb}": partial(Topics.cmd, verb=verb) for verb in COMMANDS},
    "alert": lambda t: MONITOR_ALERTS,
}


def name_for(topic: str) -> str | None:
    """The PAYLOADS name of what travels on a concrete topic (how a consumer picks the schema)."""
    if topic == MONITOR_ALERTS:
        return "alert"
    parsed = Topics.parse(topic)
    if parsed is None:
        return None
    here, rest = Topics(parsed[0], parsed[1]), parsed[2].split("/")
    if len(rest) == 3 and here.reply(rest[1]) == topic:  # a reply to any verb, an unknown one's included
        return "reply"
    return next((name for name, where in TOPIC.items() if where(here) == topic), None)


def schema(name: str) -> dict[str, Any]:
    """The JSON Schema of one payload of PAYLOADS, with its dialect and topic."""
    mode: Literal["validation", "serialization"] = "validation" if name.startswith("command-") else "serialization"
    body = PAYLOADS[name].model_json_schema(mode=mode)
    return {"$schema": DIALECT, "x-topic": TOPIC[name](_PATTERN), **body}


def render(name: str) -> str:
    """The file's text: stable (sorted keys, fixed indent), so a diff shows only a real change."""
    return json.dumps(schema(name), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in PAYLOADS:
        path = out / f"{name}.schema.json"
        path.write_text(render(name), encoding="utf-8")
        written.append(path)
    return written


def stale(out: Path) -> list[str]:
    """What differs between `out` and the models: missing, outdated or orphaned schema files."""
    problems = []
    for name in PAYLOADS:
        path = out / f"{name}.schema.json"
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.read_text(encoding="utf-8") != render(name):
            problems.append(f"{path}: differs from the model {PAYLOADS[name].__name__}")
    known = {f"{name}.schema.json" for name in PAYLOADS}
    problems += [f"{p}: no such payload any more" for p in sorted(out.glob("*.schema.json")) if p.name not in known]
    return problems


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    rest = [a for a in args if a != "--check"]
    if len(rest) > 1 or any(a.startswith("-") for a in rest):
        sys.stderr.write("usage: python -m lepton_edge.telemetry.schema_export [--check] [DIR]\n")
        return 2
    out = Path(rest[0]) if rest else DEFAULT_DIR
    if check:
        problems = stale(out)
        for p in problems:
            sys.stderr.write(f"{p} (regenerate: python -m lepton_edge.telemetry.schema_export {out})\n")
        return 1 if problems else 0
    for path in write(out):
        sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
