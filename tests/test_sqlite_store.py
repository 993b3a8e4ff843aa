"""The SQLite store beyond the shared contract: WAL, storage, tampering, processes, SIGKILL."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from _crash_writer import value_of

import flowdsl as fd
from flowdsl import _codec
from flowdsl._records import NodeRecord, RunRecord, RunStatus
from flowdsl.backends import open_store
from flowdsl.backends.sqlite.store import SCHEMA_VERSION, SQLiteStore

WRITER = str(Path(__file__).with_name("_crash_writer.py"))


def run_record(run_id: str = "r1") -> RunRecord:
    return RunRecord(
        run_id,
        "chain",
        "tests:chain",
        "fp",
        '{"x":1}',
        RunStatus.RUNNING,
        10.0,
        10.0,
        code={"small": "c1"},
    )


def node_record(node_id: str, value: str) -> NodeRecord:
    return NodeRecord(node_id, value, 1, 10.0, 11.0, "code", {"tokens": 3})


async def fill(path: Path, records: list[NodeRecord], run_id: str = "r1") -> SQLiteStore:
    """A closed store at *path* holding *records* in one run."""
    store = SQLiteStore(path)
    await store.open()
    await store.create_run(run_record(run_id))
    for record in records:
        assert await store.commit_node(run_id, record)
    await store.close()
    return store


def file_bytes(path: Path) -> int:
    """The store's size on disk, WAL included if one was left behind."""
    wal = Path(f"{path}-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def raw(path: Path, *statements: str) -> None:
    """Run SQL on the file behind the store's back, as an attacker or a bad disk would."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        for statement in statements:
            db.execute(statement)
    finally:
        db.close()


def count_blobs(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("SELECT count(*) FROM blobs").fetchone()[0])
    finally:
        db.close()


# --- modes and durability --------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(("durability", "synchronous"), [("normal", 1), ("full", 2)])
async def test_wal_mode_and_synchronous_level(
    tmp_path: Path, durability: str, synchronous: int
) -> None:
    store = SQLiteStore(tmp_path / "a.db", durability=durability)  # type: ignore[arg-type]
    await store.open()
    try:
        assert store._conn is not None
        assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == synchronous
        await store.create_run(run_record())
        assert await store.commit_node("r1", node_record("n", "1"))
        other = sqlite3.connect(tmp_path / "a.db")
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert other.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        other.close()
    finally:
        await store.close()


@pytest.mark.anyio
async def test_storage_is_at_most_1_5x_the_raw_result_bytes(tmp_path: Path) -> None:
    rng = random.Random(7)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 "
    values = [_codec.dumps("".join(rng.choices(alphabet, k=1022))) for _ in range(1000)]
    assert len(set(values)) == 1000
    assert all(len(v.encode()) == 1024 for v in values)
    path = tmp_path / "chain.db"
    await fill(path, [node_record(f"step_{i}", v) for i, v in enumerate(values)])
    raw_bytes = sum(len(v.encode()) for v in values)
    ratio = file_bytes(path) / raw_bytes
    assert ratio <= 1.5, f"the store takes {ratio:.2f}x the raw result bytes"


@pytest.mark.anyio
async def test_identical_large_values_are_stored_once(tmp_path: Path) -> None:
    value = _codec.dumps("0123456789" * 1024)  # 10 KB
    path = tmp_path / "dedupe.db"
    await fill(path, [node_record(f"step_{i}", value) for i in range(1000)])
    assert count_blobs(path) == 1
    # 1,000 copies would be 10 MB; the rows referring to one copy are ~100 bytes each.
    assert file_bytes(path) < 250_000
    store = SQLiteStore(path)
    await store.open()
    try:
        nodes = await store.load_nodes("r1")
        assert len(nodes) == 1000
        assert {n.value for n in nodes.values()} == {value}
    finally:
        await store.close()


@pytest.mark.anyio
async def test_forgetting_the_last_reference_drops_the_blob(tmp_path: Path) -> None:
    big = _codec.dumps("x" * 5000)
    path = tmp_path / "gc.db"
    store = await fill(path, [node_record("a", big), node_record("b", big)])
    await store.open()
    await store.forget_nodes("r1", ["a"])
    assert count_blobs(path) == 1
    await store.forget_nodes("r1", ["b"])
    assert count_blobs(path) == 0
    await store.close()


# --- untrusted rows --------------------------------------------------------------------------

SMALL = '{"small":true}'
LARGE = _codec.dumps("large " * 200)

NODE_TAMPERING = [
    (
        "UPDATE nodes SET value = 'not json{' WHERE node_id = 'small'",
        "small",
        "the stored value is not valid JSON",
    ),
    (
        "UPDATE nodes SET value = X'7b7d' WHERE node_id = 'small'",
        "small",
        "value is bytes, not text",
    ),
    ("UPDATE blobs SET data = X'2278227d'", "large", r"blob [0-9a-f]{16}\.\.\. does not match"),
    ("DELETE FROM blobs", "large", r"blob [0-9a-f]{16}\.\.\. is missing"),
    (
        "UPDATE nodes SET blob = X'00' WHERE node_id = 'large'",
        "large",
        "the blob reference is not a 32-byte hash",
    ),
    (
        "UPDATE nodes SET value = '1' WHERE node_id = 'large'",
        "large",
        "the row has both an inline value and a blob reference",
    ),
    (
        "UPDATE nodes SET attempts = 'many' WHERE node_id = 'small'",
        "small",
        "attempts is 'many', not a count",
    ),
    (
        "UPDATE nodes SET attempts = -1 WHERE node_id = 'small'",
        "small",
        "attempts is -1, not a count",
    ),
    (
        "UPDATE nodes SET started_at = 'noon' WHERE node_id = 'small'",
        "small",
        "started_at is str, not a timestamp",
    ),
    ("UPDATE nodes SET code = X'00' WHERE node_id = 'small'", "small", "code is bytes, not text"),
    ("UPDATE nodes SET usage = '[1]' WHERE node_id = 'small'", "small", "usage is not a mapping"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("sql", "node", "problem"), NODE_TAMPERING)
async def test_a_tampered_node_row_is_a_checkpoint_error_naming_run_and_node(
    tmp_path: Path, sql: str, node: str, problem: str
) -> None:
    path = tmp_path / "t.db"
    store = await fill(path, [node_record("small", SMALL), node_record("large", LARGE)])
    raw(path, sql)
    await store.open()
    try:
        with pytest.raises(
            fd.CheckpointError,
            match=rf"^node '{node}': run 'r1' in sqlite:///.+ is corrupted: .*{problem}.*"
            r"\. Restore the file from a backup",
        ):
            await store.load_nodes("r1")
    finally:
        await store.close()


RUN_TAMPERING = [
    ("UPDATE runs SET status = 'exploded'", "status 'exploded' is not a known run status"),
    ("UPDATE runs SET inputs = '{'", "the stored inputs is not valid JSON"),
    ("UPDATE runs SET result = 'nope'", "the stored result is not valid JSON"),
    ("UPDATE runs SET code = '{\"a\": 1}'", "code is not a mapping of node ids to code hashes"),
    ("UPDATE runs SET code = '[]'", "code is not a mapping of node ids to code hashes"),
    ("UPDATE runs SET created_at = X'00'", "created_at is bytes, not a timestamp"),
    ("UPDATE runs SET flow = X'00'", "flow is bytes, not text"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("sql", "problem"), RUN_TAMPERING)
async def test_a_tampered_run_row_is_a_checkpoint_error_naming_the_run(
    tmp_path: Path, sql: str, problem: str
) -> None:
    path = tmp_path / "t.db"
    store = await fill(path, [])
    raw(path, sql)
    await store.open()
    try:
        pattern = rf"^run 'r1' in sqlite:///.+ is corrupted: {problem}\. Restore the file"
        with pytest.raises(fd.CheckpointError, match=pattern):
            await store.get_run("r1")
        with pytest.raises(fd.CheckpointError, match=pattern):
            await store.list_runs()
        with pytest.raises(fd.CheckpointError, match=pattern):
            await store.create_run(run_record())
    finally:
        await store.close()


@pytest.mark.anyio
async def test_a_tampered_cache_entry_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    store = SQLiteStore(path)
    await store.open()
    await store.put_cached("key-1", "[1]")
    raw(path, "UPDATE cache SET value = '[1'")
    with pytest.raises(fd.CheckpointError, match=r"^cache entry 'key-1' in sqlite:///.+ corrupt"):
        await store.get_cached("key-1")
    await store.close()


@pytest.mark.anyio
async def test_a_file_from_a_newer_flowdsl_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    await fill(path, [])
    raw(path, f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(
        fd.CheckpointError,
        match=rf"has schema version {SCHEMA_VERSION + 1}, newer than the {SCHEMA_VERSION} "
        r"this flowdsl knows\. Upgrade flowdsl",
    ):
        await SQLiteStore(path).open()


@pytest.mark.anyio
async def test_a_file_of_version_2_gains_the_leases_table_and_keeps_its_runs(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    await fill(path, [node_record("n", "1")])
    raw(
        path,
        "DROP TABLE leases",
        "ALTER TABLE runs DROP COLUMN traceback",
        "PRAGMA user_version = 2",
    )
    store = SQLiteStore(path)
    await store.open()
    try:
        assert await store.get_run("r1") == run_record()
        assert set(await store.load_nodes("r1")) == {"n"}
        assert await store.acquire_lease("r1", "A", 30.0) is None
    finally:
        await store.close()
    other = sqlite3.connect(path)
    assert other.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    other.close()


@pytest.mark.anyio
async def test_a_file_of_version_3_gains_the_traceback_column_and_keeps_its_runs(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    await fill(path, [node_record("n", "1")])
    raw(path, "ALTER TABLE runs DROP COLUMN traceback", "PRAGMA user_version = 3")
    store = SQLiteStore(path)
    await store.open()
    try:
        assert await store.get_run("r1") == run_record()  # traceback None: it had none
        await store.update_run("r1", status=RunStatus.FAILED, error="e", traceback="tb")
        failed = await store.get_run("r1")
        assert failed is not None
        assert failed.traceback == "tb"
    finally:
        await store.close()
    other = sqlite3.connect(path)
    assert other.execute("PRAGMA user_version").fetchone()[0] == 4
    other.close()


@pytest.mark.anyio
async def test_another_programs_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "theirs.db"
    raw(path, "CREATE TABLE accounts (id INTEGER)", "PRAGMA application_id = 1234")
    with pytest.raises(fd.ConfigError, match="another program owns, not a flowdsl store"):
        await SQLiteStore(path).open()


@pytest.mark.anyio
async def test_a_file_that_is_not_a_database_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not an SQLite file" * 100)
    with pytest.raises(fd.CheckpointError, match=r"^the store sqlite:///.+ is corrupted"):
        await SQLiteStore(path).open()


# --- lifetime and misuse ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_parent_directories_are_created_and_open_close_are_idempotent(
    tmp_path: Path,
) -> None:
    path = tmp_path / "a" / "b" / "c" / "runs.db"
    store = SQLiteStore(path)
    await store.close()  # closing a store never opened is fine
    await store.open()
    await store.open()
    await store.create_run(run_record())
    await store.close()
    await store.close()
    assert path.exists()
    await store.open()
    assert await store.get_run("r1") == run_record()
    await store.close()


@pytest.mark.anyio
async def test_using_a_closed_store_says_to_open_it(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "x.db")
    with pytest.raises(fd.ConfigError, match=r"is not open\. Use it inside `async with ctx:`"):
        await store.get_run("r1")


@pytest.mark.anyio
async def test_updating_an_unknown_run_is_a_checkpoint_error(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "x.db")
    await store.open()
    with pytest.raises(fd.CheckpointError, match=r"^run 'ghost' does not exist in sqlite:///"):
        await store.update_run("ghost", status=RunStatus.FAILED)
    await store.close()


def test_bad_options_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(fd.ConfigError, match="unknown durability 'fast'"):
        SQLiteStore(tmp_path / "x.db", durability="fast")  # type: ignore[arg-type]
    with pytest.raises(fd.ConfigError, match="busy_timeout must be a number of seconds"):
        SQLiteStore(tmp_path / "x.db", busy_timeout=-1)


# --- URLs ------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_urls_relative_absolute_and_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    relative = open_store("sqlite:///rel/dir/runs.db")
    assert isinstance(relative, SQLiteStore)
    assert (relative.path, relative.url) == ("rel/dir/runs.db", "sqlite:///rel/dir/runs.db")
    await relative.open()
    await relative.close()
    assert (tmp_path / "rel" / "dir" / "runs.db").exists()

    absolute = open_store(f"sqlite:///{tmp_path}/abs.db?durability=full&busy_timeout=2.5")
    assert isinstance(absolute, SQLiteStore)
    assert absolute.path == f"{tmp_path}/abs.db"
    assert absolute.url == f"sqlite:///{tmp_path}/abs.db"
    assert (absolute.durability, absolute.busy_timeout) == ("full", 2.5)

    memory = open_store("sqlite://:memory:")
    assert isinstance(memory, SQLiteStore)
    await memory.open()
    await memory.create_run(run_record())
    assert await memory.commit_node("r1", node_record("n", LARGE))
    assert (await memory.load_nodes("r1"))["n"].value == LARGE
    await memory.close()


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://runs.db",
        "sqlite:/runs.db",
        "sqlite:///",
        "sqlite://",
        "sqlite:///dir/",
        "sqlite:///runs.db?mode=ro",
        "sqlite:///runs.db?busy_timeout=soon",
        "sqlite:///runs.db?durability=maybe",
        "sqlite:///runs.db?durability",
    ],
)
def test_malformed_urls_name_the_url_and_the_expected_form(url: str) -> None:
    with pytest.raises(fd.ConfigError) as info:
        open_store(url)
    message = str(info.value)
    assert message.startswith(f"malformed SQLite store URL {url!r}")
    assert "sqlite:///relative/path.db, sqlite:////absolute/path.db" in message


# --- several processes, and SIGKILL ----------------------------------------------------------


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, WRITER, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        assert proc.stderr is not None
        pytest.fail(f"the writer exited with {proc.returncode}: {proc.stderr.read()}")
    return line.strip()


def assert_prefix(run_id: str, nodes: dict[str, NodeRecord]) -> int:
    """Check that a journal is ``n0 .. n{m-1}`` with the writer's values; return m."""
    assert set(nodes) == {f"n{i}" for i in range(len(nodes))}, "the journal has a gap"
    for i in range(len(nodes)):
        assert nodes[f"n{i}"].value == value_of(run_id, i)
    return len(nodes)


async def load(path: Path, run_id: str) -> tuple[RunRecord | None, dict[str, NodeRecord]]:
    store = SQLiteStore(path)
    await store.open()
    try:
        return await store.get_run(run_id), await store.load_nodes(run_id)
    finally:
        await store.close()


@pytest.mark.timeout(120)
def test_two_processes_write_one_file_at_once(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"  # does not exist yet: both processes race to create it
    n = 300
    with contextlib.ExitStack() as stack:
        options = (f"--count={n}", "--wait-go", "--shared=both")
        writers = [stack.enter_context(spawn(str(path), name, *options)) for name in ("wa", "wb")]
        for proc in writers:
            assert read_line(proc) == "ready"
        for proc in writers:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in writers:
            out, err = proc.communicate(timeout=100)
            assert proc.returncode == 0, err
            assert out.split() == [str(i) for i in range(n)]

    for name in ("wa", "wb"):
        run, nodes = anyio.run(load, path, name)
        assert run is not None
        assert run.status is RunStatus.FINISHED
        assert assert_prefix(name, nodes) == n
    shared_run, shared = anyio.run(load, path, "both")
    assert shared_run is not None
    assert set(shared) == {f"n{i}" for i in range(n)}
    for i in range(n):
        assert shared[f"n{i}"].value in (value_of("wa", i), value_of("wb", i))


@pytest.mark.timeout(300)
def test_sigkill_at_random_instants_leaves_a_readable_prefix(tmp_path: Path) -> None:
    path = tmp_path / "crash.db"
    rng = random.Random(20261125)
    durable = 0
    for _ in range(5):
        # Each writer first checks the prefix its predecessor left, then carries on from it.
        with spawn(str(path), "chain") as proc:
            target = durable + rng.randint(1, 200)
            last = -1
            while last < target:
                last = int(read_line(proc))
            os.kill(proc.pid, signal.SIGKILL)
        assert proc.returncode == -signal.SIGKILL

        run, nodes = anyio.run(load, path, "chain")
        assert run is not None
        assert run.status is RunStatus.RUNNING
        length = assert_prefix("chain", nodes)  # every row parsed; no gaps; right values
        assert length >= last + 1, "a node reported committed was lost"
        durable = length

    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()


# A process that opens the store or the queue on argv[2] once told "go" on stdin, and says
# "ok" or the error it got.
_OPENER = """
import sys, anyio
from flowdsl.backends.sqlite.broker import SQLiteBroker
from flowdsl.backends.sqlite.store import SQLiteStore

async def main() -> None:
    kind, path = sys.argv[1], sys.argv[2]
    opened = SQLiteBroker(path) if kind == "queue" else SQLiteStore(path)
    print("ready", flush=True)
    sys.stdin.readline()
    try:
        await opened.open()
        await opened.close()
        print("ok", flush=True)
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}", flush=True)

anyio.run(main)
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["store", "queue"])
def test_processes_opening_a_new_file_at_once_all_open_it(tmp_path: Path, kind: str) -> None:
    """Switching a file to WAL while another process creates it fails at once, without
    SQLite's busy handler: opening must wait that out (8 processes, a new file each round;
    the queue failed in about a third of the rounds before it did)."""
    for round_ in range(4):
        path = tmp_path / f"new-{round_}.db"
        with contextlib.ExitStack() as stack:
            procs = [
                stack.enter_context(
                    subprocess.Popen(
                        [sys.executable, "-c", _OPENER, kind, str(path)],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                    )
                )
                for _ in range(8)
            ]
            for proc in procs:
                assert read_line(proc) == "ready"
            for proc in procs:  # as nearly at once as the processes can be told
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            answers = [read_line(proc) for proc in procs]
            for proc in procs:
                proc.communicate(timeout=60)
        assert answers == ["ok"] * 8
