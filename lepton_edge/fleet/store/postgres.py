"""The store in PostgreSQL (psycopg 3): several monitor workers on several machines, one database.

Why it is safe with N workers: uniqueness and gap counting are in SQL (see sql.py); the schema
migrates under a transaction-scoped advisory lock so two workers starting together do not both
create tables; alerts are evaluated by the holder of a session advisory lock (`exclusive`).
A server that goes away raises StoreError (one line); the thread's connection is dropped and
the next call reconnects. Opening retries every connection failure (a server still starting, a network
not up yet): libpq reports a refused login or a missing database with no SQLSTATE, in the server's
language, so they cannot be told apart safely; a schema that is not a fleet store's is StoreUnusable.
"""
from __future__ import annotations

import contextlib
import threading
import zlib
from collections.abc import Iterator

from lepton_edge.fleet.store.base import StoreError, StoreUnusable, ValueRefused
from lepton_edge.fleet.store.sql import SqlStore

_MIGRATE_LOCK = 0x1E9707  # arbitrary, fixed: the advisory lock key of schema migrations


def redacted_url(url: str) -> str:
    """The URL without its user and password, for messages."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    try:
        port = u.port
    except ValueError:  # (":99999", ":5x": urllib raises on reading it, and this builds the error's message)
        port = "?"
    return f"{u.scheme}://{u.hostname or ''}{':' + str(port) if port else ''}{u.path}"


class PostgresStore(SqlStore):
    ID_COL = "BIGSERIAL PRIMARY KEY"

    def __init__(self, url: str, *, connect_timeout: float = 5.0):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise StoreUnusable("a postgresql:// store needs psycopg: pip install 'lepton-edge[fleet]'") from None
        self.url = url
        self.connect_timeout = connect_timeout
        self._local = threading.local()
        self._all: list = []
        self._lock = threading.Lock()
        self._opening = True
        with self._tx() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATE_LOCK,))
            self._migrate(cur)
        self._opening = False

    def _redacted(self) -> str:
        return redacted_url(self.url)

    def _conn(self):
        import psycopg

        c = getattr(self._local, "conn", None)
        if c is None or c.closed:
            try:
                c = psycopg.connect(self.url, connect_timeout=max(1, int(self.connect_timeout)), autocommit=False)
            except psycopg.Error as e:
                raise StoreError(f"fleet store {self._redacted()}: {str(e).strip().splitlines()[0]}") from None
            self._local.conn = c
            with self._lock:
                self._all.append(c)
        return c

    def _q(self, sql: str) -> str:
        return sql.replace("?", "%s")

    def _insert_flags(self, cur, sql: str, rows: list[tuple]) -> list[bool]:
        """One pipelined executemany with RETURNING: a batch of windows costs one round trip."""
        cur.executemany(sql + " RETURNING 1", rows, returning=True)
        out = []
        while True:
            out.append(cur.fetchone() is not None)
            if not cur.nextset():
                break
        return out

    def _hold_boots(self, cur) -> None:
        """Under READ COMMITTED each statement sees what committed before it: a writer's upsert of `boots`
        waits for this transaction instead (SHARE ROW EXCLUSIVE conflicts with its ROW EXCLUSIVE, not with
        readers)."""
        cur.execute("LOCK TABLE boots IN SHARE ROW EXCLUSIVE MODE")

    @contextlib.contextmanager
    def _tx(self, write: bool = True) -> Iterator:
        import psycopg

        c = self._conn()
        try:
            with c.transaction(), c.cursor() as cur:
                yield cur
        except psycopg.Error as e:
            if c.closed or c.broken:
                self._local.conn = None
            why = f"fleet store {self._redacted()}: {str(e).strip().splitlines()[0]}"
            if isinstance(e, (psycopg.DataError, psycopg.IntegrityError)):  # SQLSTATE 22, 23: the value's fault
                raise ValueRefused(why) from None
            if getattr(self, "_opening", False) and (e.sqlstate or "")[:2] == "42":  # another schema, no rights:
                raise StoreUnusable(why) from None  # (SQLSTATE class 42) waiting will not change it
            raise StoreError(why) from None

    @contextlib.contextmanager
    def exclusive(self, name: str = "alerts") -> Iterator[bool]:
        """A session advisory lock: True in the one worker that holds it."""
        import psycopg

        key = zlib.crc32(f"lepton-edge:{name}".encode())
        c = self._conn()
        try:
            with c.transaction(), c.cursor() as cur:
                got = cur.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]
        except psycopg.Error as e:
            self._local.conn = None if c.broken else c
            raise StoreError(f"fleet store {self._redacted()}: {str(e).strip().splitlines()[0]}") from None
        try:
            yield bool(got)
        finally:
            if got:
                with contextlib.suppress(psycopg.Error), c.transaction(), c.cursor() as cur:
                    cur.execute("SELECT pg_advisory_unlock(%s)", (key,))

    def close(self) -> None:
        with self._lock:
            for c in self._all:
                with contextlib.suppress(Exception):
                    c.close()
            self._all.clear()
        self._local = threading.local()
