"""The embedded durable queue: batch mode in one SQLite file, beside the store's tables.

Layout (created on first use)::

    fd_tasks(id INTEGER PRIMARY KEY, run_id, node_id, payload, lease_until, deliveries,
             worker, UNIQUE(run_id, node_id))   -- ready (lease_until = 0) or leased
    fd_completions(id INTEGER PRIMARY KEY, run_id, node_id, payload)
    fd_events(id INTEGER PRIMARY KEY, run_id, payload)
    fd_dead(id INTEGER PRIMARY KEY, run_id, node_id, payload, reason, at)

A worker claims tasks by pushing their lease into the future in one UPDATE ... RETURNING;
a task whose lease lies in the past (its worker died) is claimable again, and its
``deliveries`` count is the attempt.  Completing a task deletes it and inserts its
completion in one transaction.  Readers poll by row id: SQLite has no notifications, so
in-process parties also poke each other directly (see ``flowdsl._executors.batch``).

Like the SQLite store, every call is a short synchronous transaction on the event loop's
thread: a thread hop per call would cost more than the call.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from anyio.lowlevel import checkpoint_if_cancelled

from ..._errors import ConfigError
from ..._records import NodeRecord
from ..base import Broker, Store
from ..messages import Claimed, Finished
from . import schema
from .files import connect_waiting
from .store import SQLiteStore

__all__ = ["SQLiteBroker"]


class SQLiteBroker(Broker):
    """A task queue in an SQLite file, shared by every process on this machine."""

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 10.0) -> None:
        self.path = os.fspath(path)
        self.url = f"sqlite:///{self.path}"
        self.busy_timeout = busy_timeout
        self._conn: sqlite3.Connection | None = None
        self._store: SQLiteStore | None = None

    def share_store(self, store: Store) -> None:
        """Use *store*'s connection when it keeps its journal in this queue's file: a
        worker then commits a node and completes its task in one transaction."""
        if isinstance(store, SQLiteStore) and store.path == self.path != ":memory:":
            self._store = store

    def holds(self, store: Store) -> bool:
        return store is not None and store is self._store

    async def commit_and_complete(
        self,
        task_id: str,
        run_id: str,
        record: NodeRecord,
        payload: str,
        *,
        events: list[tuple[str, str]] | None = None,
    ) -> bool:
        await checkpoint_if_cancelled()
        if self._store is None:
            raise NotImplementedError("the queue shares no store (see share_store)")
        if events:
            await self.publish_events(events)
        return bool(
            self._store.commit_node_then(
                run_id,
                record,
                schema.complete_task(task_id, run_id, record.node_id, payload),
            )
        )

    async def commit_and_complete_many(self, items: Sequence[Finished]) -> list[bool]:
        """Commit the items' records and complete their tasks in one transaction; a node
        committed before changes nothing (False), and its events are not published."""
        await checkpoint_if_cancelled()
        if self._store is None:
            raise NotImplementedError("the queue shares no store (see share_store)")
        batch = []
        for item in items:
            assert item.record is not None
            then = [*_events(item), *_finish(item)]
            batch.append((item.run_id, item.record, then))
        return self._store.commit_nodes_then(batch)

    async def complete_many(self, items: Sequence[Finished]) -> None:
        """Complete or dead-letter *items*, with their events, in one transaction."""
        await checkpoint_if_cancelled()
        if items:
            self._write([s for item in items for s in (*_events(item), *_finish(item))])

    def __repr__(self) -> str:
        return f"<SQLiteBroker {self.url!r}>"

    async def open(self) -> None:
        if self._conn is not None:
            return
        if self._store is not None:
            # The store is opened first and owns the connection; only the tables are ours.
            conn = self._store.connection()
            for statement in schema.QUEUE_SCHEMA:
                conn.execute(statement)
            self._conn = conn
            return
        try:
            self._conn = await connect_waiting(self._connect, self.busy_timeout)
        except (sqlite3.Error, OSError) as exc:
            raise self._unopened(exc) from exc

    def _connect(self) -> sqlite3.Connection:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=self.busy_timeout
        )
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            for statement in schema.QUEUE_SCHEMA:
                conn.execute(statement)
        except BaseException:
            conn.close()
            raise
        return conn

    def _unopened(self, exc: Exception) -> Exception:
        if isinstance(exc, sqlite3.Error) and schema.is_busy(exc):
            return schema.failure(self.url, self.busy_timeout, exc, None, None)
        return ConfigError(
            f"cannot open the queue {self.url}: {exc}",
            hint="Check the path and the permissions of its directory",
        )

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._store is None:
            conn.close()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ConfigError(
                f"the queue {self.url} is not open", hint="Use the context with `async with ctx:`"
            )
        return self._conn

    def _write(self, statements: list[tuple[str, Any]], *, many: bool = False) -> list[Any]:
        """Run *statements* in one write transaction; their rows, one list per statement.

        With ``many=True`` each statement's parameters are a list of rows
        (``executemany``).
        """
        db = self._db()
        out: list[Any] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in statements:
                cursor = db.executemany(sql, params) if many else db.execute(sql, params)
                out.append(cursor.fetchall())
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return out

    async def enqueue(self, tasks: list[tuple[str, str, str]]) -> None:
        await checkpoint_if_cancelled()
        if not tasks:
            return
        self._write(
            [("INSERT OR IGNORE INTO fd_tasks (run_id, node_id, payload) VALUES (?, ?, ?)", tasks)],
            many=True,
        )

    async def claim(self, worker: str, limit: int, lease: float) -> list[Claimed]:
        await checkpoint_if_cancelled()
        now = time.time()
        (rows,) = self._write([(schema.CLAIM, (now + lease, worker, now, limit))])
        rows.sort(key=lambda row: row[0])
        return [
            Claimed(str(row[0]), int(row[1]), str(row[2]), str(row[3]), str(row[4])) for row in rows
        ]

    async def extend(self, task_ids: list[str], lease: float) -> None:
        if not task_ids:
            return
        until = time.time() + lease
        self._write(
            [
                ("UPDATE fd_tasks SET lease_until = ? WHERE id = ?", (until, int(t)))
                for t in task_ids
            ]
        )

    async def complete(
        self,
        task_id: str,
        run_id: str,
        node_id: str,
        payload: str,
        *,
        events: list[tuple[str, str]] | None = None,
    ) -> None:
        await checkpoint_if_cancelled()
        if events:
            await self.publish_events(events)
        self._write(schema.complete_task(task_id, run_id, node_id, payload))

    async def dead_letter(
        self,
        task_id: str,
        run_id: str,
        node_id: str,
        payload: str,
        reason: str,
        *,
        events: list[tuple[str, str]] | None = None,
    ) -> None:
        await checkpoint_if_cancelled()
        if events:
            await self.publish_events(events)
        self._write(_finish(Finished(task_id, run_id, node_id, payload, dead=reason)))

    async def completions(self, cursor: Any) -> tuple[list[str], Any]:
        return await self.read_completions(cursor, count=-1)

    async def read_completions(self, cursor: Any, *, count: int) -> tuple[list[str], Any]:
        """At most *count* completions after *cursor* (a negative count: all of them)."""
        await checkpoint_if_cancelled()
        db = self._db()
        if cursor is None:
            row = db.execute("SELECT COALESCE(MAX(id), 0) FROM fd_completions").fetchone()
            return [], int(row[0])
        rows = db.execute(
            "SELECT id, payload FROM fd_completions WHERE id > ? ORDER BY id LIMIT ?",
            (cursor, count),
        ).fetchall()
        if not rows:
            return [], cursor
        return [str(r[1]) for r in rows], int(rows[-1][0])

    async def forget_completions(self, upto: Any) -> None:
        # Completions are read by whoever waits for them; keep the last few minutes'
        # worth for slower readers and drop the rest.
        self._write([("DELETE FROM fd_completions WHERE id <= ? - 100000", (upto,))])

    async def publish_events(self, events: list[tuple[str, str]]) -> None:
        if not events:
            return
        self._write([("INSERT INTO fd_events (run_id, payload) VALUES (?, ?)", events)], many=True)

    async def events(self, cursor: Any) -> tuple[list[tuple[str, str]], Any]:
        return await self.read_events(cursor, count=-1)

    async def read_events(self, cursor: Any, *, count: int) -> tuple[list[tuple[str, str]], Any]:
        """At most *count* events after *cursor* (a negative count: all of them)."""
        await checkpoint_if_cancelled()
        db = self._db()
        if cursor is None:
            row = db.execute("SELECT COALESCE(MAX(id), 0) FROM fd_events").fetchone()
            return [], int(row[0])
        rows = db.execute(
            "SELECT id, run_id, payload FROM fd_events WHERE id > ? ORDER BY id LIMIT ?",
            (cursor, count),
        ).fetchall()
        if not rows:
            return [], cursor
        return [(str(r[1]), str(r[2])) for r in rows], int(rows[-1][0])

    async def forget_events(self, run_id: str) -> None:
        self._write([("DELETE FROM fd_events WHERE run_id = ?", (run_id,))])

    async def dead_letters(self, run_id: str) -> list[dict[str, Any]]:
        rows = (
            self._db()
            .execute(
                "SELECT node_id, reason, at, payload FROM fd_dead WHERE run_id = ? ORDER BY id",
                (run_id,),
            )
            .fetchall()
        )
        return [
            {"node_id": str(r[0]), "reason": str(r[1]), "at": float(r[2]), "payload": str(r[3])}
            for r in rows
        ]

    async def drop_queued(self, run_id: str) -> None:
        """Remove a run's tasks that no worker holds (the run ended without them)."""
        self._write(
            [("DELETE FROM fd_tasks WHERE run_id = ? AND lease_until < ?", (run_id, time.time()))]
        )

    async def redeliver(
        self,
        run_id: str,
        *,
        skip: Collection[str] = (),
        alive: Callable[[str], bool] | None = None,
    ) -> None:
        """Hand a run's queued tasks, and those held by workers that are gone, out afresh,
        their deliveries forgotten; drop those of the nodes in *skip* (committed: the
        resume reuses them); leave those a live worker holds to it.

        A resume asks for this: the tasks of a run whose client died may be held by that
        client's own workers, dead with it; waiting out their leases, then counting those
        deliveries toward a poison task, would punish the node for the crash.  A task a
        live worker holds is not handed out again, lest it run twice.
        """
        await checkpoint_if_cancelled()
        db = self._db()
        now = time.time()
        db.execute("BEGIN IMMEDIATE")  # what is held is decided under the write lock
        try:
            rows = db.execute(
                "SELECT id, node_id, worker, lease_until FROM fd_tasks WHERE run_id = ?",
                (run_id,),
            ).fetchall()
            for task_id, node_id, worker, until in rows:
                if node_id in skip:
                    db.execute("DELETE FROM fd_tasks WHERE id = ?", (task_id,))
                elif not (until >= now and worker and alive is not None and alive(worker)):
                    db.execute(
                        "UPDATE fd_tasks SET lease_until = 0, deliveries = 0 WHERE id = ?",
                        (task_id,),
                    )
            db.execute("COMMIT")
        except BaseException:
            schema.rollback(db)
            raise

    def pending(self) -> int:
        """Tasks queued or held (for progress displays and tests)."""
        row = self._db().execute("SELECT COUNT(*) FROM fd_tasks").fetchone()
        return int(row[0])


def _events(item: Finished) -> list[tuple[str, Any]]:
    sql = "INSERT INTO fd_events (run_id, payload) VALUES (?, ?)"
    return [(sql, event) for event in item.events]


def _finish(item: Finished) -> list[tuple[str, Any]]:
    """The statements that complete *item*'s task, or dead-letter it."""
    done = schema.complete_task(item.task_id, item.run_id, item.node_id, item.payload)
    if item.dead is None:
        return done
    dead = (
        "INSERT INTO fd_dead (run_id, node_id, payload, reason, at) "
        "SELECT run_id, node_id, payload, ?, ? FROM fd_tasks WHERE id = ?",
        (item.dead, time.time(), int(item.task_id)),
    )
    return [dead, *done]
