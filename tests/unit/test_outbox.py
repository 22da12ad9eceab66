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


def test_the_bound_trims_in_steps_of_a_thousandth(tmp_path):
    """Past the bound a put trims only once the excess passes 0.1 % of it (a DELETE and a counter UPDATE
    every put at the bound cost what a put below it does not), then back to the bound exactly."""
    ob = Outbox(tmp_path / "outbox.sqlite", max_messages=3000)
    ids = [ob.put(TOPIC, b"w") for _ in range(3003)]
    assert len(ob) == 3003 and ob.take_dropped() == 0  # 3 past the bound: not yet more than 0.1 %
    ob.put(TOPIC, b"w")
    assert len(ob) == 3000 and ob.take_dropped() == 4 and ob.pending(limit=1)[0].id == ids[4]
    ob.close()


def test_writes_are_as_durable_as_asked(tmp_path):
    """WAL + NORMAL survives the agent being killed; FULL (outbox_fsync) survives a power cut too."""
    for durable, level in ((False, 1), (True, 2)):
        ob = Outbox(tmp_path / f"o{durable}.sqlite", durable=durable)
        assert ob._conn.execute("PRAGMA synchronous").fetchone()[0] == level
        assert ob._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        ob.close()


def test_memory_fallback_is_bounded(tmp_path):
    (tmp_path / "state").write_text("")
    ob = Outbox(tmp_path / "state" / "outbox.sqlite", max_messages=10 * MEMORY_MAX, retry_s=3600)
    assert ob._bound() == MEMORY_MAX  # RAM holds less than the disk would
    ob.close()


def test_rows_move_to_the_file_renumbered_when_the_file_already_used_their_ids(tmp_path):
    """They stayed in memory until a restart (bounded, lost at a crash) with no word said, and the file's
    own backlog was not sent meanwhile. Now they follow the file's rows with new ids, in order, and the
    generation changes, so the publisher starts again from the first row (tests/unit/test_publisher_edges)."""
    state = tmp_path / "state"
    state.write_text("")
    ob = Outbox(state / "outbox.sqlite", retry_s=3600)
    gen = ob.generation
    mem_ids = [ob.put(TOPIC, f"mem{i}") for i in range(2)]
    state.unlink()
    other = Outbox(state / "outbox.sqlite")  # meanwhile the file used those ids (and holds a backlog)
    other.delete([other.put(TOPIC, "file") for _ in range(5)])
    kept = other.put(TOPIC, "file-backlog")
    other.close()
    ob._retry_at = 0.0
    rid = ob.put(TOPIC, "new")
    assert not ob.degraded and ob.generation > gen and "back on" in (ob.take_recovered() or "")
    got = ob.pending()
    assert [m.payload for m in got] == [b"file-backlog", b"mem0", b"mem1", b"new"] and len(ob) == 4
    assert got[0].id == kept and max(mem_ids) <= kept < got[1].id < got[2].id < rid == got[3].id
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


def _agent_like(ob: Outbox, n: int, start: int = 0) -> None:
    """What Agent.window does: each window reports the count taken since the last, and carries it."""
    import json

    for i in range(start, start + n):
        dropped = ob.take_dropped()
        ob.put(TOPIC, json.dumps({"seq": i, "outbox_dropped": dropped}), carried=dropped)


def _reported(ob: Outbox) -> int:
    """The drops the windows still queued report, plus what the next window would."""
    import json

    return sum(json.loads(m.payload)["outbox_dropped"] for m in ob.pending(limit=10**6)) + ob.take_dropped()


def test_windows_trimmed_at_the_bound_hand_on_the_counts_they_carried(tmp_path):
    """A long outage: the bound trims the oldest windows, which are the ones carrying the drop counts. 4,000 of
    5,000 windows were dropped and 1,000 reported; now every drop is reported by a window still queued."""
    ob = Outbox(tmp_path / "outbox.sqlite", max_messages=10)
    _agent_like(ob, 100)
    assert len(ob) == 10 and _reported(ob) == 90
    big = Outbox(tmp_path / "big.sqlite", max_messages=1000)  # trims in steps (0.1 % of the bound)
    _agent_like(big, 5000)
    assert len(big) <= 1000 and _reported(big) == 5000 - len(big)
    ob.close()
    big.close()


def test_a_full_disk_drop_keeps_the_count_it_carried_and_is_told_once_each_way(tmp_path, monkeypatch):
    """The window that carried the count was itself dropped, and only +1 counted: 200 dropped read as 1. And
    nothing said the disk was full: now one notice when it fills and one, with the number, when space is back."""
    ob = Outbox(tmp_path / "outbox.sqlite", max_messages=3)
    _agent_like(ob, 5)  # two dropped by the bound, carried by the queued windows
    real = Outbox._insert

    def full(self, *a, **kw):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Outbox, "_insert", full)
    _agent_like(ob, 7, start=5)  # each of these takes the count, then is dropped with it
    notes = ob.take_recovered() or ""
    assert "is full: messages are dropped" in notes and ob.full_drops == 7
    monkeypatch.setattr(Outbox, "_insert", real)
    _agent_like(ob, 1, start=12)
    assert "space again: 7 message(s) were dropped while the disk was full" in (ob.take_recovered() or "")
    assert _reported(ob) == 2 + 7 + 1  # the bound's two, the disk's seven, one trimmed by the last put
    ob.close()


def test_an_earlier_agents_file_is_taken_as_it_is_and_ours_stays_readable_by_it(tmp_path):
    """A file an earlier agent wrote (no `carried` table) is taken as it is; and the outbox table keeps that
    agent's columns, which it checks (a device rolled back to it set a file with a new column aside, backlog
    and all)."""
    p = tmp_path / "outbox.sqlite"
    db = sqlite3.connect(p)
    db.executescript("CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB "
                     "NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, created REAL NOT NULL);"
                     "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);"
                     "INSERT INTO outbox (topic, payload, qos, retain, created) "
                     f"VALUES ('{TOPIC}', X'6f6c64', 1, 0, 0);"
                     "INSERT INTO counters VALUES ('dropped', 4);")
    db.close()
    ob = Outbox(p)
    assert [m.payload for m in ob.pending()] == [b"old"] and ob.recovered == 0 and ob.take_dropped() == 4
    ob.put(TOPIC, b"new", carried=4)
    ob.close()
    db = sqlite3.connect(p)
    assert [r[1] for r in db.execute("PRAGMA table_info(outbox)")] == ["id", "topic", "payload", "qos", "retain",
                                                                      "created"]
    assert db.execute("SELECT n FROM carried").fetchall() == [(4,)]
    db.close()


def test_an_acknowledgement_from_before_the_rows_were_renumbered_deletes_nothing(tmp_path):
    """Rows held in memory moved into a file that had used their ids, renumbered; a PUBACK for a memory row
    that came after the move deleted the file's row of that id: a window never sent, gone without a count."""
    state = tmp_path / "state"
    state.write_text("")
    ob = Outbox(state / "outbox.sqlite", retry_s=3600)
    sent = ob.pending()  # nothing yet
    mem_id = ob.put(TOPIC, "mem")
    (in_flight,) = ob.pending()
    state.unlink()
    other = Outbox(state / "outbox.sqlite")
    backlog = other.put(TOPIC, "file-backlog")  # the same id the memory row has
    other.close()
    assert backlog == mem_id and sent == []
    ob._retry_at = 0.0
    ob.put(TOPIC, "new")
    ob.delete(in_flight.id, generation=in_flight.generation)  # the PUBACK, late
    assert [m.payload for m in ob.pending()] == [b"file-backlog", b"mem", b"new"]
    (first, *_) = ob.pending()
    ob.delete(first.id, generation=first.generation)  # one of this generation deletes as ever
    assert [m.payload for m in ob.pending()] == [b"mem", b"new"]
    ob.close()


def test_one_process_holds_an_exclusive_outbox(tmp_path):
    """Two agents on one state directory took each other's broker connection and deleted each other's rows."""
    import os

    from lepton_edge.telemetry.outbox import OutboxInUse

    p = tmp_path / "outbox.sqlite"
    first = Outbox(p, exclusive=True)
    with pytest.raises(OutboxInUse, match=f"in use by another agent \\(pid {os.getpid()}\\): one agent per state"):
        Outbox(p, exclusive=True)
    first.close()
    Outbox(p, exclusive=True).close()  # let go at close


def test_the_corrupt_file_just_moved_aside_is_kept_whatever_the_clock_says(tmp_path, monkeypatch):
    """With the clock back in 1970 (a Pi without a clock, before NTP) the file just moved aside sorted first and
    was removed at once; the notice named a file that was gone."""
    import time as time_mod

    p = tmp_path / "outbox.sqlite"
    for stamp in ("20990101T000000.000001", "20990101T000000.000002"):
        (tmp_path / f"outbox.sqlite.corrupt-{stamp}").write_bytes(b"older, by their names")
    p.write_bytes(b"not a database at all" * 100)
    monkeypatch.setattr(time_mod, "gmtime", lambda *a: time_mod.struct_time((1970, 1, 1, 0, 0, 5, 3, 1, 0)))
    ob = Outbox(p)
    note = ob.take_recovered() or ""
    moved = note.split("moved aside to ")[1].split(",")[0]
    assert moved.startswith("outbox.sqlite.corrupt-1970") and (tmp_path / moved).is_file()
    assert len(list(tmp_path.glob("outbox.sqlite.corrupt-*"))) == 2  # KEEP_CORRUPT: the new one and the newest
    ob.close()
