"""The run lease as the engine keeps it (flowdsl/_engine/lease.py): owners that say which
process holds a lease, the check that a holder on this machine is gone, and a keeper that
takes, renews and releases leases (what every store must do is in the store conformance
suite)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest

from flowdsl._engine import lease as lease_module
from flowdsl._engine.lease import LeaseKeeper, Owner, new_owner, process_gone
from flowdsl.backends import MemoryStore
from flowdsl.backends.sqlite.store import SQLiteStore

pytestmark = pytest.mark.anyio


def test_an_owner_names_its_process_and_reads_back() -> None:
    owner = new_owner()
    assert owner.pid == os.getpid()
    assert Owner.parse(str(owner)) == owner
    assert owner.describe() == f"process {os.getpid()} on host {owner.host!r}"
    assert Owner.parse("not an owner") is None
    assert Owner.parse("h:notapid:1:m:n") is None
    # Two owners of one process differ (one per keeper); they share the machine.
    other = new_owner()
    assert other != owner
    assert (other.machine, other.started) == (owner.machine, owner.started)


def test_a_process_that_exited_is_gone_and_a_live_one_is_not() -> None:
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as child:
        mine = new_owner()
        theirs = str(Owner(mine.host, child.pid, _start(child.pid), mine.machine, "x"))
        assert not process_gone(theirs)
        child.kill()
        # Killed, not reaped yet (a zombie, as a SIGKILLed child is until its parent
        # waits for it): gone all the same.
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        assert process_gone(theirs)
    assert process_gone(theirs)


def _start(pid: int) -> str:
    return lease_module._start_time(pid) or ""


def test_a_reused_pid_is_not_taken_for_the_old_process() -> None:
    """Same pid, another start time: the process that held the lease is gone."""
    mine = new_owner()
    if not mine.started:
        pytest.skip("this system does not give process start times")
    parent = os.getppid()
    assert not process_gone(str(Owner(mine.host, parent, _start(parent), mine.machine, "x")))
    assert process_gone(str(Owner(mine.host, parent, "1", mine.machine, "x")))


def test_another_machines_owner_is_never_taken_for_gone() -> None:
    mine = new_owner()
    elsewhere = Owner("other-host", 999_999_999, "1", "0123456789ab", "x")
    assert not process_gone(str(elsewhere))
    assert not process_gone("garbage")
    # This process, under a name no live keeper has: a driver here that is gone.
    assert process_gone(str(Owner(mine.host, mine.pid, mine.started, mine.machine, "gone")))


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> object:
    s = MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "runs.db")
    await s.open()
    yield s
    await s.close()


async def test_a_keeper_takes_a_lease_a_live_keeper_holds_only_when_it_is_gone(
    store: MemoryStore,
) -> None:
    first = LeaseKeeper(store)
    second = LeaseKeeper(store)
    assert await first.take("r") is None
    held = await second.take("r")
    assert held is not None
    assert held.owner == first.owner
    first.close()  # the driver is gone (it never released): taken over at once
    assert await second.take("r") is None
    assert second.held == ["r"]
    await second.release("r")
    assert second.held == []
    assert await first.take("r") is None


async def test_a_keeper_renews_and_hears_of_a_lease_taken_over(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "runs.db")
    await store.open()
    try:
        keeper = LeaseKeeper(store, ttl=0.2)
        lost: list[str] = []
        assert await keeper.take("a", lambda: lost.append("a")) is None
        assert await keeper.take("b", lambda: lost.append("b")) is None
        assert await keeper.renew() == []
        # "b" runs out while its keeper does not renew it (a frozen process): another
        # machine's driver takes it.
        with anyio.fail_after(10):
            while await store.acquire_lease("b", "elsewhere", 30.0) is not None:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        assert await keeper.renew() == ["b"]
        assert lost == ["b"]
        assert keeper.held == ["a"]
    finally:
        await store.close()


class _SlowRenewals(SQLiteStore):
    """A store whose lease renewals wait at *gate* before they reach the file (a renewal
    on its way over the network while the run it names ends)."""

    gate: anyio.Event
    asked: anyio.Event

    async def renew_leases(self, owner: str, run_ids: Sequence[str], ttl: float) -> list[str]:
        self.asked.set()
        await self.gate.wait()
        return await super().renew_leases(owner, run_ids, ttl)


async def test_a_run_that_ends_while_its_lease_is_renewed_is_not_lost(tmp_path: Path) -> None:
    store = _SlowRenewals(tmp_path / "runs.db")
    store.gate, store.asked = anyio.Event(), anyio.Event()
    await store.open()
    try:
        keeper = LeaseKeeper(store, ttl=30.0)
        lost: list[str] = []
        for run_id in ("ended", "again", "kept"):
            assert await keeper.take(run_id, functools.partial(lost.append, run_id)) is None
        async with anyio.create_task_group() as tg:
            answers: list[list[str]] = []

            async def renew() -> None:
                answers.append(await keeper.renew())

            tg.start_soon(renew)
            await store.asked.wait()
            # While the renewal is on its way: one run ends, another ends and is resumed.
            await keeper.release("ended")
            await keeper.release("again")
            assert await keeper.take("again", functools.partial(lost.append, "again")) is None
            store.gate.set()
        assert answers == [[]]
        assert lost == []
        assert sorted(keeper.held) == ["again", "kept"]
        assert await keeper.renew() == []
    finally:
        await store.close()


async def test_keep_renews_until_cancelled(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "runs.db")
    await store.open()
    try:
        keeper = LeaseKeeper(store, ttl=0.3)
        assert await keeper.take("r") is None
        async with anyio.create_task_group() as tg:
            tg.start_soon(keeper.keep)
            # Several leases' worth of time: still held, since it is renewed.
            for _ in range(5):
                await anyio.sleep(0.3)
                held = await store.acquire_lease("r", "other", 30.0)
                assert held is not None
                assert held.owner == keeper.owner
            tg.cancel_scope.cancel()
    finally:
        await store.close()


async def test_a_worker_of_this_process_is_alive_only_while_it_works(tmp_path: Path) -> None:
    from flowdsl._engine.lease import process_alive
    from flowdsl._executors.batch import Worker
    from flowdsl.backends.sqlite.broker import SQLiteBroker

    store = SQLiteStore(tmp_path / "q.db")
    queue = SQLiteBroker(tmp_path / "q.db")
    queue.share_store(store)
    await store.open()
    await queue.open()
    try:
        worker = Worker(queue, store)
        assert not process_alive(worker.name)  # not started: holds nothing
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            assert process_alive(worker.name)
            tg.cancel_scope.cancel()
        # Its context ended: a resume in this process hands its tasks out again.
        assert not process_alive(worker.name)
        assert not process_alive("garbage")
    finally:
        await queue.close()
        await store.close()
