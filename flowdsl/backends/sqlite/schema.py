"""The SQLite file's layout, shared by the store and the embedded queue: the tables of each
(the journal's, versioned in ``PRAGMA user_version``, and the queue's ``fd_*`` tables,
created on first use), the statements both run, and the helpers of a write transaction.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from typing import Any, Final

import attrs

from ... import _codec
from ..._errors import BackendUnavailable, CheckpointError, ConfigError
from ..._integrity import Seal
from ..._records import NodeRecord, RunRecord
from .._validate import RUN_FIELDS, Malformed, text

__all__ = ["QUEUE_SCHEMA", "SCHEMA", "SCHEMA_VERSION"]

SCHEMA_VERSION: Final = 4
# WAL bytes kept after a checkpoint resets it: a big batch grows the WAL, and without a
# limit the file keeps that size until the last connection closes.
JOURNAL_SIZE_LIMIT: Final = 16 * 1024 * 1024
#: JSON text longer than this many bytes is stored once, by content hash, in ``blobs``.
INLINE_MAX: Final = 256
HASH_SIZE: Final = 32
#: JSON text longer than this many bytes is stored once, by content hash, in ``blobs``.
# 'flow' in ASCII: marks the file as a flowdsl store so a stranger's database is refused.
APPLICATION_ID: Final = 0x666C6F77
# 8 KiB pages hold seven 1 KiB results where 4 KiB pages hold three, which is what keeps a
# journal of 1 KiB results within 1.5x their size (4 KiB pages: just over 1.5x).
PAGE_SIZE: Final = 8192
# SQLite's default cap on bound parameters is 32766 since 3.32; stay far below it.
CHUNK: Final = 500

# Version 3: who drives each run, until when (wall-clock seconds).
_LEASES: Final = (
    """CREATE TABLE IF NOT EXISTS leases (
        run_id TEXT PRIMARY KEY NOT NULL,
        owner TEXT NOT NULL,
        expires_at REAL NOT NULL
    ) WITHOUT ROWID""",
)

SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS runs (
        run_id TEXT PRIMARY KEY NOT NULL,
        flow TEXT NOT NULL,
        flow_ref TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        inputs TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        result TEXT,
        error TEXT,
        failed_node TEXT,
        code TEXT NOT NULL,
        integrity TEXT,
        state_integrity TEXT,
        traceback TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS runs_by_created ON runs (created_at)",
    # WITHOUT ROWID: the primary key is the row, so (run_id, node_id) is stored once.
    """CREATE TABLE IF NOT EXISTS nodes (
        run_id TEXT NOT NULL,
        node_id TEXT NOT NULL,
        value TEXT,
        blob BLOB,
        attempts INTEGER NOT NULL,
        started_at REAL NOT NULL,
        finished_at REAL NOT NULL,
        code TEXT NOT NULL,
        usage TEXT,
        integrity TEXT,
        PRIMARY KEY (run_id, node_id)
    ) WITHOUT ROWID""",
    # A rowid table on purpose: its leaves hold rows up to a page, where a WITHOUT ROWID
    # table spills any row over ~1/4 page to overflow pages and wastes most of them.
    """CREATE TABLE IF NOT EXISTS blobs (
        hash BLOB PRIMARY KEY NOT NULL,
        data BLOB NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS cache (
        key TEXT PRIMARY KEY NOT NULL,
        value TEXT,
        blob BLOB,
        integrity TEXT
    ) WITHOUT ROWID""",
    *_LEASES,
)
# From schema version 1 (no integrity checks): the columns added; the rows already there
# have none, which a process without a signing key accepts (see docs/security.md).
MIGRATE_1_TO_2: Final = (
    "ALTER TABLE runs ADD COLUMN integrity TEXT",
    "ALTER TABLE runs ADD COLUMN state_integrity TEXT",
    "ALTER TABLE nodes ADD COLUMN integrity TEXT",
    "ALTER TABLE cache ADD COLUMN integrity TEXT",
)
# Version 4: a failed run's traceback (NULL in the rows already there: they have none).
MIGRATE_3_TO_4: Final = ("ALTER TABLE runs ADD COLUMN traceback TEXT",)
#: What brings a file of each older version to the next one.
MIGRATIONS: Final = {1: MIGRATE_1_TO_2, 2: _LEASES, 3: MIGRATE_3_TO_4}

# The columns of a run's row, in the order the SELECTs name them (and the record's fields
# they hold: `integrity` is `check`, `state_integrity` `state_check`).
RUN_COLUMNS: Final = RUN_FIELDS

INSERT_RUN: Final = (
    "INSERT OR IGNORE INTO runs (run_id, flow, flow_ref, fingerprint, inputs, status, "
    "created_at, updated_at, result, error, failed_node, code, integrity, state_integrity, "
    "traceback) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_RUN_SELECT: Final = (
    "SELECT run_id, flow, flow_ref, fingerprint, inputs, status, created_at, updated_at, "
    "result, error, failed_node, code, integrity, state_integrity, traceback FROM runs "
)
SELECT_RUN: Final = _RUN_SELECT + "WHERE run_id = ?"
LIST_RUNS: Final = _RUN_SELECT + "ORDER BY created_at DESC, rowid DESC LIMIT ?"
UNFINISHED_RUNS: Final = _RUN_SELECT + "WHERE status IN ('running', 'waiting')"
UPDATE_RUN: Final = (
    "UPDATE runs SET status = ?, result = ?, error = ?, failed_node = ?, updated_at = ?, "
    "fingerprint = coalesce(?, fingerprint), code = coalesce(?, code), state_integrity = ?, "
    "traceback = ? WHERE run_id = ?"
)
# Ended runs last updated before a time (their ids): what `flowdsl runs prune` deletes.
PRUNABLE: Final = (
    "SELECT run_id, status FROM runs "
    "WHERE status IN ('finished', 'failed', 'cancelled') AND updated_at < ?"
)
INSERT_NODE: Final = (
    "INSERT OR IGNORE INTO nodes (run_id, node_id, value, blob, attempts, started_at, "
    "finished_at, code, usage, integrity) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
INSERT_BLOB: Final = "INSERT OR IGNORE INTO blobs (hash, data) VALUES (?, ?)"
SELECT_NODES: Final = (
    "SELECT n.node_id, n.value, n.blob, b.data, n.attempts, n.started_at, n.finished_at, "
    "n.code, n.usage, n.integrity FROM nodes AS n LEFT JOIN blobs AS b ON b.hash = n.blob "
    "WHERE n.run_id = ?"
)
SELECT_NODE: Final = SELECT_NODES + " AND n.node_id = ?"
# Followed by "(?, ?), (?, ?), ...)" (row values): the records of given (run, node) pairs.
# The pairs as a VALUES table joined to nodes: each looked up by the primary key.  A
# "(run_id, node_id) IN (VALUES ...)" scans the whole table instead, once per lookup.
SELECT_NODE_PAIRS: Final = (
    "SELECT n.run_id, n.node_id, n.value, n.blob, b.data, n.attempts, n.started_at, "
    "n.finished_at, n.code, n.usage, n.integrity FROM (VALUES {}) AS k "
    "CROSS JOIN nodes AS n ON n.run_id = k.column1 AND n.node_id = k.column2 "
    "LEFT JOIN blobs AS b ON b.hash = n.blob"
)
RUN_BLOBS: Final = "SELECT blob FROM nodes WHERE run_id = ? AND blob IS NOT NULL"
DELETE_RUN_NODES: Final = "DELETE FROM nodes WHERE run_id = ?"
DELETE_RUN: Final = "DELETE FROM runs WHERE run_id = ?"
NODE_BLOB: Final = "SELECT blob FROM nodes WHERE run_id = ? AND node_id = ?"
DELETE_NODE: Final = "DELETE FROM nodes WHERE run_id = ? AND node_id = ?"
# Signals for fd.wait_for: the table is made on first use, so that a file made before
# signals existed gets it without a schema migration.
SIGNALS_TABLE: Final = """CREATE TABLE IF NOT EXISTS signals (
    run_id TEXT NOT NULL,
    name TEXT NOT NULL,
    seq INTEGER NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (run_id, name, seq)
) WITHOUT ROWID"""
COUNT_SIGNALS: Final = "SELECT count(*) FROM signals WHERE run_id = ? AND name = ?"
INSERT_SIGNAL: Final = "INSERT INTO signals (run_id, name, seq, value) VALUES (?, ?, ?, ?)"
SELECT_SIGNAL: Final = "SELECT value FROM signals WHERE run_id = ? AND name = ? AND seq = ?"
GET_CACHED: Final = (
    "SELECT c.value, c.blob, b.data, c.integrity FROM cache AS c "
    "LEFT JOIN blobs AS b ON b.hash = c.blob WHERE c.key = ?"
)
PUT_CACHED: Final = "INSERT OR REPLACE INTO cache (key, value, blob, integrity) VALUES (?, ?, ?, ?)"
# Taken when free, ran out, ours already, or held by the one named as dead: one statement,
# so two processes cannot both take it.  RETURNING says whether the row is ours now.
ACQUIRE_LEASE: Final = (
    "INSERT INTO leases (run_id, owner, expires_at) VALUES (:run, :owner, :until) "
    "ON CONFLICT (run_id) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at "
    "WHERE leases.owner = :owner OR leases.owner = :replacing OR leases.expires_at <= :now "
    "RETURNING owner"
)
SELECT_LEASE: Final = "SELECT owner, expires_at FROM leases WHERE run_id = ?"
RENEW_LEASE: Final = (
    "UPDATE leases SET expires_at = ? WHERE run_id = ? AND owner = ? RETURNING run_id"
)
RELEASE_LEASE: Final = "DELETE FROM leases WHERE run_id = ? AND owner = ?"


def drop_unreferenced(db: sqlite3.Connection, hashes: Iterable[bytes]) -> None:
    """Delete the blobs among *hashes* that no node and no cache entry refers to any more.

    Forgetting is rare (a resume after a code change), so this scans rather than keep an
    index on ``nodes.blob`` that every commit would pay for in time and space.
    """
    candidates = list(hashes)
    for start in range(0, len(candidates), CHUNK):
        chunk = candidates[start : start + CHUNK]
        marks = ", ".join("?" * len(chunk))  # only placeholders go into the text
        query = (
            f"SELECT blob FROM nodes WHERE blob IN ({marks}) "  # noqa: S608
            f"UNION SELECT blob FROM cache WHERE blob IN ({marks})"
        )
        used = {row[0] for row in db.execute(query, chunk + chunk)}
        db.executemany("DELETE FROM blobs WHERE hash = ?", [(h,) for h in chunk if h not in used])


def prune_runs(db: sqlite3.Connection, cutoff: float, wanted: set[str] | None) -> list[str]:
    """Delete the ended runs last updated before *cutoff* (of the *wanted* statuses, or
    any), their nodes and the blobs only they used, in one transaction; their ids."""
    pruned: list[str] = []
    db.execute("BEGIN IMMEDIATE")
    try:
        signals = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'signals'"
        ).fetchone()
        for run_id, status in db.execute(PRUNABLE, (cutoff,)).fetchall():
            if wanted is not None and status not in wanted:
                continue
            hashes = {r[0] for r in db.execute(RUN_BLOBS, (run_id,))}
            db.execute(DELETE_RUN_NODES, (run_id,))
            db.execute(DELETE_RUN, (run_id,))
            db.execute("DELETE FROM leases WHERE run_id = ?", (run_id,))
            if signals:
                db.execute("DELETE FROM signals WHERE run_id = ?", (run_id,))
            drop_unreferenced(db, (h for h in hashes if isinstance(h, bytes)))
            pruned.append(run_id)
        db.execute("COMMIT")
    except BaseException:
        rollback(db)
        raise
    return pruned


def select_node_pairs(db: sqlite3.Connection, pairs: list[tuple[str, str]]) -> list[Any]:
    """The rows of :data:`SELECT_NODE_PAIRS` for *pairs*, a chunk of them at a time."""
    rows: list[Any] = []
    for start in range(0, len(pairs), CHUNK // 2):
        chunk = pairs[start : start + CHUNK // 2]
        marks = ", ".join("(?, ?)" for _ in chunk)  # only placeholders go into the text
        query = SELECT_NODE_PAIRS.format(marks)
        rows += db.execute(query, [part for pair in chunk for part in pair]).fetchall()
    return rows


# --- the run lease ----------------------------------------------------------------------------


def acquire_lease(
    db: sqlite3.Connection, run_id: str, owner: str, ttl: float, replacing: str | None
) -> tuple[Any, Any] | None:
    """Take the lease (one statement: of two takers one wins): ``None`` when taken, else
    the standing lease's ``(owner, expires_at)`` row, as read."""
    now = time.time()
    params = {"run": run_id, "owner": owner, "until": now + ttl, "replacing": replacing}
    while True:
        if db.execute(ACQUIRE_LEASE, {**params, "now": now}).fetchall():
            return None
        row = db.execute(SELECT_LEASE, (run_id,)).fetchone()
        if row is not None:
            return (row[0], row[1])
        # Released between the two statements: free now, take it again.


def renew_leases(
    db: sqlite3.Connection, owner: str, run_ids: Sequence[str], ttl: float
) -> list[str]:
    """Extend *owner*'s leases, in one transaction; the run ids it no longer holds."""
    until = time.time() + ttl
    renewed: set[str] = set()
    db.execute("BEGIN IMMEDIATE")
    try:
        for run_id in run_ids:
            if db.execute(RENEW_LEASE, (until, run_id, owner)).fetchall():
                renewed.add(run_id)
        db.execute("COMMIT")
    except BaseException:
        rollback(db)
        raise
    return [run_id for run_id in run_ids if run_id not in renewed]


def error_name(exc: sqlite3.Error) -> str:
    return str(getattr(exc, "sqlite_errorname", "") or "")


def is_busy(exc: sqlite3.Error) -> bool:
    return error_name(exc).startswith(("SQLITE_BUSY", "SQLITE_LOCKED"))


def rollback(db: sqlite3.Connection) -> None:
    if db.in_transaction:
        db.execute("ROLLBACK")


# --- the embedded queue ---------------------------------------------------------------------

QUEUE_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS fd_tasks (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id TEXT NOT NULL,
        node_id TEXT NOT NULL,
        payload TEXT NOT NULL,
        lease_until REAL NOT NULL DEFAULT 0,
        deliveries INTEGER NOT NULL DEFAULT 0,
        worker TEXT,
        UNIQUE (run_id, node_id)
    )""",
    "CREATE INDEX IF NOT EXISTS fd_tasks_lease ON fd_tasks (lease_until, id)",
    """CREATE TABLE IF NOT EXISTS fd_completions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id TEXT NOT NULL,
        node_id TEXT NOT NULL,
        payload TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS fd_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id TEXT NOT NULL,
        payload TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS fd_dead (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id TEXT NOT NULL,
        node_id TEXT NOT NULL,
        payload TEXT NOT NULL,
        reason TEXT NOT NULL,
        at REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS fd_dead_run ON fd_dead (run_id)",
)

CLAIM: Final = """
    UPDATE fd_tasks SET lease_until = ?, deliveries = deliveries + 1, worker = ?
    WHERE id IN (SELECT id FROM fd_tasks WHERE lease_until < ? ORDER BY id LIMIT ?)
    RETURNING id, deliveries, payload, run_id, node_id
"""


def complete_task(task_id: str, run_id: str, node_id: str, payload: str) -> list[tuple[str, Any]]:
    """The statements that remove a task and publish its completion (one transaction)."""
    return [
        ("DELETE FROM fd_tasks WHERE id = ?", (int(task_id),)),
        (
            "INSERT INTO fd_completions (run_id, node_id, payload) VALUES (?, ?, ?)",
            (run_id, node_id, payload),
        ),
    ]


# --- values: inline or by content hash ------------------------------------------------------

#: A node's commit and the statements to run with it when it is the first: ``(run_id,
#: record, then)``.
CommitThen = tuple[str, NodeRecord, Sequence[tuple[str, Any]]]
#: A node's ``INSERT_NODE`` parameters, and its value's blob hash and data if it has one.
NodeRow = tuple[tuple[Any, ...], bytes | None, bytes | None]


def node_row(run_id: str, record: NodeRecord, seal: Seal) -> NodeRow:
    """``(INSERT_NODE parameters, blob hash, blob data)`` of a node's record."""
    value, digest, data = split_value(record.value)
    usage = None if record.usage is None else storable_json(_codec.dumps(record.usage))
    params = (
        run_id,
        record.node_id,
        value,
        digest,
        record.attempts,
        record.started_at,
        record.finished_at,
        record.code,
        usage,
        seal.node(run_id, record),
    )
    return params, digest, data


def insert_all(
    db: sqlite3.Connection, rows: Sequence[NodeRow], items: Sequence[CommitThen]
) -> list[bool]:
    """Insert the rows of nodes none of which is committed yet, and run their *then*
    statements, a statement for all at once (``executemany``); in the caller's open
    transaction.  An empty list, with nothing written, when a row was there already (a
    redelivered task): :func:`insert_each` then decides one by one.

    The batches of a worker, where nodes committed before are rare (its claim read the
    journal): one call per kind of statement, not one per row.  Each item's *then*
    statements touch its own rows only, so they may run statement by statement across
    the items (each item's keep their order).
    """
    db.execute("SAVEPOINT fd_all")
    if db.executemany(INSERT_NODE, [params for params, _, _ in rows]).rowcount != len(rows):
        db.execute("ROLLBACK TO fd_all")
        db.execute("RELEASE fd_all")
        return []
    blobs = [(digest, data) for _, digest, data in rows if digest is not None]
    if blobs:
        db.executemany(INSERT_BLOB, blobs)
    # Items whose statements are alike (the same SQL, in the same order) go together.
    shapes: dict[tuple[str, ...], list[Sequence[tuple[str, Any]]]] = {}
    for _, _, then in items:
        if then:
            shapes.setdefault(tuple(sql for sql, _ in then), []).append(then)
    for shape, thens in shapes.items():
        for i, sql in enumerate(shape):
            db.executemany(sql, [then[i][1] for then in thens])
    db.execute("RELEASE fd_all")
    return [True] * len(rows)


def insert_each(
    db: sqlite3.Connection, rows: Sequence[NodeRow], items: Sequence[CommitThen]
) -> list[bool]:
    """Insert each row and, if it is the node's first commit, its blob and *then*
    statements; in the caller's open transaction.  Whether each was the first."""
    created: list[bool] = []
    for (params, digest, data), (_, _, then) in zip(rows, items, strict=True):
        created.append(db.execute(INSERT_NODE, params).rowcount == 1)
        if created[-1]:
            if digest is not None:
                db.execute(INSERT_BLOB, (digest, data))
            for sql, args in then:
                db.execute(sql, args)
    return created


def split_value(value: str) -> tuple[str | None, bytes | None, bytes | None]:
    """``(inline, hash, data)``: small JSON text stays in the row, large goes to ``blobs``."""
    try:
        data = value.encode()
    except UnicodeEncodeError:
        # A lone surrogate: Python strings (and the codec's JSON text) may hold one, SQLite
        # text may not.  Kept byte-exact in a blob, whatever its size.
        data = value.encode("utf-8", "surrogatepass")
        return None, hashlib.sha256(data).digest(), data
    if len(data) <= INLINE_MAX:
        return value, None, None
    return None, hashlib.sha256(data).digest(), data


def storable_json(text: str | None) -> str | None:
    """JSON text SQLite can hold: lone surrogates, if any, become ``\\udXXX`` escapes,
    which parse back to the same value."""
    if text is None:
        return None
    try:
        text.encode()
    except UnicodeEncodeError:
        return json.dumps(_codec.loads(text), ensure_ascii=True, separators=(",", ":"))
    return text


def storable_text(text: str | None) -> str | None:
    """Free text (an error message) SQLite can hold: lone surrogates become escapes."""
    if text is None:
        return None
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()
    return text


def join_value(inline: object, digest: object, data: object) -> str:
    if digest is None:
        return text(inline, "value")
    if inline is not None:
        raise Malformed("the row has both an inline value and a blob reference")
    if not isinstance(digest, bytes) or len(digest) != HASH_SIZE:
        raise Malformed(f"the blob reference is not a {HASH_SIZE}-byte hash")
    if data is None:
        raise Malformed(f"the value's blob {digest.hex()[:16]}... is missing")
    if not isinstance(data, bytes) or hashlib.sha256(data).digest() != digest:
        raise Malformed(f"the value's blob {digest.hex()[:16]}... does not match its hash")
    try:
        return data.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise Malformed("the value's blob is not UTF-8 text") from None


def failure(
    url: str, busy_timeout: float, exc: sqlite3.Error, run_id: str | None, node_id: str | None
) -> Exception:
    """Translate an sqlite3 error at the edge, naming the file and what to do."""
    name = error_name(exc)
    where = f" (run {run_id!r})" if run_id is not None else ""
    if is_busy(exc):
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


def as_stored(record: RunRecord) -> RunRecord:
    """*record* with its texts as SQLite keeps them (lone surrogates escaped), which is
    what its integrity checks must cover."""
    inputs = storable_json(record.inputs) or ""
    result = storable_json(record.result)
    error = storable_text(record.error)
    traceback = storable_text(record.traceback)
    if (inputs, result, error, traceback) == (
        record.inputs,
        record.result,
        record.error,
        record.traceback,
    ):
        return record
    return attrs.evolve(record, inputs=inputs, result=result, error=error, traceback=traceback)
