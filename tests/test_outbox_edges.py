"""Outbox edges the mutation run found untested (bench/mutation_bench.py): a state directory that does
not exist yet, an integrity check cut short by its time budget, and how often a degraded outbox
tries its file again. Real SQLite files, no broker.
"""
from __future__ import annotations

import sqlite3

import pytest

from lepton_edge.telemetry.outbox import Outbox

TOPIC = "lepton/v1/f/d/telemetry"


def test_a_missing_state_directory_is_made(tmp_path):
    ob = Outbox(tmp_path / "var" / "lib" / "lepton-edge" / "outbox.sqlite")
    try:
        assert ob.degraded is None and ob.put(TOPIC, b"{}") > 0
        assert (tmp_path / "var" / "lib" / "lepton-edge" / "outbox.sqlite").is_file()
    finally:
        ob.close()


def test_an_integrity_check_past_its_budget_counts_as_passed(tmp_path):
    """A large outbox opened with no time for PRAGMA quick_check: the check is interrupted, the file
    kept (not moved aside as corrupt), every row still there."""
    path = tmp_path / "outbox.sqlite"
    ob = Outbox(path)
    for i in range(3000):
        ob.put(TOPIC, b"x" * 200 + str(i).encode())
    ob.close()
    again = Outbox(path, check_budget_s=0.0)
    try:
        assert again.recovered == 0 and again.take_recovered() is None and len(again) == 3000
        assert not list(tmp_path.glob("outbox.sqlite.corrupt-*"))
    finally:
        again.close()


def test_a_degraded_outbox_tries_its_file_again_only_after_retry_s(tmp_path):
    """The state directory's place is taken by a file: the outbox lives in memory and does not retry
    the file at every put (a retry per window is a syscall storm on a broken disk); once retry_s has
    passed and the path works, the rows held in memory move into the file."""
    blocker = tmp_path / "state"
    blocker.write_text("not a directory")
    ob = Outbox(blocker / "outbox.sqlite", retry_s=3600)
    try:
        assert ob.degraded and "cannot use" in ob.last_error
        why = ob.last_error
        ids = [ob.put(TOPIC, b"w%d" % i) for i in range(3)]
        assert all(ids) and ob.last_error == why  # no retry yet: the reason is still the first one
        blocker.unlink()
        ob.retry_s = 0.0
        ob._retry_at = 0.0  # the hour has passed
        assert ob.put(TOPIC, b"w3") > 0 and ob.degraded is None
        assert "back on" in (ob.take_recovered() or "")
    finally:
        ob.close()
    db = sqlite3.connect(blocker / "outbox.sqlite")
    assert [bytes(r[0]) for r in db.execute("SELECT payload FROM outbox ORDER BY id")] == [b"w0", b"w1", b"w2", b"w3"]
    db.close()


def test_the_lock_file_is_the_agents_alone_and_never_a_links_target(tmp_path):
    """outbox.sqlite.lock holds the pid of the agent that owns the outbox: mode 0600, and a symlink put in its
    place is refused (its target was truncated to that pid) rather than followed."""
    import errno
    import os
    import stat

    ob = Outbox(tmp_path / "a" / "outbox.sqlite", exclusive=True)
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "outbox.sqlite.lock").st_mode) == 0o600
    ob.close()
    precious = tmp_path / "precious"
    precious.write_text("IMPORTANT")
    (tmp_path / "b").mkdir()
    os.symlink(precious, tmp_path / "b" / "outbox.sqlite.lock")
    with pytest.raises(OSError) as e:
        Outbox(tmp_path / "b" / "outbox.sqlite", exclusive=True)
    assert e.value.errno == errno.ELOOP and precious.read_text() == "IMPORTANT"


def test_a_damaged_file_is_named_by_what_sqlite_found(tmp_path):
    """The integrity check (within its time budget) reads SQLite's own findings into the reason the file is
    moved aside: an index page overwritten with zeros is found, not taken for a check cut short."""
    from lepton_edge.telemetry.outbox import _Corrupt

    path = tmp_path / "damaged.sqlite"
    db = sqlite3.connect(path)
    db.execute("PRAGMA page_size=1024")
    db.execute("CREATE TABLE t (a INTEGER PRIMARY KEY, b TEXT)")
    db.execute("CREATE INDEX tb ON t (b)")
    db.executemany("INSERT INTO t (b) VALUES (?)", [(f"row {i:06d} " + "x" * 40,) for i in range(4000)])
    db.commit()
    db.close()
    raw = bytearray(path.read_bytes())
    pages = len(raw) // 1024
    for p in range(pages - 40, pages - 10):  # the index's pages come last: zeroed, the table still opens
        raw[p * 1024:(p + 1) * 1024] = b"\0" * 1024
    path.write_bytes(bytes(raw))
    ob = Outbox.__new__(Outbox)
    ob.check_budget_s = 30.0
    db = sqlite3.connect(path)
    try:
        with pytest.raises(_Corrupt) as e:
            ob._quick_check(db)
    finally:
        db.close()
    assert str(e.value).startswith("quick_check: ") and len(str(e.value)) > len("quick_check: ") + 5, str(e.value)


def test_a_degraded_outbox_moves_its_rows_to_the_file_at_close(tmp_path):
    """An outbox in memory whose file works again before retry_s has passed: close() dropped every row it
    held (the agent then said they were 'left in the outbox for the next start'). It tries the file once
    more at close now, so the next start sends them."""
    blocker = tmp_path / "state"
    blocker.write_text("not a directory")
    ob = Outbox(blocker / "outbox.sqlite", retry_s=3600)
    assert ob.degraded
    for i in range(3):
        assert ob.put(TOPIC, b"w%d" % i) > 0
    blocker.unlink()  # the disk has room (the path works) again, well before the hour
    ob.close()
    assert ob.degraded is None
    again = Outbox(blocker / "outbox.sqlite")
    try:
        assert [m.payload for m in again.pending()] == [b"w0", b"w1", b"w2"]
    finally:
        again.close()
