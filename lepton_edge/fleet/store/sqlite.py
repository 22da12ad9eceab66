"""The default store: one SQLite file in WAL mode, zero set-up.

Why WAL and a connection per thread: the monitor's writer thread commits batches while the web
server, the terminal dashboard and a CLI in another shell read; WAL lets readers go on during a
write. Write transactions start IMMEDIATE so two writers queue on the lock instead of failing
half-way. A locked or corrupt file becomes one StoreError line; the caller retries. While opening, only
a locked (busy) file is worth a retry: any other failure is StoreUnusable (one line, exit 2, at once).
"""
from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from lepton_edge.fleet.store.base import StoreError, StoreUnusable, ValueRefused
from lepton_edge.fleet.store.sql import SqlStore

_BUSY_CODES = (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED (their extended codes share the low byte)


def _busy(e: sqlite3.Error) -> bool:
    """Whether the failure is another connection holding the file: the one failure that clears by waiting.
    (sqlite_errorcode is Python 3.11's; before it, the message says so.)"""
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _BUSY_CODES
    return "locked" in str(e) or "busy" in str(e)


class SqliteStore(SqlStore):
    ID_COL = "INTEGER PRIMARY KEY AUTOINCREMENT"

    def __init__(self, path: str | Path, *, timeout: float = 5.0):
        self.path = Path(path)
        self.url = str(self.path)
        self.timeout = timeout
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._opening = True
        self._check_path()
        with self._tx() as cur:
            self._migrate(cur)
        self._opening = False

    def _check_path(self) -> None:
        """A path that is there but is not a regular file (a directory, /dev/null, a FIFO), or whose directory
        cannot be made, is StoreUnusable before SQLite is asked: SQLite's 'unable to open database file' and
        'disk I/O error' for them read like a passing state, and `monitor` retried them for a minute."""
        try:
            there = self.path.exists()
        except OSError as e:  # (a folder this user cannot enter: EACCES; a name too long)
            raise StoreUnusable(f"fleet store {self.path}: {e.strerror or e}") from None
        if there and not self.path.is_file():
            what = "a directory" if self.path.is_dir() else "not a regular file"
            raise StoreUnusable(f"fleet store {self.path}: {what}; give a SQLite file's path (it is created) "
                                "or a postgresql:// URL")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreUnusable(f"fleet store {self.path}: cannot create its directory: {e.strerror or e}") from None

    def _conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            try:
                c = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
                c.execute("PRAGMA journal_mode=WAL")
                c.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.Error as e:
                raise self._error(e) from None
            self._local.conn = c
            with self._lock:
                self._all.append(c)
        return c

    def _why(self, e: Exception) -> str:
        msg = str(e)
        if "not a database" in msg or "malformed" in msg:
            msg += " (the file is corrupt: move it away and the monitor starts a new one)"
        return f"fleet store {self.path}: {msg}"

    def _error(self, e: sqlite3.Error) -> StoreError:
        """The StoreError for a failure: ValueRefused for the value's fault; StoreUnusable for anything
        but a busy or locked file while the store is being opened (a locked file clears; an unreadable one
        does not); else a StoreError the caller retries."""
        if isinstance(e, (sqlite3.IntegrityError, sqlite3.DataError)):  # the value's fault: no retry helps
            return ValueRefused(self._why(e))
        if self._opening and not _busy(e):
            return StoreUnusable(self._why(e))
        return StoreError(self._why(e))

    def _floor(self, expr: str) -> str:
        return f"CAST({expr} AS INTEGER)"  # times are positive: truncation is floor

    def _greatest(self, a: str, b: str) -> str:
        return f"max({a}, {b})"

    def _least(self, a: str, b: str) -> str:
        return f"min({a}, {b})"

    @contextlib.contextmanager
    def _tx(self, write: bool = True) -> Iterator[sqlite3.Cursor]:
        c = self._conn()
        try:
            cur = c.cursor()
            cur.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        except sqlite3.Error as e:
            raise self._error(e) from None
        try:
            yield cur
            c.execute("COMMIT")
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                c.execute("ROLLBACK")
            raise self._error(e) from None
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                c.execute("ROLLBACK")
            raise

    def close(self) -> None:
        with self._lock:
            for c in self._all:
                with contextlib.suppress(sqlite3.Error):
                    c.close()
            self._all.clear()
        self._local = threading.local()
