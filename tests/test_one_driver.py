"""One driver per run: a run that a live process drives is never driven by a second one.

In this process: two contexts on one store, a driver on "another machine" (a lease whose
owner this machine cannot check) waited out and taken over, a driver that lost its lease
stepping back, and ``wait=False`` refusing with :class:`fd.RunBusy`.

Across processes: test_one_driver_processes.py.
"""

from __future__ import annotations

import os
import pickle
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import flowdsl as fd
from flowdsl._engine.lease import Owner, new_owner

import batch_steps as bs

pytestmark = pytest.mark.anyio


@pytest.fixture
def exec_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "exec.jsonl"
    monkeypatch.setenv(bs.EXEC_LOG, str(path))
    monkeypatch.delenv(bs.HOLD, raising=False)
    monkeypatch.delenv(bs.FAIL, raising=False)
    return path


def ends(log: Path, run_id: str) -> Counter[str]:
    """How many times each step's body ran to its end (its side effect), by label."""
    return Counter(
        line["label"]
        for line in bs.read_log(log)
        if line["run"] == run_id and line["event"] == "end"
    )


def started(log: Path, run_id: str, label: str) -> bool:
    return any(
        (line["run"], line["label"], line["event"]) == (run_id, label, "start")
        for line in bs.read_log(log)
    )


async def until(condition: Any, limit: float = 30.0) -> None:
    """Poll a condition on files or the store (nothing announces it)."""
    with anyio.fail_after(limit):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.01)


# --- in this process ---------------------------------------------------------------------------

GATES: dict[str, anyio.Event] = {}


@fd.step
async def gated(x: int) -> int:
    GATES["started"].set()
    await GATES["go"].wait()
    return x * 2


@fd.flow
async def gated_flow(x: int) -> int:
    return await gated(x)


@pytest.fixture
def gates() -> Iterator[dict[str, anyio.Event]]:
    GATES.update(started=anyio.Event(), go=anyio.Event())
    yield GATES
    GATES.clear()


async def test_a_second_context_waits_for_the_run_another_drives(
    sqlite_url: str, gates: dict[str, anyio.Event]
) -> None:
    events: list[Any] = []
    async with (
        fd.Context(store=sqlite_url) as first,
        fd.Context(store=sqlite_url, on_event=events.append) as second,
    ):
        run = await first.start(gated_flow, 4, run_id="one")
        await gates["started"].wait()
        results: list[Any] = []

        async def resume() -> None:
            results.append(await second.resume("one"))

        async def start() -> None:
            results.append(await (await second.start(gated_flow, 4, run_id="one")).result())

        async with anyio.create_task_group() as tg:
            tg.start_soon(resume)
            tg.start_soon(start)
            tg.start_soon(lambda: second.run(gated_flow, 4, run_id="one"))
            await anyio.sleep(0.2)  # they wait as observers: nothing ends them but the run
            assert results == []
            gates["go"].set()
        assert await run.result() == 8
    assert results == [8, 8]
    # The second context executed nothing: it has no step events of its own.
    assert [e for e in events if isinstance(e, fd.events.StepStarted)] == []


async def test_wait_false_refuses_with_run_busy_naming_the_driver(
    sqlite_url: str, gates: dict[str, anyio.Event]
) -> None:
    async with fd.Context(store=sqlite_url) as first, fd.Context(store=sqlite_url) as second:
        run = await first.start(gated_flow, 4, run_id="busy")
        await gates["started"].wait()
        calls = [
            second.resume("busy", wait=False),
            second.start(gated_flow, 4, run_id="busy", wait=False),
            second.run(gated_flow, 4, run_id="busy", wait=False),
        ]
        for call in calls:
            with pytest.raises(fd.RunBusy) as info:
                await call
            error = info.value
            assert str(error).startswith(
                f"flow 'gated_flow': run 'busy' is being driven by process {os.getpid()} "
                f"on host {new_owner().host!r}, its lease runs until "
            )
            assert "; nothing was run here. Wait for its result: call again without " in str(error)
            assert error.run_id == "busy"
            assert isinstance(error, fd.FlowError)
            assert isinstance(error, RuntimeError)
        gates["go"].set()
        assert await run.result() == 8
        # Once the driver is done, the run is no one's: its result comes back at once.
        assert await second.resume("busy", wait=False) == 8


def test_run_busy_survives_pickling() -> None:
    error = fd.RunBusy("run 'r' is busy", flow="f", run_id="r", owner="h:1:2:m:n", expires_at=5.0)
    again = pickle.loads(pickle.dumps(error))  # noqa: S301  (our own object)
    assert (type(again), str(again), again.run_id, again.owner, again.expires_at) == (
        fd.RunBusy,
        str(error),
        "r",
        "h:1:2:m:n",
        5.0,
    )


def elsewhere() -> str:
    """A lease owner this machine cannot check: only its lease's expiry tells."""
    return str(Owner("other-host", 4242, "1", "0" * 12, "x"))


async def test_a_driver_on_another_machine_is_waited_out_then_taken_over(
    sqlite_url: str, exec_log: Path
) -> None:
    async with fd.Context(store=sqlite_url) as ctx:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(bs.FAIL, "b")
            with pytest.raises(fd.StepFailed):
                await ctx.run(bs.slow_chain, 1, 0.0, run_id="far")
        # A process on another machine resumes it, and vanishes: its lease runs out.
        assert await ctx.store.acquire_lease("far", elsewhere(), 0.5) is None
        with pytest.raises(fd.RunBusy, match="driven by process 4242 on host 'other-host'"):
            await ctx.resume("far", wait=False)
        # Waited for: once its lease runs out, this process takes the run over.
        assert await ctx.resume("far") == bs.expected_trio_chain(1)
    assert ends(exec_log, "far") == Counter({"a": 1, "b": 1, "c": 1})


async def test_a_driver_that_lost_its_lease_steps_back_and_observes(
    sqlite_url: str, gates: dict[str, anyio.Event], exec_log: Path
) -> None:
    """The first driver stalls past its lease (it does not renew); another process takes
    the run over and finishes it; the first learns it lost the lease at its next renewal,
    stops driving without writing anything, and gives the other's result."""
    async with fd.Context(store=sqlite_url, run_lease=0.3) as first:
        first._leases.every = 3600.0  # its renewals stall
        run = await first.start(gated_flow, 5, run_id="lost")
        await gates["started"].wait()
        with anyio.fail_after(10):
            while await first.store.acquire_lease("lost", elsewhere(), 30.0) is not None:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        # The other driver finishes the run (here: by hand, as its journal and record say).
        await first.store.update_run("lost", status=fd.RunStatus.FINISHED, result="11")
        await first.store.release_lease("lost", elsewhere())
        assert await first._leases.renew() == ["lost"]
        assert await run.result() == 11
        record = await first.store.get_run("lost")
    assert record is not None
    assert record.status is fd.RunStatus.FINISHED  # the loser wrote no cancellation
    assert gates["go"].is_set() is False  # its step was cut short, not finished


@pytest.mark.parametrize("fails", [False, True], ids=["finished", "failed"])
async def test_a_run_another_context_drove_before_its_maker_took_the_lease_is_not_begun_again(
    sqlite_url: str, exec_log: Path, fails: bool
) -> None:
    """Two starts of one run id: the first makes the record, the second finds it, takes the
    lease before the first does and drives the run to its end; the first then takes the
    free lease and must not run the steps again (a race two service replicas met)."""
    at_lease, go_on = anyio.Event(), anyio.Event()
    async with fd.Context(store=sqlite_url) as maker, fd.Context(store=sqlite_url) as other:
        take = maker.store.acquire_lease

        async def held_back(*args: Any, **kwargs: Any) -> Any:
            at_lease.set()
            await go_on.wait()
            return await take(*args, **kwargs)

        maker.store.acquire_lease = held_back  # type: ignore[method-assign]
        outcomes: list[Any] = []

        async def make() -> None:
            try:
                outcomes.append(await maker.run(bs.slow_chain, 3, 0.0, run_id="raced"))
            except fd.StepFailed as exc:
                outcomes.append(exc.node)

        with pytest.MonkeyPatch.context() as mp:
            if fails:
                mp.setenv(bs.FAIL, "b")
            async with anyio.create_task_group() as tg:
                tg.start_soon(make)
                await at_lease.wait()  # the record is made; its maker waits to take the lease
                if fails:
                    with pytest.raises(fd.StepFailed) as failed:
                        await other.run(bs.slow_chain, 3, 0.0, run_id="raced")
                    outcomes.append(failed.value.node)
                else:
                    assert await other.run(bs.slow_chain, 3, 0.0, run_id="raced") == (
                        bs.expected_trio_chain(3)
                    )
                go_on.set()
    # The maker gives the other drive's outcome: its result, or the same failed node.
    assert outcomes == ([outcomes[0]] * 2 if fails else [bs.expected_trio_chain(3)])
    expected = {"a": 1} if fails else {"a": 1, "b": 1, "c": 1}
    assert ends(exec_log, "raced") == Counter(expected)


async def test_leases_are_released_when_runs_end(sqlite_url: str) -> None:
    async with fd.Context(store=sqlite_url) as ctx:
        assert await ctx.run(bs.slow_chain, 2, 0.0, run_id="done") == bs.expected_trio_chain(2)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(bs.FAIL, "a")
            with pytest.raises(fd.StepFailed):
                await ctx.run(bs.slow_chain, 2, 0.0, run_id="failed")
        assert ctx._leases.held == []
        for run_id in ("done", "failed"):
            assert await ctx.store.acquire_lease(run_id, "someone", 30.0) is None


def test_run_lease_and_max_deliveries_are_checked() -> None:
    with pytest.raises(fd.ConfigError, match=r"^run_lease must be a positive number"):
        fd.Context(run_lease=0)
    with pytest.raises(fd.ConfigError, match=r"^max_deliveries must be a whole number"):
        fd.Context(batch=True, max_deliveries=0)


async def test_a_context_used_without_async_with_renews_its_leases_and_raises_plainly(
    sqlite_url: str, exec_log: Path
) -> None:
    """Outside ``async with``, each drive renews its lease beside it: a run longer than
    its lease is not taken over by a process that waits for it; its failure is the
    step's StepFailed, not a group."""
    ctx = fd.Context(store=sqlite_url, run_lease=0.3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(bs.FAIL, "a")
        with pytest.raises(fd.StepFailed) as info:
            await ctx.run(bs.slow_chain, 3, 0.0, run_id="plain")
    assert isinstance(info.value.__cause__, RuntimeError)
    results: list[int] = []

    async def drive() -> None:
        results.append(await ctx.run(bs.slow_chain, 3, 0.3, run_id="long"))

    async with anyio.create_task_group() as tg, fd.Context(store=sqlite_url) as other:
        tg.start_soon(drive)
        await until(lambda: started(exec_log, "long", "a"))
        results.append(await other.resume("long"))  # waits: three leases' worth and more
    assert results == [bs.expected_trio_chain(3)] * 2
    assert ends(exec_log, "long") == Counter({"a": 1, "b": 1, "c": 1})
