"""The SQLite outbox: every message is committed here before it is published and deleted only
when the broker acknowledges it (PUBACK).

Why SQLite: a broker outage of hours, an agent crash or a power cut must lose no telemetry, and
SQLite's transactions give that with one file and no server (power-cut durability is the
`durable` option: see the PRAGMA below). The outbox is bounded (a device's
disk is small): past `max_messages` the oldest are dropped and counted, and the count travels
in the next telemetry window so the loss is visible rather than silent.

The outbox is also the one file the agent writes on every window, so whatever the disk does to
it must not take the agent down (a device left unattended cannot be restarted by hand):
- a corrupt file (random bytes, a truncation, a file with someone else's schema) is moved aside
  as `outbox.sqlite.corrupt-<time>` (at most KEEP_CORRUPT sets kept, so a crash loop cannot fill
  the disk) and a fresh one started, at open or at any later call; reported once through
  `take_recovered()` and counted in `recovered`;
- a full disk drops the window (counted, it travels as `outbox_dropped`), never raises, and the
  next put succeeds by itself once there is space again;
- a file that cannot be opened or written at all (read-only or missing state directory, a full
  disk at first start, an I/O error) puts the outbox in memory (bounded by MEMORY_MAX, lost at a
  crash) with the reason in `degraded`; the file is tried again every `retry_s` seconds and the
  rows held in memory move into it when it works.
The row count is kept in memory (read once at open, changed only after a commit), so a put costs
the same at 100,000 queued windows as at none.

Why a row's drop count is kept beside it (table `carried`: row id -> the count its window reports):
the count travels in the next window, and that window can be lost too: trimmed at the bound in a
long outage (the oldest rows, which carry the counts: 4,000 windows dropped reported as 1,000), or
dropped itself on a full disk (200 dropped reported as 1). A row that is dropped now hands its own
count on with it, so what the windows deliver adds up to what was lost (a row trimmed while in
flight may count twice: at-least-once). A table of its own, not a column: an agent of an earlier
version (a device rolled back) checks the outbox table's columns and would set the file aside,
backlog and all; it ignores a table it does not know.
Why `generation`: the rows to send change underneath the publisher when the outbox moves to memory,
back to the file or to a fresh file, and their ids may change with them. The publisher starts again
from the first row then (or a backlog left in the file waited for the next reconnect), and an
acknowledgement for a row of an older generation deletes nothing (its id may now be another row's).
"""
from __future__ import annotations

import errno
import glob
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import cast

KEEP_CORRUPT = 2  # moved-aside corrupt files kept for a post-mortem; older ones are removed
MEMORY_MAX = 10_000  # windows held in RAM while the file is unusable (~12 MB at 1.2 KB a window)
CHECK_BUDGET_S = 2.0  # PRAGMA quick_check at open stops (unchecked, not failed) after this long
WAL_PAGES = 64  # after a full disk: the write-ahead log is checkpointed past this many pages (256 KB)
_COLUMNS = {"outbox": ["id", "topic", "payload", "qos", "retain", "created"], "counters": ["name", "value"],
            "carried": ["id", "n"]}
_SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_NOTADB = 11, 13, 26


@dataclass
class Message:
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    generation: int = 0  # the outbox's generation when read: its id means this row only in that one


class _Corrupt(Exception):
    """The file opens but is not an outbox we can trust (quick_check failed, foreign schema)."""


def _code(e: BaseException) -> int | None:
    code = getattr(e, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF  # extended codes keep the primary in the low byte


def is_full(e: BaseException) -> bool:
    """SQLITE_FULL or ENOSPC: wait for space, do not treat the file as broken."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return _code(e) == _SQLITE_FULL or "database or disk is full" in str(e)


def is_corrupt(e: BaseException) -> bool:
    if isinstance(e, _Corrupt):
        return True
    msg = str(e)
    return (_code(e) in (_SQLITE_CORRUPT, _SQLITE_NOTADB) or "malformed" in msg
            or "file is not a database" in msg or "file is encrypted" in msg)


class OutboxInUse(Exception):
    """Another process holds this outbox (an `exclusive` one): a second agent on the same state directory."""


class Outbox:
    def __init__(self, path: str | Path, max_messages: int = 100_000, durable: bool = False, *,
                 retry_s: float = 30.0, check_budget_s: float = CHECK_BUDGET_S, exclusive: bool = False):
        """`exclusive`: hold `<path>.lock` (flock) until close, and raise OutboxInUse if another process
        does. Why the agent asks for it: two agents on one state directory kept taking each other's
        broker connection (one client id) and deleted each other's rows, and neither said a word."""
        self.path = Path(path)
        self._lock_fd = self._exclusive() if exclusive else None
        self.max_messages = max_messages
        self.durable = durable
        self.retry_s, self.check_budget_s = retry_s, check_budget_s
        self._lock = threading.Lock()  # guards the connection only; never held around a publish
        self.recovered = 0  # corrupt files moved aside (open or later) in this process
        self.full_drops = 0  # windows dropped because the disk was full, in this process
        self.generation = 0  # changes whenever the rows to send are in another store (memory, file, fresh file)
        self._full_since: int | None = None  # full_drops when the disk filled; None while puts succeed
        self.degraded: str | None = None  # why the outbox lives in memory now; None on the file
        self.last_error: str | None = None
        self._notices: list[str] = []
        self._dropped_mem = 0  # drops not yet in the counters table (a full disk cannot record them)
        self._count = 0
        self._carried: set[int] = set()  # ids of rows with a `carried` entry (few: only windows after a drop)
        self._last_id = 0  # highest id handed out: a fresh file continues after it (the publisher tracks ids)
        self._retry_at = 0.0
        self._file_top = 0
        self._db: sqlite3.Connection | None = None
        self._closed = False
        self._open_or_degrade()

    # ---- opening ------------------------------------------------------------------------------
    def _exclusive(self) -> int | None:
        """The lock file's descriptor, held; None where no lock can be made (a read-only state directory:
        the outbox lives in memory there, with nothing on disk to share)."""
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            if e.errno == errno.ELOOP:  # (O_NOFOLLOW) the pid was written where it pointed, truncating that file
                raise OSError(errno.ELOOP, "a symlink; the agent writes no file a link in its state directory "
                                           "points at (remove it)", f"{self.path}.lock") from None
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise OutboxInUse(f"{self.path} is in use by another agent" + (f" (pid {holder})" if holder else "")
                                  + ": one agent per state directory") from None
            return None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def _open_file(self) -> sqlite3.Connection:
        """The database file. A symlink there is not opened (the outbox then lives in memory, as for a
        directory there): SQLite follows it, so a dangling link created the database wherever it pointed."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_symlink():
            raise OSError(errno.ELOOP, "a symlink, not opened (the outbox writes only its own files)", str(self.path))
        db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=10)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a committed window survives the agent crashing or being killed, with no fsync
            # per message. FULL (durable) also survives a power cut, at an fsync per commit and per PUBACK:
            # that cost 15-25% of the demo model's frame rate here, and wears SD cards.
            db.execute(f"PRAGMA synchronous={'FULL' if self.durable else 'NORMAL'}")
            # the log is cut back to 4 MB after a checkpoint (SQLite otherwise keeps its largest size); on a disk
            # that has been full, it is kept small too (_tight)
            db.execute(f"PRAGMA journal_size_limit={4 << 20}")
            self._quick_check(db)
            self._file_top = self._create(db)
            return db
        except BaseException:
            db.close()
            raise

    def _quick_check(self, db: sqlite3.Connection) -> None:
        """Find corruption that opening alone does not show, within a time budget: a check cut short
        by the budget counts as passed (a later read that hits the damage recovers then)."""
        deadline = time.monotonic() + self.check_budget_s
        db.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
        try:
            rows = db.execute("PRAGMA quick_check(3)").fetchall()
        except sqlite3.OperationalError as e:
            if "interrupt" not in str(e):
                raise
            rows = [("ok",)]
        finally:
            db.set_progress_handler(None, 0)
        if rows != [("ok",)]:
            raise _Corrupt("quick_check: " + "; ".join(str(r[0]) for r in rows)[:200])

    def _create(self, db: sqlite3.Connection) -> int:
        """Schema, checked against ours; the id sequence continued past any id already handed out.
        Returns the highest id the file itself had used."""
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,"
                       " payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, created REAL NOT NULL)")
            db.execute("CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
            db.execute("CREATE TABLE IF NOT EXISTS carried (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
            for table, cols in _COLUMNS.items():
                got = [r[1] for r in db.execute(f"PRAGMA table_info({table})")]
                if got != cols:
                    raise _Corrupt(f"table {table} has columns {got}, expected {cols}")
            db.execute("INSERT OR IGNORE INTO counters VALUES ('dropped', 0)")
            (count,) = db.execute("SELECT COUNT(*) FROM outbox").fetchone()  # the one full count, at open
            (top,) = db.execute("SELECT MAX(id) FROM outbox").fetchone()
            seq = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
            top = max(top or 0, seq[0] if seq else 0)
            if self._last_id > top:
                db.execute("DELETE FROM sqlite_sequence WHERE name = 'outbox'")
                db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('outbox', ?)", (self._last_id,))
            carried = {r[0] for r in db.execute("SELECT id FROM carried WHERE id IN (SELECT id FROM outbox)")}
            db.execute("DELETE FROM carried WHERE id NOT IN (SELECT id FROM outbox)")  # an older agent's acks
            db.execute("COMMIT")
        except BaseException:
            self._rollback(db)
            raise
        self._count, self._last_id, self._carried = int(count), max(self._last_id, int(top)), carried
        return int(top)

    def _open(self) -> sqlite3.Connection:
        """The file, moved aside and started afresh once if it is corrupt."""
        try:
            return self._open_file()
        except (sqlite3.Error, _Corrupt) as e:
            if not is_corrupt(e):
                raise
            self._set_aside(e)
            return self._open_file()

    def _open_or_degrade(self) -> None:
        try:
            self._db = self._open()
            self.degraded = None
        except (sqlite3.Error, _Corrupt, OSError) as e:
            self._to_memory(f"cannot use {self.path}: {e}")

    def _to_memory(self, why: str) -> None:
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
        db = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
        self._create(db)
        self._db = db
        self.generation += 1
        self.degraded = why
        self.last_error = why
        self._retry_at = time.monotonic() + self.retry_s
        self._notices.append(f"outbox in memory (at most {self._bound()} windows, lost at a crash): {why}")

    def _retry_file(self) -> None:
        """Back onto the file: rows held in memory move into it, after the rows already there (with
        new ids where the file has used theirs: the publisher starts again from the first row at the
        new generation, so no id it holds matters)."""
        self._retry_at = time.monotonic() + self.retry_s
        mem = self._conn
        saved = (self._count, self._last_id, self._carried)
        try:
            db = self._open()
        except (sqlite3.Error, _Corrupt, OSError) as e:
            self._count, self._last_id, self._carried = saved
            self.last_error = f"outbox file still unusable: {e}"
            return
        rows = mem.execute("SELECT id, topic, payload, qos, retain, created FROM outbox ORDER BY id").fetchall()
        mem_carried = dict(mem.execute("SELECT id, n FROM carried").fetchall())
        (mem_dropped,) = mem.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()
        file_count = self._count
        renumber = bool(rows) and rows[0][0] <= self._file_top  # the file used these ids (it was locked at start)
        try:
            cur = db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            for r in rows:
                cur.execute("INSERT INTO outbox (id, topic, payload, qos, retain, created) VALUES (?, ?, ?, ?, ?, ?)",
                            (None if renumber else r[0], *r[1:]))
                if r[0] in mem_carried:
                    cur.execute("INSERT INTO carried VALUES (?, ?)", (cur.lastrowid, mem_carried[r[0]]))
            (top,) = cur.execute("SELECT MAX(id) FROM outbox").fetchone()
            carried = {i for (i,) in cur.execute("SELECT id FROM carried")}
            cur.execute("UPDATE counters SET value = value + ? WHERE name = 'dropped'", (mem_dropped,))
            cur.execute("COMMIT")
        except sqlite3.Error as e:
            self._rollback(db)
            db.close()
            self._count, self._last_id, self._carried = saved
            self.last_error = f"outbox file usable but rows not moved: {e}"
            return
        mem.close()
        self._db, self._count, self._carried = db, file_count + len(rows), carried
        self._last_id = max(self._last_id, int(top or 0))
        self.generation += 1
        self._notices.append(f"outbox back on {self.path} ({len(rows)} window(s) moved from memory)")
        self.degraded = None

    def _set_aside(self, why: BaseException) -> None:
        """Move the corrupt file (and its -wal/-shm) aside and keep only the newest KEEP_CORRUPT sets."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f".{time.time_ns() // 1000 % 1_000_000:06d}"
        dest = f"{self.path}.corrupt-{stamp}"
        for suffix in ("", "-wal", "-shm", "-journal"):
            src = Path(f"{self.path}{suffix}")
            if src.exists():
                os.replace(src, dest + suffix)
        prefix = f"{self.path.name}.corrupt-"
        # the one just moved is kept whatever its name: after the clock went back (a Pi without a clock, before
        # NTP) its time sorts first, and it was removed at once, with the notice naming a file that was gone
        sets = sorted(p.name for p in self.path.parent.glob(glob.escape(prefix) + "*")
                      if not p.name.endswith(("-wal", "-shm", "-journal")) and p.name != Path(dest).name)
        for old in sets[:len(sets) - (KEEP_CORRUPT - 1)]:
            for suffix in ("", "-wal", "-shm", "-journal"):
                try:
                    (self.path.parent / (old + suffix)).unlink()
                except FileNotFoundError:
                    pass
        self.recovered += 1
        self._notices.append(f"outbox {self.path.name} was corrupt ({str(why)[:200]}); moved aside to "
                             f"{Path(dest).name}, started a fresh one")

    def _recover(self, e: BaseException) -> None:
        """A corruption error at a later call: close, move aside, start afresh (lock held)."""
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
        try:
            self._set_aside(e)
        except OSError as oe:
            self._to_memory(f"corrupt ({e}) and cannot be moved aside: {oe}")
            return
        self._open_or_degrade()
        self.generation += 1

    # ---- helpers (lock held) ------------------------------------------------------------------
    @property
    def _conn(self) -> sqlite3.Connection:
        """The connection in use: the file, or memory while degraded. Set by __init__ and replaced, never
        cleared, after it (close() closes it and sets _closed, which every caller checks first)."""
        assert self._db is not None, "the outbox is opened in __init__"
        return self._db

    @staticmethod
    def _rollback(db: sqlite3.Connection) -> None:
        """ROLLBACK only when a transaction is active: after a failed COMMIT SQLite may already have
        rolled back, and a second error would hide the real one."""
        try:
            if db.in_transaction:
                db.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def _bound(self) -> int:
        return min(self.max_messages, MEMORY_MAX) if self.degraded else self.max_messages

    def _failed_write(self, e: BaseException, what: str) -> None:
        """Classify a failed write: corrupt -> set aside; full -> wait for space; else -> memory."""
        self._rollback(self._conn)
        self.last_error = f"{what}: {e}"
        if is_corrupt(e):
            self._recover(e)
        elif not is_full(e) and not self.degraded:
            self._to_memory(f"{what} failed: {e}")

    # ---- the API ------------------------------------------------------------------------------
    def put(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False, carried: int = 0) -> int:
        """Commit one message; drop the oldest beyond the bound (counted, with the counts they carried).
        Returns its id, or 0 when the message itself was dropped (disk full: counted with the count it
        carried, never raised). `carried`: the drop count this message reports (take_dropped's)."""
        data = payload.encode() if isinstance(payload, str) else payload
        with self._lock:
            if self._closed:  # a late window from a thread still stopping: counted, not raised
                self._dropped_mem += 1 + carried
                return 0
            if self.degraded and time.monotonic() >= self._retry_at:
                self._retry_file()
            if self._full_since is not None:  # the log may hold the space freed since: give it back first
                self._checkpoint()
            for _ in range(2):  # a second try only after a corrupt file was replaced
                try:
                    rid = self._insert(topic, data, qos, retain, carried)
                    if self._full_since is not None:
                        self._notices.append(f"outbox has space again: {self.full_drops - self._full_since} "
                                             "message(s) were dropped while the disk was full (counted)")
                        self._full_since = None
                    return rid
                except sqlite3.Error as e:
                    self._failed_write(e, "outbox put")
                    if is_full(e):
                        break
            if self._full_since is None:
                self._full_since = self.full_drops
                self._tight()
                self._notices.append(f"the disk under {self.path.name} is full: messages are dropped (counted in "
                                     "outbox_dropped) until there is space")
            self.full_drops += 1
            self._dropped_mem += 1 + carried
            return 0

    def _tight(self) -> None:
        """A disk that has been full: a small write-ahead log from now on. Why: at SQLite's default (1,000
        pages, 4 MB) the log took the space that came back, and every put then failed "full" with the outbox
        empty, restarts included (a 2 MB state disk). Not from the start: 64 pages halved the drain of a
        100,000-window backlog (a checkpoint, with its fsync, every 64 pages)."""
        try:
            self._conn.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")
            self._conn.execute(f"PRAGMA journal_size_limit={WAL_PAGES * 4096}")
        except sqlite3.Error:
            pass

    def _checkpoint(self) -> None:
        """Write the log into the database and truncate it (lock held); fails quietly while still full."""
        try:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass

    def _insert(self, topic: str, data: bytes, qos: int, retain: bool, carried: int = 0) -> int:
        cur = self._conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        cur.execute("INSERT INTO outbox (topic, payload, qos, retain, created) VALUES (?, ?, ?, ?, ?)",
                    (topic, data, qos, int(retain), time.time()))
        rid = int(cast(int, cur.lastrowid))  # set by the INSERT above (None only before any INSERT)
        if carried:
            cur.execute("INSERT INTO carried VALUES (?, ?)", (rid, carried))
        bound = self._bound()
        n, extra = self._count + 1, self._count + 1 - bound
        # Past the bound, trim in steps of 0.1 % of it (none below 1,000): a put at the bound then costs
        # what a put below it costs, instead of a DELETE and a counter UPDATE every time.
        last = None
        if extra > bound // 1000:  # drop the oldest by id range: one index seek, not a scan
            (last,) = cur.execute("SELECT id FROM outbox ORDER BY id LIMIT 1 OFFSET ?", (extra - 1,)).fetchone()
            handed_on = 0
            if self._carried or carried:  # the counts the dropped rows carried go on with the drop count
                (handed_on,) = cur.execute("SELECT COALESCE(SUM(n), 0) FROM carried WHERE id <= ?", (last,)).fetchone()
                cur.execute("DELETE FROM carried WHERE id <= ?", (last,))
            cur.execute("DELETE FROM outbox WHERE id <= ?", (last,))
            extra = cur.rowcount
            n -= extra
            cur.execute("UPDATE counters SET value = value + ? WHERE name = 'dropped'", (extra + int(handed_on),))
        cur.execute("COMMIT")
        self._count, self._last_id = n, max(self._last_id, rid)
        if carried:
            self._carried.add(rid)
        if last is not None and self._carried:
            self._carried = {i for i in self._carried if i > last}
        return rid

    def pending(self, limit: int = 100, after: int = 0) -> list[Message]:
        """The oldest messages with id > after, in order ([] when the file cannot be read now), each with
        the generation it was read in (delete() takes it back)."""
        with self._lock:
            if self._closed:
                return []
            try:
                rows = self._conn.execute("SELECT id, topic, payload, qos, retain FROM outbox WHERE id > ? ORDER BY id"
                                        " LIMIT ?", (after, limit)).fetchall()
            except sqlite3.Error as e:
                self.last_error = f"outbox read: {e}"
                if is_corrupt(e):
                    self._recover(e)
                return []
            gen = self.generation
        return [Message(r[0], r[1], bytes(r[2]), r[3], bool(r[4]), gen) for r in rows]

    def delete(self, ids: int | list[int], generation: int | None = None) -> None:
        """Remove acknowledged rows. A failure (full disk) leaves them to be sent again: at-least-once.
        `generation`: the one the rows were read in; from an older one, nothing is deleted (the ids may
        name other rows now: a PUBACK that came after the rows were renumbered deleted a row never sent)."""
        ids = [ids] if isinstance(ids, int) else list(ids)
        if not ids:
            return
        with self._lock:
            if self._closed or (generation is not None and generation != self.generation):
                return
            try:
                carried = [(i,) for i in ids if i in self._carried]
                if len(ids) == 1 and not carried:  # one PUBACK: a single statement is its own transaction
                    n = self._conn.execute("DELETE FROM outbox WHERE id = ?", (ids[0],)).rowcount
                else:
                    self._conn.execute("BEGIN IMMEDIATE")
                    n = self._conn.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids]).rowcount
                    self._conn.executemany("DELETE FROM carried WHERE id = ?", carried)
                    self._conn.execute("COMMIT")
                    self._carried.difference_update(i for (i,) in carried)
                self._count -= n
            except sqlite3.Error as e:
                self._rollback(self._conn)
                self.last_error = f"outbox delete: {e}"
                if is_corrupt(e):
                    self._recover(e)

    def take_dropped(self) -> int:
        """How many messages the bound or a full disk discarded since the last call (then reset to 0)."""
        with self._lock:
            n, self._dropped_mem = self._dropped_mem, 0
            if self._closed:
                return n
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                (stored,) = self._conn.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()
                self._conn.execute("UPDATE counters SET value = 0 WHERE name = 'dropped'")
                self._conn.execute("COMMIT")
                n += int(stored)
            except sqlite3.Error as e:  # the stored count stays for the next call
                self._rollback(self._conn)
                self.last_error = f"outbox take_dropped: {e}"
                if is_corrupt(e):
                    self._recover(e)
        return n

    def take_recovered(self) -> str | None:
        """What happened to the outbox's file since the last call (corrupt file moved aside, fallen
        back to memory, back on the file), one line for one event; None when nothing did."""
        with self._lock:
            notes, self._notices = self._notices, []
        return "; ".join(notes) if notes else None

    def __len__(self) -> int:
        return self._count

    def close(self) -> None:
        """Close the file; later calls do nothing (put drops and counts) rather than raise. An outbox in memory
        tries its file once more first, whatever retry_s says: what it holds is lost at close otherwise (a
        disk that had room again for 29 s of a 30 s retry_s lost every window kept through the outage)."""
        with self._lock:
            if self.degraded and not self._closed:
                self._retry_file()
            self._closed = True
            if self._db is not None:
                self._db.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # (the flock goes with it)
                self._lock_fd = None

