"""Workers that die, on every broker, with the store beside the queue or apart from it.

Worker processes (``_worker_proc.py serve``, asyncio) are SIGKILLed at the worst moments:

- between committing a node's record and acknowledging its task (the worker kills itself
  there, ``--kill-after-commit``): the next worker to get the task finds the record and
  completes with it, and a resume after the client died too drops the task; either way
  the node's side effect happens once;
- in the middle of a step without retries: the task goes to another worker and the run
  finishes (losing a worker is not the step's failure);
- by the step itself, every time (a poison task): after ``max_deliveries`` hand-outs it is
  dead-lettered unrun, with an error that names it.

Side effects are counted in the steps' execution log, which every process appends to.
"""

from __future__ import annotations

import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest

import flowdsl as fd

import batch_steps as bs
from _servers import NatsServer, RedisServer
from _worker_proc import Procs

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

LEASE = 1.0  # the workers' task lease: a dead worker's task goes to another within this


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # worker processes run asyncio; Redis and NATS clients need it


@attrs.frozen
class Layout:
    broker: str
    store: str | None  # None: the broker's own place keeps the journal

    @property
    def together(self) -> bool:
        return self.store is None


LAYOUTS = [
    pytest.param(("sqlite", True), id="sqlite-together"),
    pytest.param(("sqlite", False), id="sqlite-apart"),
    pytest.param(("redis", True), id="redis-together", marks=pytest.mark.redis),
    pytest.param(("redis", False), id="redis-apart", marks=pytest.mark.redis),
    pytest.param(("nats", True), id="nats-together", marks=pytest.mark.nats),
    pytest.param(("nats", False), id="nats-apart", marks=pytest.mark.nats),
]
TOGETHER = [p for p in LAYOUTS if p.id is not None and p.id.endswith("together")]


@pytest.fixture
def layout(request: pytest.FixtureRequest, tmp_path: Path) -> Layout:
    kind, together = request.param
    if kind == "sqlite":
        broker = f"sqlite:///{tmp_path / 'q.db'}"
        return Layout(broker, None if together else f"sqlite:///{tmp_path / 'journal.db'}")
    server: RedisServer | NatsServer = request.getfixturevalue(f"{kind}_server")
    broker = f"{server.url}?prefix=queue"
    return Layout(broker, None if together else f"{server.url}?prefix=journal")


@pytest.fixture
def procs(tmp_path: Path, layout: Layout, monkeypatch: pytest.MonkeyPatch) -> Iterator[Procs]:
    procs = Procs(tmp_path, layout.broker, layout.store)
    monkeypatch.setenv(bs.EXEC_LOG, str(procs.log))  # steps run here log there too
    yield procs
    procs.close()


def context(layout: Layout, **kwargs: Any) -> fd.Context:
    return fd.Context(batch=True, broker=layout.broker, store=layout.store, **kwargs)


def ends(procs: Procs, run_id: str) -> Counter[str]:
    """How many times each step's body ran to its end (its side effect), by label."""
    return Counter(
        line["label"]
        for line in bs.read_log(procs.log)
        if line["run"] == run_id and line["event"] == "end"
    )


async def died(procs: Procs, proc: subprocess.Popen[bytes], what: str) -> None:
    procs.expect_death(proc)
    await procs.wait_for(lambda: proc.poll() is not None, what, limit=30)


# --- killed between commit and acknowledgement ----------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS, indirect=True)
async def test_a_worker_killed_after_commit_leaves_a_task_the_next_worker_does_not_run(
    layout: Layout, procs: Procs
) -> None:
    first = procs.serve(lease=LEASE, kill_after_commit="fragile-2")
    with anyio.fail_after(60):
        async with context(layout, workers=0) as ctx:
            run = await ctx.start(bs.trio_chain, 4, run_id="acked-late")
            await died(procs, first, "the worker to kill itself after committing b")
            procs.serve(lease=LEASE)
            assert await run.result() == bs.expected_trio_chain(4)
            journal = await ctx.store.load_nodes("acked-late")
    assert ends(procs, "acked-late") == Counter({"a": 1, "b": 1, "c": 1})
    assert set(journal) == {"fragile", "fragile-2", "fragile-3"}
    runs_of_b = [line["pid"] for line in bs.read_log(procs.log) if line["label"] == "b"]
    assert runs_of_b == [first.pid, first.pid]  # its start and its end, nowhere else


@pytest.mark.parametrize("layout", LAYOUTS, indirect=True)
async def test_a_resume_after_worker_and_client_died_does_not_run_the_committed_node_again(
    layout: Layout, procs: Procs
) -> None:
    """The worker dies between b's commit and its ack, then the client dies too; a resume
    comes long before the dead worker's task lease (30 s) runs out.  It reuses b and drops
    its task: b's side effect happened once."""
    worker = procs.serve(lease=30.0, kill_after_commit="fragile-2")
    client = procs.client("batch_steps:trio_chain", "both-died", 4, workers=0)
    await died(procs, worker, "the worker to kill itself after committing b")
    procs.kill(client)
    with anyio.fail_after(20):  # well under the 30 s lease: nothing waits it out
        async with context(layout, workers=1) as ctx:
            assert await ctx.resume("both-died") == bs.expected_trio_chain(4)
            # The resume may queue c again after a worker took the dead client's copy:
            # that second task is completed with c's record, unrun.  Nothing stays.
            await _drained(ctx)
    assert ends(procs, "both-died") == Counter({"a": 1, "b": 1, "c": 1})


@pytest.mark.parametrize("layout", LAYOUTS, indirect=True)
async def test_a_worker_killed_between_a_batchs_commit_and_acks_runs_no_node_twice(
    layout: Layout, procs: Procs
) -> None:
    """The diamond's three middle steps end together and are mostly finished as one batch
    (one commit, or one commit-and-complete where the broker keeps the journal); the
    worker kills itself once c is committed, before the batch's tasks are acknowledged.
    The next worker completes what came back with the records: each node the dead worker
    committed ran once.  One it ran but had not committed yet (it ended as the batch was
    sent, so it waited for the next) runs again: before its commit a node is at least
    once, by design."""
    first = procs.serve(lease=LEASE, kill_after_commit="work-3", async_concurrency=100)
    with anyio.fail_after(60):
        async with context(layout, workers=0) as ctx:
            run = await ctx.start(bs.diamond, 5, 0.05, run_id="batch-acked-late")
            await died(procs, first, "the worker to kill itself after committing c")
            procs.serve(lease=LEASE, async_concurrency=100)
            expected, ran, _ = bs.expected_diamond(5)
            assert await run.result() == expected
            journal = await ctx.store.load_nodes("batch-acked-late")
    assert set(journal) == ran
    log = [line for line in bs.read_log(procs.log) if line["run"] == "batch-acked-late"]
    committed = {line["node"] for line in log if line["event"] == "commit"}
    assert "work-3" in committed
    runs = Counter(line["node"] for line in log if line["event"] == "end")
    assert set(runs) == ran
    for node, count in runs.items():
        if node in committed:
            assert count == 1, f"{node} was committed by the dead worker, yet ran {count} times"
        else:  # ended in the dead worker, perhaps, but never committed there
            by_first = [line for line in log if line["node"] == node and line["pid"] == first.pid]
            assert count == 1 + any(line["event"] == "end" for line in by_first), node


async def _drained(ctx: fd.Context) -> None:
    queue: Any = ctx.queue
    with anyio.fail_after(10):
        while True:
            count = queue.pending()
            if int(await count if not isinstance(count, int) else count) == 0:
                return
            await anyio.sleep(0.01)


# --- killed mid-step ------------------------------------------------------------------------


@pytest.mark.parametrize("layout", TOGETHER, indirect=True)
async def test_a_step_without_retries_whose_worker_was_killed_finishes_elsewhere(
    layout: Layout, procs: Procs
) -> None:
    first = procs.serve(lease=LEASE, hold="stall")
    with anyio.fail_after(60):
        async with context(layout, workers=0) as ctx:
            run = await ctx.start(bs.stalls, 3, run_id="stalled")

            def stall_started() -> bool:
                return any(
                    (line["label"], line["event"]) == ("stall", "start")
                    for line in bs.read_log(procs.log)
                )

            await procs.wait_for(stall_started, "the stall step to start")
            procs.kill(first)
            second = procs.serve(lease=LEASE)
            assert await run.result() == bs.mix("stall", bs.mix("a", 3))
            dead = await ctx.queue.dead_letters("stalled")
    assert dead == []
    starts = [
        line["pid"]
        for line in bs.read_log(procs.log)
        if (line["label"], line["event"]) == ("stall", "start")
    ]
    assert starts == [first.pid, second.pid]


# --- a poison task --------------------------------------------------------------------------


async def _keep_a_worker(procs: Procs, deaths: list[int], options: dict[str, Any]) -> None:
    """One worker at a time: each that dies (killed by the step it took) is replaced."""
    while True:
        worker = procs.serve(lease=LEASE, **options)
        procs.expect_death(worker)
        while worker.poll() is None:  # noqa: ASYNC110  (a process: nothing to wait on)
            await anyio.sleep(0.02)
        deaths.append(worker.pid)


@pytest.mark.parametrize("layout", TOGETHER, indirect=True)
@pytest.mark.parametrize("where", ["worker", "context"])
async def test_a_task_that_kills_every_worker_is_dead_lettered_after_max_deliveries(
    layout: Layout, procs: Procs, where: str
) -> None:
    """``stall`` kills the process that runs it.  After ``max_deliveries`` (set on the
    workers, ``flowdsl worker --max-deliveries``, or on the run's context) the next worker
    dead-letters it without running it, and the run fails naming the node."""
    deaths: list[int] = []
    worker_options: dict[str, Any] = {"kill": "stall"}
    context_options: dict[str, Any] = {}
    if where == "worker":
        worker_options["max_deliveries"] = 2
    else:
        context_options["max_deliveries"] = 2
    with anyio.fail_after(90):
        async with context(layout, workers=0, **context_options) as ctx:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_keep_a_worker, procs, deaths, worker_options)
                run = await ctx.start(bs.stalls, 5, run_id="poison")
                with pytest.raises(fd.StepFailed) as info:
                    await run.result()
                tg.cancel_scope.cancel()
            dead = await ctx.queue.dead_letters("poison")
            journal = await ctx.store.load_nodes("poison")
    error = info.value
    assert error.node_id == "fragile"
    assert error.run_id == "poison"
    assert str(error).startswith(
        "flow 'stalls', node 'fragile': a poison task: handed out 3 times, more than "
        "max_deliveries=2; every worker that took it died or lost its lease before "
        "finishing it."
    )
    assert "dead-letter list" in str(error)
    assert [d["node_id"] for d in dead] == ["fragile"]
    assert set(journal) == {"work"}
    starts = [
        line["pid"]
        for line in bs.read_log(procs.log)
        if (line["label"], line["event"]) == ("stall", "start")
    ]
    assert len(starts) == 2  # two workers ran it and died; the third did not run it
    assert set(starts) <= set(deaths)
