"""The fleet store on SQLite and on a real PostgreSQL: same answers, uniqueness and gaps in SQL."""
from __future__ import annotations

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
    assert s.schema_version() == SCHEMA_VERSION == 2
    assert s.downsample(now=time.time()) == 0  # windows_ds exists now


def test_corrupt_and_locked_sqlite_give_one_line(tmp_path):
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="corrupt") as e:
        open_store(bad)
    assert "\n" not in str(e.value)
    p = tmp_path / "ok.sqlite"
    s = open_store(p)
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
