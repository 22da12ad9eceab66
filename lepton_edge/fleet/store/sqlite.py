"""The default store: one SQLite file in WAL mode, zero set-up.

Why WAL and a connection per thread: the monitor's writer thread commits batches while the web
server, the terminal dashboard and a CLI in another shell read; WAL lets readers go on during a
write. Write transactions start IMMEDIATE so two writers queue on the lock instead of failing
half-way. A locked or corrupt file becomes one StoreError line; the caller retries.
"""
from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from lepton_edge.fleet.store.base import StoreError, ValueRefused
from lepton_edge.fleet.store.sql import SqlStore


class SqliteStore(SqlStore):
    ID_COL = "INTEGER PRIMARY KEY AUTOINCREMENT"

    def __init__(self, path: str | Path, *, timeout: float = 5.0):
        self.path = Path(path)
        self.url = str(self.path)
        self.timeout = timeout
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"fleet store {self.path}: cannot create its directory: {e.strerror or e}") from None
        with self._tx() as cur:
            self._migrate(cur)

    def _conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            try:
                c = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
                c.execute("PRAGMA journal_mode=WAL")
                c.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.Error as e:
                raise StoreError(self._why(e)) from None
            self._local.conn = c
            with self._lock:
                self._all.append(c)
        return c

    def _why(self, e: Exception) -> str:
        msg = str(e)
        if "not a database" in msg or "malformed" in msg:
            msg += " (the file is corrupt: move it away and the monitor starts a new one)"
        return f"fleet store {self.path}: {msg}"

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
            raise StoreError(self._why(e)) from None
        try:
            yield cur
            c.execute("COMMIT")
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                c.execute("ROLLBACK")
            if isinstance(e, (sqlite3.IntegrityError, sqlite3.DataError)):  # the value's fault: no retry helps
                raise ValueRefused(self._why(e)) from None
            raise StoreError(self._why(e)) from None
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
