"""Batch mode on NATS JetStream, in one process: events reach other clients, large values
travel, the queue keeps one task per node, leases are renewed and run out, dead letters,
bad input.  Against real nats-server processes; worker processes are in
test_nats_scale.py.  That batch mode gives what real time gives, and that crashed runs
resume, is checked on NATS with every other backend (test_backend_properties.py).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from hypothesis import HealthCheck, settings

import flowdsl as fd
from flowdsl._executors.batch import StepCheckpointFailed, Worker
from flowdsl._records import NodeRecord
from flowdsl.backends.messages import decode_completion
from flowdsl.backends.nats import broker as nats_broker_module
from flowdsl.backends.nats.broker import NATSBroker
from flowdsl.backends.nats.keys import to_token
from flowdsl.backends.nats.store import NATSStore

import _nats_fixtures as nf
import nats_steps as ns
from _servers import NatsServer

pytestmark = pytest.mark.anyio

# A NATS run costs a few round trips per node: a handful of examples per property.
SETTINGS = settings(
    max_examples=6,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture
def anyio_backend() -> Any:
    """nats-py runs on asyncio only (trio is refused: see the trio test below)."""
    return ("asyncio", {"debug": True})


url, broker, fresh = nf.url, nf.broker, nf.fresh  # a fresh prefix a test, a broker on it


def signature(event: Any) -> tuple[str, str]:
    """An event without what differs between two runs: its time, duration and run id."""
    data = attrs.asdict(event)
    for key in ("at", "duration", "run_id"):
        data.pop(key, None)
    return type(event).__name__, json.dumps(data, sort_keys=True, default=str)


# --- events and other clients ---------------------------------------------------------------


async def test_run_events_come_over_nats_and_another_client_can_follow(
    nats_server: NatsServer,
) -> None:
    url = fresh(nats_server)
    # connect_timeout is part of what a connection is shared by: a separate connection,
    # as a client on another machine would have.
    watcher = NATSBroker(url + "&connect_timeout=3")
    await watcher.open()
    try:
        _, done_cursor = await watcher.completions(None)
        _, event_cursor = await watcher.events(None)
        with anyio.fail_after(15):
            async with fd.Context(batch=True, broker=url, store=url, workers=1) as ctx:
                run = await ctx.start(ns.fan, "e", run_id="watched")
                kinds = [type(e).__name__ async for e in run.events()]
                assert await run.result() == ns.expected_fan("e")
        assert kinds[0] == "RunStarted"
        assert kinds[-1] == "RunFinished"
        assert Counter(kinds)["StepFinished"] == ns.FAN + 2

        # The watcher's reader is pushed to: what it holds is what has arrived so far,
        # so it is read until everything has (or the deadline says it never will).
        finished: list[Any] = []
        steps: list[str] = []
        with anyio.fail_after(10):
            while True:
                texts, done_cursor = await watcher.completions(done_cursor)
                finished += [decode_completion(t) for t in texts]
                events, event_cursor = await watcher.events(event_cursor)
                steps += [json.loads(t)["type"] for run_id, t in events if run_id == "watched"]
                ok = {c.node_id for c in finished if c.run_id == "watched" and c.ok}
                if len(ok) == ns.FAN + 2 and Counter(steps)["StepFinished"] == ns.FAN + 2:
                    break
                await anyio.sleep(0.01)
        assert ok == {"seed", "total", *_parts()}
        assert Counter(steps)["StepFinished"] == ns.FAN + 2
        assert await watcher.completions(done_cursor) == ([], done_cursor)
    finally:
        await watcher.close()


def _parts() -> set[str]:
    graph = ns.fan.graph
    return {n for n in graph.nodes if n.startswith("part")}


async def test_large_values_cross_the_queue_and_the_journal(url: str) -> None:
    n = 3 * 1024 * 1024  # three times the server's max payload
    with anyio.fail_after(30):
        async with fd.Context(batch=True, broker=url, store=url, workers=1) as ctx:
            assert await ctx.run(ns.big_flow, n, run_id="big") == n
            nodes = await ctx.store.load_nodes("big")
            again = await ctx.run(ns.big_flow, n, run_id="big2")
    assert again == n
    assert len(json.loads(nodes["big"].value)) == n


# --- the queue ------------------------------------------------------------------------------


async def test_a_node_is_queued_once_while_queued_or_held_and_again_after(
    broker: NATSBroker,
) -> None:
    task = ("r", "a/b.c-d", '{"x": 1}')
    await broker.enqueue([task, task])
    await broker.enqueue([task])  # as a publish retried after its reply was lost
    assert await broker.pending() == 1
    # The subject is the dedupe: the task carries no message id for the server to keep.
    stored = await broker.link.js.get_msg(broker.tasks_stream, seq=1)
    assert "Nats-Msg-Id" not in (stored.headers or {})
    [claimed] = await broker.claim("w", 10, 30.0)
    await broker.enqueue([task])  # held: still not twice
    assert await broker.pending() == 1
    assert claimed.payload == task[2]
    assert claimed.deliveries == 1
    await broker.complete(claimed.task_id, "r", task[1], "{}")
    with anyio.fail_after(5):
        while await broker.pending():  # the ack travels without a reply  # noqa: ASYNC110
            await anyio.sleep(0.01)
    await broker.enqueue([task])  # done: a resume may queue it again
    assert await broker.pending() == 1
    assert await broker.claim("w", 10, 30.0) != []


async def test_a_failed_runs_tasks_are_dropped_and_others_stay(broker: NATSBroker) -> None:
    await broker.enqueue([("a", "n1", "a1"), ("b", "n1", "b1"), ("a", "n2", "a2")])
    await broker.enqueue([("b", "n2", "b2")])
    await broker.drop_queued("a")
    await broker.drop_queued("nothing queued")
    assert await broker.pending() == 2
    claimed = await broker.claim("w", 10, 30.0)
    assert sorted(c.payload for c in claimed) == ["b1", "b2"]
    assert {(c.run_id, c.node_id) for c in claimed} == {("b", "n1"), ("b", "n2")}


async def test_a_resumed_runs_tasks_are_handed_out_afresh(url: str, broker: NATSBroker) -> None:
    await broker.enqueue([("r", "n", "held by a dead client's worker"), ("other", "n", "o")])
    held = await broker.claim("dies with its client", 10, 30.0)
    assert len(held) == 2
    # The resuming process (its own connection: what this one holds is held by the dead).
    resumer = NATSBroker(url)
    await resumer.open()
    try:
        await resumer.redeliver("r")  # claimable now, not after the 30 s lease
    finally:
        await resumer.close()
    [again] = await broker.claim("w", 10, 30.0)
    assert (again.payload, again.deliveries) == ("held by a dead client's worker", 1)
    assert await broker.claim("w", 10, 30.0) == []  # the other run's task is still held


async def test_claim_returns_at_once_when_a_task_comes(
    broker: NATSBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A long poll far longer than the deadline: the claim can only end in time by being
    # answered when the task arrives, not by its poll running out.
    monkeypatch.setattr(nats_broker_module, "LONG_POLL", 60.0)
    started = anyio.Event()
    claimed: list[Any] = []

    async def claim() -> None:
        started.set()
        while not claimed:
            claimed.extend(await broker.claim("w", 8, 30.0))

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(claim)
            await started.wait()
            await anyio.sleep(0.2)  # let the long poll reach the server first
            await broker.enqueue([("r", "n", "{}")])
    assert [c.payload for c in claimed] == ["{}"]


async def test_a_task_whose_lease_runs_out_comes_back_as_another_delivery(
    broker: NATSBroker,
) -> None:
    await broker.enqueue([("r", "n", "payload")])
    [first] = await broker.claim("dead worker", 1, 1.0)
    assert first.deliveries == 1
    with anyio.fail_after(10):
        again: list[Any] = []
        while not again:
            again = await broker.claim("w", 1, 1.0)
    # At least the second delivery: on a loaded machine JetStream may hand it out again
    # (ack wait) before this loop's fetch takes it, and that delivery counts too.
    assert again[0].payload == "payload"
    assert again[0].deliveries >= 2


async def test_extend_keeps_a_slow_live_step_from_being_handed_out_again(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "exec.log"
    monkeypatch.setenv(ns.LOG_ENV, str(log))
    monkeypatch.setenv(ns.DELAY_ENV, "1.6")  # each step outlives its 1 s lease
    async with fd.Context(batch=True, broker=url, store=url, workers=0) as ctx:
        run = await ctx.start(ns.fan, "slow", run_id="slow")
        workers = [Worker(ctx.queue, ctx.store, lease=1.0, local=True) for _ in range(2)]
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for worker in workers:
                    await tg.start(worker.run)
                assert await run.result() == ns.expected_fan("slow")
                tg.cancel_scope.cancel()
    assert ns.executions(log) == Counter(ns.fan_lines("slow"))  # none ran twice


async def doomed_delivery(queue: NATSBroker) -> None:
    """A worker takes a task, then dies (never acks)."""
    with anyio.fail_after(10):
        held: list[Any] = []
        while not held:
            held = await queue.claim("doomed", 1, 1.0)


async def test_a_task_whose_worker_died_goes_to_another_worker(url: str) -> None:
    async with fd.Context(batch=True, broker=url, store=url, workers=0) as ctx:
        queue: NATSBroker = ctx.queue
        run = await ctx.start(ns.single, "d", run_id="lost")
        await doomed_delivery(queue)
        worker = Worker(queue, ctx.store, lease=1.0, local=True)
        with anyio.fail_after(15):
            async with anyio.create_task_group() as tg:
                await tg.start(worker.run)
                assert await run.result() == "worked d"
                tg.cancel_scope.cancel()
        assert await queue.dead_letters("lost") == []


async def test_a_task_handed_out_past_max_deliveries_is_dead_lettered(url: str) -> None:
    async with fd.Context(batch=True, broker=url, store=url, workers=0) as ctx:
        queue: NATSBroker = ctx.queue
        run = await ctx.start(ns.single, "d", run_id="dead")
        await doomed_delivery(queue)
        worker = Worker(queue, ctx.store, lease=1.0, local=True, max_deliveries=1)
        with anyio.fail_after(15):
            async with anyio.create_task_group() as tg:
                await tg.start(worker.run)
                with pytest.raises(fd.StepFailed, match="dead-letter") as info:
                    await run.result()
                tg.cancel_scope.cancel()
        [letter] = await queue.dead_letters("dead")
        assert await queue.dead_letters("other") == []
        assert await queue.pending() == 0
    assert info.value.node_id == "work"
    assert letter["node_id"] == "work"
    assert "a poison task: handed out 2 times" in letter["reason"]
    assert json.loads(letter["payload"])["run_id"] == "dead"


# --- bad input ------------------------------------------------------------------------------

GOOD = ("g1", "g2", "g3")


async def raw_js(server: NatsServer) -> Any:
    import nats

    nc = await nats.connect(server.url)
    return nc, nc.jetstream()


def task_payload(**changes: Any) -> str:
    data: dict[str, Any] = {
        "run_id": "bad",
        "node_id": "work",
        "flow": "single",
        "step": "nats_steps:work",
        "kind": "step",
        "labels": [],
        "args": ["b"],
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


async def fails_beside_good_runs(url: str, plant: Any) -> BaseException:
    """*plant* writes behind flowdsl's back; run ``bad`` fails, the good runs finish."""
    with anyio.fail_after(20):
        async with fd.Context(batch=True, broker=url, store=url, workers=0) as ctx:
            await plant(ctx)
            good = [await ctx.start(ns.fan, key, run_id=key) for key in GOOD]
            bad = await ctx.start(ns.single, "b", run_id="bad")
            await waiting_for(ctx, "bad", "work")
            async with anyio.create_task_group() as tg:
                for _ in range(2):
                    await tg.start(Worker(ctx.queue, ctx.store, local=True).run)
                assert [await r.result() for r in good] == [ns.expected_fan(k) for k in GOOD]
                with pytest.raises(fd.CheckpointError) as info:
                    await bad.result()
                tg.cancel_scope.cancel()
            record = await ctx.store.get_run("bad")
    assert record is not None
    assert record.status is fd.RunStatus.FAILED
    return info.value


async def waiting_for(ctx: fd.Context, run_id: str, node_id: str) -> None:
    """Until the scheduler has queued the node (or found it queued) and waits for it."""
    executor: Any = ctx._executor
    # The scheduler enqueues in the run's own task; nothing announces it.
    while (run_id, node_id) not in executor._waiting:  # noqa: ASYNC110
        await anyio.sleep(0.005)


MALFORMED = {
    "args not a list": task_payload(args="b"),
    "no step": task_payload(step=...),
    "an argument of the wrong type": task_payload(args=[{"not": "a str"}]),
    "a later protocol": task_payload(v=2),
    # Nothing in it names the run: the task's subject does.
    "not UTF-8": b'{"run_id": "bad", \xff',
    "not JSON": b"\x00garbage{",
}


@pytest.mark.parametrize("payload", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_task_published_by_hand_fails_its_run(
    nats_server: NatsServer, url: str, payload: str | bytes
) -> None:
    prefix = url.rpartition("prefix=")[2]

    async def plant(ctx: fd.Context) -> None:
        nc, js = await raw_js(nats_server)
        try:
            data = payload.encode() if isinstance(payload, str) else payload
            # The node's own subject: the scheduler's task is then refused as queued.
            await js.publish(f"{prefix}.tasks.{to_token('bad')}.{to_token('work')}", data)
        finally:
            await nc.close()

    error = await fails_beside_good_runs(url, plant)
    assert isinstance(error, fd.StepFailed)
    assert error.node_id == "work"


async def test_garbage_in_the_bucket_fails_its_run_and_not_the_worker(
    nats_server: NatsServer, url: str
) -> None:
    prefix = url.rpartition("prefix=")[2]

    async def plant(ctx: fd.Context) -> None:
        nc, js = await raw_js(nats_server)
        try:
            kv = await js.key_value(prefix)
            # A record at the node's key: the worker's commit finds it taken, reads it back.
            await kv.put(f"node.{to_token('bad')}.{to_token('work')}", b"\x00 not json")
        finally:
            await nc.close()

    error = await fails_beside_good_runs(url, plant)
    assert isinstance(error, StepCheckpointFailed)
    assert "corrupted" in str(error)
    assert "'bad'" in str(error)


async def test_a_foreign_record_at_a_nodes_key_is_a_checkpoint_error(url: str) -> None:
    store = NATSStore(url)
    await store.open()
    try:
        kv = store._bucket.kv
        await kv.put(
            f"node.{to_token('r')}.{to_token('n')}",
            json.dumps({"v": 1, "node_id": "other", "value": "1"}).encode(),
        )
        with pytest.raises(fd.CheckpointError, match=r"node 'n'.*names 'other'"):
            await store.load_nodes("r")
        assert await store.commit_node("r2", NodeRecord("n", "1", 1, 0.0, 1.0))
    finally:
        await store.close()


# --- trio -----------------------------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["trio"])
@pytest.mark.parametrize("batch", [False, True], ids=["real-time", "batch"])
async def test_a_nats_context_under_trio_is_refused_clearly(url: str, batch: bool) -> None:
    options: dict[str, Any] = {"batch": True, "broker": url} if batch else {}
    ctx = fd.Context(store=url, **options)
    with pytest.raises(fd.ConfigError, match=r"asyncio only.*this is trio"):
        async with ctx:
            pass
