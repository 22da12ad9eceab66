"""Mutation score of the modules whose bugs matter most (issue #13, point 9): does a test fail when
the code is wrong?

Why: ten bugs planted by hand once passed eight times unnoticed; a mutation tool plants hundreds the
same way. mutmut (PyPI, 2.x) makes the mutants: each one changes one thing in one line (an operator,
a number, a string, a keyword, an assignment to None). This script writes each mutant into a scratch
copy of the repository (never the working tree), runs that module's fast tests against it with a
timeout, and counts the mutant killed when they fail. Survivors are kept with their line, so a
reader sees what no test notices.

Why a sample: the seven modules make about 2,000 mutants and the fast tests of a module take seconds
to start; on a shared 2-core machine that is hours. `--sample N` runs N mutants per module, drawn
with a fixed seed (the same ones every run, so scores compare across commits), and the table gives
the 95 % interval that the sample allows; `--sample 0` runs every mutant.

    .venv/bin/python bench/mutation_bench.py run [--sample 40] [--modules bundle,signing] [--src DIR]
    .venv/bin/python bench/mutation_bench.py report        # prints the table from the last run
    .venv/bin/python bench/mutation_bench.py report --survivors bundle   # every survivor of a module
    .venv/bin/python bench/run.py --only mutation          # the table into BENCHMARKS.md
    make mutation                                          # run, then the table into BENCHMARKS.md

Results: out/mutation/results.json (one entry per module; a run with --modules replaces only those).
Survivors read and found equivalent (no caller can tell them from the original) are listed in
EQUIVALENT with the reason, and counted apart from the score.
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "out" / "mutation" / "results.json"
GOAL = 0.80  # killed share per module (issue #13)
SEED = 13

# module -> (the file, the fast tests that cover it). Tests here start no export (no torch): each
# mutant runs them once, so a module's tests must finish in seconds.
_PB = "tests/test_planted_bugs.py::test_"
_TINY = "tests/test_agent_tiny.py::test_"
MODULES: dict[str, tuple[str, list[str]]] = {
    "bundle": ("lepton_edge/bundle.py", [
        "tests/test_bundle_hardening.py", _PB + "manifest_edited_and_rechecksummed_after_signing_is_refused",
        _PB + "archive_sha256_is_checked_on_url_and_path_deploys"]),
    "signing": ("lepton_edge/signing.py", [
        "tests/test_signing.py", "tests/unit/test_signing_messages.py",
        _PB + "manifest_edited_and_rechecksummed_after_signing_is_refused",
        "tests/test_bundle_hardening.py::test_signature_covers_the_model",
        "tests/test_bundle_hardening.py::test_signature_is_checked_before_any_file_is_hashed"]),
    "agent.deploy": ("lepton_edge/agent/deploy.py", [
        "tests/test_bundle_hardening.py", _PB + "archive_sha256_is_checked_on_url_and_path_deploys",
        _PB + "manifest_edited_and_rechecksummed_after_signing_is_refused",
        _TINY + "deploy_swaps_after_the_check_and_rollback_restores_the_served_model"]),
    "agent.service": ("lepton_edge/agent/service.py", [
        _TINY + "deploy_swaps_after_the_check_and_rollback_restores_the_served_model",
        _TINY + "a_bundle_that_fails_its_probe_is_refused_before_the_swap",
        _TINY + "windows_left_in_the_outbox_are_delivered_by_the_next_start",
        _TINY + "commands_over_mqtt_and_oversized_ones_rate_limited"]),
    "telemetry.outbox": ("lepton_edge/telemetry/outbox.py", [
        "tests/test_outbox.py", "tests/test_outbox_edges.py",
        _PB + "outbox_rows_stay_until_the_broker_acknowledges_them"]),
    "telemetry.publisher": ("lepton_edge/telemetry/publisher.py", [
        _PB + "outbox_rows_stay_until_the_broker_acknowledges_them",
        _TINY + "windows_left_in_the_outbox_are_delivered_by_the_next_start"]),
    "exporters.validation": ("exporters/validation.py", [
        "tests/test_validation_gate.py", _PB + "accuracy_gate_fails_a_drop_past_the_threshold"]),
}
# The unit tests (tests/unit/) that import a module join its tests, first, so that under -x a mutant they
# kill costs seconds instead of the end-to-end tests' half minute. Only those that import it: the whole
# directory takes ~22 s, and under every mutant of seven modules that was most of CI's mutation check.
UNIT = "tests/unit"
# Mutants that change nothing a caller can observe, found by reading each survivor: (module, a piece of
# the line before, a piece of it after, as mutmut writes them; "" after: a line mutmut deleted) -> why.
# A survivor they match is counted in its own column and kept out of the score, so the score says what
# the tests miss, not what cannot be missed; applied when the table is made, so marking one needs no
# new run. Keyed on text, not line numbers: other edits of the module move lines, not this text.
EQUIVALENT: dict[tuple[str, str, str], str] = {
    ("bundle", "@classmethod", ""): "@classmethod dropped under a field_validator: pydantic 2 adds it anyway",
    ("bundle", "self.shape[2:4] if self.layout", "self.shape[2:5] if self.layout"):
        "InputSpec.hw() refuses every shape but a 4-D one first: [2:5] slices what [2:4] does",
    ("bundle", "iter(lambda: f.read(1 << 20), b\"\")", "iter(lambda: f.read(1 << 21), b\"\")"):
        "sha256_file's read size: the hash of the same bytes read in larger blocks is the same",
    ("bundle", "while left > 0 and", "while left > 1 and"):
        "a regular file's read returns less than asked only at its end, where the next read returns nothing",
    ("agent.service", "self._flow_seen, self._flow_at = -1,", "self._flow_seen, self._flow_at = -2,"):
        "read only after READY, which sets it first",
    ("agent.service", 'self._rate_ok(f"log:{key}")', 'self._rate_ok(f"XXlog:{key}XX")'):
        "the rate limiter's key for log lines: any text works that no other caller's key can equal",
    ("agent.service", "if check_signature and self.cfg.trusted_keys:", "if check_signature or self.cfg.trusted_keys:"):
        "the one caller passes check_signature=True; without trusted keys verify() then checks only the "
        "checksums, which Runtime.load checks again",
    ("agent.service", "stored = False", "stored = None"):
        "read only as `not stored`, where None and False are alike",
    ("agent.service", 'level: str = "info"', 'level: str = "XXinfoXX"'):
        "an unknown level logs at INFO, the default's own level; a caller's sink ignores the level",
    ("agent.deploy", 'with_name(f".{dest.name}.partial")', 'with_name(f"XX.{dest.name}.partialXX")'):
        "a temporary file's name: leftovers are removed whatever their name (anything neither current nor good)",
    ("agent.deploy", "out.unlink(missing_ok=True)", "out.unlink(missing_ok=False)"):
        "the archive was just written: it exists either way",
    ("agent.deploy", "p.unlink(missing_ok=True)", "p.unlink(missing_ok=False)"):
        "p comes from a directory listing made just before: it exists either way",
    ("agent.deploy", "mkdtemp(prefix=f\"{time.strftime(", "XX"):
        "a fetched bundle's directory name: only its uniqueness matters (mkdtemp's own suffix)",
    ("agent.deploy", "time.monotonic() >= self._end", "time.monotonic() > self._end"):
        "differs only at the very instant of the deadline",
    ("agent.deploy", "self._timer.daemon = True", "self._timer.daemon = False"):
        "_Deadline is used only as a context manager, whose exit cancels the timer: no timer outlives it",
    ("telemetry.outbox", "if self.durable else 'NORMAL'", "XXNORMAL"):
        "SQLite reads a synchronous value it does not know as NORMAL, the value it replaces",
    ("telemetry.outbox", "db.set_progress_handler(None, 0)", "db.set_progress_handler(None, 1)"):
        "removing the handler: the step count goes with it",
    ("telemetry.publisher", "self._sent_upto = 0", "self._sent_upto = 1"):
        "every connect resets it to 0, and the sender sends only while connected",
    ("telemetry.publisher", 'name="telemetry:sender"', 'name="XXtelemetry:senderXX"'): "a thread's name",
    ("telemetry.publisher", "if room <= 0:", "if room < 0:"):
        "pending(limit=0) returns no row: the loop stops either way",
    ("exporters.validation", 'description: str = "validating"', '"XXvalidatingXX"'): "a progress bar's label",
    ("exporters.validation", 'with ui.stage(f"reference outputs on', 'with ui.stage(f"XXreference outputs on'):
        "a progress stage's label",
    ("telemetry.publisher", "self.last_error: str | None = None", "self.last_error: str & None = None"):
        "an annotation, never evaluated (from __future__ import annotations)",
    ("telemetry.publisher", "self._sender.join(timeout=5)", "self._sender.join(timeout=6)"):
        "stop()'s wait for the sender thread, which ends within one turn of its loop once woken",
    ("exporters.validation", 'batch, "reference")', 'batch, "XXreferenceXX")'): "a progress bar's label",
    ("exporters.validation", "noisy: Outputs | None = None", "noisy: Outputs & None = None"):
        "an annotation, never evaluated (from __future__ import annotations)",
    ("exporters.validation", "eval_out: Outputs | None = None", "eval_out: Outputs & None = None"):
        "an annotation, never evaluated (from __future__ import annotations)",
}


def equivalent(name: str, s: dict) -> str | None:
    """Why the surviving mutant `s` of module `name` is equivalent (see EQUIVALENT), or None."""
    for (mod, before, after), why in EQUIVALENT.items():
        if mod == name and before in s["before"] and (after in s["after"] if after else s["after"] == ""):
            return why
    return None


# ---- mutants -------------------------------------------------------------------------------------
def mutants(path: Path) -> list[dict]:
    """Every mutant mutmut makes of `path`: {n, line, before, after, source}."""
    from mutmut import Context, list_mutations, mutate

    src = path.read_text()
    out = []
    for n, mid in enumerate(list_mutations(Context(source=src, filename=str(path)))):
        new, done = mutate(Context(source=src, filename=str(path), mutation_id=mid))
        if not done or new == src:
            continue
        diff = [d for d in difflib.unified_diff(src.splitlines(), new.splitlines(), lineterm="", n=0)
                if d[:1] in "+-" and not d.startswith(("+++", "---"))]
        before = next((d[1:] for d in diff if d[0] == "-"), "")
        after = next((d[1:] for d in diff if d[0] == "+"), "")
        out.append({"n": n, "line": mid.line_number + 1, "before": before.strip(), "after": after.strip(),
                    "source": new})
    return out


def kind(m: dict) -> str:
    """What the mutant changed, in a word a reader can group by."""
    b, a = m["before"], m["after"]
    if "XX" in a and "XX" not in b:
        return "string"
    if a.endswith("= None") or " = None" in a and " = None" not in b:
        return "assignment to None"
    if any(w in a.split() and w not in b.split() for w in ("True", "False", "break", "continue")):
        return "keyword"
    if [t for t in a.replace("(", " ").replace(")", " ").split() if t.lstrip("-").replace(".", "").isdigit()] != \
            [t for t in b.replace("(", " ").replace(")", " ").split() if t.lstrip("-").replace(".", "").isdigit()]:
        return "number"
    return "operator"


def unit_tests_of(tree: Path, rel: str) -> list[str]:
    """The files of tests/unit/ that import the module at `rel` (any spelling: `from lepton_edge.agent
    import service`, `from lepton_edge.agent.service import Agent`, `import lepton_edge.bundle`); exporters/
    is imported as lepton_edge.exporters."""
    parts = Path(rel).with_suffix("").parts
    dotted = ".".join(parts if parts[0] == "lepton_edge" else ("lepton_edge", *parts))
    parent, leaf = dotted.rsplit(".", 1)
    direct = re.compile(rf"^\s*(?:from|import)\s+{re.escape(dotted)}\b", re.M)
    named = re.compile(rf"^\s*from\s+{re.escape(parent)}\s+import\s+(\([^)]*\)|[^\n]*)", re.M)
    found = []
    for f in sorted((tree / UNIT).glob("test_*.py")):
        text = f.read_text(errors="replace")
        if direct.search(text) or any(re.search(rf"\b{leaf}\b", m.group(1)) for m in named.finditer(text)):
            found.append(f.relative_to(tree).as_posix())
    return found


# ---- a scratch copy ------------------------------------------------------------------------------
def scratch(src: Path) -> Path:
    """The repository's files (tracked, and untracked ones git does not ignore) in a new directory,
    with exporters/ and targets/ linked inside lepton_edge/ as the build maps them, so that with
    PYTHONPATH=<copy> every import comes from the copy, not from the editable install."""
    dest = Path(tempfile.mkdtemp(prefix="lepton-mutation-"))
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=src, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        p = src / rel
        if p.is_file() and not p.is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dest / rel)
    for pkg in ("exporters", "targets"):
        (dest / "lepton_edge" / pkg).symlink_to(Path("..") / pkg)
    return dest


def run_tests(tree: Path, tests: list[str], timeout: float, log: Path | None = None) -> tuple[str, float]:
    """'pass', 'fail' or 'timeout' of the tests in the copy, and the seconds they took; with `log`, pytest's
    output is kept there (the unmutated baseline's: when it fails, which test failed is the first question)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    base = tree / ".pytest-tmp"  # every path a test makes (a broker's config, an agent's state) names the copy
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", f"--basetemp={base}", *tests]
    t = time.monotonic()
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    try:
        r = subprocess.run(cmd, cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
                           timeout=timeout, start_new_session=True, check=False)
    except subprocess.TimeoutExpired:
        _reap(tree)
        return "timeout", time.monotonic() - t
    finally:
        if log:
            out.close()
    # pytest: 0 passed, 1 tests failed, 5 no tests collected; anything else (2 interrupted, 3 internal error,
    # 4 usage) means the tests could not run: a mutant that breaks the import is killed as well
    return ("pass" if r.returncode == 0 else "fail"), time.monotonic() - t


def _reap(tree: Path) -> None:
    """After a timeout: the processes the killed tests left (a broker they had SIGSTOPped, an agent),
    found by the copy's path in their command line, each woken and killed by its pid."""
    import signal

    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if str(tree) in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                pid = int(proc.name)
                if pid != os.getpid():
                    os.kill(pid, signal.SIGCONT)
                    os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            continue


def run(names: list[str], sample: int, src: Path, budget_s: float, results: Path = RESULTS) -> dict:
    """Each module's mutants against its tests in a scratch copy of `src`; every module's entry is
    merged into `results` as soon as it is done (other modules' entries are kept)."""
    saved: dict = {}
    tree = scratch(src)
    try:
        for name in names:
            rel, tests = MODULES[name]
            tests = [t for t in tests if (tree / t.split("::")[0]).exists()]
            tests[:0] = unit_tests_of(tree, rel)
            every = mutants(tree / rel)
            chosen = sorted(random.Random(SEED).sample(range(len(every)), min(sample, len(every)))) \
                if sample else list(range(len(every)))
            log = tree / ".baseline.log"
            state, base_s = run_tests(tree, tests, 900, log)
            flaky = None
            if state != "pass":  # once more: a test that fails now and then must not read as "the tests fail"
                # (CI once saw test_bundle_store's extended-header cap fail here and pass everywhere else,
                # 20 runs alone and 4 of this harness); the first failure is kept in the results and said
                flaky = log.read_text(errors="replace").strip().splitlines()[-30:] if log.is_file() else []
                state, base_s = run_tests(tree, tests, 900, log)
            entry = {"file": rel, "tests": tests, "mutants": len(every), "sampled": len(chosen), "seed": SEED,
                     "baseline_s": round(base_s, 1), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "killed": 0, "timeout": 0, "survived": [], "not_run": 0}
            print(f"{name}: {len(every)} mutants, {len(chosen)} sampled; tests {state} in {base_s:.1f} s",
                  file=sys.stderr, flush=True)
            if flaky is not None and state == "pass":
                entry["flaky_baseline"] = flaky
                print("  (they failed once before passing: a flaky test; that failure's last lines:)", file=sys.stderr)
                print("\n".join(f"  | {ln}" for ln in flaky[-12:]), file=sys.stderr, flush=True)
            if state != "pass":
                tail = log.read_text(errors="replace").strip().splitlines()[-30:] if log.is_file() else []
                print("\n".join(f"  | {ln}" for ln in tail), file=sys.stderr, flush=True)
                entry["error"] = f"the tests do not pass on the unmutated code ({state})"
                entry["baseline_output"] = tail
                saved[name] = entry
                _merge(results, name, entry)
                continue
            original = (tree / rel).read_text()
            started = time.monotonic()
            try:
                for i in chosen:
                    if time.monotonic() - started > budget_s:
                        entry["not_run"] += 1
                        continue
                    m = every[i]
                    (tree / rel).write_text(m["source"])
                    state, _ = run_tests(tree, tests, 2 * base_s + 10)
                    if state == "pass":
                        entry["survived"].append({k: m[k] for k in ("line", "before", "after")} | {"kind": kind(m)})
                    else:
                        entry["killed" if state == "fail" else "timeout"] += 1
            finally:
                (tree / rel).write_text(original)
            entry["seconds"] = round(time.monotonic() - started)
            saved[name] = entry
            _merge(results, name, entry)
            print(f"   {score_line(entry)}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    return saved


def _merge(results: Path, name: str, entry: dict) -> None:
    """Read, update one module, write: a run of some modules keeps the others' last figures."""
    saved = json.loads(results.read_text()) if results.exists() else {}
    saved[name] = entry
    results.parent.mkdir(parents=True, exist_ok=True)
    tmp = results.with_suffix(".tmp")
    tmp.write_text(json.dumps(saved, indent=1) + "\n")
    tmp.replace(results)


# ---- the score -----------------------------------------------------------------------------------
def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % interval of a share k/n (Wilson): what a sample of n mutants can say about all of them."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, c - h), min(1.0, c + h)


def score_line(e: dict) -> str:
    n = e["killed"] + e["timeout"] + len(e["survived"])
    return (f"{e['killed'] + e['timeout']}/{n} killed ({(e['killed'] + e['timeout']) / n:.0%}; equivalent mutants "
            "still counted here, not in the table)") if n else "no mutant run"


def table(saved: dict) -> tuple[str, list[str], list[list[str]]]:
    rows = []
    for name, (rel, _tests) in MODULES.items():
        e = saved.get(name)
        if e is None:
            rows.append([rel, "-", "-", "-", "-", "-", "-", "not run", "-"])
            continue
        if "error" in e:
            rows.append([rel, str(e["mutants"]), "-", "-", "-", "-", "-", e["error"], "FAIL"])
            continue
        dead = e["killed"] + e["timeout"]
        alive = [s for s in e["survived"] if not equivalent(name, s)]
        same = len(e["survived"]) - len(alive)
        n = dead + len(alive)
        lo, hi = wilson(dead, n)
        kinds: dict[str, int] = {}
        for s in alive:
            kinds[s["kind"]] = kinds.get(s["kind"], 0) + 1
        survivors = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])) or "-"
        budget = f" ({e['not_run']} not run: time budget)" if e["not_run"] else ""
        rows.append([rel, f"{n} of {e['mutants']}{budget}",
                     str(dead) + (f" ({e['timeout']} by timeout)" if e["timeout"] else ""), str(len(alive)), str(same),
                     f"{dead / n:.0%}" if n else "-", f"{lo:.0%}-{hi:.0%}" if n else "-", survivors,
                     ("PASS" if dead / n >= GOAL else "FAIL") if n else "-"])
    when = max((e.get("when", "") for e in saved.values()), default="never")
    title = (f"Mutation score (mutmut 2 mutants, each run against its module's fast tests; a random sample per "
             f"module, seed {SEED}; run {when}; `make mutation`)")
    return title, ["module", "mutants run (less equivalent)", "killed", "survived", "equivalent", "score",
                   "95 % interval", "surviving kinds",
                   f">= {GOAL:.0%} killed"], rows


def survivors_report(saved: dict, per_module: int | None = 8, only: list[str] | None = None) -> str:
    lines = []
    for name, e in saved.items():
        if only and name not in only:
            continue
        for s in e.get("survived", [])[:per_module]:
            why = equivalent(name, s)
            lines.append(f"{e['file']}:{s['line']} [{s['kind']}] {s['before'][:70]!r} -> {s['after'][:70]!r}"
                         + (f"  (equivalent: {why})" if why else ""))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the mutants; results to out/mutation/results.json")
    r.add_argument("--sample", type=int, default=int(os.environ.get("MUTATION_SAMPLE", "30")),
                   help="mutants per module (0: all); default 30 or $MUTATION_SAMPLE")
    r.add_argument("--modules", type=lambda v: v.split(","), default=list(MODULES), metavar="NAME[,NAME]",
                   help=", ".join(MODULES))
    r.add_argument("--src", type=Path, default=ROOT, help="the repository to copy (default: this one)")
    r.add_argument("--results", type=Path, default=RESULTS, help="where the figures go (default: %(default)s)")
    r.add_argument("--budget", type=float, default=float(os.environ.get("MUTATION_BUDGET_S", "900")),
                   help="seconds per module; mutants past it are counted as not run")
    r.add_argument("--min-score", type=float, default=None,
                   help="exit 1 when a module run kills fewer than this share (equivalent mutants left out): "
                        "CI's guard that the score does not fall (`make mutation-check`)")
    rep = sub.add_parser("report", help="print the table and the survivors of the last run")
    rep.add_argument("--survivors", type=lambda v: v.split(","), metavar="NAME[,NAME]",
                     help="list every surviving mutant of these modules (default: the first 8 of each)")
    a = ap.parse_args()
    if a.cmd == "run":
        unknown = set(a.modules) - set(MODULES)
        if unknown:
            ap.error(f"unknown module(s): {', '.join(sorted(unknown))}; known: {', '.join(MODULES)}")
        run(a.modules, a.sample, a.src.resolve(), a.budget, a.results)
        saved = json.loads(a.results.read_text()) if a.results.exists() else {}
    else:
        saved = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    title, _header, rows = table(saved)
    print(title)
    for row in rows:
        print("  " + " | ".join(row))
    only = getattr(a, "survivors", None)
    print(survivors_report(saved, None if only else 8, only))
    if getattr(a, "min_score", None) is not None:
        low = below(saved, a.modules, a.min_score)
        if low:
            sys.exit(f"mutation score below {a.min_score:.0%}: " + ", ".join(low))


def below(saved: dict, names: list[str], min_score: float) -> list[str]:
    """The modules of this run whose killed share (equivalents left out) is under min_score."""
    low = []
    for name in names:
        e = saved.get(name)
        if e is None or "error" in e:
            low.append(f"{name} (no result)")
            continue
        dead = e["killed"] + e["timeout"]
        n = dead + len([s for s in e["survived"] if not equivalent(name, s)])
        if n and dead / n < min_score:
            low.append(f"{name} {dead}/{n}")
    return low


if __name__ == "__main__":
    main()
