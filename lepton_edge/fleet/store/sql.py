"""The store in portable SQL, shared by SQLite and PostgreSQL; each backend adds its connection,
transactions, error mapping and a few dialect words.

Why one implementation: the two databases must give the same answers (tests run both), and the
correctness rules live in SQL that both accept:
- a window's identity is UNIQUE(fleet, device, boot_id, seq) and inserts are ON CONFLICT DO NOTHING,
  so N workers (or a redelivery) cannot store it twice;
- lost windows per boot are (max_seq - min_seq + 1) - count, kept in `boots` by atomic upserts, so a
  late window fills its gap and two workers inserting at once still add up;
- an alert is open at most once per (fleet, device, rule): a partial unique index, not a worker.
Rows are written in a fixed key order so two PostgreSQL workers never wait on each other in a cycle.

Why reads are cheap (schema v3): the writer keeps each device's current state as columns of `devices`
(a fleet page is one query, no JSON but the latency dict) and every window's minute as sums and counts
in `windows_ds` (same atomic upserts), so a 24 h chart reads 1,440 rows instead of 86,400 windows and
averages exactly what the windows would; the summary cards are one aggregate query.
"""
from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import math
import time
from typing import Any

from lepton_edge.fleet.store.base import (
    ALERT,
    OFFLINE,
    OK,
    SCHEMA_VERSION,
    WARNING,
    Alert,
    DeviceState,
    EventRecord,
    FleetSummary,
    HistoryPoint,
    Store,
)

MAX_TEXT = 2000  # event messages are cut here: a device cannot grow an index entry without bound
# An event's `data` as stored, in characters of JSON; larger is kept as {"truncated": true, "chars": n}. Why: the
# agent's are a few hundred (a deploy's figures), but a device could send 60 KB with every event, at the 20 a
# second the flood limit lets through: 500 such events took 43 MiB of SQLite files and made /api/events 29 MB.
MAX_EVENT_DATA = 4096


def _f(x) -> float | None:
    return None if x is None else float(x)


def _migrations(id_col: str) -> dict[int, list[str]]:
    """Version -> statements. Opening an older store runs the missing ones in order, in one transaction."""
    return {
        1: [
            "CREATE TABLE devices (fleet TEXT NOT NULL, device TEXT NOT NULL, online BOOLEAN,"
            " status_ts DOUBLE PRECISION, last_seen DOUBLE PRECISION, boot_id TEXT, software TEXT, meta TEXT,"
            " last_window TEXT,"
            " last_window_ts DOUBLE PRECISION, windows BIGINT NOT NULL DEFAULT 0, duplicates BIGINT NOT NULL DEFAULT 0,"
            " outbox_dropped BIGINT NOT NULL DEFAULT 0, deploys BIGINT NOT NULL DEFAULT 0,"
            " rollbacks BIGINT NOT NULL DEFAULT 0, last_event TEXT, last_event_ts DOUBLE PRECISION,"
            " PRIMARY KEY (fleet, device))",
            "CREATE TABLE windows (fleet TEXT NOT NULL, device TEXT NOT NULL, boot_id TEXT NOT NULL,"
            " seq BIGINT NOT NULL, ts DOUBLE PRECISION NOT NULL, received DOUBLE PRECISION NOT NULL,"
            " fps DOUBLE PRECISION,"
            " frames BIGINT NOT NULL DEFAULT 0, dropped BIGINT NOT NULL DEFAULT 0, corrupt BIGINT NOT NULL DEFAULT 0,"
            " p50 DOUBLE PRECISION, p95 DOUBLE PRECISION, p99 DOUBLE PRECISION, temperature_c DOUBLE PRECISION,"
            " cpu_percent DOUBLE PRECISION, rss_bytes BIGINT, PRIMARY KEY (fleet, device, boot_id, seq))",
            "CREATE INDEX windows_ts ON windows (fleet, device, ts)",
            "CREATE TABLE boots (fleet TEXT NOT NULL, device TEXT NOT NULL, boot_id TEXT NOT NULL,"
            " min_seq BIGINT NOT NULL, max_seq BIGINT NOT NULL, n BIGINT NOT NULL,"
            " PRIMARY KEY (fleet, device, boot_id))",
            f"CREATE TABLE events (id {id_col}, fleet TEXT NOT NULL, device TEXT NOT NULL, h TEXT NOT NULL,"
            " ts DOUBLE PRECISION NOT NULL, received DOUBLE PRECISION NOT NULL, boot_id TEXT NOT NULL,"
            " kind TEXT NOT NULL, level TEXT NOT NULL, message TEXT NOT NULL, data TEXT NOT NULL,"
            " UNIQUE (fleet, device, h))",
            "CREATE INDEX events_ts ON events (ts)",
            "CREATE TABLE bad_messages (fleet TEXT NOT NULL, device TEXT NOT NULL, reason TEXT NOT NULL,"
            " n BIGINT NOT NULL, last DOUBLE PRECISION NOT NULL, PRIMARY KEY (fleet, device, reason))",
            f"CREATE TABLE alerts (id {id_col}, fleet TEXT NOT NULL, device TEXT NOT NULL, rule TEXT NOT NULL,"
            " severity TEXT NOT NULL, message TEXT NOT NULL, started DOUBLE PRECISION NOT NULL,"
            " resolved DOUBLE PRECISION, value DOUBLE PRECISION, threshold DOUBLE PRECISION)",
            "CREATE UNIQUE INDEX alerts_active ON alerts (fleet, device, rule) WHERE resolved IS NULL",
        ],
        2: [  # downsampled history: old windows averaged into buckets that `history` reads with the rest
            "CREATE TABLE windows_ds (fleet TEXT NOT NULL, device TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL,"
            " n BIGINT NOT NULL, fps DOUBLE PRECISION, p50 DOUBLE PRECISION, p95 DOUBLE PRECISION,"
            " p99 DOUBLE PRECISION, temperature_c DOUBLE PRECISION, cpu_percent DOUBLE PRECISION,"
            " rss_bytes DOUBLE PRECISION, dropped BIGINT NOT NULL, corrupt BIGINT NOT NULL, frames BIGINT NOT NULL,"
            " PRIMARY KEY (fleet, device, ts))",
        ],
        3: [  # speed: the dashboards read columns, not JSON; charts of >= 24 h read 1-minute rows
            *(f"ALTER TABLE devices ADD COLUMN {c} {t}" for c, t in _DEV_COLS),
            _backfill_devices,
            "CREATE TABLE windows_ds_v3 (fleet TEXT NOT NULL, device TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL,"
            " n BIGINT NOT NULL, " + ", ".join(f"s_{c} DOUBLE PRECISION NOT NULL, n_{c} BIGINT NOT NULL"
                                                for c in _AVG_COLS) +
            ", dropped BIGINT NOT NULL, corrupt BIGINT NOT NULL, frames BIGINT NOT NULL,"
            " PRIMARY KEY (fleet, device, ts))",
            # old downsampled rows (averages over n) keep their bucket; their windows are gone from `windows`
            "INSERT INTO windows_ds_v3 (fleet, device, ts, n, " + ", ".join(f"s_{c}, n_{c}" for c in _AVG_COLS) +
            ", dropped, corrupt, frames) SELECT fleet, device, ts, n, " +
            ", ".join(f"COALESCE({c} * n, 0), CASE WHEN {c} IS NULL THEN 0 ELSE n END" for c in _AVG_COLS) +
            ", dropped, corrupt, frames FROM windows_ds",
            "CREATE TABLE store_state (k TEXT PRIMARY KEY, v DOUBLE PRECISION NOT NULL)",
            # raw windows older than this are only in windows_ds (see history)
            "INSERT INTO store_state (k, v) SELECT 'ds_cut', max(ts) + 60 FROM windows_ds HAVING count(*) > 0",
            "DROP TABLE windows_ds",
            "ALTER TABLE windows_ds_v3 RENAME TO windows_ds",
            _backfill_rollup,
        ],
        4: [  # the live page's poller reads the newest alerts and the newest open ones every second: on 50,000
            # alerts (SQLite) those two reads scanned the table, 102 ms a poll; 9 ms with these
            "CREATE INDEX alerts_started ON alerts (started, id)",
            "CREATE INDEX alerts_open_started ON alerts (started, id) WHERE resolved IS NULL",
        ],
    }


# Per-device state kept as columns by the writer (v3): a fleet page is one indexed read, no JSON but latency.
_META_COLS = (("bundle_name", "TEXT"), ("bundle_sha256", "TEXT"), ("precision", "TEXT"), ("backend", "TEXT"),
              ("latency_budget_ms", "DOUBLE PRECISION"))
_LAST_COLS = (("lw_bundle_name", "TEXT"), ("lw_bundle_sha256", "TEXT"), ("fps", "DOUBLE PRECISION"),
              ("latency", "TEXT"), ("dropped", "BIGINT"), ("corrupt", "BIGINT"), ("cpu_percent", "DOUBLE PRECISION"),
              ("rss_bytes", "BIGINT"), ("temperature_c", "DOUBLE PRECISION"), ("throttled", "TEXT"),
              ("inf_p95", "DOUBLE PRECISION"))
_DEV_COLS = _META_COLS + _LAST_COLS
# Averaged chart columns: windows_ds keeps their sum and count per minute, so any bucket of whole minutes
# averages exactly what the raw windows would give.
_AVG_COLS = ("fps", "p50", "p95", "p99", "temperature_c", "cpu_percent", "rss_bytes")
MINUTE = 60.0


def _avg_vals(p: dict) -> tuple:
    """A window's values of _AVG_COLS (None where absent)."""
    inf = (p.get("latency_ms") or {}).get("inference") or {}
    return (_num(p.get("fps")), _num(inf.get("p50")), _num(inf.get("p95")), _num(inf.get("p99")),
            _num(p.get("temperature_c")), _num(p.get("cpu_percent")), _num(p.get("rss_bytes")))


SOFTWARE_CHARS = 64  # telemetry.schema.Status.version's cap


def _str(x, limit: int = 200) -> str | None:
    return x[:limit] if isinstance(x, str) else None  # meta is not schema-checked: a name is text or nothing


def _num(x) -> float | None:
    """A finite float, or None (a NaN, an infinity or an integer past a double's range never reaches a column)."""
    if not isinstance(x, (int, float)):
        return None
    try:
        f = float(x)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def meta_cols(meta: dict) -> tuple:
    """The meta payload's values kept as device columns (order of _META_COLS)."""
    b = meta.get("bundle") if isinstance(meta.get("bundle"), dict) else {}
    budget = b.get("latency_budget_ms") or meta.get("latency_budget_ms")
    return (_str(b.get("name")), _str(b.get("sha256")), _str(b.get("precision")), _str(b.get("backend")),
            _num(budget))


def last_cols(p: dict) -> tuple:
    """A window's values kept as device columns (order of _LAST_COLS)."""
    b = p.get("bundle") if isinstance(p.get("bundle"), dict) else {}
    lat = {str(k): {str(q): float(x) for q, x in v.items() if isinstance(x, (int, float))}
           for k, v in (p.get("latency_ms") or {}).items() if isinstance(v, dict)}
    inf = lat.get("inference") or {}
    return (_str(b.get("name")), _str(b.get("sha256")), _num(p.get("fps")), json.dumps(lat) if lat else None,
            int(p.get("dropped") or 0), int(p.get("corrupt") or 0), _num(p.get("cpu_percent")),
            None if p.get("rss_bytes") is None else int(p["rss_bytes"]), _num(p.get("temperature_c")),
            _str(p.get("throttled")), _num(inf.get("p95")))


def _backfill_devices(store: SqlStore, cur) -> None:
    """v3: fill the new device columns from the JSON the v2 writer kept."""
    rows = store._x(cur, "SELECT fleet, device, meta, last_window FROM devices").fetchall()
    sets = ", ".join(f"{c} = ?" for c, _ in _DEV_COLS)
    vals = []
    for f, d, meta, last in rows:
        m = json.loads(meta) if meta else {}
        lw = json.loads(last) if last else {}
        vals.append((*meta_cols(m if isinstance(m, dict) else {}), *last_cols(lw if isinstance(lw, dict) else {}),
                     f, d))
    store._many(cur, f"UPDATE devices SET {sets}, last_window = NULL WHERE fleet = ? AND device = ?", vals)


def _backfill_rollup(store: SqlStore, cur) -> None:
    """v3: the 1-minute rows of the windows still stored (merged with old downsampled rows of that minute)."""
    bt = f"{store._floor(f'ts / {MINUTE!r}')} * {MINUTE!r}"
    store._x(cur, "INSERT INTO windows_ds (fleet, device, ts, n, " + ", ".join(f"s_{c}, n_{c}" for c in _AVG_COLS) +
             f", dropped, corrupt, frames) SELECT fleet, device, {bt}, COUNT(*), " +
             ", ".join(f"COALESCE(SUM({c}), 0), COUNT({c})" for c in _AVG_COLS) +
             f", SUM(dropped), SUM(corrupt), SUM(frames) FROM windows GROUP BY fleet, device, {bt} "
             f"ON CONFLICT (fleet, device, ts) DO UPDATE SET {_ROLLUP_MERGE}")


_ROLLUP_MERGE = ", ".join(f"{c} = windows_ds.{c} + excluded.{c}" for c in
                          ("n", *(f"{p}_{c}" for c in _AVG_COLS for p in ("s", "n")), "dropped", "corrupt", "frames"))


_WIN_COLS = "fleet, device, boot_id, seq, ts, received, fps, frames, dropped, corrupt, p50, p95, p99, " \
            "temperature_c, cpu_percent, rss_bytes"


_STATE_FIELDS = frozenset(DeviceState.model_fields)
_set = object.__setattr__


def _trusted_state(values: dict) -> DeviceState:
    """A DeviceState from values that already have their fields' types, without validation.

    Why: a fleet read builds 1,000 of them a second for the dashboards, and validation (or pydantic's
    model_construct, which still walks every field in Python) was most of that time; this is what
    model_construct ends with. Safe because every value comes from a typed column written from a validated
    payload (tests/test_fleet_store.py checks the result equals a validated DeviceState). A field added to
    DeviceState but not here falls back to validation instead of yielding a half-built object."""
    if values.keys() != _STATE_FIELDS:
        return DeviceState.model_validate(values)
    m = DeviceState.__new__(DeviceState)
    _set(m, "__dict__", values)
    _set(m, "__pydantic_fields_set__", set(_STATE_FIELDS))
    _set(m, "__pydantic_extra__", None)
    _set(m, "__pydantic_private__", None)
    return m



# Windows lost per device: each boot's (max_seq - min_seq + 1) - count, summed in floating point. Why not
# an integer SUM: a window's seq may be up to 2^53 (schema), so 1,025 boots of one device, 2,050 valid
# windows, overflowed SQLite's 64-bit SUM, and every read of the fleet failed ("integer overflow") until the
# store was edited by hand. DOUBLE PRECISION is REAL to SQLite and double to PostgreSQL.
_GAPS = ("SUM(CAST(CASE WHEN max_seq - min_seq + 1 - n > 0 THEN max_seq - min_seq + 1 - n ELSE 0 END "
         "AS DOUBLE PRECISION))")
MAX_GAPS = 2 ** 53  # what a device can claim to have lost: exact in a float, in JSON and in a browser


def _gaps(v) -> int:
    return int(min(float(v or 0), MAX_GAPS))

class SqlStore(Store):
    ID_COL = ""  # the dialect's auto-increment primary key

    # ---- dialect ------------------------------------------------------------------------------
    @abc.abstractmethod
    def _tx(self, write: bool = True) -> contextlib.AbstractContextManager:
        """A cursor inside one transaction; errors become StoreError."""

    def _q(self, sql: str) -> str:
        return sql

    def _floor(self, expr: str) -> str:
        return f"floor({expr})"

    def _greatest(self, a: str, b: str) -> str:
        return f"GREATEST({a}, {b})"

    def _least(self, a: str, b: str) -> str:
        return f"LEAST({a}, {b})"

    def _hold_boots(self, cur) -> None:
        """Keep other writers' `boots` rows from changing until this transaction ends (_fold_boots: its two
        statements must see the same boots). Nothing here: a SQLite write transaction holds the database."""

    def _insert_flags(self, cur, sql: str, rows: list[tuple]) -> list[bool]:
        """Execute an INSERT ... ON CONFLICT DO NOTHING per row; True where a row was inserted."""
        out = []
        for r in rows:
            cur.execute(sql, r)
            out.append(cur.rowcount == 1)
        return out

    def _x(self, cur, sql: str, args: tuple | list = ()) -> Any:
        cur.execute(self._q(sql), args)
        return cur

    # ---- schema -------------------------------------------------------------------------------
    def _migrate(self, cur) -> None:
        cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        cur.execute("SELECT max(version) FROM schema_version")
        have = cur.fetchone()[0] or 0
        from lepton_edge.fleet.store.base import StoreUnusable

        if not isinstance(have, int) or isinstance(have, bool):  # another application's schema_version table
            raise StoreUnusable(f"fleet store {self.url}: its schema_version table holds {str(have)[:40]!r}, "
                                "not a fleet store's version (another application's database?)")
        if have > SCHEMA_VERSION:
            raise StoreUnusable(f"fleet store {self.url} has schema version {have}, newer than this lepton-edge "
                                f"({SCHEMA_VERSION}): upgrade lepton-edge")
        for v, stmts in sorted(_migrations(self.ID_COL).items()):
            if v <= have:
                continue
            for s in stmts:
                s(self, cur) if callable(s) else cur.execute(s)
            cur.execute(self._q("INSERT INTO schema_version (version) VALUES (?)"), (v,))

    def schema_version(self) -> int:
        with self._tx(write=False) as cur:
            return self._x(cur, "SELECT max(version) FROM schema_version").fetchone()[0] or 0

    # ---- writes -------------------------------------------------------------------------------
    def _many(self, cur, sql: str, rows: list[tuple]) -> None:
        """One statement over many rows (psycopg pipelines them: one round trip per batch)."""
        if rows:
            cur.executemany(self._q(sql), rows)

    def _touch(self, cur, keys: list[tuple[str, str]]) -> None:
        self._many(cur, "INSERT INTO devices (fleet, device) VALUES (?, ?) ON CONFLICT DO NOTHING", sorted(set(keys)))

    def add_window(self, fleet: str, device: str, payload: dict, received: float) -> bool:
        return self.add_windows([(fleet, device, payload, received)])[0]

    def add_windows(self, rows: list[tuple[str, str, dict, float]]) -> list[bool]:
        if not rows:
            return []
        order = sorted(range(len(rows)), key=lambda i: (rows[i][0], rows[i][1], rows[i][2]["boot_id"],
                                                        rows[i][2]["seq"]))
        vals = []
        for i in order:
            f, d, p, rec = rows[i]
            inf = (p.get("latency_ms") or {}).get("inference") or {}
            vals.append((f, d, p["boot_id"], int(p["seq"]), float(p["ts"]), rec, p.get("fps"),
                         int(p.get("frames") or 0), int(p.get("dropped") or 0), int(p.get("corrupt") or 0),
                         inf.get("p50"), inf.get("p95"),
                         inf.get("p99"), p.get("temperature_c"), p.get("cpu_percent"), p.get("rss_bytes")))
        ins = self._q(f"INSERT INTO windows ({_WIN_COLS}) VALUES ({', '.join('?' * 16)}) ON CONFLICT DO NOTHING")
        with self._tx() as cur:
            self._touch(cur, [(r[0], r[1]) for r in rows])
            flags = self._insert_flags(cur, ins, vals)
            boots: dict[tuple, list] = {}
            devs: dict[tuple, dict] = {}
            mins: dict[tuple, list] = {}  # (fleet, device, minute) -> n, dropped, corrupt, frames, (sum, count)...
            for i, ok in zip(order, flags):
                f, d, p, rec = rows[i]
                dv = devs.setdefault((f, d), {"n": 0, "dup": 0, "outbox": 0, "seen": rec, "last": None})
                dv["seen"] = max(dv["seen"], rec)
                if not ok:
                    dv["dup"] += 1
                    continue
                seq = int(p["seq"])
                b = boots.setdefault((f, d, p["boot_id"]), [seq, seq, 0])
                b[0], b[1], b[2] = min(b[0], seq), max(b[1], seq), b[2] + 1
                dv["n"] += 1
                dv["outbox"] += int(p.get("outbox_dropped") or 0)
                if dv["last"] is None or p["ts"] >= dv["last"]["ts"]:
                    dv["last"] = p
                m = mins.get(key := (f, d, math.floor(float(p["ts"]) / MINUTE) * MINUTE))
                if m is None:
                    m = mins[key] = [0] * (4 + 2 * len(_AVG_COLS))
                m[0] += 1
                m[1] += int(p.get("dropped") or 0)
                m[2] += int(p.get("corrupt") or 0)
                m[3] += int(p.get("frames") or 0)
                for j, x in enumerate(_avg_vals(p)):
                    if x is not None:
                        m[4 + 2 * j] += x
                        m[5 + 2 * j] += 1
            self._many(cur, "INSERT INTO boots (fleet, device, boot_id, min_seq, max_seq, n) VALUES (?, ?, ?, ?, ?, ?) "
                       "ON CONFLICT (fleet, device, boot_id) DO UPDATE SET "
                       f"min_seq = {self._least('boots.min_seq', 'excluded.min_seq')}, "
                       f"max_seq = {self._greatest('boots.max_seq', 'excluded.max_seq')}, n = boots.n + excluded.n",
                       [(f, d, b, lo, hi, n) for (f, d, b), (lo, hi, n) in sorted(boots.items())])
            self._many(cur, "UPDATE devices SET windows = windows + ?, duplicates = duplicates + ?, "
                       "outbox_dropped = outbox_dropped + ?, "
                       f"last_seen = {self._greatest('COALESCE(last_seen, 0)', '?')} WHERE fleet = ? AND device = ?",
                       [(dv["n"], dv["dup"], dv["outbox"], dv["seen"], f, d) for (f, d), dv in sorted(devs.items())])
            self._many(cur, "INSERT INTO windows_ds (fleet, device, ts, n, dropped, corrupt, frames, " +
                       ", ".join(f"s_{c}, n_{c}" for c in _AVG_COLS) + f") VALUES ({', '.join('?' * 21)}) "
                       f"ON CONFLICT (fleet, device, ts) DO UPDATE SET {_ROLLUP_MERGE}",
                       [(*k, *m) for k, m in sorted(mins.items())])
            lasts = []
            for (f, d), dv in sorted(devs.items()):
                if dv["last"] is not None:
                    ts = float(dv["last"]["ts"])
                    lasts.append((*last_cols(dv["last"]), ts, f, d, ts))
            self._many(cur, "UPDATE devices SET " + ", ".join(f"{c} = ?" for c, _ in _LAST_COLS) +
                       ", last_window_ts = ? WHERE fleet = ? AND device = ?"
                       " AND (last_window_ts IS NULL OR last_window_ts <= ?)", lasts)
        out = [False] * len(rows)
        for i, ok in zip(order, flags):
            out[i] = ok
        return out

    def add_event(self, fleet: str, device: str, payload: dict, received: float) -> bool:
        msg = str(payload.get("message", ""))[:MAX_TEXT]
        data = json.dumps(payload.get("data") or {})
        if len(data) > MAX_EVENT_DATA:
            data = json.dumps({"truncated": True, "chars": len(data)})
        # by the time the device sent (a time the monitor replaced is kept as sent_ts): a repeat of the event
        # (an outbox resend, a redelivery) is the same event whenever it arrives
        sent = payload.get("sent_ts", payload["ts"])
        h = hashlib.sha256(json.dumps([payload["boot_id"], sent if isinstance(sent, (int, float)) else str(sent),
                                       payload["kind"], msg], sort_keys=True).encode()).hexdigest()[:32]
        kind = str(payload["kind"])
        with self._tx() as cur:
            self._touch(cur, [(fleet, device)])
            self._x(cur, "INSERT INTO events (fleet, device, h, ts, received, boot_id, kind, level, message, data) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    (fleet, device, h, float(payload["ts"]), received, payload["boot_id"], kind,
                     payload.get("level", "info"), msg, data))
            if cur.rowcount != 1:
                return False
            self._x(cur, "UPDATE devices SET deploys = deploys + ?, rollbacks = rollbacks + ?, "
                    f"last_seen = {self._greatest('COALESCE(last_seen, 0)', '?')} WHERE fleet = ? AND device = ?",
                    (int(kind == "deploy"), int(kind == "rollback"), received, fleet, device))
            self._x(cur, "UPDATE devices SET last_event = ?, last_event_ts = ? WHERE fleet = ? AND device = ? "
                    "AND (last_event_ts IS NULL OR last_event_ts <= ?)",
                    (f"{kind}: {msg}"[:200], float(payload["ts"]), fleet, device, float(payload["ts"])))
        return True

    def set_status(self, fleet: str, device: str, payload: dict, received: float) -> None:
        online = bool(payload.get("online"))
        with self._tx() as cur:
            self._touch(cur, [(fleet, device)])
            # applied in arrival order: a Last Will carries the time it was set (connect), not sent. An offline
            # status says nothing of when the device was last heard: last_seen stays (it was set to 0.0 where it
            # was empty, and a device known only from a retained offline status read "20789d ago": 1970)
            seen = f", last_seen = {self._greatest('COALESCE(last_seen, 0)', '?')}" if online else ""
            self._x(cur, "UPDATE devices SET online = ?, status_ts = ?, boot_id = ?, "
                    f"software = COALESCE(?, software){seen} WHERE fleet = ? AND device = ?",
                    (online, received, payload.get("boot_id"), payload.get("version"),
                     *((received,) if online else ()), fleet, device))

    def set_meta(self, fleet: str, device: str, payload: dict, received: float) -> None:
        with self._tx() as cur:
            self._touch(cur, [(fleet, device)])
            self._x(cur, "UPDATE devices SET meta = ?, software = COALESCE(?, software), " +
                    ", ".join(f"{c} = ?" for c, _ in _META_COLS) + " WHERE fleet = ? AND device = ?",
                    # (software capped as status's version is: a 60 KB one was every HA config's dev.sw)
                    (json.dumps(payload), _str(payload.get("software"), SOFTWARE_CHARS), *meta_cols(payload),
                     fleet, device))

    def count_bad(self, fleet: str | None, device: str | None, reason: str, received: float,
                  known: bool = False) -> None:
        self.count_bad_many({(fleet or "", device or "", reason): (1, received)}, known)

    def count_bad_many(self, rows: dict[tuple[str, str, str], tuple[int, float]], known: bool = False) -> None:
        """(fleet or '', device or '', reason) -> (count, last received): a flood costs one row per reason.

        Counted against the device only when it is one the store knows (it has sent something valid); the
        others' under ('', ''). Why: a refused message made its device, so 200,000 one-byte messages under
        made-up names were 200,000 devices (31 MB of store, 700 MB of monitor, a 27 s /metrics, a retained
        Home Assistant device each), all from messages the store was said never to keep. `known`: the
        messages passed the schema (the database refused a value), so their devices are devices."""
        with self._tx() as cur:
            named = {(f, d) for f, d, _ in rows if f and d}
            if known:
                self._touch(cur, list(named))
            else:
                named = {k for k in named
                         if self._x(cur, "SELECT 1 FROM devices WHERE fleet = ? AND device = ?", k).fetchone()}
            merged: dict[tuple[str, str, str], tuple[int, float]] = {}
            for (f, d, r), (n, last) in rows.items():
                key = (f, d, r[:64]) if (f, d) in named else ("", "", r[:64])
                had, seen = merged.get(key, (0, last))
                merged[key] = (had + n, max(seen, last))
            for (f, d, r), (n, last) in sorted(merged.items()):
                self._x(cur, "INSERT INTO bad_messages (fleet, device, reason, n, last) VALUES (?, ?, ?, ?, ?) "
                        "ON CONFLICT (fleet, device, reason) DO UPDATE SET n = bad_messages.n + excluded.n, "
                        "last = excluded.last", (f, d, r[:64], n, last))

    def forget(self, fleet: str, device: str) -> None:
        with self._tx() as cur:
            for t in ("windows", "windows_ds", "boots", "events", "bad_messages", "alerts", "devices"):
                self._x(cur, f"DELETE FROM {t} WHERE fleet = ? AND device = ?", (fleet, device))

    _ALERT_COLS = "id, fleet, device, rule, severity, message, started, resolved, value, threshold"

    def _alert(self, r) -> Alert:
        return Alert(id=r[0], fleet=r[1], device=r[2], rule=r[3], severity=r[4], message=r[5], started=r[6],
                     resolved=r[7], value=r[8], threshold=r[9])

    def upsert_alert(self, alert: Alert) -> Alert | None:
        with self._tx() as cur:
            r = self._x(cur, "INSERT INTO alerts (fleet, device, rule, severity, message, started, resolved, value, "
                        "threshold) VALUES (?, ?, ?, ?, ?, ?, NULL, ?, ?) "
                        "ON CONFLICT (fleet, device, rule) WHERE resolved IS NULL DO NOTHING "
                        f"RETURNING {self._ALERT_COLS}",
                        (alert.fleet, alert.device, alert.rule, alert.severity, alert.message[:MAX_TEXT],
                         alert.started, alert.value, alert.threshold)).fetchone()
        return self._alert(r) if r else None

    def resolve_alert(self, fleet: str, device: str, rule: str, resolved: float) -> Alert | None:
        with self._tx() as cur:
            r = self._x(cur, "UPDATE alerts SET resolved = ? WHERE fleet = ? AND device = ? AND rule = ? "
                        f"AND resolved IS NULL RETURNING {self._ALERT_COLS}",
                        (resolved, fleet, device, rule)).fetchone()
        return self._alert(r) if r else None

    def retain(self, older_than_s: float, now: float | None = None) -> int:
        cut = (now or time.time()) - older_than_s
        n = 0
        with self._tx() as cur:
            for t, col in (("windows", "ts"), ("windows_ds", "ts"), ("events", "ts"), ("alerts", "resolved")):
                n += self._x(cur, f"DELETE FROM {t} WHERE {col} < ?", (cut,)).rowcount
            self._fold_boots(cur)
        return n

    def _fold_boots(self, cur) -> None:
        """Boots none of whose windows is left (retained or downsampled away) become one row per device that
        keeps their lost windows: boot_id '' (no BootId is empty), min_seq 0, max_seq lost - 1, n 0.
        Why: `boots` was never cleaned, so a device sending each window under a fresh boot_id left a row per
        window that retention did not remove (20,000 windows retained away left 20,000 rows), and every fleet
        read sums them all. Folding, not deleting, keeps each device's seq_gaps (and the alert on it) as it was.
        (A window that comes even later for a folded boot starts a row of its own: a gap it fills stays counted.
        The boot the device's last status names is kept whole: it may resume after an outage longer than the
        retention, and the seqs it lost across the outage are counted then.)"""
        def gone(t: str) -> str:  # (never the boot the device's status names: one that resumes after a long
            # outage must find its seqs, or the windows it lost across the outage go uncounted)
            return (f"{t}.boot_id <> '' AND NOT EXISTS (SELECT 1 FROM windows w WHERE w.fleet = {t}.fleet AND "
                    f"w.device = {t}.device AND w.boot_id = {t}.boot_id) AND {t}.boot_id <> COALESCE((SELECT "
                    f"d.boot_id FROM devices d WHERE d.fleet = {t}.fleet AND d.device = {t}.device), '')")
        lost = "CASE WHEN max_seq - min_seq + 1 - n > 0 THEN max_seq - min_seq + 1 - n ELSE 0 END"
        total = self._least("SUM(lost)", repr(float(MAX_GAPS)))
        # (a window of a gone boot committed between the fold and the delete would keep that boot's row
        # beside the fold that already counts its lost windows: counted twice)
        self._hold_boots(cur)
        self._x(cur, "INSERT INTO boots (fleet, device, boot_id, min_seq, max_seq, n) "
                f"SELECT fleet, device, '', 0, CAST({total} AS BIGINT) - 1, 0 FROM (SELECT fleet, device, "
                f"CAST({lost} AS DOUBLE PRECISION) AS lost FROM boots b WHERE {gone('b')}) g GROUP BY fleet, device "
                "HAVING SUM(lost) > 0 ON CONFLICT (fleet, device, boot_id) DO UPDATE SET "
                f"max_seq = {self._least('boots.max_seq + excluded.max_seq + 1', str(MAX_GAPS))}")
        self._x(cur, f"DELETE FROM boots WHERE {gone('boots')}")

    def downsample(self, older_than_s: float = 86400.0, bucket_s: float = 60.0, now: float | None = None) -> int:
        """The writer already keeps every window's minute in `windows_ds` (sums and counts), so folding is
        deleting the raw windows before a whole-minute cut; a bucket_s above a minute (rounded to whole
        minutes) also merges those old minute rows into bucket_s rows."""
        b = max(1, round(float(bucket_s) / MINUTE)) * MINUTE
        cut = math.floor(((now or time.time()) - older_than_s) / b) * b  # whole buckets only
        with self._tx() as cur:
            if b > MINUTE:
                bt = f"{self._floor(f'ts / {b!r}')} * {b!r}"
                cols = ("n", "dropped", "corrupt", "frames", *(f"{p}_{c}" for c in _AVG_COLS for p in ("s", "n")))
                self._x(cur, f"CREATE TEMPORARY TABLE ds_fold AS SELECT fleet, device, {bt} AS ts, " +
                        ", ".join(f"SUM({c}) AS {c}" for c in cols) +
                        f" FROM windows_ds WHERE ts < ? GROUP BY fleet, device, {bt}", (cut,))
                self._x(cur, "DELETE FROM windows_ds WHERE ts < ?", (cut,))
                self._x(cur, f"INSERT INTO windows_ds (fleet, device, ts, {', '.join(cols)}) "
                        f"SELECT fleet, device, ts, {', '.join(cols)} FROM ds_fold")
                self._x(cur, "DROP TABLE ds_fold")
            self._x(cur, "INSERT INTO store_state (k, v) VALUES ('ds_cut', ?) ON CONFLICT (k) DO UPDATE SET "
                    f"v = {self._greatest('store_state.v', 'excluded.v')}", (cut,))
            n = self._x(cur, "DELETE FROM windows WHERE ts < ?", (cut,)).rowcount
            self._fold_boots(cur)
            return n

    # ---- reads --------------------------------------------------------------------------------
    _DEV_SQL = (
        "SELECT d.fleet, d.device, d.online, d.last_seen, d.boot_id, d.software, d.windows, d.duplicates, "
        "d.outbox_dropped, d.deploys, d.rollbacks, d.last_event, COALESCE(g.gaps, 0), COALESCE(a.n, 0), "
        "COALESCE(a.crit, 0), COALESCE(b.n, 0), " + ", ".join(f"d.{c}" for c, _ in _DEV_COLS) + " FROM devices d "
        f"LEFT JOIN (SELECT fleet, device, {_GAPS} AS gaps FROM boots GROUP BY fleet, device) g "
        "ON g.fleet = d.fleet AND g.device = d.device "
        "LEFT JOIN (SELECT fleet, device, COUNT(*) AS n, "
        "SUM(CASE WHEN severity = 'critical' THEN 1 ELSE 0 END) AS crit "
        "FROM alerts WHERE resolved IS NULL GROUP BY fleet, device) a ON a.fleet = d.fleet AND a.device = d.device "
        "LEFT JOIN (SELECT fleet, device, SUM(n) AS n FROM bad_messages GROUP BY fleet, device) b "
        "ON b.fleet = d.fleet AND b.device = d.device")

    @staticmethod
    def _state(r) -> DeviceState:
        (name, sha, precision, backend, budget, lw_name, lw_sha, fps, latency, dropped, corrupt, cpu, rss, temp,
         throttled, _) = r[16:]
        online = None if r[2] is None else bool(r[2])
        active, crit = int(r[13]), int(r[14])
        sev = OFFLINE if online is False else ALERT if crit else WARNING if active else OK
        return _trusted_state(dict(
            fleet=r[0], device=r[1], online=online, last_seen=r[3], boot_id=r[4], software=r[5],
            bundle_name=name or lw_name, bundle_sha256=sha or lw_sha, precision=precision, backend=backend,
            fps=fps, latency=json.loads(latency) if latency else {}, dropped=dropped or 0, corrupt=corrupt or 0,
            cpu_percent=cpu, rss_bytes=rss, temperature_c=temp, throttled=throttled, outbox_dropped=int(r[8]),
            windows=int(r[6]), seq_gaps=_gaps(r[12]), duplicates=int(r[7]), bad_messages=int(r[15]), last_event=r[11],
            deploys=int(r[9]), rollbacks=int(r[10]), active_alerts=active, severity=sev, latency_budget_ms=budget))

    def devices(self) -> list[DeviceState]:
        with self._tx(write=False) as cur:
            rows = self._x(cur, self._DEV_SQL + " ORDER BY d.fleet, d.device").fetchall()
        return [self._state(r) for r in rows]

    def device(self, fleet: str, device: str) -> DeviceState | None:
        with self._tx(write=False) as cur:
            r = self._x(cur, self._DEV_SQL + " WHERE d.fleet = ? AND d.device = ?", (fleet, device)).fetchone()
        return self._state(r) if r else None

    def seq_gaps(self) -> dict[tuple[str, str], int]:
        with self._tx(write=False) as cur:
            rows = self._x(cur, f"SELECT fleet, device, {_GAPS} FROM boots GROUP BY fleet, device").fetchall()
        return {(r[0], r[1]): _gaps(r[2]) for r in rows}

    def history(self, fleet: str, device: str, since: float, until: float | None = None,
                max_points: int = 1000) -> list[HistoryPoint]:
        """Buckets of a minute or more are read from the 1-minute rows alone (a 24 h chart reads 1,440 rows,
        not 86,400 windows) and are whole minutes, so they average exactly what the windows would; finer
        buckets read the raw windows, and the minute rows where the windows were downsampled away."""
        until = time.time() if until is None else until
        w = max((until - since) / max(1, int(max_points)), 1e-3)
        sums = ", ".join(f"SUM(s_{c}) / NULLIF(SUM(n_{c}), 0)" for c in _AVG_COLS)
        rows_ds = "FROM windows_ds WHERE fleet = ? AND device = ? AND ts >= ? AND ts <= ?"
        if w >= MINUTE:
            w = math.ceil(w / MINUTE) * MINUTE
            bt = f"{self._floor(f'ts / {w!r}')} * {w!r}"
            sql = (f"SELECT {bt} AS b, {sums}, SUM(dropped), SUM(corrupt), SUM(frames) {rows_ds} "
                   f"GROUP BY {bt} ORDER BY b")
            args: tuple = (fleet, device, math.floor(since / MINUTE) * MINUTE, until)
        else:
            bt = f"{self._floor(f'ts / {w!r}')} * {w!r}"
            with self._tx(write=False) as cur:
                r = self._x(cur, "SELECT v FROM store_state WHERE k = 'ds_cut'").fetchone()
            cut = float(r[0]) if r else 0.0
            raw = (f"SELECT {bt} AS b, " + ", ".join(f"AVG({c})" for c in _AVG_COLS) +
                   ", SUM(dropped), SUM(corrupt), SUM(frames) FROM windows WHERE fleet = ? AND device = ? "
                   f"AND ts >= ? AND ts <= ? GROUP BY {bt}")
            args = (fleet, device, max(since, cut), until)
            if cut <= since:
                sql = raw + " ORDER BY b"
            else:  # before the cut, the windows live on as minute rows only
                sql = (f"SELECT b, {', '.join(f'SUM(s_{c}) / NULLIF(SUM(n_{c}), 0)' for c in _AVG_COLS)}, "
                       "SUM(dropped), SUM(corrupt), SUM(frames) FROM ("
                       f"SELECT {bt} AS b, " + ", ".join(f"SUM({c}) AS s_{c}, COUNT({c}) AS n_{c}" for c in _AVG_COLS) +
                       ", SUM(dropped) AS dropped, SUM(corrupt) AS corrupt, SUM(frames) AS frames FROM windows "
                       f"WHERE fleet = ? AND device = ? AND ts >= ? AND ts <= ? GROUP BY {bt} UNION ALL "
                       f"SELECT {bt} AS b, " + ", ".join(f"s_{c}, n_{c}" for c in _AVG_COLS) +
                       f", dropped, corrupt, frames {rows_ds} AND ts < ?) u GROUP BY b ORDER BY b")
                args = (*args, fleet, device, since, until, cut)
        with self._tx(write=False) as cur:
            rows = self._x(cur, sql, args).fetchall()
        return [HistoryPoint(ts=float(r[0]), fps=_f(r[1]), inference_p50_ms=_f(r[2]), inference_p95_ms=_f(r[3]),
                             inference_p99_ms=_f(r[4]), temperature_c=_f(r[5]), cpu_percent=_f(r[6]),
                             rss_bytes=_f(r[7]), dropped=int(r[8] or 0), corrupt=int(r[9] or 0),
                             frames=int(r[10] or 0)) for r in rows]

    def events(self, fleet: str | None = None, device: str | None = None, since: float = 0.0,
               limit: int = 200) -> list[EventRecord]:
        where, args = self._filter(fleet, device)
        with self._tx(write=False) as cur:
            rows = self._x(cur, f"SELECT {self._EVENT_COLS} FROM events "
                           f"WHERE ts >= ?{where} ORDER BY ts DESC, id DESC LIMIT ?",
                           (since, *args, max(0, int(limit)))).fetchall()
        return [self._event(r) for r in rows]

    _EVENT_COLS = "fleet, device, ts, received, boot_id, kind, level, message, data"

    def newest_events(self, kinds: list[str], since: float = 0.0, errors: bool = False) -> list[EventRecord]:
        """One query, one row per (fleet, device, rule) (ROW_NUMBER over each partition: SQLite 3.25 or
        later, every PostgreSQL the store supports), so no device's events can crowd out another's."""
        if not kinds:
            return []
        marks = ", ".join("?" * len(kinds))
        wanted = f"kind IN ({marks})" + (" OR level = 'error'" if errors else "")
        sql = (f"SELECT {self._EVENT_COLS} FROM (SELECT {self._EVENT_COLS}, ROW_NUMBER() OVER (PARTITION BY fleet, "
               f"device, CASE WHEN kind IN ({marks}) THEN kind ELSE 'error' END ORDER BY received DESC, id DESC) AS rn "
               f"FROM events WHERE ts >= ? AND ({wanted})) newest WHERE rn = 1 ORDER BY fleet, device, kind")
        with self._tx(write=False) as cur:
            rows = self._x(cur, sql, (*kinds, since, *kinds)).fetchall()
        return [self._event(r) for r in rows]

    @staticmethod
    def _event(r) -> EventRecord:
        return EventRecord(fleet=r[0], device=r[1], ts=r[2], received=r[3], boot_id=r[4], kind=r[5], level=r[6],
                           message=r[7], data=json.loads(r[8]))

    @staticmethod
    def _filter(fleet, device) -> tuple[str, list]:
        where, args = "", []
        if fleet:
            where += " AND fleet = ?"
            args.append(fleet)
        if device:
            where += " AND device = ?"
            args.append(device)
        return where, args

    def alerts(self, active_only: bool = False, fleet: str | None = None, device: str | None = None,
               limit: int = 200) -> list[Alert]:
        where, args = self._filter(fleet, device)
        if active_only:
            where += " AND resolved IS NULL"
        with self._tx(write=False) as cur:
            rows = self._x(cur, f"SELECT {self._ALERT_COLS} FROM alerts WHERE 1 = 1{where} "
                           "ORDER BY started DESC, id DESC LIMIT ?", (*args, max(0, int(limit)))).fetchall()
        return [self._alert(r) for r in rows]

    def alerts_by_id(self, ids: list[int]) -> list[Alert]:
        ids, rows = [int(i) for i in ids], []
        with self._tx(write=False) as cur:
            for at in range(0, len(ids), 500):  # (SQLite before 3.32 takes at most 999 parameters)
                some = ids[at:at + 500]
                rows += self._x(cur, f"SELECT {self._ALERT_COLS} FROM alerts WHERE id IN "
                                f"({', '.join('?' * len(some))})", some).fetchall()
        return [self._alert(r) for r in rows]

    def open_alert_ids(self) -> set[int]:
        with self._tx(write=False) as cur:  # (index only: alerts_open_started)
            return {int(r[0]) for r in self._x(cur, "SELECT id FROM alerts WHERE resolved IS NULL").fetchall()}

    def summary(self) -> FleetSummary:
        """One aggregate query over the device columns (the cards refresh every second)."""
        with self._tx(write=False) as cur:
            r = self._x(cur, "SELECT COUNT(*), SUM(CASE WHEN online THEN 1 ELSE 0 END), "
                        "SUM(CASE WHEN NOT online THEN 1 ELSE 0 END), SUM(CASE WHEN online THEN fps ELSE 0 END), "
                        "MAX(CASE WHEN online THEN inf_p95 END), (SELECT COUNT(*) FROM alerts a JOIN devices d "
                        "ON a.fleet = d.fleet AND a.device = d.device WHERE a.resolved IS NULL) FROM devices"
                        ).fetchone()
        return FleetSummary(devices=int(r[0]), online=int(r[1] or 0), offline=int(r[2] or 0),
                            total_fps=round(float(r[3] or 0.0), 3), worst_p95_ms=_f(r[4]), active_alerts=int(r[5]))
