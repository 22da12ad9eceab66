"""The terminal dashboard and the `fleet ls|show|history|alerts|top` commands, read from a real
SQLite store: order by severity, colour, JSON for scripts, one-line errors, and the live table
driven through tmux as a user over SSH would see it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest
from rich.console import Console

from fleet_views_data import add_device, small_fleet
from lepton_edge.fleet import tui
from lepton_edge.fleet.store import open_store

WORST_FIRST = ["yard/cam-off", "lab/cam-slow"]


@pytest.fixture
def fleet_store(tmp_path):
    path = tmp_path / "fleet.sqlite"
    st = open_store(path)
    now = small_fleet(st)
    yield st, path, now
    st.close()


def fleet_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lepton_edge.fleet.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200"})


def _lines_with(text: str, name: str) -> list[str]:
    return [ln for ln in text.splitlines() if name in ln]


def test_render_worst_first_with_colour_and_budget(fleet_store):
    st, _, now = fleet_store
    con = Console(record=True, width=200, force_terminal=True, color_system="standard")
    con.print(tui.render(st, now=now))
    plain = con.export_text(clear=False)
    ansi = con.export_text(styles=True)
    order = [ln.split()[0] for ln in plain.splitlines() if ln.strip().startswith(("lab/", "yard/"))]
    assert order[:2] == WORST_FIRST and sorted(order[2:]) == ["lab/cam-ok", "yard/cam-gaps"]
    head = plain.splitlines()[0]
    assert "4 devices" in head and "3 online" in head and "1 offline" in head and "1 alerts" in head
    for col in ("fleet/device", "online", "fps", "inference p95", "CPU", "RSS", "temp", "dropped", "gaps",
                "bundle", "last seen", "alerts"):
        assert col in plain
    slow = _lines_with(plain, "lab/cam-slow")[0]
    assert "80.0/50 ms" in slow and "9.5" in slow
    assert "OFF" in _lines_with(plain, "yard/cam-off")[0]
    gaps_line = _lines_with(plain, "yard/cam-gaps")[0]
    assert " 2 " in gaps_line and "fashion-cnn" in gaps_line
    # Colour: offline and alert lines red, a healthy line without red.
    red = "\x1b[31m", "\x1b[1;31m"
    assert any(c in _lines_with(ansi, "yard/cam-off")[0] for c in red)
    assert any(c in _lines_with(ansi, "lab/cam-slow")[0] for c in red)
    assert not any(c in _lines_with(ansi, "lab/cam-ok")[0] for c in red)
    # Small terminals keep the worst lines and say how many are hidden.
    con2 = Console(record=True, width=200)
    con2.print(tui.render(st, now=now, max_rows=2))
    small = con2.export_text()
    assert "lab/cam-ok" not in small and "and 2 more devices" in small and "yard/cam-off" in small


def test_fleet_ls_json_is_the_snapshot(fleet_store):
    st, path, _ = fleet_store
    r = fleet_cli("fleet", "ls", "--store", str(path), "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    snap = tui.snapshot(st)
    assert got["summary"] == snap["summary"]
    assert [(d["fleet"], d["device"]) for d in got["devices"]] == [(d["fleet"], d["device"]) for d in
                                                                   snap["devices"]]
    assert [f"{d['fleet']}/{d['device']}" for d in got["devices"][:2]] == WORST_FIRST
    slow = got["devices"][1]
    assert slow["inference_p95_ms"] == 80.0 and slow["latency_budget_ms"] == 50.0 and slow["active_alerts"] == 1
    assert got["devices"][0]["online"] is False and got["devices"][0]["severity"] == "offline"
    # `fleet top --once --json` prints the same thing.
    r2 = fleet_cli("fleet", "top", "--store", str(path), "--once", "--json")
    assert [d["device"] for d in json.loads(r2.stdout)["devices"]] == [d["device"] for d in got["devices"]]


def test_fleet_show_history_alerts(fleet_store):
    st, path, _ = fleet_store
    r = fleet_cli("fleet", "show", "cam-slow", "--store", str(path), "--json")
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["device"]["fleet"] == "lab" and shown["device"]["latency"]["inference"]["p95"] == 80.0
    assert [a["rule"] for a in shown["alerts"]] == ["latency"]
    assert [e["kind"] for e in shown["events"]] == ["rollback"]
    r = fleet_cli("fleet", "show", "yard/cam-gaps", "--store", str(path))
    assert r.returncode == 0 and "seq_gaps" in r.stdout and "inference" in r.stdout

    r = fleet_cli("fleet", "history", "yard/cam-gaps", "--since", "15m", "--store", str(path), "--json")
    assert r.returncode == 0, r.stderr
    h = json.loads(r.stdout)
    assert h["fleet"] == "yard" and 1 <= len(h["points"]) <= 4
    assert all(p["fps"] == 28.0 and p["inference_p95_ms"] == 11.0 for p in h["points"])
    assert sum(p["frames"] for p in h["points"]) == 4 * 56
    r = fleet_cli("fleet", "history", "cam-ok", "--since", "1h", "--store", str(path))
    assert r.returncode == 0 and "p95 ms" in r.stdout

    r = fleet_cli("fleet", "alerts", "--store", str(path), "--json")
    alerts = json.loads(r.stdout)
    assert [(a["device"], a["rule"], a["severity"], a["resolved"]) for a in alerts] == \
        [("cam-slow", "latency", "critical", None)]
    st.resolve_alert("lab", "cam-slow", "latency", time.time())
    assert json.loads(fleet_cli("fleet", "alerts", "--active", "--store", str(path), "--json").stdout) == []
    r = fleet_cli("fleet", "alerts", "lab/cam-slow", "--store", str(path))
    assert r.returncode == 0 and "latency" in r.stdout and "active" not in r.stdout.split("alerts")[-1]


@pytest.mark.parametrize("args, message", [
    (["fleet", "show", "cam-nope"], "unknown device 'cam-nope'"),
    (["fleet", "show", "lab/cam-sloww"], "did you mean: lab/cam-slow"),
    (["fleet", "show", "a/b/c"], "expected FLEET/DEVICE"),
    (["fleet", "history", "cam-ok", "--since", "5x"], "--since '5x'"),
    (["fleet", "history", "cam-ok", "--since", "900d"], "at most 400d"),
    (["fleet", "alerts", "nope"], "unknown device"),
])
def test_bad_input_is_one_line_exit_2(fleet_store, args, message):
    _, path, _ = fleet_store
    r = fleet_cli(*args, "--store", str(path))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_ambiguous_device_and_missing_store(fleet_store, tmp_path):
    st, path, _ = fleet_store
    add_device(st, "yard", "cam-ok")
    r = fleet_cli("fleet", "show", "cam-ok", "--store", str(path))
    assert r.returncode == 2 and "several fleets: lab/cam-ok, yard/cam-ok" in r.stderr
    assert fleet_cli("fleet", "show", "yard/cam-ok", "--store", str(path)).returncode == 0
    missing = tmp_path / "nowhere" / "fleet.sqlite"
    r = fleet_cli("fleet", "ls", "--store", str(missing))
    assert r.returncode == 2 and "no fleet store at" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not missing.exists() and not missing.parent.exists()  # reading never creates a store


def test_reading_commands_never_write_to_a_file_that_is_not_a_fleet_store(tmp_path):
    """`fleet ls --store app.db` added the store's tables to another application's database, and an empty
    file became a store: reading commands now refuse both, and leave them byte for byte."""
    import hashlib
    import sqlite3

    other = tmp_path / "app.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE invoices (n INTEGER)")
    con.commit()
    con.close()
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n")
    # another application's own schema_version table (a common name): an empty one made `fleet ls` create the
    # store's eight tables in that database, a Flyway-style text version was a TypeError traceback
    versioned, flyway = tmp_path / "versioned.db", tmp_path / "flyway.db"
    for db, rows in ((versioned, []), (flyway, [("1.0.3",)])):
        con = sqlite3.connect(db)
        con.execute("CREATE TABLE schema_version (version TEXT)")
        con.executemany("INSERT INTO schema_version VALUES (?)", rows)
        con.commit()
        con.close()
    half = tmp_path / "half.db"  # the store's tables, and a version that is not one
    con = sqlite3.connect(half)
    for t in ("schema_version (version TEXT)", "devices (fleet TEXT)", "windows (fleet TEXT)"):
        con.execute(f"CREATE TABLE {t}")
    con.execute("INSERT INTO schema_version VALUES ('v2')")
    con.commit()
    con.close()
    for path, why in ((other, "not a fleet store"), (empty, "empty, not a fleet store"), (text, "not a SQLite file"),
                      (versioned, "no devices, windows table"), (flyway, "no devices, windows table"),
                      (half, "its schema_version holds 'v2'")):
        before = hashlib.sha256(path.read_bytes()).hexdigest()
        for args in (("fleet", "ls"), ("fleet", "alerts")):
            r = fleet_cli(*args, "--store", str(path))
            assert r.returncode == 2 and why in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_what_a_device_sends_is_shown_as_text_never_as_markup(tmp_path):
    """A bundle named `[/bold]` raised MarkupError in the dashboard (monitor, monitor --once, fleet top) and in
    `fleet show`; `[blink red]x[/]` styled the operator's terminal. A device's strings are text."""
    from fleet_views_data import meta
    from lepton_edge.telemetry.schema import Event

    path = tmp_path / "f.sqlite"
    st = open_store(path)
    now = time.time()
    add_device(st, "lab", "evil", now=now)
    st.set_meta("lab", "evil", meta("boot-evil", bundle="[/bold][blink red]x[/]"), now)
    add_device(st, "lab", "esc", now=now)  # ESC passes Rich: OSC 52 wrote the clipboard, CSI 2J cleared the screen
    st.set_meta("lab", "esc", meta("boot-esc", bundle="y\x1b]52;c;aGk=\x07\x1b[2J"), now)
    st.add_event("lab", "evil", Event(boot_id="boot-evil", kind="deploy", level="info",
                                      message="now [/] running [bold]y[/bold]").model_dump(), now)
    st.close()
    for args in (("fleet", "ls"), ("fleet", "top", "--once"), ("fleet", "show", "lab/evil")):
        r = fleet_cli(*args, "--store", str(path))
        assert r.returncode == 0 and "Traceback" not in r.stderr, (args, r.stderr[-2000:])
        assert "[/bold][blink red]x[/]" in r.stdout.replace("\n", "") or "[/bold][blink" in r.stdout, (args, r.stdout)
    assert "now [/] running [bold]y[/bold]" in r.stdout
    for args in (("fleet", "ls"), ("fleet", "top", "--once"), ("fleet", "show", "lab/esc")):
        r = fleet_cli(*args, "--store", str(path))
        assert r.returncode == 0 and "\x1b]52" not in r.stdout and "\x1b[2J" not in r.stdout, (args, r.stdout)
        assert "y?]52;c;aGk=??[2J" in r.stdout, (args, r.stdout)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed (apt-get install tmux)")
def test_live_dashboard_in_tmux_follows_the_store(fleet_store):
    """`fleet top` in a real terminal (tmux, 160x30, no mouse): the table shows, a device written to the
    store by another process appears at the next refresh, Ctrl-C ends it cleanly."""
    st, path, _ = fleet_store
    sock = f"lepton-f3-{uuid.uuid4().hex[:8]}"
    tmux = ["tmux", "-L", sock, "-f", "/dev/null"]
    cmd = (f"{sys.executable} -m lepton_edge.fleet.cli fleet top --store {path} --refresh 0.3; "
           "echo EXITED-$?; sleep 60")
    subprocess.run([*tmux, "new-session", "-d", "-x", "160", "-y", "30", "-s", "dash", cmd], check=True,
                   env={**os.environ, "TERM": "xterm-256color"})

    def pane() -> str:
        return subprocess.run([*tmux, "capture-pane", "-p", "-t", "dash"], capture_output=True, text=True).stdout

    def wait(pred, timeout=20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = pane()
            if pred(text):
                return text
            time.sleep(0.1)
        return pane()

    try:
        first = wait(lambda t: "yard/cam-off" in t and "lab/cam-ok" in t)
        assert "yard/cam-off" in first, first
        rows = [ln.split()[0] for ln in first.splitlines() if ln.strip().startswith(("lab/", "yard/"))]
        assert rows[:2] == WORST_FIRST
        add_device(st, "dock", "cam-late", fps=7.0)
        later = wait(lambda t: "dock/cam-late" in t)
        assert "dock/cam-late" in later and "5 devices" in later, later
        subprocess.run([*tmux, "send-keys", "-t", "dash", "C-c"], check=True)
        done = wait(lambda t: "EXITED-" in t, timeout=10)
        assert "EXITED-0" in done and "Traceback" not in done, done
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)


def test_reading_commands_never_create_tables_in_another_postgresql_database(postgres):
    r = fleet_cli("fleet", "ls", "--store", postgres)
    assert r.returncode == 2 and "not a fleet store" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    import psycopg

    with psycopg.connect(postgres) as c:
        assert c.execute("SELECT to_regclass('schema_version')").fetchone()[0] is None
        c.execute("CREATE TABLE schema_version (version TEXT)")  # another application's, of a common name
    r = fleet_cli("fleet", "ls", "--store", postgres)
    assert r.returncode == 2 and "no devices, windows table" in r.stderr, r.stderr
    with psycopg.connect(postgres) as c:
        assert c.execute("SELECT to_regclass('devices')").fetchone()[0] is None
        c.execute("DROP TABLE schema_version")
    st = open_store(postgres)  # a real store: read as such
    add_device(st, "lab", "cam")
    st.close()
    r = fleet_cli("fleet", "ls", "--store", postgres)
    assert r.returncode == 0 and "lab/cam" in r.stdout, r.stderr
