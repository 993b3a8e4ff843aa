"""What a batch worker does to spend less per task, doing the same (issue 20).

- its tasks are reused (``TaskPool``): a job runs in a task that ran one before, in a copy
  of the context of whoever started it, as a new task's would be; a job's exception
  reaches the task group; idle tasks beyond a few end when trimmed;
- a successful task's completion is written field by field: the same text as
  ``encode_completion``, for any record, sealed or signed;
- the SQLite store commits a worker's batch with a statement per kind (``executemany``)
  and still commits each node once, running the statements of first commits only;
- a worker process sets the garbage collector for serving and puts it back after.

Pool tests run on asyncio and trio.
"""

from __future__ import annotations

import contextvars
import gc
from pathlib import Path

import anyio
import anyio.lowlevel
import attrs
import pytest

from flowdsl._executors.batch.collector import YOUNG_THRESHOLD, tuned_collector
from flowdsl._executors.batch.completions import ok_completion
from flowdsl._executors.batch.pool import TaskPool
from flowdsl._integrity import UNKEYED, Seal
from flowdsl._records import NodeRecord
from flowdsl.backends.messages import Completion, decode_completion, encode_completion
from flowdsl.backends.sqlite import SQLiteStore

_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("test_pool_var", default="unset")


@pytest.mark.anyio
async def test_pool_reuses_tasks_and_isolates_contexts() -> None:
    seen: list[tuple[int, str]] = []

    async def job(i: int, done: anyio.Event) -> None:
        seen.append((i, _VAR.get()))
        _VAR.set(f"job {i}")  # must not reach the next job this task runs
        await anyio.lowlevel.checkpoint()
        assert _VAR.get() == f"job {i}"
        done.set()

    async with anyio.create_task_group() as tg:
        pool = TaskPool(tg)
        _VAR.set("starter")
        for i in range(3):
            done = anyio.Event()
            pool.start_soon(job, i, done)
            await done.wait()
            await anyio.wait_all_tasks_blocked()  # the task goes idle
        assert pool.started == 1  # one task served the three jobs, one after another
        assert pool.idle == 1
        tg.cancel_scope.cancel()
    assert seen == [(0, "starter"), (1, "starter"), (2, "starter")]
    assert _VAR.get() == "starter"


@pytest.mark.anyio
async def test_pool_runs_jobs_at_once_and_trims_idle_tasks() -> None:
    gate = anyio.Event()
    running = 0
    peak = 0

    async def job() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await gate.wait()
        running -= 1

    async with anyio.create_task_group() as tg:
        pool = TaskPool(tg)
        for _ in range(20):
            pool.start_soon(job)
        await anyio.wait_all_tasks_blocked()
        assert peak == 20
        assert pool.started == 20
        gate.set()
        await anyio.wait_all_tasks_blocked()
        assert pool.idle == 20
        pool.trim(keep=5)
        await anyio.wait_all_tasks_blocked()
        assert pool.idle == 5
        for _ in range(5):  # the idle ones serve: no new task
            pool.start_soon(job)
        await anyio.wait_all_tasks_blocked()
        assert pool.started == 20
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_pool_job_failure_reaches_the_task_group() -> None:
    async def job() -> None:
        await anyio.lowlevel.checkpoint()
        raise LookupError("boom")

    with pytest.RaisesGroup(LookupError):
        async with anyio.create_task_group() as tg:
            TaskPool(tg).start_soon(job)


@pytest.mark.anyio
async def test_pool_cancellation_reaches_the_job() -> None:
    cancelled = anyio.Event()

    async def job() -> None:
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled.set()
            raise

    async with anyio.create_task_group() as tg:
        TaskPool(tg).start_soon(job)
        await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()
    assert cancelled.is_set()


RECORDS = [
    NodeRecord("leaf[3]", "5", 1, 1733367600.123456, 1733367600.2233, "abc/def"),
    NodeRecord('é"x\u2028', '"ü\\n"', 3, 1e300, 2.5, "c", {"input_tokens": 3, "cost": 0.5}),
    NodeRecord("a", '"\ud800"', 1, 1.0, 2.0, "", None),  # a lone surrogate
    NodeRecord("a", "1", 1, float("nan"), float("inf"), "", {"model": "é"}),
    NodeRecord("a", "[1]", 0, 1, 2, "x"),  # ints where floats go (an old record)
]


@pytest.mark.parametrize("seal", [UNKEYED, Seal(b"k" * 32)], ids=["unkeyed", "signed"])
@pytest.mark.parametrize("record", RECORDS)
def test_completion_text_is_encode_completions(seal: Seal, record: NodeRecord) -> None:
    expected = encode_completion(Completion("run\u00e9", "n[1]", True, record), seal)
    text = ok_completion("run\u00e9", "n[1]", record, seal)
    assert text == expected
    if record.started_at == record.started_at:  # NaN never equals itself
        decoded = attrs.evolve(decode_completion(text, seal), check="")
        assert decoded == Completion("run\u00e9", "n[1]", True, record)


def _done(task_id: int) -> list[tuple[str, tuple[object, ...]]]:
    return [
        ("INSERT INTO t (id) VALUES (?)", (task_id,)),
        ("INSERT INTO t (id) VALUES (?)", (-task_id,)),
    ]


@pytest.mark.anyio
async def test_sqlite_batch_commit_keeps_first_commits(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    await store.open()
    try:
        db = store.connection()
        db.execute("CREATE TABLE t (id INTEGER)")
        big = '"' + "x" * 1000 + '"'  # goes to a blob
        first = [
            ("r", NodeRecord(f"n{i}", big if i == 1 else str(i), 1, 1.0, 2.0), _done(i))
            for i in range(1, 4)
        ]
        assert store.commit_nodes_then(first) == [True, True, True]
        # n2 committed before, n4 twice in one batch: each decided alone, the first kept.
        again = [
            ("r", NodeRecord("n2", "20", 1, 1.0, 2.0), _done(20)),
            ("r", NodeRecord("n4", "4", 1, 1.0, 2.0), _done(4)),
            ("r", NodeRecord("n4", "40", 1, 1.0, 2.0), _done(40)),
        ]
        assert store.commit_nodes_then(again) == [False, True, False]
        rows = sorted(row[0] for row in db.execute("SELECT id FROM t"))
        assert rows == [-4, -3, -2, -1, 1, 2, 3, 4]
        nodes = await store.load_nodes("r")
        assert {k: r.value for k, r in nodes.items()} == {
            "n1": big,
            "n2": "2",
            "n3": "3",
            "n4": "4",
        }
    finally:
        await store.close()


def test_tuned_collector_is_put_back() -> None:
    before = gc.get_threshold()
    with tuned_collector():
        assert gc.get_threshold()[0] == max(before[0], YOUNG_THRESHOLD)
        assert gc.get_freeze_count() > 0
        with tuned_collector():  # a second worker in the process leaves it be
            pass
        assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
