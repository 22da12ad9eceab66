"""Where the fleet's history lives: one SQLite file by default, PostgreSQL when several workers write.

Why a URL picks the backend: the same `--store` flag serves a laptop (a path) and a fleet that
outgrew one machine (`postgresql://...`), and nothing else in the monitor changes.
"""
from __future__ import annotations

from pathlib import Path

from lepton_edge.fleet.store.base import (
    SCHEMA_VERSION,
    Alert,
    DeviceState,
    EventRecord,
    FleetSummary,
    HistoryPoint,
    Store,
    StoreError,
    StoreUnusable,
)

DEFAULT_PATH = Path("~/.local/share/lepton-edge/fleet.sqlite")

__all__ = ["open_store", "Store", "StoreError", "StoreUnusable", "DeviceState", "HistoryPoint", "EventRecord", "Alert",
           "FleetSummary", "SCHEMA_VERSION", "DEFAULT_PATH"]


def open_store(url_or_path: str | Path | None = None) -> Store:
    """`postgresql://...` (or `postgres://`) -> PostgreSQL; anything else is a SQLite file path."""
    s = str(url_or_path) if url_or_path else str(DEFAULT_PATH)
    if s.startswith(("postgresql://", "postgres://")):
        from lepton_edge.fleet.store.postgres import PostgresStore

        return PostgresStore(s)
    from lepton_edge.fleet.store.sqlite import SqliteStore

    return SqliteStore(Path(s.removeprefix("sqlite://")).expanduser())
