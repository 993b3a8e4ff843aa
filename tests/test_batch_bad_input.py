"""Bad input in batch mode: what flowdsl did not write fails one run, never the others.

The queue and the journal live in an SQLite file anyone can write to.  A task message,
a completion or a journal row written by hand (garbage, JSON of the wrong shape, a step
that does not exist) fails the run it belongs to with :class:`fd.CheckpointError` (or
:class:`fd.ConfigError` when the step cannot be imported), and the runs beside it finish.
A step that a worker process cannot import (defined in a function, or in ``__main__``)
fails its run at once with a :class:`fd.ConfigError` that says what to do, not a hang.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import flowdsl as fd
from flowdsl._executors.batch import Worker
from flowdsl._records import NodeRecord

import batch_steps as bs
from _worker_proc import Procs

pytestmark = pytest.mark.anyio

GOOD = (11, 12, 13)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "q.db"


@pytest.fixture
def url(db_path: Path) -> str:
    return f"sqlite:///{db_path}"


@pytest.fixture
def procs(tmp_path: Path, url: str) -> Iterator[Procs]:
    procs = Procs(tmp_path, url)
    yield procs
    procs.close()


def write(db_path: Path, sql: str, *params: Any) -> None:
    """Write to the queue file behind flowdsl's back, as another program would."""
    with contextlib.closing(sqlite3.connect(db_path)) as db, db:
        db.execute(sql, params)


def task_payload(**changes: Any) -> str:
    """The task message flowdsl writes for node ``work`` of run ``bad`` of ``diamond``,
    with *changes* (a value of ``...`` drops the key)."""
    data: dict[str, Any] = {
        "run_id": "bad",
        "node_id": "work",
        "flow": "diamond",
        "step": "batch_steps:work",
        "kind": "step",
        "labels": [],
        "args": ["a", 1, 0.0],
        "kwargs": {},
        "marker": "m",
        "observed": False,
        "v": 1,
    }
    for key, value in changes.items():
        if value is ...:
            del data[key]
        else:
            data[key] = value
    return json.dumps(data)


async def start_good(ctx: fd.Context) -> list[fd.Run]:
    return [await ctx.start(bs.diamond, x, 0.0, run_id=f"good-{x}") for x in GOOD]


async def check_good(ctx: fd.Context, runs: list[fd.Run]) -> None:
    assert [await run.result() for run in runs] == [bs.expected_diamond(x)[0] for x in GOOD]
    for x in GOOD:
        record = await ctx.store.get_run(f"good-{x}")
        assert record is not None
        assert record.status is fd.RunStatus.FINISHED


async def fails_alone(url: str, db_path: Path, payload: str) -> BaseException:
    """Plant *payload* as the task of node ``work`` of run ``bad``, start that run beside
    three good ones; return how the bad run failed (the good ones must finish)."""
    with anyio.fail_after(15):
        async with fd.Context(batch=True, store=url, workers=2) as ctx:
            # Planted first: the scheduler's own task for the node is then not added twice.
            write(
                db_path,
                "INSERT INTO fd_tasks (run_id, node_id, payload) VALUES (?, ?, ?)",
                "bad",
                "work",
                payload,
            )
            good = await start_good(ctx)
            bad = await ctx.start(bs.diamond, 1, 0.0, run_id="bad")
            await check_good(ctx, good)
            with pytest.raises(fd.StepFailed) as info:
                await bad.result()
            record = await ctx.store.get_run("bad")
    assert record is not None
    assert record.status is fd.RunStatus.FAILED
    assert record.failed_node == "work"
    assert info.value.node_id == "work"
    assert info.value.run_id == "bad"
    return info.value


def assert_names_its_node_once(error: BaseException) -> None:
    # The worker's words travel without the prefix, which the scheduler's side adds.
    assert str(error).startswith("flow 'diamond', node 'work': ")
    assert str(error).count("node 'work'") == 1


# --- task messages --------------------------------------------------------------------------

CHECKPOINT_CASES = {
    # Unreadable: the worker knows the run and node from the queue's row, not the payload.
    "not JSON": "\x00garbage{",
    "a JSON list": "[1, 2]",
    "an object without ids": json.dumps({"hello": "world"}),
    "args not a list": task_payload(args="a, 1, 0.0"),
    "no step": task_payload(step=...),
    "unknown key": task_payload(priority=9),
    "a step called a branch": task_payload(kind="branch", labels=["x"]),
    "an argument of the wrong type": task_payload(args=["a", {"not": "an int"}, 0.0]),
    "a later protocol": task_payload(v=2),
}


@pytest.mark.parametrize("payload", CHECKPOINT_CASES.values(), ids=CHECKPOINT_CASES.keys())
async def test_a_malformed_task_fails_its_run_with_checkpoint_error(
    url: str, db_path: Path, payload: str
) -> None:
    error = await fails_alone(url, db_path, payload)
    assert isinstance(error, fd.CheckpointError)
    assert_names_its_node_once(error)


# A worker runs only the steps registered in its process: whatever else a task names is
# refused without importing anything (tests/test_security.py checks that nothing is).
_UNKNOWN = r"which this worker does not know; it was refused without importing anything"
CONFIG_CASES = {
    "no such module": (task_payload(step="no_such_module_xyz:work"), _UNKNOWN),
    "no such step": (task_payload(step="batch_steps:no_such_step"), _UNKNOWN),
    "not a step": (task_payload(step="batch_steps:mix"), _UNKNOWN),
}


@pytest.mark.parametrize(("payload", "match"), CONFIG_CASES.values(), ids=CONFIG_CASES.keys())
async def test_a_task_naming_an_unknown_step_fails_its_run_with_config_error(
    url: str, db_path: Path, payload: str, match: str
) -> None:
    error = await fails_alone(url, db_path, payload)
    assert isinstance(error, fd.ConfigError)
    assert_names_its_node_once(error)
    assert re.search(match, str(error))


# --- completions and journal rows -----------------------------------------------------------


async def queued(ctx: fd.Context, run_id: str, node_id: str) -> None:
    """Wait until the scheduler put the node's task on the queue (so it waits for its
    completion)."""
    db = ctx.queue._db()
    sql = "SELECT 1 FROM fd_tasks WHERE run_id = ? AND node_id = ?"
    with anyio.fail_after(10):
        # The scheduler enqueues in the run's own task; the queue has no notification.
        while not db.execute(sql, (run_id, node_id)).fetchall():  # noqa: ASYNC110
            await anyio.sleep(0.005)


async def test_an_unreadable_completion_is_dropped_and_the_run_goes_on(
    url: str, db_path: Path
) -> None:
    with anyio.fail_after(15):
        async with fd.Context(batch=True, store=url, workers=0) as ctx:
            run = await ctx.start(bs.diamond, 2, 0.0, run_id="r")
            await queued(ctx, "r", "work")
            no_ok = json.dumps({"run_id": "r", "node_id": "work"})
            for payload in ("garbage{", no_ok, "[]"):
                write(
                    db_path,
                    "INSERT INTO fd_completions (run_id, node_id, payload) VALUES (?, ?, ?)",
                    "r",
                    "work",
                    payload,
                )
            async with anyio.create_task_group() as tg:
                await tg.start(Worker(ctx.queue, ctx.store, local=True).run)
                assert await run.result() == bs.expected_diamond(2)[0]
                tg.cancel_scope.cancel()


async def test_a_completion_that_says_ok_without_a_record_is_a_checkpoint_error(
    url: str, db_path: Path
) -> None:
    with anyio.fail_after(15):
        async with fd.Context(batch=True, store=url, workers=0) as ctx:
            run = await ctx.start(bs.diamond, 2, 0.0, run_id="r")
            await queued(ctx, "r", "work")
            forged = json.dumps({"run_id": "r", "node_id": "work", "ok": True})
            write(
                db_path,
                "INSERT INTO fd_completions (run_id, node_id, payload) VALUES (?, ?, ?)",
                "r",
                "work",
                forged,
            )
            with pytest.raises(fd.CheckpointError):
                await run.result()


async def test_a_journaled_result_of_the_wrong_type_fails_its_run_with_checkpoint_error(
    url: str,
) -> None:
    """The node's row is already in the journal when the worker commits: the worker's
    result is discarded and the stored one travels back, where it does not decode."""
    with anyio.fail_after(15):
        async with fd.Context(batch=True, store=url, workers=2) as ctx:
            now = time.time()
            await ctx.store.commit_node("bad", NodeRecord("work", '"not an int"', 1, now, now))
            good = await start_good(ctx)
            bad = await ctx.start(bs.diamond, 1, 0.0, run_id="bad")
            await check_good(ctx, good)
            with pytest.raises(fd.CheckpointError, match=r"node 'work'.*cannot be read"):
                await bad.result()


async def test_a_corrupted_journal_row_fails_its_run_and_not_the_worker(
    url: str, db_path: Path
) -> None:
    with anyio.fail_after(15):
        async with fd.Context(batch=True, store=url, workers=0) as ctx:
            # A row the store refuses to read: its value is not JSON.
            write(
                db_path,
                "INSERT INTO nodes (run_id, node_id, value, attempts, started_at, "
                "finished_at, code) VALUES ('bad', 'work', 'not json{', 1, 0, 0, '')",
            )
            good = await start_good(ctx)
            bad = await ctx.start(bs.diamond, 1, 0.0, run_id="bad")
            worker = Worker(ctx.queue, ctx.store, local=True)
            async with anyio.create_task_group() as tg:
                await tg.start(worker.run)
                with anyio.fail_after(5):
                    await check_good(ctx, good)
                    with pytest.raises(fd.CheckpointError, match=r"corrupted"):
                        await bad.result()
                tg.cancel_scope.cancel()


# --- steps a worker process cannot import ---------------------------------------------------


async def test_a_step_defined_in_a_function_fails_on_a_worker_process(
    url: str, procs: Procs
) -> None:
    @fd.step
    async def local_shout(s: str) -> str:
        return s.upper()

    @fd.flow
    async def local_flow(s: str) -> str:
        return await local_shout(s)

    procs.serve()
    with anyio.fail_after(30):
        async with fd.Context(batch=True, store=url, workers=0) as ctx:
            run = await ctx.start(local_flow, "hi", run_id="local")
            good = await ctx.start(bs.diamond, 4, 0.0, run_id="good")
            with pytest.raises(fd.ConfigError) as info:
                await run.result()
            assert await good.result() == bs.expected_diamond(4)[0]
    error = info.value
    assert isinstance(error, fd.StepFailed)
    assert error.node_id == "local_shout"
    message = str(error)
    assert message.startswith("flow 'local_flow', node 'local_shout': ")
    assert (
        "step 'test_batch_bad_input:test_a_step_defined_in_a_function_fails_on_a_worker_process"
        ".<locals>.local_shout' is defined inside a function, which a worker process "
        "cannot import" in message
    )
    assert "in-process workers: fd.Context(batch=True, workers=N)" in message


MAIN_SCRIPT = """
    import json
    import sys

    import anyio

    import flowdsl as fd


    @fd.step
    async def shout(s: str) -> str:
        return s.upper()


    @fd.flow
    async def loud(s: str) -> str:
        return await shout(s)


    async def main(url: str) -> None:
        async with fd.Context(batch=True, store=url, workers=0) as ctx:
            with anyio.fail_after(20):
                try:
                    await ctx.run(loud, "hi")
                except fd.FlowError as exc:
                    kinds = [cls.__name__ for cls in type(exc).__mro__]
                    print(json.dumps({"kinds": kinds, "message": str(exc)}))


    anyio.run(main, sys.argv[1])
"""


async def test_a_step_defined_in_main_fails_on_a_worker_process(
    tmp_path: Path, url: str, procs: Procs
) -> None:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(MAIN_SCRIPT))
    procs.serve()
    with anyio.fail_after(40):
        done = await anyio.run_process(
            [sys.executable, str(script), url], cwd=tmp_path, env=procs.env(), check=False
        )
    assert done.returncode == 0, done.stderr.decode()
    report = json.loads(done.stdout)
    assert {"StepFailed", "ConfigError"} <= set(report["kinds"])
    message = report["message"]
    assert message.startswith("flow 'loud', node 'shout': ")
    assert "step '__main__:shout' is defined in __main__" in message
    assert "Move the step into a module" in message
    assert "in-process workers: fd.Context(batch=True, workers=N)" in message
