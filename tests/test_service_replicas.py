"""Two ``flowdsl serve`` replicas on one store (an SQLite file, a Redis server): every run
is driven exactly once, and when one replica is SIGKILLed the other takes up its runs.

Each step of ``service_flows.counted`` and ``counted_gated`` appends ``<pid> done
<step>:<x>`` to one log file when it runs, from whichever process: the test counts the
lines to tell how often each step of each run ran, and where.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import flowdsl as fd

from _service_proc import Service, serve, service_env

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(180)]

RUNS = 30


@pytest.fixture
def anyio_backend() -> Any:
    return "asyncio"  # grpc.aio is asyncio only


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'runs.db'}"
    server = request.getfixturevalue("redis_server")
    return str(server.url)


@pytest.fixture
def services(tmp_path: Path, store: str) -> Iterator[Any]:
    env = service_env(tmp_path)
    started: list[Service] = []

    def start(*extra: str) -> Service:
        service = serve(store, env, "--take-over-every", "0.2", *extra)
        started.append(service)
        return service

    yield start
    for service in started:
        service.reap()


def step_runs(tmp_path: Path) -> list[tuple[int, str, str]]:
    """``(pid, kind, step:x)`` for every line the steps logged."""
    path = tmp_path / "steps.log"
    if not path.exists():
        return []
    return [
        (int(pid), kind, label)
        for pid, kind, label in (line.split() for line in path.read_text().splitlines())
    ]


async def wait_until_started(client: fd.Client, run_id: str, node: str) -> None:
    async for event in client.watch(run_id):
        if event.type == "StepStarted" and event.node_id == node:
            return
    raise AssertionError(f"run {run_id} ended before {node} started")


async def test_two_replicas_drive_every_run_exactly_once(services: Any, tmp_path: Path) -> None:
    a, b = services(), services()
    async with fd.Client(a.url) as to_a, fd.Client(b.url) as to_b:
        created: dict[str, list[bool]] = collections.defaultdict(list)

        async def start(client: fd.Client, x: int) -> None:
            run = await client.start("service_flows:counted", {"x": x}, run_id=f"r{x}")
            created[run.run_id].append(run.created)

        async with anyio.create_task_group() as tg:
            for x in range(RUNS):
                # A third of the runs through A, a third through B, a third through both
                # at once with the same run id.
                if x % 3 != 1:
                    tg.start_soon(start, to_a, x)
                if x % 3 != 0:
                    tg.start_soon(start, to_b, x)
        ended = {}
        for x in range(RUNS):
            client = to_a if x % 2 else to_b  # each replica answers for every run
            ended[x] = await client.wait(f"r{x}")
        page = await to_a.list(page_size=1000)

    assert {x: (run.status, run.result) for x, run in ended.items()} == {
        x: ("finished", x + 3) for x in range(RUNS)
    }
    assert sorted(run.run_id for run in page.runs) == sorted(f"r{x}" for x in range(RUNS))
    # Of two starts of one id, at most one says it began the run (none, when the other
    # replica's drive took the run's lease before the one that made its record).
    assert sorted(rid for rid, flags in created.items() if len(flags) == 2) == sorted(
        f"r{x}" for x in range(RUNS) if x % 3 == 2
    )
    assert all(flags.count(True) <= 1 for flags in created.values())
    done = collections.Counter(label for _, kind, label in step_runs(tmp_path) if kind == "done")
    expected = {f"{step}:{x}": 1 for x in range(RUNS) for step in ("one", "two")}
    assert done == expected
    pids = {pid for pid, _, _ in step_runs(tmp_path)}
    assert pids <= {a.proc.pid, b.proc.pid}
    a.stop()
    b.stop()


async def test_a_replica_killed_mid_run_its_runs_finish_on_the_other(
    services: Any, tmp_path: Path
) -> None:
    a, b = services(), services()
    on_a = [f"a{x}" for x in range(RUNS // 2)]
    on_b = [f"b{x}" for x in range(RUNS // 2)]
    xs = {run_id: i for i, run_id in enumerate(on_a + on_b)}
    async with fd.Client(a.url) as to_a, fd.Client(b.url) as to_b:
        for run_ids, client in ((on_a, to_a), (on_b, to_b)):
            for run_id in run_ids:
                await client.start("service_flows:counted_gated", {"x": xs[run_id]}, run_id=run_id)
        for run_ids, client in ((on_a, to_a), (on_b, to_b)):
            for run_id in run_ids:
                await wait_until_started(client, run_id, "stage_held")
        # Every run is held in its second step, its first journaled: A dies.
        a.kill()
        (tmp_path / "gates" / "held").touch()
        ended = {run_id: await to_b.wait(run_id) for run_id in on_a + on_b}

    assert {rid: (run.status, run.result) for rid, run in ended.items()} == {
        rid: ("finished", (x + 1) * 10 + 2) for rid, x in xs.items()
    }
    lines = step_runs(tmp_path)
    done = collections.Counter(label for _, kind, label in lines if kind == "done")
    assert done == {f"{step}:{x}": 1 for x in xs.values() for step in ("one", "held", "two")}
    where = {label: pid for pid, kind, label in lines if kind == "done"}
    held_starts = collections.defaultdict(list)
    for pid, kind, label in lines:
        if kind == "start":
            held_starts[label].append(pid)
    for run_id in on_a:
        x = xs[run_id]
        # Its first step ran on A, never again; the step in flight when A died ran again
        # on B (at least once, as a crash allows), and the rest ran on B.
        assert where[f"one:{x}"] == a.proc.pid
        assert held_starts[f"held:{x}"] == [a.proc.pid, b.proc.pid]
        assert where[f"held:{x}"] == where[f"two:{x}"] == b.proc.pid
    for run_id in on_b:
        x = xs[run_id]
        assert held_starts[f"held:{x}"] == [b.proc.pid]
        assert {where[f"{step}:{x}"] for step in ("one", "held", "two")} == {b.proc.pid}
    b.stop()


async def test_cancel_through_the_replica_that_does_not_drive_the_run_is_refused(
    services: Any, tmp_path: Path
) -> None:
    a, b = services(), services()
    async with fd.Client(a.url) as to_a, fd.Client(b.url) as to_b:
        await to_a.start("service_flows:counted_gated", {"x": 7}, run_id="held-on-a")
        await wait_until_started(to_a, "held-on-a", "stage_held")
        with pytest.raises(fd.service.ServiceError) as refused:
            await to_b.cancel("held-on-a")
        assert refused.value.code == "FAILED_PRECONDITION"
        assert f"is being driven by process {a.proc.pid} on host" in str(refused.value)
        assert (await to_b.get("held-on-a")).status == "running"
        cancelled = await to_a.cancel("held-on-a")
        assert cancelled.status == "cancelled"
    a.stop()
    b.stop()


async def test_a_waiting_run_of_a_killed_replica_is_taken_up_and_signalled(
    services: Any,
) -> None:
    a, b = services(), services()
    async with fd.Client(a.url) as to_a:
        await to_a.start("service_flows:approved", {"topic": "launch"}, run_id="waits")
        async for event in to_a.watch("waits"):
            if event.type == "RunWaiting":
                break
    a.kill()
    async with fd.Client(b.url) as to_b:
        # B takes the run up (its driver is gone) and waits in its place; the signal
        # reaches it through B.
        await to_b.signal("waits", "approval", True)
        ended = await to_b.wait("waits")
    assert (ended.status, ended.result) == ("finished", "launch: yes")
    b.stop()
