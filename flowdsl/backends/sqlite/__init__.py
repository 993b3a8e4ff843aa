"""The embedded backend: a SQLite file holds the journal (``store``) and, in batch mode, the
queue (``broker``); sharing one connection makes a commit and its completion one
transaction."""

from __future__ import annotations

from .broker import SQLiteBroker
from .store import SQLiteStore

__all__ = ["SQLiteBroker", "SQLiteStore", "open_broker", "open_store"]


def open_store(url: str) -> SQLiteStore:
    return SQLiteStore.from_url(url)


def open_broker(url: str) -> SQLiteBroker:
    return SQLiteBroker(SQLiteStore.from_url(url).path)
