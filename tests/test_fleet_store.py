"""The fleet store on SQLite and on a real PostgreSQL: same answers, uniqueness and gaps in SQL."""
from __future__ import annotations

import json
import sqlite3
import threading
import time

import pytest

from lepton_edge.fleet.store import SCHEMA_VERSION, StoreError, open_store
from lepton_edge.fleet.store.base import Alert
from lepton_edge.telemetry.schema import Event, Telemetry


def win(seq: int, ts: float, boot: str = "b1", fps: float = 10.0) -> dict:
    return Telemetry(boot_id=boot, seq=seq, window_s=1, frames=10, fps=fps, ts=ts, temperature_c=50.0,
                     latency_ms={"inference": {"p50": 1, "p95": 2, "p99": 3, "max": 4}}).model_dump()


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    url = str(tmp_path / "f.sqlite") if request.param == "sqlite" else request.getfixturevalue("postgres")
    s = open_store(url)
    yield s
    s.close()


def test_duplicates_refused_and_gaps_filled_by_late_windows(store):
    now = time.time()
    assert store.add_windows([("f", "d", win(0, now), now), ("f", "d", win(1, now), now),
                              ("f", "d", win(4, now), now), ("f", "d", win(1, now), now)]) == [True, True, True, False]
    d = store.device("f", "d")
    assert (d.windows, d.seq_gaps, d.duplicates) == (3, 2, 1)
    assert store.add_window("f", "d", win(3, now), now) and store.add_window("f", "d", win(2, now), now)
    assert store.device("f", "d").seq_gaps == 0  # late, out-of-order windows fill their gaps
    store.add_window("f", "d", win(5, now, boot="b2"), now)  # a new boot starts anywhere: no gap
    assert store.device("f", "d").seq_gaps == 0


def test_many_boots_with_huge_gaps_leave_the_fleet_readable(store):
    """seq may be up to 2^53 a window (schema): 1,025 boots of one device, each with windows 0 and 2^53, summed
    past SQLite's 64-bit SUM, and every read of the fleet (fleet ls, the dashboard, /metrics, the alert
    engine, even `fleet forget`) failed with "integer overflow". The sum is a float now, capped at 2^53."""
    now = time.time()
    rows = [("f", "evil", win(seq, now, boot=f"b{i}"), now) for i in range(1025) for seq in (0, 2 ** 53)]
    store.add_windows(rows)
    store.add_window("f", "good", win(0, now), now)
    devs = {d.device: d for d in store.devices()}
    assert devs["good"].windows == 1 and devs["evil"].seq_gaps == 2 ** 53
    assert store.seq_gaps()[("f", "evil")] == 2 ** 53 and store.device("f", "good").seq_gaps == 0


def _boot_rows(store, device: str) -> int:
    with store._tx(write=False) as cur:
        return store._x(cur, "SELECT COUNT(*) FROM boots WHERE device = ?", (device,)).fetchone()[0]


def test_retention_folds_the_boots_of_windows_it_removed_and_keeps_their_lost_windows(store):
    """`boots` was never cleaned: a device sending each window under a fresh boot_id left one row per window
    after retention removed the windows (20,000 through a real monitor), and every fleet read sums them all.
    Boots with no window left are now folded into one row per device that keeps their lost windows."""
    now = time.time()
    old = now - 7200
    store.add_windows([("f", "evil", win(0, old, boot=f"b{i}"), old) for i in range(300)])
    store.add_windows([("f", "lossy", win(s, old, boot=b), old) for b, seqs in (("o1", (0, 5)), ("o2", (0, 3)))
                       for s in seqs] + [("f", "lossy", win(s, now, boot="cur"), now) for s in (0, 2)])
    assert (store.device("f", "evil").seq_gaps, store.device("f", "lossy").seq_gaps) == (0, 4 + 2 + 1)
    store.retain(3600, now=now)
    assert (_boot_rows(store, "evil"), _boot_rows(store, "lossy")) == (0, 2)  # (lossy: the fold and "cur")
    assert store.device("f", "lossy").seq_gaps == 7 and store.device("f", "evil").seq_gaps == 0
    store.add_windows([("f", "lossy", win(s, old, boot="o3"), old) for s in (0, 4)])  # 3 more lost, then retained
    store.downsample(3600, now=now)  # (downsampling removes windows too)
    assert _boot_rows(store, "lossy") == 2 and store.device("f", "lossy").seq_gaps == 10
    store.add_window("f", "lossy", win(1, now, boot="cur"), now)  # a current boot's late window still fills its gap
    assert store.device("f", "lossy").seq_gaps == 9
    # the boot the device's status names resumes after an outage longer than the retention: the seqs lost
    # across it count (they went uncounted when its row was folded with the others)
    store.set_status("f", "quiet", {"online": True, "boot_id": "D"}, old)
    store.add_windows([("f", "quiet", win(s, old, boot="D"), old) for s in range(10)])
    store.retain(3600, now=now)
    store.add_windows([("f", "quiet", win(s, now, boot="D"), now) for s in range(20, 25)])
    assert store.device("f", "quiet").seq_gaps == 10


def test_a_window_committed_while_boots_fold_is_not_counted_twice(postgres):
    """Retention folds the boots with no window left, then deletes them: two statements. Under PostgreSQL's
    READ COMMITTED a window of such a boot committed between them kept the boot's row beside the fold that
    already counted its lost windows (4 lost counted as 9 here). The writer now waits for the fold."""
    from lepton_edge.fleet.store.sql import SqlStore

    store, other = open_store(postgres), open_store(postgres)
    try:
        now = time.time()
        old = now - 7200
        store.set_status("f", "d", {"online": True, "boot_id": "cur"}, now)
        store.add_windows([("f", "d", win(s, old, boot="old"), old) for s in (0, 5)])  # 4 lost
        writer = threading.Thread(target=other.add_window, args=("f", "d", win(7, now, boot="old"), now))

        def between(cur, sql, args=()):  # the writer commits, where it can, after the fold's first statement
            out = SqlStore._x(store, cur, sql, args)
            if sql.startswith("INSERT INTO boots") and "SELECT fleet, device, ''" in sql:
                writer.start()
                writer.join(1.0)
            return out

        store._x = between  # type: ignore[method-assign]
        store.retain(3600, now=now)
        del store._x
        writer.join(10)
        assert not writer.is_alive()
        # the fold keeps the 4; the late window starts a row of its own (documented: the gap it fills stays)
        assert store.device("f", "d").seq_gaps == 4 and store.device("f", "d").windows == 3
    finally:
        store.close()
        other.close()


def test_two_writers_store_each_window_once(store):
    now = time.time()
    rows = [("f", f"d{i % 5}", win(i // 5, now + i), now) for i in range(400)]
    results: list[list[bool]] = []

    def write(part):
        for i in range(0, len(part), 50):
            for _ in range(20):
                try:
                    results.append(store.add_windows(part[i:i + 50]))
                    break
                except StoreError:  # a deadlock/lock wait is a retry, as in the monitor
                    time.sleep(0.05)

    ts = [threading.Thread(target=write, args=(rows,)), threading.Thread(target=write, args=(rows[::-1],))]
    [t.start() for t in ts]
    [t.join(60) for t in ts]
    assert sum(sum(r) for r in results) == 400
    devs = store.devices()
    assert sum(d.windows for d in devs) == 400 and sum(d.duplicates for d in devs) == 400
    assert all(d.seq_gaps == 0 for d in devs)


def test_a_devices_software_string_is_capped_as_its_status_version_is(store):
    """meta's `software` went into the store whole (status's `version` is capped at 64 by the schema):
    a device's 60 KB string became every Home Assistant config's dev.sw and a /metrics label."""
    now = time.time()
    store.set_status("f", "d", {"online": True, "boot_id": "b1", "version": "0.9"}, now)
    store.set_meta("f", "d", {"v": 1, "software": "S" * 60_000}, now)
    assert store.device("f", "d").software == "S" * 64
    store.set_meta("f", "d", {"v": 1, "software": 12}, now)  # not text: the last one stays
    assert store.device("f", "d").software == "S" * 64


def test_an_offline_status_never_sets_when_the_device_was_last_seen(store):
    """A device known only from its retained offline status (a Last Will) has never been seen: `fleet ls`
    read "20789d ago" (last_seen stored as 0.0, 1970). An offline status after messages keeps their time."""
    from lepton_edge.fleet.tui import device_record

    now = time.time()
    store.set_status("f", "gone", {"online": False, "boot_id": "b1"}, now)
    assert store.device("f", "gone").last_seen is None
    assert device_record(store.device("f", "gone"), now)["last_seen_age_s"] is None
    store.set_status("f", "d", {"online": True, "boot_id": "b1"}, now - 50)
    store.set_status("f", "d", {"online": False, "boot_id": "b1"}, now)
    assert store.device("f", "d").last_seen == pytest.approx(now - 50) and not store.device("f", "d").online


def test_state_events_alerts_history_downsample_retain(store):
    now = time.time()
    store.set_status("f", "d", {"online": True, "boot_id": "b1", "version": "0.9"}, now)
    store.set_meta("f", "d", {"v": 1, "bundle": {"name": "cnn", "sha256": "ab" * 32, "precision": "int8",
                                                "latency_budget_ms": 20}}, now)
    store.add_windows([("f", "d", win(i, now - 3 * 86400 + i * 10), now) for i in range(600)])
    assert store.add_event("f", "d", Event(boot_id="b1", kind="rollback", message="bad").model_dump(), now)
    d = store.device("f", "d")
    assert (d.online, d.bundle_name, d.precision, d.latency_budget_ms, d.rollbacks, d.software) == \
        (True, "cnn", "int8", 20.0, 1, "0.9")
    assert d.last_event == "rollback: bad"
    a = store.upsert_alert(Alert(fleet="f", device="d", rule="offline", message="m", started=now))
    assert a and a.id and store.upsert_alert(Alert(fleet="f", device="d", rule="offline", message="m",
                                                    started=now)) is None
    assert store.device("f", "d").active_alerts == 1 and store.summary().active_alerts == 1
    before = store.history("f", "d", now - 4 * 86400, now, max_points=50)
    assert 0 < len(before) <= 50 and sum(p.frames for p in before) == 6000
    assert store.downsample(older_than_s=86400, bucket_s=60, now=now) == 600
    after = store.history("f", "d", now - 4 * 86400, now, max_points=50)
    assert sum(p.frames for p in after) == 6000 and after[0].fps == pytest.approx(10.0)
    assert store.resolve_alert("f", "d", "offline", now + 1).resolved == now + 1
    assert store.resolve_alert("f", "d", "offline", now + 2) is None
    assert [(x.id, x.resolved) for x in store.alerts_by_id([a.id, a.id + 1000])] == [(a.id, now + 1)]
    assert store.alerts_by_id([]) == []
    assert store.open_alert_ids() == set()
    assert len(store.alerts_by_id([a.id] * 1200)) == 3  # (in queries of 500 ids)
    assert store.retain(86400, now=now) > 0 and store.history("f", "d", now - 4 * 86400, now) == []
    store.forget("f", "d")
    assert store.device("f", "d") is None


def test_sqlite_migrates_an_older_schema(tmp_path):
    from lepton_edge.fleet.store.sql import _migrations

    p = tmp_path / "old.sqlite"
    c = sqlite3.connect(p)
    c.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for s in _migrations("INTEGER PRIMARY KEY AUTOINCREMENT")[1]:
        c.execute(s)
    c.execute("INSERT INTO schema_version VALUES (1)")
    c.commit()
    c.close()
    s = open_store(p)
    assert s.schema_version() == SCHEMA_VERSION == 4
    assert s.downsample(now=time.time()) == 0  # windows_ds exists now


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_v2_store_with_data_migrates_to_columns_and_minute_rows(backend, request, tmp_path):
    """v2 kept device state as JSON and downsampled rows as averages; v3 reads columns and 1-minute sums.
    A v2 store's devices, windows and old downsampled rows read the same after the migration."""
    from lepton_edge.fleet.store.sql import _migrations

    now = 1_700_000_400.0  # a whole number of 2-minute buckets
    old_ds = ("f", "d", now - 7200, 6, 10.0, 1.0, 2.0, 3.0, 50.0, None, None, 0, 0, 60)  # a downsampled minute
    wins = [("f", "d", "b1", i, now - 600 + i * 10, now, 10.0 + i % 2, 10, 0, 0, 1.0, 2.0 + i % 3, 3.0, 50.0, None,
             None) for i in range(30)]
    last = {"ts": now - 310, "fps": 11.0, "latency_ms": {"inference": {"p50": 1.0, "p95": 4.0, "p99": 3.0,
                                                                      "max": 4.0}},
            "dropped": 2, "corrupt": 1, "temperature_c": 61.0, "throttled": "0x50000", "bundle": {"name": "w"}}
    meta = {"v": 1, "bundle": {"name": "cnn", "sha256": "ab" * 32, "precision": "int8", "latency_budget_ms": 20}}
    if backend == "sqlite":
        url = str(tmp_path / "v2.sqlite")
        c = sqlite3.connect(url)
        q = lambda sql: sql  # noqa: E731
        id_col = "INTEGER PRIMARY KEY AUTOINCREMENT"
    else:
        import psycopg

        url = request.getfixturevalue("postgres")
        c = psycopg.connect(url)
        q = lambda sql: sql.replace("?", "%s")  # noqa: E731
        id_col = "BIGSERIAL PRIMARY KEY"
    c.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for v in (1, 2):
        for stmt in _migrations(id_col)[v]:
            c.execute(stmt)
        c.execute(q("INSERT INTO schema_version VALUES (?)"), (v,))
    c.execute(q("INSERT INTO devices (fleet, device, online, last_seen, boot_id, meta, last_window, last_window_ts, "
                "windows) VALUES ('f', 'd', ?, ?, 'b1', ?, ?, ?, 30)"),
              (True, now, json.dumps(meta), json.dumps(last), last["ts"]))
    c.execute(q("INSERT INTO boots VALUES ('f', 'd', 'b1', 0, 29, 30)"))
    for w in wins:
        c.execute(q(f"INSERT INTO windows VALUES ({', '.join('?' * 16)})"), w)
    c.execute(q(f"INSERT INTO windows_ds VALUES ({', '.join('?' * 14)})"), old_ds)
    c.commit()
    c.close()

    s = open_store(url)
    try:
        assert s.schema_version() == SCHEMA_VERSION == 4
        d = s.device("f", "d")
        assert (d.bundle_name, d.bundle_sha256, d.precision, d.latency_budget_ms) == ("cnn", "ab" * 32, "int8", 20.0)
        assert (d.fps, d.latency["inference"]["p95"], d.dropped, d.corrupt, d.temperature_c, d.throttled) == \
            (11.0, 4.0, 2, 1, 61.0, "0x50000")
        assert s.summary().worst_p95_ms == 4.0 and s.summary().total_fps == 11.0
        # 24 h at 720 points (2-minute buckets) reads minute rows: the old downsampled minute and the windows
        day = s.history("f", "d", now - 86400, now, 720)
        assert sum(p.frames for p in day) == 60 + 300
        assert [p.ts for p in day][:1] == [now - 7200]
        # the windows' own 2-minute averages, as the raw rows give them
        for p in day[1:]:
            mine = [w for w in wins if p.ts <= w[4] < p.ts + 120]
            assert p.fps == pytest.approx(sum(w[6] for w in mine) / len(mine))
            assert p.inference_p95_ms == pytest.approx(sum(w[11] for w in mine) / len(mine))
        # fine buckets read the raw windows; before the old cut only minute rows are left
        fine = s.history("f", "d", now - 7300, now, 2000)
        assert sum(p.frames for p in fine) == 360 and len(fine) == 31
        assert s.add_window("f", "d", win(30, now + 1), now + 1)  # and the writer goes on
        assert s.device("f", "d").windows == 31 and s.device("f", "d").seq_gaps == 0
    finally:
        s.close()


def test_history_from_minute_rows_equals_history_from_windows(store):
    """A chart of >= 1-minute buckets reads 1-minute sums; they must average exactly what the windows give."""
    now = 1_700_000_400.0  # a whole number of 2-minute buckets
    rows = [("f", "d", win(i, now - 7200 + i * 7 + 0.5, fps=5.0 + i % 11), now) for i in range(1000)]
    rows[3][2]["fps"] = None  # a window without fps counts in frames, not in the fps average
    store.add_windows(rows)
    coarse = store.history("f", "d", now - 7200, now, 60)  # 120 s buckets: minute rows
    fine = store.history("f", "d", now - 7200, now, 7200)  # 1 s buckets: raw windows
    assert len(coarse) == 59 and sum(p.frames for p in coarse) == sum(p.frames for p in fine) == 10000
    for p in coarse:
        mine = [r[2] for r in rows if p.ts <= r[2]["ts"] < p.ts + 120]
        fps = [w["fps"] for w in mine if w["fps"] is not None]
        assert p.fps == pytest.approx(sum(fps) / len(fps)) and p.frames == 10 * len(mine)
    # downsampling deletes the raw windows; the minute rows keep the chart as it was
    assert store.downsample(older_than_s=0, now=now + 60) == 1000
    assert [p.model_dump() for p in store.history("f", "d", now - 7200, now, 60)] == \
        [p.model_dump() for p in coarse]
    assert sum(p.frames for p in store.history("f", "d", now - 7200, now, 7200)) == 10000


def test_downsample_to_coarser_buckets_keeps_the_totals(store):
    now = 1_700_000_400.0
    store.add_windows([("f", "d", win(i, now - 3600 + i * 10, fps=float(i % 4)), now) for i in range(360)])
    before = store.history("f", "d", now - 3600, now, 2)  # 30-minute buckets
    assert store.downsample(older_than_s=0, bucket_s=300, now=now) == 360
    with store._tx(write=False) as cur:
        assert store._x(cur, "SELECT COUNT(*) FROM windows_ds").fetchone()[0] == 12  # 5-minute rows
    after = store.history("f", "d", now - 3600, now, 2)
    assert [(p.ts, p.frames) for p in after] == [(p.ts, p.frames) for p in before]
    assert [p.fps for p in after] == pytest.approx([p.fps for p in before])


def test_fleet_read_values_have_their_field_types(store):
    """devices() skips validation for speed: what it builds must equal a validated DeviceState."""
    from lepton_edge.fleet.store.base import DeviceState

    now = time.time()
    store.set_meta("f", "d", {"v": 1, "bundle": {"name": 7, "sha256": ["x"], "latency_budget_ms": 30}}, now)
    w = win(0, now)
    w["latency_ms"]["inference"] = {"p50": 1, "p95": 2, "p99": 3, "max": 4}  # ints from a raw dict
    store.add_windows([("f", "d", w, now), ("f", "e", win(0, now), now)])
    store.set_status("f", "e", {"online": False, "boot_id": "b1"}, now)
    for d in store.devices():
        assert DeviceState.model_validate(d.model_dump()) == d
        assert d.model_dump_json() == DeviceState.model_validate(d.model_dump()).model_dump_json()
    assert store.device("f", "d").bundle_name is None  # a hostile meta's non-text name is not a name


def test_corrupt_and_locked_sqlite_give_one_line(tmp_path):
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="corrupt") as e:
        open_store(bad)
    assert "\n" not in str(e.value)
    p = tmp_path / "ok.sqlite"
    s = open_store(p)
    s.close()  # the next connection waits 0.2 s for a lock, not 5 s
    s.timeout = 0.2
    blocker = sqlite3.connect(p, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    with pytest.raises(StoreError, match="locked"):
        s.add_window("f", "d", win(0, time.time()), time.time())
    blocker.execute("ROLLBACK")
    s._local.conn = None  # a fresh connection picks up the new timeout
    assert s.add_window("f", "d", win(0, time.time()), time.time())


def test_postgres_going_away_is_one_line_then_reconnects(postgres_server, postgres):
    s = open_store(postgres)
    assert s.add_window("f", "d", win(0, time.time()), time.time())
    postgres_server.stop()
    try:
        with pytest.raises(StoreError) as e:
            s.add_window("f", "d", win(1, time.time()), time.time())
        assert "\n" not in str(e.value) and "postgresql://" in str(e.value)
    finally:
        postgres_server.start()
    for _ in range(50):
        try:
            assert s.add_window("f", "d", win(1, time.time()), time.time())
            break
        except StoreError:
            time.sleep(0.1)
    assert s.device("f", "d").windows == 2


def test_reopening_a_store_keeps_its_data(tmp_path):
    s = open_store(tmp_path / "f.sqlite")
    s.add_window("f", "d", win(0, time.time()), time.time())
    s.close()
    assert open_store(tmp_path / "f.sqlite").device("f", "d").windows == 1


def test_retimed_events_stay_one_and_a_fast_clock_hides_no_other_device_s_events(tmp_path):
    """A repeat of an event whose time the monitor replaced (it arrives later, with another arrival time) is
    the same event: de-duplicated by the time the device sent. The web page's live feed tracked a
    high-water mark of device time, so one device's fast clock hid every other device's later events.
    A value the database refuses is a StoreError to every reader (ValueRefused)."""
    from lepton_edge.fleet.store.base import StoreError, ValueRefused
    from lepton_edge.fleet.web.app import Broadcaster

    assert issubclass(ValueRefused, StoreError)
    st = open_store(tmp_path / "e.sqlite")
    now = time.time()
    ev = {"v": 1, "boot_id": "b1", "kind": "deploy", "level": "info", "message": "m", "data": {}}
    st.add_event("f", "slow", {**ev, "ts": now, "sent_ts": 1000.0}, now)
    st.add_event("f", "slow", {**ev, "ts": now + 5, "sent_ts": 1000.0}, now + 5)  # the resend, retimed
    assert len(st.events(fleet="f", device="slow")) == 1
    hub = Broadcaster(st)
    hub._snapshot()  # primes the device cache
    st.add_event("f", "fast", {**ev, "ts": now + 250, "message": "ahead"}, now)  # inside the 300 s tolerance
    first = [m["payload"]["message"] for m in hub._snapshot() if m["topic"].endswith("/events")]
    st.add_event("f", "normal", {**ev, "ts": now + 1, "message": "later, on a right clock"}, now + 1)
    second = [m["payload"]["message"] for m in hub._snapshot() if m["topic"].endswith("/events")]
    assert "ahead" in first and second == ["later, on a right clock"], (first, second)
    st.close()


def test_a_postgres_url_with_a_port_urllib_cannot_read_is_one_line(tmp_path):
    """`--store postgresql://u:pw@host:99999/db` (or :5x): the helper writing the error's URL read the port
    itself, urllib raised, and the operator got a traceback instead of the line (the password stays out)."""
    from conftest import run_cli

    for url in ("postgresql://op:S3cretPW@127.0.0.1:99999/fleet", "postgresql://op:S3cretPW@127.0.0.1:5x/fleet"):
        r = run_cli("fleet", "ls", "--store", url, timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr and "S3cretPW" not in r.stderr + r.stdout
        assert len(r.stderr.strip().splitlines()) == 1 and "postgresql://127.0.0.1:?/fleet" in r.stderr, r.stderr


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_another_applications_tables_are_unusable_at_once_on_both_databases(tmp_path, request, backend):
    """A database holding another application's `events` table: SQLite's was StoreUnusable at once, PostgreSQL's
    a plain StoreError (its SQLSTATE dropped), which `monitor` retried for its whole minute."""
    from lepton_edge.fleet.cli import open_store_retrying
    from lepton_edge.fleet.store import StoreUnusable

    if backend == "sqlite":
        url = str(tmp_path / "other.sqlite")
        with sqlite3.connect(url) as c:
            c.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, what TEXT)")
    else:
        import psycopg

        url = request.getfixturevalue("postgres")
        with psycopg.connect(url, autocommit=True) as c:
            c.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, what TEXT)")
    t0, said = time.monotonic(), []
    with pytest.raises(StoreUnusable) as e:
        open_store_retrying(url, said.append, wait_s=20)
    assert time.monotonic() - t0 < 5 and not said and "\n" not in str(e.value), (said, str(e.value))


def test_the_live_pages_alert_reads_are_served_by_an_index(tmp_path):
    """The live page's poller reads the newest alerts and the newest open ones every second: both scanned and
    sorted the whole table (102 ms a poll on 50,000 alerts). Schema 4 indexes them (9 ms)."""
    from lepton_edge.fleet.store.sql import SqlStore

    p = tmp_path / "p.sqlite"
    open_store(p).close()
    c = sqlite3.connect(p)
    for where in ("", " AND resolved IS NULL"):  # (SqlStore.alerts, the newest and the open ones)
        plan = str(c.execute(f"EXPLAIN QUERY PLAN SELECT {SqlStore._ALERT_COLS} FROM alerts WHERE 1 = 1{where}"
                             " ORDER BY started DESC, id DESC LIMIT 200").fetchall())
        assert "USING INDEX alerts_" in plan and "TEMP B-TREE" not in plan, plan
    c.close()
