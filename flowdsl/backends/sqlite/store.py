"""The SQLite store: the durable embedded default (``store="sqlite:///runs.db"``).

Layout (schema version 3, kept in ``PRAGMA user_version``; an older file is brought up to
it when opened)::

    runs(run_id PRIMARY KEY, flow, flow_ref, fingerprint, inputs, status,
         created_at, updated_at, result, error, failed_node, code)
    nodes(run_id, node_id, value, blob, attempts, started_at, finished_at, code, usage)
         PRIMARY KEY (run_id, node_id)     -- the journal: one row per finished node
    blobs(hash PRIMARY KEY, data)          -- large values, once per distinct content
    cache(key PRIMARY KEY, value, blob)    -- ``@fd.step(cache=True)`` results
    leases(run_id PRIMARY KEY, owner, expires_at)   -- who drives each run, until when

A node's JSON text of at most :data:`INLINE_MAX` bytes sits in its row; a larger one goes to
``blobs`` under its SHA-256 and the row keeps the hash, so a value returned by a thousand
nodes (or by a node and the cache) is stored once.  Finishing a node writes that node's row
(and maybe one blob) and nothing else: storage grows with the results, never with
steps x state.

Durability: the file is in WAL mode.  With ``durability="normal"`` (the default,
``synchronous=NORMAL``) a committed node survives the process being killed at any instant,
SIGKILL included, because the write has reached the operating system; a power loss or a
kernel crash may lose the last commits (never corrupt the file).  ``durability="full"``
(``synchronous=FULL``) syncs the WAL to the disk on every commit and survives power loss, at
about three times the cost per step.

Several processes on one machine may share a file: each opens its own connection, writers
queue on SQLite's lock for up to ``busy_timeout`` seconds.  (Not on a network filesystem:
WAL needs shared memory between the processes.)

Every row read back is checked before it is believed: a file is data from outside, and a
malformed or tampered row raises :class:`~flowdsl.CheckpointError` naming the run and node.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, Literal

from anyio.lowlevel import checkpoint_if_cancelled

from ... import _codec
from ..._errors import CheckpointError, ConfigError
from ..._records import Lease, NodeRecord, RunRecord, RunStatus
from .. import _validate as v
from ..base import ExpectedNodes, Store
from . import schema
from .files import check_identity, connect_waiting, migrate
from .url import bad_url as _bad_url
from .url import url_options as _url_options

SCHEMA_VERSION = schema.SCHEMA_VERSION

INLINE_MAX = schema.INLINE_MAX

__all__ = ["INLINE_MAX", "SCHEMA_VERSION", "SQLiteStore"]

_RESTORE_HINT: Final = (
    "Restore the file from a backup, or delete this run's rows "
    "(DELETE FROM nodes WHERE run_id = ...; DELETE FROM runs WHERE run_id = ...) and start "
    "it again"
)

Durability = Literal["normal", "full"]


class SQLiteStore(Store):
    """Runs and node journals in one SQLite file, safe for several processes on a machine.

    *path* is a file (its parent directories are created) or ``":memory:"`` (for tests:
    nothing is durable and the data goes when the store is closed).  *durability* is
    ``"normal"`` (survives a killed process) or ``"full"`` (survives power loss, slower);
    *busy_timeout* is how many seconds a write waits for another process's write.

    Every call runs on the event loop's own thread, synchronously.  A commit is one small
    transaction (tens of microseconds, at most ~0.1 ms) that blocks the loop for that long;
    handing it to a worker thread instead (aiosqlite's way) costs about five times the
    write itself in thread switches, for every node.  The price: while another process
    holds the write lock the loop waits (at most ``busy_timeout``) instead of running other
    tasks, and every few hundred commits SQLite's automatic checkpoint copies the WAL into
    the file and syncs it, which blocks the loop for a few milliseconds.  (Moving
    checkpoints to a thread was tried: the file sync stalls the next WAL write anyway on
    ext4, and the checkpoints only got more frequent.)
    """

    # A commit is a short synchronous transaction on the loop's thread (see above).
    commits_nowait = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: Durability = "normal",
        busy_timeout: float = 5.0,
    ) -> None:
        if durability not in ("normal", "full"):
            raise ConfigError(
                f"unknown durability {durability!r} for the SQLite store",
                hint="Use durability='normal' (survives a killed process) or 'full' "
                "(survives power loss)",
            )
        if not busy_timeout >= 0:
            raise ConfigError(
                f"busy_timeout must be a number of seconds >= 0, not {busy_timeout!r}"
            )
        self.path = os.fspath(path)
        self.durability: Durability = durability
        self.busy_timeout = float(busy_timeout)
        self.url = "sqlite://:memory:" if self.path == ":memory:" else f"sqlite:///{self.path}"
        self._conn: sqlite3.Connection | None = None

    @classmethod
    def from_url(cls, url: str) -> SQLiteStore:
        """A store from ``sqlite:///relative.db``, ``sqlite:////abs.db`` or
        ``sqlite://:memory:``, with optional ``?durability=full&busy_timeout=10``."""
        rest, _, query = url.partition("?")
        scheme, sep, location = rest.partition("://")
        if scheme.lower() != "sqlite" or not sep:
            raise _bad_url(url)
        if location == ":memory:":
            path = ":memory:"
        elif location.startswith("/") and len(location) > 1 and not location.endswith("/"):
            path = location[1:]  # the third slash ends the (empty) host part
        else:
            raise _bad_url(url)
        return cls(path, **_url_options(url, query))

    def __repr__(self) -> str:
        state = "open" if self._conn is not None else "closed"
        return f"<SQLiteStore {self.url!r} durability={self.durability!r} {state}>"

    # --- lifetime -------------------------------------------------------------------------

    async def open(self) -> None:
        await checkpoint_if_cancelled()
        if self._conn is not None:
            return
        try:
            self._conn = await connect_waiting(self._connect, self.busy_timeout)
        except sqlite3.Error as exc:
            raise self._failure(exc) from exc
        except OSError as exc:  # the parent directory could not be created
            raise ConfigError(
                f"cannot create the store {self.url}: {exc}",
                hint="Check the path and the permissions of its directory",
            ) from exc

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            # The last connection to close checkpoints the WAL into the file and removes it;
            # while others stay open, copy what we can and cut the WAL back to its limit.
            self._checkpoint(conn)
            conn.close()

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        if self.path == ":memory:":
            return
        # Busy (another process writes): its own checkpoints will do.
        with contextlib.suppress(sqlite3.Error):
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _connect(self) -> sqlite3.Connection:
        memory = self.path == ":memory:"
        if not memory:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we write BEGIN/COMMIT ourselves; the sqlite3 module's
        # implicit transactions would open one on the first SELECT and hold it.
        conn = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout,
            isolation_level=None,
            check_same_thread=False,
            cached_statements=64,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            check_identity(conn, self.path, self.url)
            conn.execute(f"PRAGMA page_size = {schema.PAGE_SIZE}")  # only a new file takes it
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if not memory and str(mode).lower() != "wal":
                raise ConfigError(
                    f"the SQLite store {self.url} cannot use WAL mode (it reports {mode!r})",
                    hint="Put the file on a local filesystem",
                )
            synchronous = "FULL" if self.durability == "full" else "NORMAL"
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            conn.execute(f"PRAGMA journal_size_limit = {schema.JOURNAL_SIZE_LIMIT}")
            migrate(conn, self.path, self.url)
        except BaseException:
            conn.close()
            raise
        return conn

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ConfigError(
                f"the store {self.url} is not open",
                hint="Use it inside `async with ctx:` or call `await store.open()` first",
            )
        return self._conn

    # --- runs -----------------------------------------------------------------------------

    async def create_run(self, record: RunRecord) -> tuple[RunRecord, bool]:
        await checkpoint_if_cancelled()
        db = self._db()
        kept = schema.as_stored(record)
        row = (
            record.run_id,
            record.flow,
            record.flow_ref,
            record.fingerprint,
            kept.inputs,
            record.status.value,
            record.created_at,
            record.updated_at,
            kept.result,
            kept.error,
            record.failed_node,
            _codec.dumps(record.code),
            self.seal.run_head(kept),
            self.seal.run_state_of(kept),
            kept.traceback,
        )
        try:
            # INSERT OR IGNORE decides races between processes: one insert wins, and every
            # loser reads the winner's row.
            if db.execute(schema.INSERT_RUN, row).rowcount == 1:
                return record, True
            stored = db.execute(schema.SELECT_RUN, (record.run_id,)).fetchone()
        except sqlite3.Error as exc:
            raise self._failure(exc, run_id=record.run_id) from exc
        if stored is None:  # deleted between the two statements by another process
            raise CheckpointError(
                f"run {record.run_id!r} vanished from {self.url} while it was being created",
                hint="Start it again",
            )
        return self._run_from_row(record.run_id, stored), False

    async def get_run(self, run_id: str) -> RunRecord | None:
        await checkpoint_if_cancelled()
        try:
            row = self._db().execute(schema.SELECT_RUN, (run_id,)).fetchone()
        except sqlite3.Error as exc:
            raise self._failure(exc, run_id=run_id) from exc
        return None if row is None else self._run_from_row(run_id, row)

    async def update_run(
        self,
        run_id: str,
        *,
        status: RunStatus,
        result: str | None = None,
        error: str | None = None,
        failed_node: str | None = None,
        fingerprint: str | None = None,
        code: dict[str, str] | None = None,
        traceback: str | None = None,
    ) -> None:
        await checkpoint_if_cancelled()
        result = schema.storable_json(result)
        error = schema.storable_text(error)
        traceback = schema.storable_text(traceback)
        params = (
            status.value,
            result,
            error,
            failed_node,
            time.time(),
            fingerprint,
            None if code is None else _codec.dumps(code),
            self.seal.run_state(run_id, status.value, result, error, failed_node, traceback),
            traceback,
            run_id,
        )
        try:
            updated = self._db().execute(schema.UPDATE_RUN, params).rowcount
        except sqlite3.Error as exc:
            raise self._failure(exc, run_id=run_id) from exc
        if updated == 0:
            raise CheckpointError(
                f"run {run_id!r} does not exist in {self.url}",
                hint="Create the run (ctx.start) before updating it",
            )

    async def list_runs(self, *, limit: int = 50) -> list[RunRecord]:
        return await self._select_runs(schema.LIST_RUNS, (max(limit, 0),))

    async def unfinished_runs(self) -> list[RunRecord]:
        # Only the matching rows are decoded (and verified): the store may hold many more.
        return await self._select_runs(schema.UNFINISHED_RUNS, ())

    async def _select_runs(self, query: str, params: tuple[Any, ...]) -> list[RunRecord]:
        await checkpoint_if_cancelled()
        try:
            rows = self._db().execute(query, params).fetchall()
        except sqlite3.Error as exc:
            raise self._failure(exc) from exc
        return [self._run_from_row(_id_of(row), row) for row in rows]

    # --- the journal ----------------------------------------------------------------------

    async def commit_node(self, run_id: str, record: NodeRecord) -> bool:
        await checkpoint_if_cancelled()
        return self.commit_node_then(run_id, record, ())

    def commit_node_nowait(self, run_id: str, record: NodeRecord) -> bool:
        """:meth:`commit_node` as the synchronous write it is (see the class docstring)."""
        return self.commit_node_then(run_id, record, ())

    def commit_node_then(
        self, run_id: str, record: NodeRecord, then: Sequence[tuple[str, tuple[Any, ...]]]
    ) -> bool:
        """Commit *record* and, if it is the first commit of that node, run the *then*
        statements in the same transaction.

        The embedded queue shares this connection and completes its task this way: the
        node's row, the task's removal and its completion become durable together.
        """
        return self.commit_nodes_then([(run_id, record, then)])[0]

    def commit_nodes_then(self, items: Sequence[schema.CommitThen]) -> list[bool]:
        """:meth:`commit_node_then` for many ``(run_id, record, then)``, in one transaction
        (a batch worker's finished tasks): one bool each, in order."""
        db = self._db()
        rows = [schema.node_row(run_id, record, self.seal) for run_id, record, _ in items]
        try:
            # The rows and their blobs become durable together.  IMMEDIATE takes the
            # write lock up front, so a concurrent writer makes us wait (busy_timeout)
            # rather than fail on a lock upgrade.
            db.execute("BEGIN IMMEDIATE")
            try:
                created = schema.insert_all(db, rows, items) if len(rows) > 1 else []
                if not created:
                    created = schema.insert_each(db, rows, items)
                db.execute("COMMIT")
            except BaseException:
                schema.rollback(db)
                raise
        except sqlite3.Error as exc:
            run_id, record, _ = items[0]
            raise self._failure(exc, run_id=run_id, node_id=record.node_id) from exc
        return created

    async def commit_nodes(self, records: Sequence[tuple[str, NodeRecord]]) -> list[bool]:
        await checkpoint_if_cancelled()
        return self.commit_nodes_then([(run_id, record, ()) for run_id, record in records])

    def connection(self) -> sqlite3.Connection:
        """The open connection, for the embedded queue that lives in the same file."""
        return self._db()

    async def load_nodes(self, run_id: str) -> dict[str, NodeRecord]:
        await checkpoint_if_cancelled()
        try:
            rows = self._db().execute(schema.SELECT_NODES, (run_id,)).fetchall()
        except sqlite3.Error as exc:
            raise self._failure(exc, run_id=run_id) from exc
        records = (self._node_from_row(run_id, row) for row in rows)
        return {record.node_id: record for record in records}

    async def load_node(self, run_id: str, node_id: str) -> NodeRecord | None:
        await checkpoint_if_cancelled()
        try:
            row = self._db().execute(schema.SELECT_NODE, (run_id, node_id)).fetchone()
        except sqlite3.Error as exc:
            raise self._failure(exc, run_id=run_id) from exc
        return None if row is None else self._node_from_row(run_id, row)

    async def lookup_nodes(
        self, keys: Sequence[tuple[str, str]], *, expected: ExpectedNodes = None
    ) -> dict[tuple[str, str], NodeRecord]:
        await checkpoint_if_cancelled()
        pairs = list(dict.fromkeys(keys))
        try:
            rows = schema.select_node_pairs(self._db(), pairs)
        except sqlite3.Error as exc:
            raise self._failure(exc, run_id=pairs[0][0] if pairs else None) from exc
        want = expected or {}
        records = (
            (r, self._node_from_row(r, row[1:], want.get((r, row[1]))))
            for row in rows
            for r in (_id_of(row),)
        )
        return {(run_id, record.node_id): record for run_id, record in records}

    # --- the run lease ----------------------------------------------------------------------

    async def acquire_lease(
        self, run_id: str, owner: str, ttl: float, *, replacing: str | None = None
    ) -> Lease | None:
        await checkpoint_if_cancelled()
        try:
            held = schema.acquire_lease(self._db(), run_id, owner, ttl, replacing)
        except sqlite3.Error as exc:
            raise self._failure(exc, run_id=run_id) from exc
        if held is None:
            return None
        try:
            return Lease(run_id, v.text(held[0], "owner"), v.timestamp(held[1], "expires_at"))
        except v.Malformed as exc:
            raise v.corrupted(self.url, run_id, None, f"its lease: {exc}", _RESTORE_HINT) from None

    async def renew_leases(self, owner: str, run_ids: Sequence[str], ttl: float) -> list[str]:
        await checkpoint_if_cancelled()
        if not run_ids:
            return []
        try:
            return schema.renew_leases(self._db(), owner, run_ids, ttl)
        except sqlite3.Error as exc:
            raise self._failure(exc) from exc

    async def release_lease(self, run_id: str, owner: str) -> None:
        await checkpoint_if_cancelled()
        try:
            self._db().execute(schema.RELEASE_LEASE, (run_id, owner))
        except sqlite3.Error as exc:
            raise self._failure(exc, run_id=run_id) from exc

    # --- retention ------------------------------------------------------------------------

    async def prune(
        self, *, older_than: float, statuses: frozenset[RunStatus] | None = None
    ) -> list[str]:
        await checkpoint_if_cancelled()
        db = self._db()
        cutoff = time.time() - older_than
        wanted = {s.value for s in statuses} if statuses is not None else None
        try:
            pruned = schema.prune_runs(db, cutoff, wanted)
        except sqlite3.Error as exc:
            raise self._failure(exc) from exc
        self._checkpoint(db)
        return pruned

    async def forget_nodes(self, run_id: str, node_ids: list[str]) -> None:
        await checkpoint_if_cancelled()
        if not node_ids:
            return
        db = self._db()
        keys = [(run_id, node_id) for node_id in node_ids]
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                hashes: set[bytes] = set()
                for key in keys:
                    row = db.execute(schema.NODE_BLOB, key).fetchone()
                    if row is not None and isinstance(row[0], bytes):
                        hashes.add(row[0])
                db.executemany(schema.DELETE_NODE, keys)
                schema.drop_unreferenced(db, hashes)
                db.execute("COMMIT")
            except BaseException:
                schema.rollback(db)
                raise
        except sqlite3.Error as exc:
            raise self._failure(exc, run_id=run_id) from exc

    # --- the step cache -------------------------------------------------------------------

    async def get_cached(self, key: str) -> str | None:
        await checkpoint_if_cancelled()
        try:
            row = self._db().execute(schema.GET_CACHED, (key,)).fetchone()
        except sqlite3.Error as exc:
            raise self._failure(exc) from exc
        if row is None:
            return None
        try:
            value = v.check_json(schema.join_value(row[0], row[1], row[2]), "the cached value")
            v.check_cached(self.seal, key, value, row[3])
            return value
        except v.Malformed as exc:
            raise CheckpointError(
                f"cache entry {key!r} in {self.url} is corrupted: {exc}",
                hint="Restore the file from a backup, or delete the entry "
                "(DELETE FROM cache WHERE key = ...)",
            ) from None

    async def put_cached(self, key: str, value: str) -> None:
        await checkpoint_if_cancelled()
        db = self._db()
        inline, digest, data = schema.split_value(value)
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                if digest is not None:
                    db.execute(schema.INSERT_BLOB, (digest, data))
                check = self.seal.cached(key, value)
                db.execute(schema.PUT_CACHED, (key, inline, digest, check))
                db.execute("COMMIT")
            except BaseException:
                schema.rollback(db)
                raise
        except sqlite3.Error as exc:
            raise self._failure(exc) from exc

    # --- reading rows back ----------------------------------------------------------------

    def _run_from_row(self, run_id: str, row: Sequence[Any]) -> RunRecord:
        try:
            fields = dict(zip(schema.RUN_COLUMNS, row, strict=True))
            fields["code"] = v.load_json(v.text(fields["code"], "code"), "code")
            return v.run_record(run_id, fields, self.seal)
        except v.Malformed as exc:
            raise v.corrupted(self.url, run_id, None, str(exc), _RESTORE_HINT) from None

    def _node_from_row(
        self, run_id: str, row: Sequence[Any], expected: NodeRecord | None = None
    ) -> NodeRecord:
        node_id = row[0]
        node = node_id if isinstance(node_id, str) else repr(node_id)
        try:
            (_, value, digest, data, attempts, started_at, finished_at, code, usage, check) = row
            fields = {
                "value": schema.join_value(value, digest, data),
                "attempts": attempts,
                "started_at": started_at,
                "finished_at": finished_at,
                "code": code,
                "usage": None if usage is None else v.load_json(v.text(usage, "usage"), "usage"),
                "check": check,
            }
            node_id = v.text(node_id, "node_id")
            return v.node_record(run_id, node_id, fields, self.seal, expected=expected)
        except v.Malformed as exc:
            raise v.corrupted(self.url, run_id, node, str(exc), _RESTORE_HINT) from None

    def _failure(
        self, exc: sqlite3.Error, *, run_id: str | None = None, node_id: str | None = None
    ) -> Exception:
        """Translate an sqlite3 error at the edge, naming the file and what to do."""
        return schema.failure(self.url, self.busy_timeout, exc, run_id, node_id)

    # --- signals (fd.wait_for) --------------------------------------------------------------

    def _signals(self) -> sqlite3.Connection:
        db = self._db()
        if not getattr(self, "_signals_ready", False):
            db.execute(schema.SIGNALS_TABLE)
            self._signals_ready = True
        return db

    async def put_signal(self, run_id: str, name: str, value: str) -> int:
        """Append *value* (JSON text) to the run's signals called *name*; its index."""
        await checkpoint_if_cancelled()
        try:
            db = self._signals()
            db.execute("BEGIN IMMEDIATE")
            try:
                (index,) = db.execute(schema.COUNT_SIGNALS, (run_id, name)).fetchone()
                db.execute(schema.INSERT_SIGNAL, (run_id, name, index, value))
                db.execute("COMMIT")
            except BaseException:
                schema.rollback(db)
                raise
        except sqlite3.Error as exc:
            raise self._failure(exc, run_id=run_id) from exc
        return int(index)

    async def get_signal(self, run_id: str, name: str, index: int) -> str | None:
        """The *index*-th signal *name* sent to the run (from 0), or ``None`` if not yet."""
        await checkpoint_if_cancelled()
        try:
            row = self._signals().execute(schema.SELECT_SIGNAL, (run_id, name, index)).fetchone()
        except sqlite3.Error as exc:
            raise self._failure(exc, run_id=run_id) from exc
        if row is None:
            return None
        try:
            return v.check_json(row[0], "the signal")
        except v.Malformed as exc:
            raise v.corrupted(self.url, run_id, None, str(exc), _RESTORE_HINT) from None


def _id_of(row: Sequence[Any]) -> str:
    return row[0] if isinstance(row[0], str) else "?"
