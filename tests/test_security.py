"""Untrusted data: what an attacker with write access to a store or a queue can and cannot
do (docs/security.md), tried as one would, on SQLite, Redis and NATS with real servers.

- Nothing read from a queue imports code: a task naming a module is refused without
  importing it (a canary module that an import would run stays silent), dead-lettered.
- Tampering is detected: records and messages carry an integrity check bound to their run
  and node (a digest; an HMAC with a signing key).
- A completion that disagrees with the journal is refused.
- Secret values never reach a stored or emitted error.
- Values the codec cannot carry are CodecErrors, never retried.
- Ended runs can be pruned; the SQLite WAL does not stay large.

The command line's part (no credential printed, no import by `runs`, `resume --import`,
`runs prune`, bad input) is in tests/test_security_cli.py.
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
import security_steps as ss

import flowdsl as fd
from flowdsl import _codec
from flowdsl import events as ev
from flowdsl._integrity import Seal
from flowdsl._records import NodeRecord, RunRecord, RunStatus
from flowdsl.backends.messages import Completion, TaskMessage, encode_completion, encode_task
from flowdsl.backends.sqlite.schema import SCHEMA_VERSION
from flowdsl.backends.sqlite.store import SQLiteStore

from _servers import NatsServer, RedisServer

pytestmark = pytest.mark.anyio

# The Redis and NATS clients run on asyncio only.
ASYNCIO_ONLY = pytest.mark.parametrize("anyio_backend", ["asyncio"])

KEY = fd.Secret("SECURITY_SIGNING_KEY", "k" * 32)
OTHER_KEY = fd.Secret("SECURITY_OTHER_KEY", "o" * 32)


@pytest.fixture(autouse=True)
def _fresh_calls() -> None:
    ss.CALLS.clear()
    ss.GATE.clear()


def raw(path: Path, *statements: str) -> list[Any]:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        out: list[Any] = []
        for sql in statements:
            out = db.execute(sql).fetchall()
        return out
    finally:
        db.close()


def write(path: Path, sql: str, *params: object) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute(sql, params)
    finally:
        db.close()


def wal_size(path: Path) -> int:
    return Path(f"{path}-wal").stat().st_size


async def finished_pair(url: str, run_id: str = "p", **options: Any) -> None:
    async with fd.Context(store=url, **options) as ctx:
        assert await ctx.run(ss.pair, 7, run_id=run_id) == 35


async def resumed(url: str, run_id: str = "p", **options: Any) -> Any:
    """Resume an ended run after its result was lost (as a resume after a failure would):
    every node's journaled result is read back and believed, or refused."""
    async with fd.Context(store=url, **options) as ctx:
        await ctx.store.update_run(run_id, status=RunStatus.FAILED, error="lost")
        return await ctx.resume(run_id)


# --- code is loaded only from what the operator names --------------------------------------

CANARY_MODULE = """
from pathlib import Path

Path({canary!r}).write_text("imported")

import flowdsl as fd


@fd.step
async def work(x: int) -> int:
    Path({canary!r}).write_text("ran")
    return x
"""


async def test_a_forged_task_naming_a_module_is_refused_without_importing_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    canary = tmp_path / "canary.txt"
    (tmp_path / "fd_canary_module.py").write_text(CANARY_MODULE.format(canary=str(canary)))
    monkeypatch.syspath_prepend(str(tmp_path))  # an import would succeed: none may happen
    url = f"sqlite:///{tmp_path}/q.db"
    forged = TaskMessage(
        run_id="forged",
        node_id="work",
        flow="anything",
        step="fd_canary_module:work",
        kind="step",
        labels=(),
        args=(1,),
        kwargs={},
        marker="x/y",
        observed=False,
    )
    async with fd.Context(batch=True, store=url, workers=1) as ctx:
        await ctx.queue.enqueue([("forged", "work", encode_task(forged, ctx.seal))])
        with anyio.fail_after(10):
            while not (dead := await ctx.queue.dead_letters("forged")):  # noqa: ASYNC110
                await anyio.sleep(0.01)
        # The worker goes on serving real runs.
        assert await ctx.run(ss.pair, 2) == 10
    assert not canary.exists()
    assert "fd_canary_module" not in sys.modules
    [letter] = dead
    assert letter["node_id"] == "work"
    assert "'fd_canary_module:work', which this worker does not know" in letter["reason"]
    assert "refused without importing anything" in letter["reason"]
    assert "--import MODULE" in letter["reason"]


async def test_a_forged_task_for_a_registered_step_is_refused_under_a_signing_key(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/q.db"
    task = TaskMessage(
        run_id="forged",
        node_id="triple",
        flow="pair",
        step=ss.triple.ref,
        kind="step",
        labels=(),
        args=(1000,),
        kwargs={},
        marker="x/y",
        observed=False,
    )
    forgeries = {
        "unsigned": encode_task(task),
        "signed with another key": encode_task(task, Seal(b"o" * 32)),
        # A real signature over other arguments: the arguments were edited after signing.
        "arguments edited": encode_task(attrs.evolve(task, args=(1,)), Seal(b"k" * 32)).replace(
            "[1]", "[1000]"
        ),
    }
    async with fd.Context(batch=True, store=url, workers=1, signing_key=KEY) as ctx:
        for i, payload in enumerate(forgeries.values()):
            await ctx.queue.enqueue([(f"forged{i}", "triple", payload)])
        with anyio.fail_after(10):
            for i in range(len(forgeries)):
                while not await ctx.queue.dead_letters(f"forged{i}"):  # noqa: ASYNC110
                    await anyio.sleep(0.01)
        assert "triple" not in ss.CALLS
        reasons = [(await ctx.queue.dead_letters(f"forged{i}"))[0]["reason"] for i in range(3)]
        # Signed tasks of the clients still run.
        assert await ctx.run(ss.pair, 2) == 10
    assert "it is not signed" in reasons[0]
    assert "signed with a key this process does not know" in reasons[1]
    assert "does not match its signature" in reasons[2]


async def test_a_forged_completion_in_the_sqlite_queue_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/q.db"
    ss.GATE["double"] = anyio.Event()
    async with fd.Context(batch=True, store=url, workers=1) as ctx:
        run = await ctx.start(ss.pair, 7, run_id="c")
        with anyio.fail_after(10):
            while ss.CALLS.get("double") != 1:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        # While the step runs, a well-formed completion (its check right, for no key is
        # needed to make a digest) says it finished with another result.
        record = NodeRecord("double", "666", 1, 1.0, 2.0, "x")
        forged = encode_completion(Completion("c", "double", True, record))
        db = sqlite3.connect(tmp_path / "q.db", isolation_level=None)
        db.execute(
            "INSERT INTO fd_completions (run_id, node_id, payload) VALUES (?, ?, ?)",
            ("c", "double", forged),
        )
        db.close()
        await anyio.sleep(0.2)  # the listener reads it and refuses it: the journal has none
        assert not run.status.ended
        ss.GATE["double"].set()
        assert await run.result() == 35


async def test_a_completion_that_disagrees_with_the_journal_fails_the_node(
    tmp_path: Path,
) -> None:
    from flowdsl._executors.batch import BatchExecutor
    from flowdsl._executors.batch.client import _Waiter

    store = SQLiteStore(tmp_path / "j.db")
    await store.open()
    try:
        await store.create_run(
            RunRecord("r", "pair", ss.pair.ref, "f", "{}", RunStatus.RUNNING, 1.0, 1.0)
        )
        await store.commit_node("r", NodeRecord("double", "14", 1, 1.0, 2.0, "x"))
        executor = BatchExecutor(broker=None, store=store)  # type: ignore[arg-type]
        waiters = [(_Waiter(anyio.Event()), Completion("r", "double", True, None)) for _ in "ab"]
        agreeing = NodeRecord("double", "14", 1, 1.0, 2.0, "x")
        lying = NodeRecord("double", "15", 1, 1.0, 2.0, "x")
        checked = await executor._agreeing(
            [
                (waiters[0][0], attrs.evolve(waiters[0][1], record=agreeing)),
                (waiters[1][0], attrs.evolve(waiters[1][1], record=lying)),
            ]
        )
    finally:
        await store.close()
    assert checked[0][1].ok
    assert checked[0][1].record == agreeing
    assert not checked[1][1].ok
    assert checked[1][1].error_kind == "checkpoint"
    assert "disagrees with the journal" in (checked[1][1].error or "")


async def test_a_resume_without_its_flow_never_imports_the_module_a_record_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    canary = tmp_path / "canary.txt"
    (tmp_path / "fd_canary_flow.py").write_text(CANARY_MODULE.format(canary=str(canary)))
    monkeypatch.syspath_prepend(str(tmp_path))
    url = f"sqlite:///{tmp_path}/r.db"
    await finished_pair(url, "r")
    # Edited through the store's own API, so its integrity check holds: only an import
    # could make it do harm.
    raw(tmp_path / "r.db", "UPDATE runs SET flow_ref = 'fd_canary_flow:work', integrity = NULL")
    async with fd.Context(store=url) as ctx:
        await ctx.store.update_run("r", status=RunStatus.FAILED, error="x")
        with pytest.raises(fd.ConfigError, match=r"is not imported in this process") as info:
            await ctx.resume("r")
    assert "--import MODULE" in str(info.value)
    assert not canary.exists()
    assert "fd_canary_flow" not in sys.modules


# --- tampering with records ------------------------------------------------------------------


async def test_swapped_node_results_in_sqlite_are_a_checkpoint_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    await finished_pair(url)
    db = tmp_path / "s.db"
    [(a,)] = raw(db, "SELECT value FROM nodes WHERE node_id = 'double'")
    [(b,)] = raw(db, "SELECT value FROM nodes WHERE node_id = 'triple'")
    write(db, "UPDATE nodes SET value = ? WHERE node_id = 'double'", b)
    write(db, "UPDATE nodes SET value = ? WHERE node_id = 'triple'", a)
    with pytest.raises(fd.CheckpointError, match=r"run 'p' .* corrupted") as info:
        await resumed(url)
    assert info.value.node in ("double", "triple")
    assert "does not match its integrity check" in str(info.value)


async def test_a_shortened_number_in_sqlite_is_a_checkpoint_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    await finished_pair(url)
    raw(tmp_path / "s.db", "UPDATE nodes SET value = '2' WHERE node_id = 'triple'")  # was 21
    with pytest.raises(fd.CheckpointError, match=r"run 'p' .* corrupted") as info:
        await resumed(url)
    assert info.value.node == "triple"


async def test_a_result_moved_to_another_run_is_a_checkpoint_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    await finished_pair(url, "one")
    async with fd.Context(store=url) as ctx:
        assert await ctx.run(ss.pair, 1, run_id="two") == 5
    db = tmp_path / "s.db"
    raw(
        db,
        "DELETE FROM nodes WHERE run_id = 'two' AND node_id = 'double'",
        "INSERT INTO nodes SELECT 'two', node_id, value, blob, attempts, started_at, "
        "finished_at, code, usage, integrity FROM nodes WHERE run_id = 'one' "
        "AND node_id = 'double'",
    )
    with pytest.raises(fd.CheckpointError, match=r"run 'two' .* corrupted") as info:
        await resumed(url, "two")
    assert info.value.node == "double"


async def test_an_edited_run_state_in_sqlite_is_a_checkpoint_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    await finished_pair(url)
    raw(tmp_path / "s.db", "UPDATE runs SET result = '36'")
    async with fd.Context(store=url) as ctx:
        with pytest.raises(fd.CheckpointError, match=r"run 'p' .* the run record: its content"):
            await ctx.resume("p")


async def test_an_edited_traceback_in_sqlite_is_a_checkpoint_error(tmp_path: Path) -> None:
    fd.Secret("SECURITY_TEST_KEY", "sk-live-0123456789abcdef")
    url = f"sqlite:///{tmp_path}/t.db"
    async with fd.Context(store=url, signing_key=KEY) as ctx:
        with pytest.raises(fd.StepFailed):
            await ctx.run(ss.leaky, 1, run_id="t")
        record = await ctx.store.get_run("t")
        assert record is not None
        assert record.traceback is not None
    raw(tmp_path / "t.db", "UPDATE runs SET traceback = 'all is well'")
    async with fd.Context(store=url, signing_key=KEY) as ctx:
        with pytest.raises(fd.CheckpointError, match=r"run 't' .* the run record: its content"):
            await ctx.store.get_run("t")


def test_a_run_state_signed_before_tracebacks_were_kept_still_verifies() -> None:
    seal = Seal(b"k" * 32)
    record = RunRecord("r", "f", "m:f", "x", "{}", RunStatus.FAILED, 1.0, 2.0, error="e")
    older = seal.make("state", "r", "failed", None, "e", None)  # the check's old parts
    seal.verify_run_state(record, older)
    assert seal.run_state_of(record) == older
    with pytest.raises(Exception, match="does not match"):
        seal.verify_run_state(attrs.evolve(record, traceback="tb"), older)


@ASYNCIO_ONLY
async def test_swapped_and_shortened_results_on_redis_are_a_checkpoint_error(
    redis_server: RedisServer,
) -> None:
    import redis.asyncio

    url = f"{redis_server.url}?prefix=sec"
    await finished_pair(url)
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        a = await client.hget("sec:nodes:p", "double")
        b = await client.hget("sec:nodes:p", "triple")
        await client.hset("sec:nodes:p", mapping={"double": b, "triple": a})
        with pytest.raises(fd.CheckpointError, match=r"run 'p' .* corrupted"):
            await resumed(url)
        await client.hset("sec:nodes:p", mapping={"double": a, "triple": b})
        assert await resumed(url) == 35
        await client.hset("sec:nodes:p", "triple", b.replace(b'"value":"21"', b'"value":"2"'))
        with pytest.raises(fd.CheckpointError, match=r"run 'p' .* corrupted") as info:
            await resumed(url)
        assert info.value.node == "triple"
    finally:
        await client.aclose()


@ASYNCIO_ONLY
async def test_edited_inline_text_on_nats_is_a_checkpoint_error(nats_server: NatsServer) -> None:
    from flowdsl.backends.nats.keys import node_key

    url = nats_server.url + "?prefix=sec"
    async with fd.Context(store=url) as ctx:
        assert await ctx.run(ss.loud, "hello", run_id="t") == "HELLO!"
        kv = ctx.store._bucket.kv  # type: ignore[attr-defined]
        entry = await kv.get(node_key("t", "shout"))
        await kv.put(node_key("t", "shout"), entry.value.replace(b"HELLO!", b"GOODBYE!"))
        await ctx.store.update_run("t", status=RunStatus.FAILED, error="lost")
        with pytest.raises(fd.CheckpointError, match=r"run 't' .* corrupted") as info:
            await ctx.resume("t")
    assert info.value.node == "shout"
    assert "does not match its integrity check" in str(info.value)


# --- signing keys ----------------------------------------------------------------------------


async def test_signed_records_need_the_key_and_survive_a_rotation(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/k.db"
    await finished_pair(url, signing_key=KEY)
    [(check,)] = raw(tmp_path / "k.db", "SELECT integrity FROM nodes WHERE node_id = 'double'")
    assert check.startswith("hs:")
    # Without the key, or with another, nothing is believed.
    with pytest.raises(fd.CheckpointError, match=r"this process has no signing key"):
        await resumed(url)
    with pytest.raises(fd.CheckpointError, match=r"signed with a key this process does not"):
        await resumed(url, signing_key=OTHER_KEY)
    # Rotation: the new key signs, the old one still verifies what it signed.
    assert await resumed(url, signing_key=OTHER_KEY, old_signing_keys=[KEY]) == 35


async def test_a_tamperer_without_the_key_cannot_pass_a_digest_for_a_signature(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/k.db"
    await finished_pair(url, signing_key=KEY)
    db = tmp_path / "k.db"
    # What an attacker can compute: the unkeyed digest of an edited record, or no check.
    forged = Seal().node("p", NodeRecord("triple", "2", 1, 0.0, 0.0, ""))
    write(db, "UPDATE nodes SET value = '2', integrity = ? WHERE node_id = 'triple'", forged)
    with pytest.raises(fd.CheckpointError, match=r"is not signed"):
        await resumed(url, signing_key=KEY)
    raw(db, "UPDATE nodes SET integrity = NULL WHERE node_id = 'triple'")
    with pytest.raises(fd.CheckpointError, match=r"carries no signature"):
        await resumed(url, signing_key=KEY)


async def test_records_without_a_check_are_accepted_only_without_a_key(tmp_path: Path) -> None:
    """Records an older flowdsl wrote (schema 1, no checks): read as they are without a
    key, refused with one (docs/security.md: migrating)."""
    url = f"sqlite:///{tmp_path}/old.db"
    await finished_pair(url)
    raw(
        tmp_path / "old.db",
        "UPDATE nodes SET integrity = NULL",
        "UPDATE runs SET integrity = NULL, state_integrity = NULL",
    )
    async with fd.Context(store=url) as ctx:
        assert await ctx.run(ss.pair, 7, run_id="p") == 35
    with pytest.raises(fd.CheckpointError, match=r"carries no signature"):
        async with fd.Context(store=url, signing_key=KEY) as ctx:
            await ctx.run(ss.pair, 7, run_id="p")


async def test_a_schema_1_file_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    await finished_pair(f"sqlite:///{path}")
    # Take the file back to schema 1: no integrity columns.
    raw(
        path,
        *(
            f"ALTER TABLE {table} DROP COLUMN {column}"
            for table, column in (
                ("runs", "integrity"),
                ("runs", "state_integrity"),
                ("nodes", "integrity"),
                ("cache", "integrity"),
                ("runs", "traceback"),
            )
        ),
        "PRAGMA user_version = 1",
    )
    assert await resumed(f"sqlite:///{path}") == 35
    assert raw(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


async def test_batch_mode_signs_tasks_and_completions(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/b.db"
    async with fd.Context(batch=True, store=url, workers=2, signing_key=KEY) as ctx:
        assert await ctx.map(ss.pair, [1, 2, 3]) == [5, 10, 15]
    [(check,)] = raw(tmp_path / "b.db", "SELECT integrity FROM nodes LIMIT 1")
    assert check.startswith("hs:")


def test_a_short_signing_key_is_refused() -> None:
    with pytest.raises(fd.ConfigError, match=r"too short"):
        fd.Context(signing_key=fd.Secret("SHORT_KEY", "abc"))
    with pytest.raises(fd.ConfigError, match=r"old_signing_keys= without signing_key="):
        fd.Context(old_signing_keys=[KEY])


# --- secrets in errors -----------------------------------------------------------------------


async def test_a_secret_in_an_error_is_masked_everywhere(tmp_path: Path) -> None:
    value = "sk-live-0123456789abcdef"
    fd.Secret("SECURITY_TEST_KEY", value)
    url = f"sqlite:///{tmp_path}/e.db"
    events: list[Any] = []
    async with fd.Context(store=url, on_event=events.append) as ctx:
        with pytest.raises(fd.StepFailed) as info:
            await ctx.run(ss.leaky, 1, run_id="e")
        stored = await ctx.store.get_run("e")
    import traceback

    shown = "".join(traceback.format_exception(info.value))
    assert "***" in str(info.value)
    texts = [str(info.value), str(info.value.__cause__), shown, stored.error or ""]
    texts.append(stored.traceback or "")
    assert "in leaks" in texts[-1]
    assert "***" in texts[-1]
    texts += [e.error for e in events if isinstance(e, ev.StepFailed | ev.StepRetrying)]
    assert all(value not in text for text in texts), texts


@pytest.mark.parametrize("batch", [False, True], ids=["realtime", "batch"])
async def test_a_url_password_in_a_steps_error_never_reaches_the_journal(
    tmp_path: Path, batch: bool
) -> None:
    url = f"sqlite:///{tmp_path}/u.db"
    async with fd.Context(store=url, batch=batch, workers=1 if batch else None) as ctx:
        with pytest.raises(fd.StepFailed) as info:
            await ctx.run(ss.connecting, 7, run_id="u")
        stored = await ctx.store.get_run("u")
    assert stored is not None
    assert stored.error is not None
    assert "redis://app:***@10.0.0.1" in stored.error
    for text in (str(info.value), stored.error, stored.traceback or ""):
        assert "hunter2" not in text, text


# --- values the codec cannot carry -----------------------------------------------------------


@pytest.mark.parametrize(
    ("flow", "step", "problem"),
    [
        (ss.too_big, "huge", "an integer of more than 4300 digits"),
        (ss.recursive, "loop", "contains itself"),
    ],
)
async def test_a_value_the_codec_cannot_carry_is_never_retried(
    flow: Any, step: str, problem: str
) -> None:
    with pytest.raises(fd.CodecError, match=problem):
        await fd.Context().run(flow, 1)
    assert ss.CALLS[step] == 1


# --- retention -------------------------------------------------------------------------------


async def _old_and_new(store: Any) -> None:
    old = RunRecord("old", "f", "m:f", "x", "{}", RunStatus.FINISHED, 1000.0, 1000.0, "1")
    await store.create_run(old)
    await store.commit_node("old", NodeRecord("n", "1", 1, 1.0, 2.0, "c"))
    new = RunRecord("new", "f", "m:f", "x", "{}", RunStatus.RUNNING, 2000.0, 2000.0)
    await store.create_run(new)
    # A run ending is when the store deletes the runs past its ttl.
    await store.update_run("new", status=RunStatus.FINISHED, result="2")


@ASYNCIO_ONLY
async def test_a_redis_store_with_a_ttl_deletes_runs_ended_long_ago(
    redis_server: RedisServer,
) -> None:
    from flowdsl.backends.redis.store import RedisStore

    store = RedisStore(f"{redis_server.url}?prefix=ttl&ttl=1h")
    assert store.ttl == 3600
    await store.open()
    try:
        await _old_and_new(store)
        assert await store.get_run("old") is None
        assert await store.load_nodes("old") == {}
        assert (await store.get_run("new")) is not None
    finally:
        await store.close()


@ASYNCIO_ONLY
async def test_a_nats_store_with_a_ttl_deletes_runs_ended_long_ago(
    nats_server: NatsServer,
) -> None:
    from flowdsl.backends.nats.store import NATSStore

    store = NATSStore(f"{nats_server.url}?prefix=ttl&ttl=1h")
    assert store.ttl == 3600
    await store.open()
    try:
        await _old_and_new(store)
        assert await store.get_run("old") is None
        assert await store.load_nodes("old") == {}
        assert (await store.get_run("new")) is not None
    finally:
        await store.close()


async def test_the_sqlite_wal_does_not_stay_large_after_a_big_batch(tmp_path: Path) -> None:
    path = tmp_path / "w.db"
    store = SQLiteStore(path)
    await store.open()
    reader = sqlite3.connect(path, isolation_level=None)
    try:
        await store.create_run(RunRecord("r", "f", "m:f", "x", "{}", RunStatus.RUNNING, 1.0, 1.0))
        # A reader's open snapshot keeps checkpoints from resetting the WAL, which then
        # grows with every commit (as it does while workers read during a batch).
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM nodes").fetchall()
        value = _codec.dumps("x" * 1000)
        for i in range(3000):
            store.commit_node_nowait("r", NodeRecord(f"n{i}", value, 1, 1.0, 2.0, "c"))
        assert wal_size(path) > 8 * 1024 * 1024
        reader.execute("COMMIT")
        await store.close()  # another connection (the reader) is still open
        assert wal_size(path) < 1024 * 1024
    finally:
        reader.close()
