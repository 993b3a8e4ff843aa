"""Batch mode on the embedded SQLite queue: worker processes, events, retries, leases.

The property that batch mode gives what real time gives, with in-process workers, is
checked on every broker in test_backend_properties.py; here it is checked with worker
processes.  In-process workers run on asyncio and trio; worker processes (``_worker_proc.py serve``,
on asyncio) join the same SQLite file.  Every test passes ``store=`` so that nothing is
written to the working directory, and bounds every wait with ``fail_after``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from hypothesis import HealthCheck, given, settings

import flowdsl as fd
from flowdsl import events as ev
from flowdsl._engine.runner import current_scope
from flowdsl._executors.batch import Worker
from flowdsl.backends.messages import decode_completion

import batch_steps as bs
from _worker_proc import Procs
from strategies import DagSpec, build_flow, dag_specs, flow_inputs

pytestmark = pytest.mark.anyio

# The profile's example counts (conftest.py: 50 in dev, 100 on CI) with in-process
# workers; a fifth with worker processes, where polling across processes costs more.
_PROFILE = settings().max_examples
SETTINGS = settings(
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
PROCESS_SETTINGS = settings(SETTINGS, max_examples=max(4, _PROFILE // 5))


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'q.db'}"


@pytest.fixture
def procs(tmp_path: Path, url: str) -> Iterator[Procs]:
    procs = Procs(tmp_path, url)
    yield procs
    procs.close()


@pytest.fixture
def exec_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The execution log of batch_steps' steps run in this process."""
    path = tmp_path / "exec.jsonl"
    monkeypatch.setenv(bs.EXEC_LOG, str(path))
    monkeypatch.delenv(bs.HOLD, raising=False)
    return path


def signature(event: Any) -> tuple[str, str]:
    """An event without what differs between two runs: its time, duration and run id."""
    data = attrs.asdict(event)
    for key in ("at", "duration", "run_id"):
        data.pop(key, None)
    return type(event).__name__, json.dumps(data, sort_keys=True)


def skipped(events: list[Any]) -> set[str]:
    return {e.node_id for e in events if isinstance(e, ev.StepSkipped)}


async def run_real_time(flow: fd.Flow[..., Any], *args: Any) -> tuple[Any, set[str], list[Any]]:
    """The result, the journal's node ids and the events of a real-time run."""
    events: list[Any] = []
    async with fd.Context(on_event=events.append) as ctx:
        result = await ctx.run(flow, *args, run_id="rt")
        nodes = set(await ctx.store.load_nodes("rt"))
    return result, nodes, events


# --- mode equivalence ---------------------------------------------------------------------


@PROCESS_SETTINGS
@given(spec=dag_specs(max_ops=5, max_subflows=1), inputs=flow_inputs())
async def test_random_dag_on_two_worker_processes_matches_real_time(
    spec: DagSpec, inputs: tuple[int, str], url: str, procs: Procs
) -> None:
    if not procs.procs:  # one pair of workers serves every example
        for _ in range(2):
            procs.serve(imports=("strategies",))
    flow = build_flow(spec)
    result, nodes, events = await run_real_time(flow, *inputs)

    batch_events: list[Any] = []
    run_id = uuid.uuid4().hex
    with anyio.fail_after(30):
        async with fd.Context(
            batch=True, store=url, workers=0, on_event=batch_events.append
        ) as ctx:
            run = await ctx.start(flow, *inputs, run_id=run_id)
            with anyio.move_on_after(25):
                assert await run.result() == result
            procs.check()  # a worker that died explains a timeout
            assert run.status is fd.RunStatus.FINISHED
            assert set(await ctx.store.load_nodes(run_id)) == nodes
    assert skipped(batch_events) == skipped(events)
    assert Counter(map(signature, batch_events)) == Counter(map(signature, events))


async def test_worker_processes_share_the_work(url: str, procs: Procs) -> None:
    """Two worker processes on one file: every run finishes, each node ran once, and
    both processes took part."""
    workers = [procs.serve(concurrency=2) for _ in range(2)]
    # Both serve before the first task: else the first up may take every task alone.
    await procs.wait_for(lambda: all("ready" in procs.output(w) for w in workers), "ready")
    inputs = list(range(8))
    with anyio.fail_after(60):
        async with fd.Context(batch=True, store=url, workers=0) as ctx:
            runs = [await ctx.start(bs.diamond, x, 0.02, run_id=f"d{x}") for x in inputs]
            results: list[Any] = []
            with anyio.move_on_after(50):
                results = [await run.result() for run in runs]
            procs.check()
            journals = [set(await ctx.store.load_nodes(f"d{x}")) for x in inputs]
    assert results == [bs.expected_diamond(x)[0] for x in inputs]
    assert journals == [bs.expected_diamond(x)[1] for x in inputs]
    log = [line for line in bs.read_log(procs.log) if line["event"] == "start"]
    assert Counter((line["run"], line["node"]) for line in log).most_common(1)[0][1] == 1
    assert {line["pid"] for line in log} == {w.pid for w in workers}


# --- events ---------------------------------------------------------------------------------


async def test_run_events_in_batch_mode_are_the_real_time_events(url: str) -> None:
    _, _, real_time = await run_real_time(bs.diamond, 3, 0.0)
    result, ran, other = bs.expected_diamond(3)
    heard: list[Any] = []
    with anyio.fail_after(20):
        async with fd.Context(batch=True, store=url, workers=2, on_event=heard.append) as ctx:
            run = await ctx.start(bs.diamond, 3, 0.0, run_id="ev")
            assert await run.result() == result
            # Subscribed after the run ended: the history comes from the start.
            streamed = [event async for event in run.events()]

    assert streamed == heard
    assert Counter(map(signature, streamed)) == Counter(map(signature, real_time))
    assert isinstance(streamed[0], ev.RunStarted)
    assert isinstance(streamed[-1], ev.RunFinished)
    assert streamed[-1].result == result
    started = {e.node_id for e in streamed if isinstance(e, ev.StepStarted)}
    finished = {e.node_id for e in streamed if isinstance(e, ev.StepFinished)}
    assert started == finished == ran
    assert skipped(streamed) == {other}
    (taken,) = [e for e in streamed if isinstance(e, ev.BranchTaken)]
    assert taken.node_id == "parity"
    assert f"parity.{taken.case}/work" in ran
    order = [(type(e).__name__, e.node_id) for e in streamed]
    for node in ran:
        assert order.index(("StepStarted", node)) < order.index(("StepFinished", node))


async def test_events_stream_live_while_a_batch_run_goes(url: str) -> None:
    """A subscriber from before the first step sees every event as it comes."""
    got: list[Any] = []
    with anyio.fail_after(20):
        async with fd.Context(batch=True, store=url, workers=1) as ctx:
            run = await ctx.start(bs.resume_chain, 4, run_id="live")
            async for event in run.events():
                got.append(event)
            assert await run.result() == bs.expected_chain(4)
    kinds = Counter(type(e).__name__ for e in got)
    assert kinds == {"RunStarted": 1, "StepStarted": 6, "StepFinished": 6, "RunFinished": 1}


@fd.step(retries=1, backoff=0)
async def flaky(x: int) -> int:
    scope = current_scope()
    assert scope is not None
    if scope.attempt == 1:
        raise ConnectionError("first attempt fails")
    return x * 2


@fd.step
async def broken(x: int) -> int:
    raise ValueError(f"no good: {x}")


@fd.flow
async def retried_then_broken(x: int) -> int:
    y = await flaky(x)
    return await broken(y)


async def test_retry_and_failure_events_in_batch_mode_are_the_real_time_events(url: str) -> None:
    real_time: list[Any] = []
    async with fd.Context(on_event=real_time.append) as ctx:
        with pytest.raises(fd.StepFailed, match=r"no good: 4"):
            await ctx.run(retried_then_broken, 2)
    heard: list[Any] = []
    with anyio.fail_after(20):
        async with fd.Context(batch=True, store=url, workers=1, on_event=heard.append) as ctx:
            run = await ctx.start(retried_then_broken, 2, run_id="bad")
            with pytest.raises(fd.StepFailed, match=r"node 'broken': .*no good: 4") as info:
                await run.result()
    assert info.value.node_id == "broken"
    assert info.value.run_id == "bad"

    def comparable(events: list[Any]) -> Counter[tuple[str, str]]:
        # StepRetrying's delay is random jitter; RunFailed's text names the mode's error.
        return Counter(signature(e) for e in events if not isinstance(e, ev.RunFailed))

    assert comparable(heard) == comparable(real_time)
    kinds = [type(e).__name__ for e in heard]
    assert kinds.count("StepRetrying") == 1
    assert kinds.count("StepFailed") == 1
    assert kinds[-1] == "RunFailed"
    assert heard[-1].node_id == "broken"


# --- many runs ------------------------------------------------------------------------------

EXECUTED: Counter[int] = Counter()
DONE: dict[int, anyio.Event] = {}
N_MAP = 6


@fd.step
async def reversed_echo(i: int) -> int:
    """Finishes only after input i + 1 did: runs complete in reverse input order."""
    EXECUTED[i] += 1
    try:
        if i + 1 in DONE:
            await DONE[i + 1].wait()
        if i == 3:
            raise ValueError("three fails")
        return i * 10
    finally:
        DONE[i].set()


@fd.flow
async def echo(i: int) -> int:
    return await reversed_echo(i)


async def test_map_in_batch_mode_keeps_input_order_and_is_idempotent_by_run_id(
    url: str, tmp_path: Path
) -> None:
    other_url = f"sqlite:///{tmp_path / 'other.db'}"
    EXECUTED.clear()
    DONE.clear()
    DONE.update({i: anyio.Event() for i in range(N_MAP)})
    run_ids = [f"map-{i}" for i in range(N_MAP)]
    expected: list[Any] = [i * 10 for i in range(N_MAP)]
    with anyio.fail_after(30):
        # Without return_exceptions the first failure ends the map (the cancelled runs
        # leave tasks in their queue: a file of their own).
        async with fd.Context(batch=True, store=other_url, workers=2) as ctx:
            with pytest.raises(fd.StepFailed, match=r"three fails"):
                await ctx.map(echo, range(N_MAP), progress=False)
        EXECUTED.clear()
        DONE.update({i: anyio.Event() for i in range(N_MAP)})
        async with fd.Context(batch=True, store=url, workers=2) as ctx:
            first = await ctx.map(
                echo, range(N_MAP), run_ids=run_ids, return_exceptions=True, progress=False
            )
        assert Counter(range(N_MAP)) == EXECUTED

        # A second map over the same run ids, in another context on the same file: the
        # stored results (and the stored failure) come back; no step runs again.
        async with fd.Context(batch=True, store=url, workers=2) as ctx:
            second = await ctx.map(
                echo, range(N_MAP), run_ids=run_ids, return_exceptions=True, progress=False
            )
    assert Counter(range(N_MAP)) == EXECUTED
    for results in (first, second):
        failure = results[3]
        assert isinstance(failure, fd.StepFailed)
        assert failure.run_id == "map-3"
        assert "three fails" in str(failure)
        assert results[:3] + results[4:] == expected[:3] + expected[4:]


async def test_map_in_batch_mode_many_runs_on_few_workers(url: str) -> None:
    inputs = list(range(40))
    with anyio.fail_after(30):
        async with fd.Context(batch=True, store=url, workers=1, worker_concurrency=2) as ctx:
            results = await ctx.map(bs.diamond, [(x, 0.0) for x in inputs], progress=False)
    assert results == [bs.expected_diamond(x)[0] for x in inputs]


FIRST_FAILED: list[int] = []


@fd.step
async def first_fails(i: int) -> int:
    """The first to run fails; the others would take long (they stay queued)."""
    if not FIRST_FAILED:
        FIRST_FAILED.append(i)
        raise ValueError("the first input fails")
    await anyio.sleep_forever()
    raise AssertionError("unreachable")


@fd.flow
async def first_fails_flow(i: int) -> int:
    out: int = await first_fails(i)
    return out


async def test_a_map_stopped_by_a_failure_leaves_no_queued_work(url: str) -> None:
    FIRST_FAILED.clear()
    with anyio.fail_after(20):
        async with fd.Context(batch=True, store=url, workers=1, worker_concurrency=1) as ctx:
            with pytest.raises(fd.StepFailed, match=r"the first input fails"):
                await ctx.map(first_fails_flow, range(6), progress=False)
            statuses = Counter(r.status for r in await ctx.store.list_runs())
            queued = (
                ctx.queue._db()
                .execute("SELECT COUNT(*) FROM fd_tasks WHERE lease_until = 0")
                .fetchone()[0]
            )
    assert statuses == {fd.RunStatus.FAILED: 1, fd.RunStatus.CANCELLED: 5}
    assert queued == 0  # tasks held by the worker finish; nothing waits to start


# --- the client dies ------------------------------------------------------------------------


def _held_for(path: Path, run_id: str) -> list[float]:
    """Seconds left on the leases of the run's tasks (held by the dead client's workers)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        rows = db.execute("SELECT lease_until FROM fd_tasks WHERE run_id = ?", (run_id,))
        return [until - time.time() for (until,) in rows.fetchall()]


async def _crash_client(procs: Procs, tmp_path: Path, flow: str) -> set[str]:
    """Start *flow* in a client process with in-process workers; SIGKILL it once every
    node but the held ``c2`` and the final ``total`` is committed.  The committed ids."""
    client = procs.client(flow, "crash", 5, workers=2, hold="c2")

    def committed() -> set[str]:
        if not (tmp_path / "q.db").exists():
            return set()
        with contextlib.closing(sqlite3.connect(tmp_path / "q.db")) as db:
            try:
                rows = db.execute("SELECT node_id FROM nodes WHERE run_id = 'crash'").fetchall()
            except sqlite3.OperationalError:  # the tables are not there yet
                return set()
        return {row[0] for row in rows}

    def c2_in_flight() -> bool:
        return any(
            (line["run"], line["label"], line["event"]) == ("crash", "c2", "start")
            for line in bs.read_log(procs.log)
        )

    await procs.wait_for(lambda: len(committed()) == 4 and c2_in_flight(), "4 commits and c2")
    procs.kill(client)
    assert "started" in procs.output(client)
    return committed()


async def test_resume_after_the_client_died_finishes_without_rerunning_finished_nodes(
    tmp_path: Path, url: str, procs: Procs, exec_log: Path
) -> None:
    assert exec_log == procs.log
    before = await _crash_client(procs, tmp_path, "batch_steps:resume_chain")
    assert before == {"work", "work-2", "work-3", "work-5"}  # a, b, c1, c3
    # c2's task is held under the dead worker's 30 s lease: resume must not wait it out.
    (left,) = _held_for(tmp_path / "q.db", "crash")
    assert left > 20
    heard: list[Any] = []
    with anyio.fail_after(15):
        async with fd.Context(batch=True, store=url, workers=2, on_event=heard.append) as ctx:
            assert await ctx.resume("crash") == bs.expected_chain(5)
            journal = await ctx.store.load_nodes("crash")
            record = await ctx.store.get_run("crash")
    assert set(journal) == before | {"work-4", "total"}
    assert record is not None
    assert record.status is fd.RunStatus.FINISHED

    mine = os.getpid()
    log = bs.read_log(procs.log)
    again = {line["node"] for line in log if line["pid"] == mine}
    assert again == {"work-4", "total"}  # c2 (in flight when the client died) and the sum
    assert not before & again
    reused = {e.node_id for e in heard if isinstance(e, ev.StepReused)}
    assert reused == before
    assert isinstance(heard[0], ev.RunStarted)
    assert heard[0].resumed


async def test_resume_reruns_a_node_without_retries_that_was_in_flight(
    tmp_path: Path, url: str, procs: Procs, exec_log: Path
) -> None:
    before = await _crash_client(procs, tmp_path, "batch_steps:fragile_chain")
    assert before == {"work", "work-2", "work-3", "work-4"}
    (left,) = _held_for(tmp_path / "q.db", "crash")
    assert left > 20
    with anyio.fail_after(15):
        async with fd.Context(batch=True, store=url, workers=2) as ctx:
            assert await ctx.resume("crash") == bs.expected_chain(5)
            assert await ctx.queue.dead_letters("crash") == []
            journal = await ctx.store.load_nodes("crash")
    # The dead client's delivery does not count against retries=0: a fresh first attempt.
    assert journal["fragile"].attempts == 1
    again = [line for line in bs.read_log(procs.log) if line["pid"] == os.getpid()]
    assert sorted((line["node"], line["event"]) for line in again) == [
        ("fragile", "end"),
        ("fragile", "start"),
        ("total", "end"),
        ("total", "start"),
    ]


# --- leases: a slow worker and its replacement --------------------------------------------

GATE: dict[str, anyio.Event] = {}
GATED_RUNS: list[int] = []


@fd.step
async def gated(x: int) -> str:
    """Its first execution blocks until the test releases it."""
    GATED_RUNS.append(len(GATED_RUNS) + 1)
    execution = GATED_RUNS[-1]
    if execution == 1:
        GATE["started"].set()
        await GATE["release"].wait()
    return f"{x}@run{execution}"


@fd.step
async def shout(s: str) -> str:
    return s.upper()


@fd.flow
async def slow_then_shout(x: int) -> str:
    return await shout(await gated(x))


async def _claim(ctx: fd.Context, worker: str, lease: float) -> Any:
    with anyio.fail_after(10):
        # The scheduler enqueues from its own task; the queue has no notification.
        while not (claimed := await ctx.queue.claim(worker, 1, lease)):  # noqa: ASYNC110
            await anyio.sleep(0.005)
    return claimed[0]


async def test_a_node_finished_twice_commits_once(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="flowdsl.batch")
    GATE.update(started=anyio.Event(), release=anyio.Event())
    GATED_RUNS.clear()
    slow_done = anyio.Event()
    with anyio.fail_after(30):
        async with fd.Context(batch=True, store=url, workers=0) as ctx:
            run = await ctx.start(slow_then_shout, 7, run_id="twice")
            # A slow worker takes the task with a lease nobody renews (its heartbeat is
            # stuck, say): the lease runs out while the step still runs.
            held = await _claim(ctx, "slow", lease=0.3)
            slow = Worker(ctx.queue, ctx.store, local=True, name="slow")

            async def run_slow() -> None:
                await slow.handle(held)
                slow_done.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(run_slow)
                await GATE["started"].wait()
                replacement = Worker(ctx.queue, ctx.store, local=True, name="replacement")
                await tg.start(replacement.run)
                assert await run.result() == "7@RUN2"
                first = await ctx.store.load_nodes("twice")
                GATE["release"].set()  # the slow worker finishes after all
                await slow_done.wait()
                tg.cancel_scope.cancel()
            journal = await ctx.store.load_nodes("twice")
            texts, _ = await ctx.queue.completions(0)

    assert journal == first
    assert json.loads(journal["gated"].value) == "7@run2"
    # The lease that ran out was no failure of the step: its second delivery is a first
    # attempt, not a retry.
    assert journal["gated"].attempts == 1
    # Both workers completed the task; both completions carry the record committed first.
    done = [decode_completion(t) for t in texts]
    gated_done = [c for c in done if c.node_id == "gated"]
    assert len(gated_done) == 2
    assert all(c.ok and c.record == journal["gated"] for c in gated_done)
    assert "already committed; this result is discarded" in caplog.text


@pytest.mark.parametrize("retries", [0, 1])
async def test_a_task_whose_worker_vanished_is_handed_out_again(url: str, retries: int) -> None:
    """A worker takes the task and is never heard of again; once its lease runs out the
    task goes to another worker, whatever the step's retries: losing a worker is not the
    step's failure."""
    flow = vanish_flows[retries]
    with anyio.fail_after(30):
        async with fd.Context(batch=True, store=url, workers=0) as ctx:
            run = await ctx.start(flow, 5, run_id="vanish")
            await _claim(ctx, "vanished", lease=0.2)
            async with anyio.create_task_group() as tg:
                await tg.start(Worker(ctx.queue, ctx.store, local=True).run)
                try:
                    outcome: Any = await run.result()
                except fd.StepFailed as exc:
                    outcome = exc
                tg.cancel_scope.cancel()
            dead = await ctx.queue.dead_letters("vanish")
            journal = await ctx.store.load_nodes("vanish")
    assert outcome == 6
    assert journal["once"].attempts == 1
    assert dead == []


async def test_a_task_handed_out_more_than_max_deliveries_is_a_poison_task(url: str) -> None:
    """Every worker that takes the task vanishes: past the worker's max_deliveries the
    task is dead-lettered unrun, with an error that says why."""
    with anyio.fail_after(30):
        async with fd.Context(batch=True, store=url, workers=0) as ctx:
            run = await ctx.start(vanish_0, 5, run_id="poison")
            await _claim(ctx, "vanished", lease=0.2)
            await _claim(ctx, "vanished too", lease=0.2)
            async with anyio.create_task_group() as tg:
                await tg.start(Worker(ctx.queue, ctx.store, local=True, max_deliveries=2).run)
                with pytest.raises(fd.StepFailed) as info:
                    await run.result()
                tg.cancel_scope.cancel()
            dead = await ctx.queue.dead_letters("poison")
            journal = await ctx.store.load_nodes("poison")
    error = info.value
    assert error.node_id == "once"
    assert str(error).startswith(
        "flow 'vanish_0', node 'once': a poison task: handed out 3 times, more than "
        "max_deliveries=2; every worker that took it died or lost its lease before "
        "finishing it. A worker process died"
    )
    assert "dead-letter list" in str(error)
    assert [d["node_id"] for d in dead] == ["once"]
    assert dead[0]["reason"].startswith("a poison task: handed out 3 times")
    assert journal == {}


def test_max_deliveries_must_be_a_whole_number_of_at_least_one(tmp_path: Path) -> None:
    from flowdsl.backends.sqlite.broker import SQLiteBroker
    from flowdsl.backends.sqlite.store import SQLiteStore

    queue, store = SQLiteBroker(tmp_path / "q.db"), SQLiteStore(tmp_path / "q.db")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(fd.ConfigError, match=r"^max_deliveries must be a whole number"):
            Worker(queue, store, max_deliveries=bad)  # type: ignore[arg-type]


@fd.step
async def once(x: int) -> int:
    return x + 1


@fd.step(retries=1, name="once")
async def once_retried(x: int) -> int:
    return x + 1


@fd.flow
async def vanish_0(x: int) -> int:
    return await once(x)


@fd.flow
async def vanish_1(x: int) -> int:
    out: int = await once_retried(x)  # `step(retries=...)` is typed as returning Any
    return out


vanish_flows = {0: vanish_0, 1: vanish_1}


async def test_the_listener_lets_the_queue_forget_old_completions(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flowdsl._executors.batch import client as batch_module
    from flowdsl.backends.sqlite.broker import SQLiteBroker

    forgotten: list[Any] = []
    original = SQLiteBroker.forget_completions

    async def counting(self: SQLiteBroker, upto: Any) -> None:
        forgotten.append(upto)
        await original(self, upto)

    monkeypatch.setattr(batch_module, "_FORGET_EVERY", 5)
    monkeypatch.setattr(SQLiteBroker, "forget_completions", counting)
    with anyio.fail_after(30):
        async with fd.Context(batch=True, store=url, workers=1) as ctx:
            results = await ctx.map(bs.diamond, [(x, 0.0) for x in range(3)], progress=False)
    assert results == [bs.expected_diamond(x)[0] for x in range(3)]
    # 3 runs of the diamond complete well over 5 tasks: the cursor was handed on.
    assert forgotten
    assert all(isinstance(upto, int) and upto > 0 for upto in forgotten)


async def test_a_broker_error_on_enqueue_fails_every_run_whose_task_it_held(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first tasks of three runs go to the queue in one batch, and the queue refuses
    it: each run fails with the broker's error, none waits for ever for a task that was
    never queued (on asyncio a flusher task sends it, on trio the first node)."""
    async with fd.Context(batch=True, broker=url, workers=1) as ctx:
        queue: Any = ctx.queue
        real = queue.enqueue
        batches: list[int] = []

        async def refuse(tasks: list[tuple[str, str, str]]) -> None:
            batches.append(len(tasks))
            if len(batches) == 1:
                raise fd.BackendUnavailable("the queue is away (a test)")
            await real(tasks)

        monkeypatch.setattr(queue, "enqueue", refuse)
        outcomes: dict[str, BaseException | None] = {}

        async def one(i: int) -> None:
            try:
                await ctx.run(bs.trio_chain, i, run_id=f"refused-{i}")
                outcomes[f"refused-{i}"] = None
            except fd.BackendUnavailable as exc:
                outcomes[f"refused-{i}"] = exc

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for i in range(3):
                    tg.start_soon(one, i)
        assert batches[0] == 3  # the three first tasks, in one batch
        assert set(outcomes) == {"refused-0", "refused-1", "refused-2"}
        for run_id, error in outcomes.items():
            assert error is not None, f"{run_id} finished though its task was never queued"
            assert "the queue is away" in str(error), error
        # The queue is back: the next run goes through.
        assert await ctx.run(bs.trio_chain, 4, run_id="after") == bs.expected_trio_chain(4)
