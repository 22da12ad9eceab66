"""Coverage-guided fuzzing (atheris, libFuzzer) of one parser, on the checkers the hypothesis tests use.

    python tests/fuzz/atheris_fuzz.py <parser> [libFuzzer flags] WORK_DIR tests/fuzz/corpus/<parser>

`make fuzz` runs every parser for FUZZ_SECONDS with a scratch WORK_DIR first (libFuzzer writes new
inputs into the first directory only, so the committed corpus is read, not grown); a crash is
written as crash-<sha1> in the current directory. To keep an input worth keeping, copy it into
corpus/<parser>/ (or `-merge=1 corpus/<parser> WORK_DIR`) and commit it.
Parsers: command, manifest, signature, profile, agent_config, input_spec, broker, telemetry.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import atheris  # noqa: E402

with atheris.instrument_imports(include=["lepton_edge"]):
    import lepton_edge.agent.commands  # noqa: F401
    import lepton_edge.agent.config  # noqa: F401
    import lepton_edge.bundle  # noqa: F401
    import lepton_edge.runtime.spec  # noqa: F401
    import lepton_edge.signing  # noqa: F401
    import lepton_edge.targets  # noqa: F401
    import lepton_edge.telemetry.broker  # noqa: F401
    import lepton_edge.telemetry.schema  # noqa: F401

import fuzz_targets as ft  # noqa: E402


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ft.CHECKS:
        sys.exit(f"usage: {sys.argv[0]} <{'|'.join(ft.CHECKS)}> [libFuzzer flags] [corpus dirs]")
    parser = sys.argv.pop(1)
    sys.setrecursionlimit(1000)  # the interpreter's default, whatever atheris set

    def one(data: bytes) -> None:
        ft.check_bytes(parser, data)

    atheris.Setup(sys.argv, one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
