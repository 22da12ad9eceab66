"""Outbox contracts the publisher and the agent rely on, beside tests/test_outbox.py (corruption,
full disk, concurrency): what survives a restart, ids that are never reused, the bound as a
property, and the fall-back to memory and back (no root needed here: the state path is made
unusable with an ordinary file where a directory should be)."""
from __future__ import annotations

import errno
import sqlite3

import pytest

from lepton_edge.telemetry.outbox import MEMORY_MAX, Outbox, is_corrupt, is_full

TOPIC = "lepton/v1/f/d/telemetry"


def test_rows_and_drop_count_survive_a_restart(tmp_path):
    p = tmp_path / "outbox.sqlite"
    ob = Outbox(p, max_messages=3)
    ids = [ob.put(TOPIC, f"m{i}") for i in range(5)]  # two dropped by the bound
    ob.close()
    ob = Outbox(p, max_messages=3)
    assert len(ob) == 3 and [m.id for m in ob.pending()] == ids[2:]
    assert ob.take_dropped() == 2  # the loss travels in the next window even after a crash
    ob.close()


def test_ids_are_never_reused_after_the_outbox_empties_and_reopens(tmp_path):
    """The publisher asks for rows `after` the highest id it sent; a reused id would be skipped."""
    p = tmp_path / "outbox.sqlite"
    ob = Outbox(p)
    first = [ob.put(TOPIC, "a") for _ in range(3)]
    ob.delete(first)
    ob.close()
    ob = Outbox(p)
    assert len(ob) == 0
    nxt = ob.put(TOPIC, "b")
    assert nxt > max(first)
    ob.close()


def test_message_fields_round_trip(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite")
    ob.put("t/status", '{"online":true}', qos=1, retain=True)
    ob.put("t/raw", b"\x00\xff", qos=0)
    a, b = ob.pending()
    assert (a.topic, a.payload, a.qos, a.retain) == ("t/status", b'{"online":true}', 1, True)
    assert (b.topic, b.payload, b.qos, b.retain) == ("t/raw", b"\x00\xff", 0, False)
    assert isinstance(a.payload, bytes)
    ob.close()


def test_pending_limit_and_after(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite")
    ids = [ob.put(TOPIC, str(i)) for i in range(7)]
    assert [m.id for m in ob.pending(limit=2, after=ids[2])] == ids[3:5]
    assert ob.pending(after=ids[-1]) == []
    ob.close()


@pytest.mark.parametrize("bound", [1, 10, 2500])
def test_bound_holds_with_every_drop_counted(tmp_path, bound):
    """Never more than the bound plus its 0.1 % trimming step, the newest kept, and every window
    accounted for: kept + dropped == put."""
    ob = Outbox(tmp_path / "o.sqlite", max_messages=bound)
    n = bound + 7
    most = 0
    for i in range(n):
        ob.put(TOPIC, str(i))
        most = max(most, len(ob))
    assert most <= bound + bound // 1000
    kept = ob.pending(limit=n)
    assert len(kept) == len(ob)
    assert [int(m.payload) for m in kept] == list(range(n - len(kept), n))
    assert len(kept) + ob.take_dropped() == n
    ob.close()


def test_durable_outbox_syncs_every_commit(tmp_path):
    full = Outbox(tmp_path / "a.sqlite", durable=True)
    normal = Outbox(tmp_path / "b.sqlite")
    assert full._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert normal._db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert normal._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    full.close()
    normal.close()


def test_unusable_path_falls_back_to_memory_then_moves_rows_to_the_file(tmp_path):
    state = tmp_path / "state"
    state.write_text("a file where the state directory should be")
    ob = Outbox(state / "outbox.sqlite", retry_s=3600)
    assert ob.degraded and "memory" in (ob.take_recovered() or "")
    ids = [ob.put(TOPIC, f"m{i}") for i in range(3)]
    assert all(ids) and len(ob) == 3
    state.unlink()  # fixed: the next put after retry_s tries the file again
    ob.retry_s, ob._retry_at = 0.0, 0.0
    last = ob.put(TOPIC, "m3")
    assert ob.degraded is None and "back on" in (ob.take_recovered() or "")
    assert [m.payload for m in ob.pending()] == [b"m0", b"m1", b"m2", b"m3"]
    assert [m.id for m in ob.pending()] == ids + [last]  # same ids: the publisher tracks them
    ob.close()
    db = sqlite3.connect(state / "outbox.sqlite")
    assert db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 4
    db.close()


def test_memory_fallback_is_bounded(tmp_path):
    (tmp_path / "state").write_text("")
    ob = Outbox(tmp_path / "state" / "outbox.sqlite", max_messages=10 * MEMORY_MAX, retry_s=3600)
    assert ob._bound() == MEMORY_MAX  # RAM holds less than the disk would
    ob.close()


def test_rows_stay_in_memory_when_the_file_already_used_their_ids(tmp_path):
    """Moving them would renumber rows the publisher may have in flight: they stay in memory."""
    state = tmp_path / "state"
    state.write_text("")
    ob = Outbox(state / "outbox.sqlite", retry_s=3600)
    mem_ids = [ob.put(TOPIC, "mem") for _ in range(2)]
    state.unlink()
    other = Outbox(state / "outbox.sqlite")  # meanwhile the file used those ids (sent and acknowledged since)
    other.delete([other.put(TOPIC, "file") for _ in range(5)])
    other.close()
    ob._retry_at = 0.0
    rid = ob.put(TOPIC, "mem")
    assert ob.degraded and "not moved" in (ob.last_error or "")
    assert [m.id for m in ob.pending()] == mem_ids + [rid] and len(ob) == 3
    ob.close()


@pytest.mark.parametrize("exc, full, corrupt", [
    (OSError(errno.ENOSPC, "No space left on device"), True, False),
    (OSError(errno.EACCES, "Permission denied"), False, False),
    (sqlite3.OperationalError("database or disk is full"), True, False),
    (sqlite3.DatabaseError("database disk image is malformed"), False, True),
    (sqlite3.DatabaseError("file is not a database"), False, True),
    (sqlite3.OperationalError("attempt to write a readonly database"), False, False),
])
def test_errors_are_classified_full_or_corrupt(exc, full, corrupt):
    assert is_full(exc) is full and is_corrupt(exc) is corrupt
