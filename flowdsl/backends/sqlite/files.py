"""The SQLite store's file as a file: what a new one is given, how an older version is
brought up to date, and what an sqlite3 error means for the store's user."""

from __future__ import annotations

import sqlite3

from ..._errors import BackendUnavailable, CheckpointError, ConfigError
from . import schema

__all__ = ["check_identity", "failure", "migrate"]


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
    """Create the tables of a new file; bring an older version's up to this one."""
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
        # A file an older flowdsl wrote: its data stays, what is new is added.
        for older in range(version or schema.SCHEMA_VERSION, schema.SCHEMA_VERSION):
            for statement in schema.MIGRATIONS[older]:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {schema.SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        schema.rollback(conn)
        raise


def failure(
    url: str,
    busy_timeout: float,
    exc: sqlite3.Error,
    *,
    run_id: str | None = None,
    node_id: str | None = None,
) -> Exception:
    """Translate an sqlite3 error at the edge, naming the file and what to do."""
    name = schema.error_name(exc)
    where = f" (run {run_id!r})" if run_id is not None else ""
    if schema.is_busy(exc):
        # Another process holds the write lock: the file is fine, only busy.
        return BackendUnavailable(
            f"the store {url}",
            reason="it stayed locked by another writer",
            waited=busy_timeout,
            run_id=run_id,
            node=node_id,
            hint="Raise busy_timeout (sqlite:///path.db?busy_timeout=30), or find the "
            "process that holds the file",
        )
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return CheckpointError(
            f"the store {url} is corrupted{where}: {exc}",
            node=node_id,
            hint="Restore the file from a backup",
        )
    if name.startswith(("SQLITE_CANTOPEN", "SQLITE_READONLY", "SQLITE_PERM", "SQLITE_AUTH")):
        return ConfigError(
            f"cannot write the store {url}: {exc}",
            node=node_id,
            hint="Check that the file and its directory exist and are writable",
        )
    return CheckpointError(
        f"the store {url} failed{where}: {exc}",
        node=node_id,
        hint="Check the disk (space, permissions) and the file",
    )
