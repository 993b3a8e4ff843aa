"""Batch mode on Redis, in one process: events watched from elsewhere, bad input failing
only its run, dead letters, and a server restart in the middle of a batch.  Against a real
redis-server.  That batch mode gives what real time gives, and that crashed runs resume,
is checked on Redis with every other backend (test_backend_properties.py).

Worker processes, SIGKILL and scale-out are in test_redis_scale.py.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, settings

import flowdsl as fd
from flowdsl import _codec
from flowdsl import events as ev
from flowdsl._executors.batch import StepCheckpointFailed, Worker, decode_event
from flowdsl._records import RunStatus
from flowdsl.backends.redis.broker import RedisBroker

from _servers import RedisServer
from redis_steps import DELAY_ENV, FAN, expected_fan, fan

pytestmark = pytest.mark.anyio

SETTINGS = settings(
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    deadline=None,
)
_prefixes = itertools.count()


@pytest.fixture
def anyio_backend() -> Any:
    """redis-py's client runs on asyncio only (trio is refused: test_redis_store)."""
    return ("asyncio", {"debug": True})


def fresh_url(server: RedisServer) -> str:
    """A deployment of its own on the shared server: a new key prefix."""
    return f"{server.url}?prefix=t{next(_prefixes)}"


def batch_context(url: str, **kwargs: Any) -> fd.Context:
    return fd.Context(batch=True, broker=url, store=url, **kwargs)


async def raw_client(server: RedisServer) -> Any:
    import redis.asyncio

    return redis.asyncio.Redis.from_url(server.url)


async def poll_until(condition: Callable[[], Any]) -> Any:
    """Wait for a condition on the server (nothing there can wake us)."""
    with anyio.fail_after(20):
        while True:
            value = await condition()
            if value:
                return value
            await anyio.sleep(0.01)


# --- events, watched from another client ------------------------------------------------------


async def test_a_run_is_watched_from_another_client(redis_server: RedisServer) -> None:
    url = fresh_url(redis_server)
    watcher = RedisBroker(url)  # as a process on another machine would
    await watcher.open()
    try:
        async with batch_context(url, workers=1) as ctx:
            run = await ctx.start(fan, "watched")
            seen: list[Any] = []
            async for text in watcher.watch(run.run_id, poll=0.01):
                seen.append(decode_event(text))
                if sum(isinstance(e, ev.StepFinished) for e in seen) == FAN + 2:
                    break
            assert await run.result() == expected_fan("watched")
            local = [e async for e in run.events()]
    finally:
        await watcher.close()
    finished = {e.node_id for e in seen if isinstance(e, ev.StepFinished)}
    assert finished == {e.node_id for e in local if isinstance(e, ev.StepFinished)}
    assert len(finished) == FAN + 2
    assert all(e.run_id == run.run_id for e in seen)


# --- bad input fails its run; the worker serves the others ------------------------------------


async def test_garbage_entries_in_the_task_stream_are_dropped(redis_server: RedisServer) -> None:
    url = fresh_url(redis_server)
    prefix = url.rpartition("prefix=")[2]
    client = await raw_client(redis_server)
    try:
        for fields in (
            {"junk": "1"},
            {"payload": b"not json"},
            {"payload": b'{"run_id": "nobody", "node_id": "x"}'},
            {"payload": b"\xff\xfe"},
        ):
            await client.xadd(f"{prefix}:tasks", fields)
        async with batch_context(url, workers=1) as ctx:
            results = await ctx.map(fan, ["a", "b", "c"], progress=False)
        assert results == [expected_fan(k) for k in "abc"]
        assert await client.xlen(f"{prefix}:tasks") == 0
    finally:
        await client.aclose()


def wrong_arguments(fields: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """A well-formed message whose arguments are not a list."""
    message = _codec.loads(fields[b"payload"])
    message["args"] = "not a list of arguments"
    return {b"payload": _codec.dumps(message).encode()}


def not_utf8(fields: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """An unreadable payload; the entry still names its run and node."""
    return {**fields, b"payload": b"\xff" + fields[b"payload"]}


@pytest.mark.parametrize("corrupt", [wrong_arguments, not_utf8])
async def test_a_malformed_task_fails_its_run_with_a_checkpoint_error(
    redis_server: RedisServer, corrupt: Callable[[dict[bytes, bytes]], dict[bytes, bytes]]
) -> None:
    url = fresh_url(redis_server)
    prefix = url.rpartition("prefix=")[2]
    client = await raw_client(redis_server)
    try:
        async with batch_context(url, workers=0) as ctx:
            bad = await ctx.start(fan, "bad")
            (entry_id, fields), *_ = await poll_until(
                lambda: client.xrange(f"{prefix}:tasks", "-", "+")
            )
            node_id = _codec.loads(fields[b"payload"])["node_id"]
            await client.xdel(f"{prefix}:tasks", entry_id)
            await client.xadd(f"{prefix}:tasks", corrupt(fields))
            good = await ctx.start(fan, "good")
            worker = Worker(ctx.queue, ctx.store, local=True)
            async with anyio.create_task_group() as tg:
                await tg.start(worker.run)
                with pytest.raises(fd.CheckpointError) as info:
                    await bad.result()
                assert await good.result() == expected_fan("good")
                tg.cancel_scope.cancel()
    finally:
        await client.aclose()
    error = info.value
    assert isinstance(error, StepCheckpointFailed)
    assert isinstance(error, fd.StepFailed)
    assert (error.node, error.run_id) == (node_id, bad.run_id)
    # Arguments edited in place no longer match the task's integrity check.
    assert re.search(r"malformed task message|task message refused", str(error))


GATES: dict[str, anyio.Event] = {}
ENTERED: dict[str, anyio.Event] = {}


@fd.step
async def gated(key: str) -> str:
    ENTERED.setdefault(key, anyio.Event()).set()
    await GATES.setdefault(key, anyio.Event()).wait()
    return key.upper()


@fd.step
async def after(text: str) -> str:
    return text + "!"


@fd.flow
async def gated_flow(key: str) -> str:
    return await after(await gated(key))


async def test_garbage_in_the_journal_fails_its_run_and_the_others_go_on(
    redis_server: RedisServer,
) -> None:
    url = fresh_url(redis_server)
    prefix = url.rpartition("prefix=")[2]
    (node_id,) = [n for n in gated_flow.graph.nodes if gated_flow.graph[n].name == "gated"]
    client = await raw_client(redis_server)
    try:
        async with batch_context(url, workers=1) as ctx:
            bad = await ctx.start(gated_flow, "bad")
            await ENTERED.setdefault("bad", anyio.Event()).wait()
            # Written while the step runs: the worker's commit finds it in its place.
            await client.hset(f"{prefix}:nodes:{bad.run_id}", node_id, b"{garbage")
            GATES.setdefault("bad", anyio.Event()).set()
            with pytest.raises(fd.CheckpointError) as info:
                await bad.result()
            GATES.setdefault("good", anyio.Event()).set()
            assert await ctx.run(gated_flow, "good") == "GOOD!"
            record = await ctx.store.get_run(bad.run_id)
    finally:
        await client.aclose()
        GATES.clear()
        ENTERED.clear()
    assert isinstance(info.value, StepCheckpointFailed)
    assert info.value.node == node_id
    assert f"run {bad.run_id!r} in redis://" in str(info.value)
    assert "is corrupted" in str(info.value)
    assert record is not None
    assert (record.status, record.failed_node) == (RunStatus.FAILED, node_id)


@fd.step(retries=0)
async def fragile(key: str) -> str:
    return key


@fd.flow
async def fragile_flow(key: str) -> str:
    return await fragile(key)


@pytest.mark.parametrize("max_deliveries", [1, 2])
async def test_a_task_whose_worker_died_goes_to_another_up_to_max_deliveries(
    redis_server: RedisServer, max_deliveries: int
) -> None:
    """A worker takes the task of a step without retries and dies with it (it never
    renews nor completes).  Losing a worker is not the step's failure: the task goes to
    another worker, unless that would be more deliveries than allowed (a poison task)."""
    url = fresh_url(redis_server)
    async with batch_context(url, workers=0) as ctx:
        run = await ctx.start(fragile_flow, "x")
        broker: RedisBroker = ctx.queue
        (taken,) = await poll_until(lambda: broker.claim("doomed-worker", 1, 0.2))
        worker = Worker(broker, ctx.store, local=True, lease=0.2, max_deliveries=max_deliveries)
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            try:
                outcome: Any = await run.result()
            except fd.StepFailed as exc:
                outcome = exc
            tg.cancel_scope.cancel()
        letters = await broker.dead_letters(run.run_id)
    if max_deliveries == 2:
        assert outcome == "x"
        assert letters == []
        return
    assert isinstance(outcome, fd.StepFailed)
    assert "a poison task: handed out 2 times, more than max_deliveries=1" in str(outcome)
    assert "dead-letter" in str(outcome)
    assert [(d["node_id"], d["payload"]) for d in letters] == [(outcome.node, taken.payload)]


# --- the server restarts in the middle of a batch -----------------------------------------------


async def test_a_batch_survives_a_server_restart(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DELAY_ENV, "0.02")
    url = fresh_url(redis_server)
    keys = [f"k{i}" for i in range(30)]
    async with batch_context(url, workers=2) as ctx:
        results: list[Any] = []

        async def batch() -> None:
            results.extend(await ctx.map(fan, keys, progress=False))

        async with anyio.create_task_group() as tg:
            tg.start_soon(batch)
            # Once some runs are done and others in flight: kill -9, then restart.
            await poll_until(lambda: _finished_runs(ctx, 5))
            redis_server.kill()
            await anyio.to_thread.run_sync(redis_server.restart)
        journals = [await ctx.store.load_nodes(r.run_id) for r in await ctx.store.list_runs()]
        runs = await ctx.store.list_runs(limit=100)
    assert results == [expected_fan(k) for k in keys]
    assert len(runs) == len(keys)
    assert Counter(r.status for r in runs) == {RunStatus.FINISHED: len(keys)}
    assert all(len(j) == FAN + 2 for j in journals)


async def _finished_runs(ctx: fd.Context, at_least: int) -> bool:
    runs = await ctx.store.list_runs(limit=1000)
    return sum(r.status is RunStatus.FINISHED for r in runs) >= at_least
