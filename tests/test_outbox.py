"""The SQLite outbox on its own (no broker): order, bound, running count, and what a corrupt file,
a full disk or a read-only state directory do to it (issue 10: none of them may stop the agent)."""
from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from lepton_edge.telemetry.outbox import KEEP_CORRUPT, WAL_PAGES, Outbox
from tmpfs import tmpfs

TOPIC = "lepton/v1/f/d/telemetry"
WINDOW = b'{"v":1,' + b'"x":"' + b"a" * 1200 + b'"}'  # about one telemetry window


def rows_on_disk(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    finally:
        db.close()


def test_order_pending_after_and_delete(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite")
    ids = [ob.put(TOPIC, f"m{i}") for i in range(10)]
    assert ids == sorted(ids) and len(set(ids)) == 10
    assert [m.payload for m in ob.pending(limit=3)] == [b"m0", b"m1", b"m2"]
    assert [m.id for m in ob.pending(limit=100, after=ids[6])] == ids[7:]
    ob.delete(ids[:4])
    ob.delete(ids[0])  # already gone: the count must not go down twice
    ob.delete([])
    assert len(ob) == 6 == rows_on_disk(tmp_path / "o.sqlite")
    assert ob.pending(limit=1)[0].payload == b"m4"
    ob.close()


def test_bound_drops_oldest_counted_and_take_dropped_resets(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite", max_messages=10)
    for i in range(25):
        ob.put(TOPIC, f"m{i}")
    assert len(ob) == 10 == rows_on_disk(tmp_path / "o.sqlite")
    assert [m.payload for m in ob.pending(limit=100)] == [f"m{i}".encode() for i in range(15, 25)]
    assert ob.take_dropped() == 15
    assert ob.take_dropped() == 0
    ob.close()


def test_running_count_after_reopen_and_put_does_not_count_rows(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite", max_messages=50)
    for _ in range(30):
        ob.put(TOPIC, WINDOW)
    ob.delete([m.id for m in ob.pending(limit=5)])
    ob.put(TOPIC, WINDOW)
    ob.close()
    ob = Outbox(tmp_path / "o.sqlite", max_messages=50)
    assert len(ob) == 26
    # the count is kept, not recounted: a put never runs COUNT(*) over the table
    seen: list[str] = []
    ob._db.set_trace_callback(seen.append)
    for _ in range(40):
        ob.put(TOPIC, WINDOW)
    ob._db.set_trace_callback(None)
    assert not [s for s in seen if "COUNT(" in s.upper()], seen[:5]
    assert len(ob) == 50 == rows_on_disk(tmp_path / "o.sqlite")
    assert ob.take_dropped() == 16
    ob.close()


def _random_bytes(p: Path) -> None:
    p.write_bytes(os.urandom(64 * 1024))


def _truncated(p: Path) -> None:
    ob = Outbox(p)
    for _ in range(3000):
        ob.put(TOPIC, WINDOW)
    ob.close()
    os.truncate(p, p.stat().st_size // 2)


def _wrong_schema(p: Path) -> None:
    db = sqlite3.connect(p)
    db.execute("CREATE TABLE outbox (a TEXT)")
    db.execute("INSERT INTO outbox VALUES ('not ours')")
    db.commit()
    db.close()


@pytest.mark.parametrize("spoil", [_random_bytes, _truncated, _wrong_schema], ids=["random", "truncated", "schema"])
def test_corrupt_file_moved_aside_fresh_start_reported_once(tmp_path, spoil):
    p = tmp_path / "state" / "outbox.sqlite"
    p.parent.mkdir()
    spoil(p)
    ob = Outbox(p)  # used to raise DatabaseError at every start
    note = ob.take_recovered()
    assert note and "corrupt" in note and "moved aside" in note
    assert ob.take_recovered() is None and ob.recovered == 1 and ob.degraded is None
    assert len(ob) == 0
    rid = ob.put(TOPIC, WINDOW)
    assert rid > 0 and [m.id for m in ob.pending()] == [rid]
    aside = list(p.parent.glob("outbox.sqlite.corrupt-*"))
    assert aside and not any(a.name.endswith("-wal") for a in aside if not Path(str(a)[:-4]).exists())
    ob.close()
    assert rows_on_disk(p) == 1


def test_crash_loop_keeps_few_corrupt_copies(tmp_path):
    p = tmp_path / "outbox.sqlite"
    for _ in range(5):
        _random_bytes(p)
        Outbox(p).close()
    sets = [a for a in tmp_path.glob("outbox.sqlite.corrupt-*") if not a.name.endswith(("-wal", "-shm"))]
    assert len(sets) == KEEP_CORRUPT


def test_corruption_found_at_a_later_call(tmp_path):
    """The file goes bad under a running outbox: the next call moves it aside, starts afresh and
    goes on numbering after the ids already handed out (the publisher tracks them)."""
    p = tmp_path / "outbox.sqlite"
    ob = Outbox(p)
    last = [ob.put(TOPIC, WINDOW) for _ in range(20)][-1]
    other = sqlite3.connect(p, isolation_level=None)  # point the table at a page that does not exist
    (ver,) = other.execute("PRAGMA schema_version").fetchone()
    other.execute("PRAGMA writable_schema=ON")
    other.execute("UPDATE sqlite_master SET rootpage = 99999 WHERE name = 'outbox'")
    other.execute(f"PRAGMA schema_version={ver + 1}")
    other.close()
    assert ob.pending() == []  # used to raise "database disk image is malformed"
    assert "corrupt" in (ob.take_recovered() or "") and ob.recovered == 1
    rid = ob.put(TOPIC, WINDOW)
    assert rid > last
    assert [m.id for m in ob.pending(after=last)] == [rid] and len(ob) == 1
    ob.close()


def test_concurrent_put_and_delete(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite", max_messages=100_000)
    n, got, errors = 1500, [], []

    def producer():
        try:
            for i in range(n):
                ob.put(TOPIC, f"{i}")
        except Exception as e:  # pragma: no cover - the assertion below reports it
            errors.append(e)

    def consumer():
        deadline = time.monotonic() + 30
        try:
            while len(got) < n and time.monotonic() < deadline:
                batch = ob.pending(limit=50)
                got.extend(int(m.payload) for m in batch)
                ob.delete([m.id for m in batch])
        except Exception as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=producer), threading.Thread(target=consumer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert got == list(range(n))
    assert len(ob) == 0 == rows_on_disk(tmp_path / "o.sqlite")
    ob.close()


# ---- real filesystems: a full disk, a read-only state directory (root mounts a small tmpfs) ---------------
def fill(d: Path) -> Path:
    """Fill the filesystem to the last byte."""
    f = d / "filler"
    fd = os.open(f, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return f


def test_full_disk_put_degrades_counts_and_recovers(tmp_path):
    with tmpfs(tmp_path / "state", "size=1m") as d:
        ob = Outbox(d / "outbox.sqlite")
        first = [ob.put(TOPIC, WINDOW) for _ in range(20)]
        filler = fill(d)
        results = [ob.put(TOPIC, WINDOW) for _ in range(200)]  # used to raise "no transaction is active"
        dropped = results.count(0)
        assert dropped > 0 and ob.full_drops == dropped
        assert "full" in (ob.last_error or "")
        assert ob.take_dropped() == dropped  # travels as outbox_dropped
        kept = [r for r in results if r]
        filler.unlink()
        rid = ob.put(TOPIC, WINDOW)  # space is back: the next put succeeds by itself
        assert rid > max(first + kept)
        ids = [m.id for m in ob.pending(limit=1000)]
        assert ids == first + kept + [rid] and len(ob) == len(ids)
        assert ob.degraded is None and ob.take_dropped() == 0
        ob.close()
        assert rows_on_disk(d / "outbox.sqlite") == len(ids)


def test_after_a_full_disk_the_log_does_not_keep_the_space_that_came_back(tmp_path):
    """At SQLite's default checkpoint (1,000 pages, 4 MB) the write-ahead log took the space a full disk freed:
    every put then failed "full" with the outbox empty, and a restart changed nothing (a 2 MB state disk)."""
    with tmpfs(tmp_path / "state", "size=2m") as d:
        ob = Outbox(d / "outbox.sqlite", max_messages=10)
        filler = fill(d)
        assert ob.put(TOPIC, WINDOW) == 0
        filler.unlink()
        stored = 0
        for _ in range(400):  # the broker acknowledges each at once: the outbox stays small, the log must too
            rid = ob.put(TOPIC, WINDOW, carried=ob.take_dropped())
            if rid:
                stored += 1
                ob.delete(rid)
        assert stored == 400 and os.path.getsize(d / "outbox.sqlite-wal") <= WAL_PAGES * 4096 * 2, stored
        ob.close()
        again = Outbox(d / "outbox.sqlite", max_messages=10)  # a restart
        assert again.put(TOPIC, WINDOW) > 0
        again.close()


def test_open_on_full_disk_falls_back_to_memory_then_back_to_the_file(tmp_path):
    with tmpfs(tmp_path / "state", "size=1m") as d:
        filler = fill(d)
        ob = Outbox(d / "outbox.sqlite", retry_s=0.0)  # used to raise "database or disk is full"
        assert ob.degraded and "memory" in (ob.take_recovered() or "")
        ids = [ob.put(TOPIC, WINDOW) for _ in range(5)]
        assert all(ids) and len(ob) == 5
        filler.unlink()
        last = ob.put(TOPIC, WINDOW)  # retried the file: the rows held in memory move into it
        assert ob.degraded is None and "back on" in (ob.take_recovered() or "")
        assert [m.id for m in ob.pending()] == ids + [last] and len(ob) == 6
        ob.close()
        assert rows_on_disk(d / "outbox.sqlite") == 6


def test_read_only_state_dir_degrades_to_memory(tmp_path):
    with tmpfs(tmp_path / "ro", "size=1m,ro") as d:
        ob = Outbox(d / "state" / "outbox.sqlite", retry_s=3600)
        note = ob.take_recovered()
        assert ob.degraded and note and "memory" in note and "Read-only" in note
        rid = ob.put(TOPIC, WINDOW)
        assert rid > 0 and [m.id for m in ob.pending()] == [rid] and ob.take_dropped() == 0
        ob.close()


def test_closed_outbox_does_not_raise(tmp_path):
    """A window from a thread still stopping after close(): dropped and counted, never a traceback."""
    ob = Outbox(tmp_path / "o.sqlite")
    ob.put(TOPIC, WINDOW)
    ob.close()
    assert ob.put(TOPIC, WINDOW) == 0 and ob.pending() == [] and ob.take_dropped() == 1
    ob.delete(1)
    assert rows_on_disk(tmp_path / "o.sqlite") == 1

