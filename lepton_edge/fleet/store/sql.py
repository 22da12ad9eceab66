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
"""
from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import math
import time
from typing import Any

from lepton_edge.fleet.store.base import (ALERT, OFFLINE, OK, SCHEMA_VERSION, WARNING, Alert, DeviceState,
                                          EventRecord, FleetSummary, HistoryPoint, Store)

MAX_TEXT = 2000  # event messages are cut here: a device cannot grow an index entry without bound


def _f(x) -> float | None:
    return None if x is None else float(x)


def _migrations(id_col: str) -> dict[int, list[str]]:
    """Version -> statements. Opening an older store runs the missing ones in order, in one transaction."""
    return {
        1: [
            "CREATE TABLE devices (fleet TEXT NOT NULL, device TEXT NOT NULL, online BOOLEAN, status_ts DOUBLE PRECISION,"
            " last_seen DOUBLE PRECISION, boot_id TEXT, software TEXT, meta TEXT, last_window TEXT,"
            " last_window_ts DOUBLE PRECISION, windows BIGINT NOT NULL DEFAULT 0, duplicates BIGINT NOT NULL DEFAULT 0,"
            " outbox_dropped BIGINT NOT NULL DEFAULT 0, deploys BIGINT NOT NULL DEFAULT 0,"
            " rollbacks BIGINT NOT NULL DEFAULT 0, last_event TEXT, last_event_ts DOUBLE PRECISION,"
            " PRIMARY KEY (fleet, device))",
            "CREATE TABLE windows (fleet TEXT NOT NULL, device TEXT NOT NULL, boot_id TEXT NOT NULL, seq BIGINT NOT NULL,"
            " ts DOUBLE PRECISION NOT NULL, received DOUBLE PRECISION NOT NULL, fps DOUBLE PRECISION,"
            " frames BIGINT NOT NULL DEFAULT 0, dropped BIGINT NOT NULL DEFAULT 0, corrupt BIGINT NOT NULL DEFAULT 0,"
            " p50 DOUBLE PRECISION, p95 DOUBLE PRECISION, p99 DOUBLE PRECISION, temperature_c DOUBLE PRECISION,"
            " cpu_percent DOUBLE PRECISION, rss_bytes BIGINT, PRIMARY KEY (fleet, device, boot_id, seq))",
            "CREATE INDEX windows_ts ON windows (fleet, device, ts)",
            "CREATE TABLE boots (fleet TEXT NOT NULL, device TEXT NOT NULL, boot_id TEXT NOT NULL,"
            " min_seq BIGINT NOT NULL, max_seq BIGINT NOT NULL, n BIGINT NOT NULL, PRIMARY KEY (fleet, device, boot_id))",
            f"CREATE TABLE events (id {id_col}, fleet TEXT NOT NULL, device TEXT NOT NULL, h TEXT NOT NULL,"
            " ts DOUBLE PRECISION NOT NULL, received DOUBLE PRECISION NOT NULL, boot_id TEXT NOT NULL, kind TEXT NOT NULL,"
            " level TEXT NOT NULL, message TEXT NOT NULL, data TEXT NOT NULL, UNIQUE (fleet, device, h))",
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
    }


_WIN_COLS = "fleet, device, boot_id, seq, ts, received, fps, frames, dropped, corrupt, p50, p95, p99, " \
            "temperature_c, cpu_percent, rss_bytes"
_LAST_KEYS = ("ts", "fps", "latency_ms", "dropped", "corrupt", "cpu_percent", "rss_bytes", "temperature_c",
              "throttled", "bundle", "frames", "window_s")


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
        if have > SCHEMA_VERSION:
            from lepton_edge.fleet.store.base import StoreError

            raise StoreError(f"fleet store {self.url} has schema version {have}, newer than this lepton-edge "
                             f"({SCHEMA_VERSION}): upgrade lepton-edge")
        for v, stmts in sorted(_migrations(self.ID_COL).items()):
            if v <= have:
                continue
            for s in stmts:
                cur.execute(s)
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
            vals.append((f, d, p["boot_id"], int(p["seq"]), float(p["ts"]), rec, p.get("fps"), int(p.get("frames") or 0),
                         int(p.get("dropped") or 0), int(p.get("corrupt") or 0), inf.get("p50"), inf.get("p95"),
                         inf.get("p99"), p.get("temperature_c"), p.get("cpu_percent"), p.get("rss_bytes")))
        ins = self._q(f"INSERT INTO windows ({_WIN_COLS}) VALUES ({', '.join('?' * 16)}) ON CONFLICT DO NOTHING")
        with self._tx() as cur:
            self._touch(cur, [(r[0], r[1]) for r in rows])
            flags = self._insert_flags(cur, ins, vals)
            boots: dict[tuple, list] = {}
            devs: dict[tuple, dict] = {}
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
            self._many(cur, "INSERT INTO boots (fleet, device, boot_id, min_seq, max_seq, n) VALUES (?, ?, ?, ?, ?, ?) "
                       "ON CONFLICT (fleet, device, boot_id) DO UPDATE SET "
                       f"min_seq = {self._least('boots.min_seq', 'excluded.min_seq')}, "
                       f"max_seq = {self._greatest('boots.max_seq', 'excluded.max_seq')}, n = boots.n + excluded.n",
                       [(f, d, b, lo, hi, n) for (f, d, b), (lo, hi, n) in sorted(boots.items())])
            self._many(cur, "UPDATE devices SET windows = windows + ?, duplicates = duplicates + ?, "
                       "outbox_dropped = outbox_dropped + ?, "
                       f"last_seen = {self._greatest('COALESCE(last_seen, 0)', '?')} WHERE fleet = ? AND device = ?",
                       [(dv["n"], dv["dup"], dv["outbox"], dv["seen"], f, d) for (f, d), dv in sorted(devs.items())])
            lasts = []
            for (f, d), dv in sorted(devs.items()):
                if dv["last"] is not None:
                    last = {k: dv["last"].get(k) for k in _LAST_KEYS}
                    lasts.append((json.dumps(last), float(last["ts"]), f, d, float(last["ts"])))
            self._many(cur, "UPDATE devices SET last_window = ?, last_window_ts = ? WHERE fleet = ? AND device = ?"
                       " AND (last_window_ts IS NULL OR last_window_ts <= ?)", lasts)
        out = [False] * len(rows)
        for i, ok in zip(order, flags):
            out[i] = ok
        return out

    def add_event(self, fleet: str, device: str, payload: dict, received: float) -> bool:
        msg = str(payload.get("message", ""))[:MAX_TEXT]
        data = json.dumps(payload.get("data") or {})
        h = hashlib.sha256(json.dumps([payload["boot_id"], payload["ts"], payload["kind"], msg],
                                      sort_keys=True).encode()).hexdigest()[:32]
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
            # applied in arrival order: a Last Will carries the time it was set (connect), not sent
            self._x(cur, "UPDATE devices SET online = ?, status_ts = ?, boot_id = ?, "
                    "software = COALESCE(?, software), "
                    f"last_seen = {self._greatest('COALESCE(last_seen, 0)', '?')} WHERE fleet = ? AND device = ?",
                    (online, received, payload.get("boot_id"), payload.get("version"),
                     received if online else 0.0, fleet, device))

    def set_meta(self, fleet: str, device: str, payload: dict, received: float) -> None:
        with self._tx() as cur:
            self._touch(cur, [(fleet, device)])
            self._x(cur, "UPDATE devices SET meta = ?, software = COALESCE(?, software) WHERE fleet = ? AND device = ?",
                    (json.dumps(payload), payload.get("software") if isinstance(payload.get("software"), str)
                     else None, fleet, device))

    def count_bad(self, fleet: str | None, device: str | None, reason: str, received: float) -> None:
        with self._tx() as cur:
            if fleet and device:
                self._touch(cur, [(fleet, device)])
            self._x(cur, "INSERT INTO bad_messages (fleet, device, reason, n, last) VALUES (?, ?, ?, 1, ?) "
                    "ON CONFLICT (fleet, device, reason) DO UPDATE SET n = bad_messages.n + 1, last = excluded.last",
                    (fleet or "", device or "", reason[:64], received))

    def count_bad_many(self, rows: dict[tuple[str, str, str], tuple[int, float]]) -> None:
        """(fleet or '', device or '', reason) -> (count, last received): a flood costs one row per reason."""
        with self._tx() as cur:
            self._touch(cur, [(f, d) for f, d, _ in rows if f and d])
            for (f, d, r), (n, last) in sorted(rows.items()):
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
                        f"AND resolved IS NULL RETURNING {self._ALERT_COLS}", (resolved, fleet, device, rule)).fetchone()
        return self._alert(r) if r else None

    def retain(self, older_than_s: float, now: float | None = None) -> int:
        cut = (now or time.time()) - older_than_s
        n = 0
        with self._tx() as cur:
            for t, col in (("windows", "ts"), ("windows_ds", "ts"), ("events", "ts"), ("alerts", "resolved")):
                n += self._x(cur, f"DELETE FROM {t} WHERE {col} < ?", (cut,)).rowcount
        return n

    def downsample(self, older_than_s: float = 86400.0, bucket_s: float = 60.0, now: float | None = None) -> int:
        b = float(bucket_s)
        cut = math.floor(((now or time.time()) - older_than_s) / b) * b  # whole buckets only
        bt = f"{self._floor(f'ts / {b!r}')} * {b!r}"
        merge = ", ".join(f"{c} = COALESCE((windows_ds.{c} * windows_ds.n + excluded.{c} * excluded.n) / "
                          f"(windows_ds.n + excluded.n), excluded.{c}, windows_ds.{c})"
                          for c in ("fps", "p50", "p95", "p99", "temperature_c", "cpu_percent", "rss_bytes"))
        with self._tx() as cur:
            self._x(cur, "INSERT INTO windows_ds (fleet, device, ts, n, fps, p50, p95, p99, temperature_c, cpu_percent, "
                    f"rss_bytes, dropped, corrupt, frames) SELECT fleet, device, {bt} AS bt, COUNT(*), AVG(fps), "
                    "AVG(p50), AVG(p95), AVG(p99), AVG(temperature_c), AVG(cpu_percent), AVG(rss_bytes), SUM(dropped), "
                    f"SUM(corrupt), SUM(frames) FROM windows WHERE ts < ? GROUP BY fleet, device, {bt} "
                    f"ON CONFLICT (fleet, device, ts) DO UPDATE SET {merge}, n = windows_ds.n + excluded.n, "
                    "dropped = windows_ds.dropped + excluded.dropped, corrupt = windows_ds.corrupt + excluded.corrupt, "
                    "frames = windows_ds.frames + excluded.frames", (cut,))
            return self._x(cur, "DELETE FROM windows WHERE ts < ?", (cut,)).rowcount

    # ---- reads --------------------------------------------------------------------------------
    _DEV_SQL = (
        "SELECT d.fleet, d.device, d.online, d.last_seen, d.boot_id, d.software, d.meta, d.last_window, d.windows, "
        "d.duplicates, d.outbox_dropped, d.deploys, d.rollbacks, d.last_event, COALESCE(g.gaps, 0), "
        "COALESCE(a.n, 0), COALESCE(a.crit, 0), COALESCE(b.n, 0) FROM devices d "
        "LEFT JOIN (SELECT fleet, device, SUM(CASE WHEN max_seq - min_seq + 1 - n > 0 THEN max_seq - min_seq + 1 - n "
        "ELSE 0 END) AS gaps FROM boots GROUP BY fleet, device) g ON g.fleet = d.fleet AND g.device = d.device "
        "LEFT JOIN (SELECT fleet, device, COUNT(*) AS n, SUM(CASE WHEN severity = 'critical' THEN 1 ELSE 0 END) AS crit "
        "FROM alerts WHERE resolved IS NULL GROUP BY fleet, device) a ON a.fleet = d.fleet AND a.device = d.device "
        "LEFT JOIN (SELECT fleet, device, SUM(n) AS n FROM bad_messages GROUP BY fleet, device) b "
        "ON b.fleet = d.fleet AND b.device = d.device")

    @staticmethod
    def _state(r) -> DeviceState:
        meta = json.loads(r[6]) if r[6] else {}
        last = json.loads(r[7]) if r[7] else {}
        bundle = meta.get("bundle") if isinstance(meta.get("bundle"), dict) else {}
        lb = last.get("bundle") if isinstance(last.get("bundle"), dict) else {}
        budget = bundle.get("latency_budget_ms") or meta.get("latency_budget_ms")
        online = None if r[2] is None else bool(r[2])
        active, crit = int(r[15]), int(r[16])
        sev = OFFLINE if online is False else ALERT if crit else WARNING if active else OK
        return DeviceState(
            fleet=r[0], device=r[1], online=online, last_seen=r[3], boot_id=r[4], software=r[5],
            bundle_name=bundle.get("name") or lb.get("name"), bundle_sha256=bundle.get("sha256") or lb.get("sha256"),
            precision=bundle.get("precision"), backend=bundle.get("backend"), fps=last.get("fps"),
            latency=last.get("latency_ms") or {}, dropped=last.get("dropped") or 0, corrupt=last.get("corrupt") or 0,
            cpu_percent=last.get("cpu_percent"), rss_bytes=last.get("rss_bytes"),
            temperature_c=last.get("temperature_c"), throttled=last.get("throttled"), outbox_dropped=int(r[10]),
            windows=int(r[8]), seq_gaps=int(r[14]), duplicates=int(r[9]), bad_messages=int(r[17]), last_event=r[13],
            deploys=int(r[11]), rollbacks=int(r[12]), active_alerts=active, severity=sev,
            latency_budget_ms=_f(budget) if isinstance(budget, (int, float)) else None)

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
            rows = self._x(cur, "SELECT fleet, device, SUM(CASE WHEN max_seq - min_seq + 1 - n > 0 THEN "
                           "max_seq - min_seq + 1 - n ELSE 0 END) FROM boots GROUP BY fleet, device").fetchall()
        return {(r[0], r[1]): int(r[2]) for r in rows}

    def history(self, fleet: str, device: str, since: float, until: float | None = None,
                max_points: int = 1000) -> list[HistoryPoint]:
        until = time.time() if until is None else until
        w = max((until - since) / max(1, int(max_points)), 1e-3)
        bt = f"{self._floor(f'ts / {w!r}')} * {w!r}"
        cols = "fps, p50, p95, p99, temperature_c, cpu_percent, rss_bytes"
        avg = ", ".join(f"SUM({c} * n) / NULLIF(SUM(CASE WHEN {c} IS NULL THEN 0 ELSE n END), 0)"
                        for c in cols.split(", "))
        sql = (f"SELECT {bt} AS b, {avg}, SUM(dropped), SUM(corrupt), SUM(frames) FROM ("
               f"SELECT ts, 1 AS n, {cols}, dropped, corrupt, frames FROM windows "
               "WHERE fleet = ? AND device = ? AND ts >= ? AND ts <= ? UNION ALL "
               f"SELECT ts, n, {cols}, dropped, corrupt, frames FROM windows_ds "
               f"WHERE fleet = ? AND device = ? AND ts >= ? AND ts <= ?) u GROUP BY {bt} ORDER BY b")
        with self._tx(write=False) as cur:
            rows = self._x(cur, sql, (fleet, device, since, until) * 2).fetchall()
        return [HistoryPoint(ts=float(r[0]), fps=_f(r[1]), inference_p50_ms=_f(r[2]), inference_p95_ms=_f(r[3]),
                             inference_p99_ms=_f(r[4]), temperature_c=_f(r[5]), cpu_percent=_f(r[6]),
                             rss_bytes=_f(r[7]), dropped=int(r[8] or 0), corrupt=int(r[9] or 0),
                             frames=int(r[10] or 0)) for r in rows]

    def events(self, fleet: str | None = None, device: str | None = None, since: float = 0.0,
               limit: int = 200) -> list[EventRecord]:
        where, args = self._filter(fleet, device)
        with self._tx(write=False) as cur:
            rows = self._x(cur, "SELECT fleet, device, ts, received, boot_id, kind, level, message, data FROM events "
                           f"WHERE ts >= ?{where} ORDER BY ts DESC, id DESC LIMIT ?",
                           (since, *args, max(0, int(limit)))).fetchall()
        return [EventRecord(fleet=r[0], device=r[1], ts=r[2], received=r[3], boot_id=r[4], kind=r[5], level=r[6],
                            message=r[7], data=json.loads(r[8])) for r in rows]

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

    def summary(self) -> FleetSummary:
        devs = self.devices()
        p95s = [d.latency.get("inference", {}).get("p95") for d in devs if d.online]
        p95s = [p for p in p95s if p is not None]
        return FleetSummary(devices=len(devs), online=sum(1 for d in devs if d.online),
                            offline=sum(1 for d in devs if d.online is False),
                            total_fps=round(sum(d.fps or 0.0 for d in devs if d.online), 3),
                            worst_p95_ms=max(p95s) if p95s else None,
                            active_alerts=sum(d.active_alerts for d in devs))
