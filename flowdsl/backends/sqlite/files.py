"""The SQLite file as a file: opening it while another process may be creating it, whose
it is, and how an older version's tables are brought up to this one's."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import anyio

from ..._errors import CheckpointError, ConfigError
from . import schema

__all__ = ["check_identity", "connect_waiting", "migrate"]


async def connect_waiting(
    connect: Callable[[], sqlite3.Connection], busy_timeout: float
) -> sqlite3.Connection:
    """``connect()``, tried again while the file is busy, for up to *busy_timeout* seconds.

    Switching a new file to WAL fails at once with "database is locked" while another
    process is creating it (SQLite does not call the busy handler there), so the store
    and the queue open their files through this, sleeping without blocking the loop.  Any
    other error, or a file still busy at the deadline, is raised as it came.
    """
    deadline = anyio.current_time() + busy_timeout
    delay = 0.001
    while True:
        try:
            return connect()
        except sqlite3.Error as exc:
            if not schema.is_busy(exc) or anyio.current_time() >= deadline:
                raise
        await anyio.sleep(delay)
        delay = min(delay * 2, 0.05)


def check_identity(conn: sqlite3.Connection, path: str, url: str) -> None:
    """Refuse a file another program owns, or one a newer flowdsl wrote."""
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if app_id not in (0, schema.APPLICATION_ID):
        raise ConfigError(
            f"{path} is an SQLite database that another program owns, not a flowdsl store",
            hint="Give the store a file of its own",
        )
    if version > schema.SCHEMA_VERSION:
        raise CheckpointError(
            f"the store {url} has schema version {version}, newer than the "
            f"{schema.SCHEMA_VERSION} this flowdsl knows",
            hint="Upgrade flowdsl to the version that wrote it",
        )


def migrate(conn: sqlite3.Connection, path: str, url: str) -> None:
    """Create the tables of a new file; bring an older version's up to this one, one
    version at a time (its data stays; what is new is added)."""
    if conn.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Read again under the write lock: another process may have just created it.
        check_identity(conn, path, url)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            for statement in schema.SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA application_id = {schema.APPLICATION_ID}")
        for older in range(version or schema.SCHEMA_VERSION, schema.SCHEMA_VERSION):
            for statement in schema.MIGRATIONS[older]:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {schema.SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        schema.rollback(conn)
        raise
