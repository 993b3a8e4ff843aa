"""Batch workers fetch, run and finish tasks many at a time (issue 20).

- every broker hands out as many tasks as a worker asks for in one claim, and completes,
  dead-letters or commits-and-completes a batch of finished tasks as it would each alone
  (events before their completion, the first commit kept);
- a worker holds up to ``async_concurrency`` tasks: async steps waiting on I/O are not
  capped by the threads (``concurrency``) sync steps run in;
- a worker that dies between a batch's commit and its acknowledgements runs no node
  twice: the tasks come back and the journal check completes them unrun.

The broker tests run on each broker (the embedded queue on asyncio and trio, Redis and
NATS on asyncio); the worker tests on the embedded queue, on asyncio and trio.  No test
asserts how long anything took.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from test_broker_conformance import (  # noqa: F401 - fixtures, used by name
    broker,
    claim_until,
    eventually,
    kind,
    make_broker,
    make_store,
    node_of,
    node_record,
    other,
    read_completions,
    read_events,
    task,
)

import flowdsl as fd
from flowdsl._executors.batch import Worker
from flowdsl._records import NodeRecord
from flowdsl.backends import Broker, Store, link, open_broker, open_store
from flowdsl.backends.messages import Finished, TaskMessage, encode_task

pytestmark = pytest.mark.anyio


# --- every broker ---------------------------------------------------------------------------


async def test_one_claim_takes_as_many_tasks_as_asked(broker: Broker) -> None:  # noqa: F811
    await broker.enqueue([task("r", f"n{i:02}") for i in range(40)])
    first = await claim_until(broker, "w", 30.0)
    taken = list(first)
    while len(taken) < 40:
        taken += await eventually(functools.partial(broker.claim, "w", 40 - len(taken), 30.0))
    assert sorted(map(node_of, taken)) == [f"n{i:02}" for i in range(40)]
    assert len({c.task_id for c in taken}) == 40
    assert await broker.claim("w", 10, 30.0) == []


async def test_a_claim_asks_for_all_its_room_in_one_call(broker: Broker) -> None:  # noqa: F811
    """40 queued tasks, a claim of 40: one call brings them all where the broker has them
    ready (JetStream may deliver a pull in parts: there, more than one at least)."""
    await broker.enqueue([task("r", f"n{i:02}") for i in range(40)])
    got: list[Any] = await eventually(lambda: broker.claim("w", 40, 30.0))
    if "NATS" in type(broker).__name__:
        assert len(got) >= 1
    else:
        assert len(got) == 40


async def test_complete_many_publishes_events_then_completions_and_dead_letters(
    broker: Broker,  # noqa: F811
    other: Broker,  # noqa: F811
) -> None:
    _, done_cursor = await other.completions(None)
    _, event_cursor = await other.events(None)
    await broker.enqueue([task("r", n) for n in ("a", "b", "c")])
    held = {}
    while len(held) < 3:
        held.update({node_of(c): c for c in await claim_until(broker, "w", 30.0)})
    await broker.complete_many(
        [
            Finished(held["a"].task_id, "r", "a", '"a"', (("r", '{"e": "a"}'),)),
            Finished(held["b"].task_id, "r", "b", '"b failed"', dead="handed out 9 times"),
            Finished(held["c"].task_id, "r", "c", '"c"', (("r", '{"e": "c1"}'), ("r", "{}"))),
        ]
    )
    texts, _ = await read_completions(other, done_cursor, 3)
    assert sorted(texts) == ['"a"', '"b failed"', '"c"']
    seen, _ = await read_events(other, event_cursor, 3)
    assert seen == [("r", '{"e": "a"}'), ("r", '{"e": "c1"}'), ("r", "{}")]
    (letter,) = await eventually(lambda: other.dead_letters("r"))
    assert (letter["node_id"], letter["reason"]) == ("b", "handed out 9 times")
    assert letter["payload"] == task("r", "b")[2]
    assert await broker.claim("w", 10, 30.0) == []


async def test_a_batch_of_commits_keeps_each_first_commit(
    make_broker: Callable[[], Broker],  # noqa: F811
    make_store: Callable[[], Store],  # noqa: F811
) -> None:
    store = make_store()
    queue = make_broker()
    link(store, queue)
    await store.open()
    await queue.open()
    try:
        first = node_record("a")
        assert await store.commit_node("r", first)
        later = NodeRecord("a", '"later"', 2, 3.0, 4.0, "c", None)
        fresh = [node_record("b"), node_record("c")]
        if queue.holds(store):
            _, cursor = await queue.completions(None)
            await queue.enqueue([task("r", n) for n in ("a", "b", "c")])
            held = {}
            while len(held) < 3:
                held.update({node_of(c): c for c in await claim_until(queue, "w", 30.0)})
            items = [
                Finished(held[r.node_id].task_id, "r", r.node_id, f'"{r.node_id}"', record=r)
                for r in (later, *fresh)
            ]
            assert await queue.commit_and_complete_many(items) == [False, True, True]
            texts, _ = await read_completions(queue, cursor, 2)
            assert sorted(texts) == ['"b"', '"c"']
        else:
            records = [("r", later), *(("r", r) for r in fresh)]
            assert await store.commit_nodes(records) == [False, True, True]
        assert await store.load_nodes("r") == {"a": first, "b": fresh[0], "c": fresh[1]}
        assert await store.commit_nodes([]) == []
    finally:
        await queue.close()
        await store.close()


# --- a worker's concurrency -----------------------------------------------------------------

GATE: dict[str, Any] = {}
ENTERED: list[int] = []


@fd.step
async def waits_at_the_gate(i: int) -> int:
    ENTERED.append(i)
    if len(ENTERED) == GATE["expected"]:
        GATE["all_in"].set()
    await GATE["open"].wait()
    return i * 2


@fd.flow
async def gated_flow(i: int) -> int:
    out: int = await waits_at_the_gate(i)
    return out


async def test_async_steps_are_not_capped_by_the_thread_slots(tmp_path: Path) -> None:
    """200 async steps, all waiting on one event at once, in one worker whose sync slots
    are 2: none needs another to finish first."""
    ENTERED.clear()
    GATE.update(expected=200, all_in=anyio.Event(), open=anyio.Event())
    url = f"sqlite:///{tmp_path / 'q.db'}"
    results: list[int] = []
    with anyio.fail_after(60):
        async with (
            fd.Context(batch=True, store=url, workers=1, worker_concurrency=2) as ctx,
            anyio.create_task_group() as tg,
        ):

            async def run_all() -> None:
                results.extend(await ctx.map(gated_flow, range(200), progress=False))

            tg.start_soon(run_all)
            await GATE["all_in"].wait()  # every step is inside, none finished
            assert sorted(ENTERED) == list(range(200))
            GATE["open"].set()
    assert results == [i * 2 for i in range(200)]


async def test_async_concurrency_bounds_the_tasks_a_worker_holds(tmp_path: Path) -> None:
    ENTERED.clear()
    GATE.update(expected=5, all_in=anyio.Event(), open=anyio.Event())
    url = f"sqlite:///{tmp_path / 'q.db'}"
    with anyio.fail_after(60):
        async with (
            fd.Context(batch=True, store=url, workers=1, worker_async_concurrency=5) as ctx,
            anyio.create_task_group() as tg,
        ):

            async def run_all() -> None:
                await ctx.map(gated_flow, range(12), progress=False)

            tg.start_soon(run_all)
            await GATE["all_in"].wait()
            (worker,) = ctx._workers
            # The worker holds its five; it takes no sixth until one is finished.
            for _ in range(20):
                await anyio.lowlevel.checkpoint()
            assert worker.held == 5
            assert len(ENTERED) == 5
            GATE["open"].set()


SYNC: dict[str, Any] = {}


@fd.step
def counted_sync(i: int) -> int:
    with SYNC["lock"]:
        SYNC["now"] += 1
        SYNC["most"] = max(SYNC["most"], SYNC["now"])
    SYNC["release"].wait(timeout=30)
    with SYNC["lock"]:
        SYNC["now"] -= 1
    return i


@fd.flow
async def sync_flow(i: int) -> int:
    out: int = await counted_sync(i)
    return out


async def test_sync_steps_take_at_most_concurrency_threads(tmp_path: Path) -> None:
    SYNC.update(lock=threading.Lock(), now=0, most=0, release=threading.Event())
    url = f"sqlite:///{tmp_path / 'q.db'}"
    with anyio.fail_after(60):
        async with (
            fd.Context(batch=True, store=url, workers=1, worker_concurrency=2) as ctx,
            anyio.create_task_group() as tg,
        ):

            async def run_all() -> None:
                assert await ctx.map(sync_flow, range(8), progress=False) == list(range(8))

            tg.start_soon(run_all)
            while SYNC["most"] < 2:  # noqa: ASYNC110 - threads have no anyio event
                await anyio.sleep(0.005)
            (worker,) = ctx._workers
            # Two run; the others wait for a thread, and the worker takes no more
            # than a second round's worth off the queue meanwhile.
            while worker.waiting_for_thread < 2:  # noqa: ASYNC110
                await anyio.sleep(0.005)
            assert worker.held <= 2 * 2
            SYNC["release"].set()
    assert SYNC["most"] == 2


# --- a worker that dies between a batch's commit and its acknowledgements ------------------


def _task_text(node_id: str) -> str:
    """A sealed task of a step no worker knows: run, it would be refused."""
    message = TaskMessage("r", node_id, "f", "nowhere:step", "step", (), (), {}, "m", False)
    return encode_task(message)


class Killed(BaseException):
    """What the worker process would die of: nothing after it runs."""


async def test_a_crash_between_a_batchs_commits_and_acks_runs_no_node_twice(
    tmp_path: Path,
) -> None:
    """The store apart from the queue: a batch's records are committed, then the worker
    dies before acknowledging any task.  The tasks come back once their leases run out;
    the next worker's journal check completes them with the records, unrun."""
    queue = open_broker(f"sqlite:///{tmp_path / 'q.db'}")
    store = open_store(f"sqlite:///{tmp_path / 'journal.db'}")
    link(store, queue)
    await store.open()
    await queue.open()
    try:
        assert not queue.holds(store)
        records = [node_record(n) for n in ("a", "b", "c")]
        await queue.enqueue([("r", r.node_id, _task_text(r.node_id)) for r in records])
        held = {}
        while len(held) < 3:
            held.update({node_of(c): c for c in await claim_until(queue, "dying", 0.2)})
        dying = Worker(queue, store, name="dying")
        committed: list[str] = []

        def die(batch: Sequence[tuple[str, str]]) -> None:
            committed.extend(node_id for _, node_id in batch)
            raise Killed

        dying.finisher._on_commit = die
        items = [
            Finished(held[r.node_id].task_id, "r", r.node_id, '"ran"', record=r) for r in records
        ]
        with pytest.raises(Killed):
            await dying.finisher.finish(items)
        assert committed == ["a", "b", "c"]  # one write, then the hook, then the acks
        assert await store.load_nodes("r") == {r.node_id: r for r in records}
        _, cursor = await queue.completions(None)
        # The leases run out: the tasks come back as second deliveries.
        back = await claim_until(queue, "next", 30.0)
        while len(back) < 3:
            back += await claim_until(queue, "next", 30.0)
        assert sorted((node_of(c), c.deliveries) for c in back) == [
            ("a", 2),
            ("b", 2),
            ("c", 2),
        ]
        nextone = Worker(queue, store, name="next")
        committed_records = await store.lookup_nodes([("r", n) for n in ("a", "b", "c")])
        finished = [await nextone.settle(c, committed_records) for c in back]
        # Completed with the committed records, nothing to commit, nothing run.
        assert all(f.record is None and f.dead is None for f in finished)
        await nextone.finisher.finish(finished)
        texts, _ = await read_completions(queue, cursor, 3)
        assert len(texts) == 3
        assert await queue.claim("w", 10, 30.0) == []
    finally:
        await queue.close()
        await store.close()
