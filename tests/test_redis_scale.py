"""Batch mode on Redis across worker processes: scale-out, workers SIGKILLed at random
instants, and the server killed and restarted in the middle of a batch.  Every run must
finish once, with one journal record per node, and nothing left queued.

Workers are real processes: ``flowdsl worker --broker redis://... --import redis_steps``
(the command line), or ``flowdsl._executors.batch.serve`` with a short lease, so that the
tasks of a killed worker come back within a second.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import flowdsl as fd
from flowdsl._records import RunStatus
from flowdsl.backends.redis.broker import GROUP, RedisBroker

from _servers import RedisServer
from redis_steps import DELAY_ENV, FAN, LOG_ENV, expected_fan, fan, fan_lines, read_log

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

TESTS = Path(__file__).resolve().parent
_SERVE = """
import functools, sys, anyio
from flowdsl._executors.batch import serve
url, lease = sys.argv[1], float(sys.argv[2])
anyio.run(functools.partial(serve, url, store=url, imports=("redis_steps",), concurrency=8,
                            async_concurrency=8, lease=lease))
"""


@pytest.fixture
def anyio_backend() -> Any:
    """redis-py's client runs on asyncio only (trio is refused: test_redis_store)."""
    return ("asyncio", {"debug": True})


class Workers:
    """Worker processes of one test; every one still running is killed at teardown."""

    def __init__(self, url: str, directory: Path, delay: float) -> None:
        self.url = url
        self.directory = directory
        self.log = directory / "executions.log"
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
            LOG_ENV: str(self.log),
            DELAY_ENV: str(delay),
        }
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, *, lease: float | None = None) -> subprocess.Popen[bytes]:
        """``flowdsl worker`` (lease None: the command line's default) or ``serve``."""
        if lease is None:
            command = [
                *(sys.executable, "-m", "flowdsl", "worker"),
                *("--broker", self.url, "--store", self.url),
                *("--import", "redis_steps", "--concurrency", "8", "--async-concurrency", "8"),
            ]
        else:
            command = [sys.executable, "-c", _SERVE, self.url, str(lease)]
        output = (self.directory / f"worker-{len(self.processes)}.out").open("wb")
        process = subprocess.Popen(
            command, env=self.env, stdout=output, stderr=subprocess.STDOUT, cwd=self.directory
        )
        output.close()
        self.processes.append(process)
        return process

    def running(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.processes if p.poll() is None]

    def output(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')}"
            for path in sorted(self.directory.glob("worker-*.out"))
        )

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()


@pytest.fixture
def workers_factory(tmp_path: Path) -> Iterator[Any]:
    made: list[Workers] = []

    def make(url: str, *, delay: float = 0.0) -> Workers:
        workers = Workers(url, tmp_path, delay)
        made.append(workers)
        return workers

    yield make
    for workers in made:
        workers.stop()


async def waiting_workers(url: str) -> int:
    """How many workers wait on the queue now (each blocks in XREADGROUP when idle)."""
    broker = RedisBroker(url)
    await broker.open()
    try:
        clients = await broker._link.client.client_list()
        return sum(c["cmd"] == "xreadgroup" and "b" in c["flags"] for c in clients)
    finally:
        await broker.close()


async def wait_for(condition: Any) -> None:
    """Poll a condition on the server or on processes (nothing there can wake us)."""
    with anyio.fail_after(60):
        while True:
            if await condition():
                return
            await anyio.sleep(0.05)


async def check_every_run_finished_once(ctx: fd.Context, keys: list[str], results: list[Any]):
    """Results right, each run finished, one journal record per node, nothing queued."""
    assert results == [expected_fan(k) for k in keys]
    runs = await ctx.store.list_runs(limit=10 * len(keys))
    assert len(runs) == len(keys)
    assert Counter(r.status for r in runs) == {RunStatus.FINISHED: len(keys)}
    broker: RedisBroker = ctx.queue
    for run in runs:
        assert len(await ctx.store.load_nodes(run.run_id)) == FAN + 2
        assert await broker.dead_letters(run.run_id) == []
    assert await broker.pending() == 0
    client = broker._link.client
    assert await client.hlen(broker.queued_key) == 0


async def holding_tasks(broker: RedisBroker, workers: Workers) -> list[Any]:
    """The worker processes that hold tasks right now (by the pid in their names)."""
    summary = await broker._link.client.xpending(broker.tasks_key, GROUP)
    pids = {int(c["name"].decode().split(":")[1]) for c in summary["consumers"]}
    return [p for p in workers.running() if p.pid in pids]


def url_for(server: RedisServer, name: str) -> str:
    return f"{server.url}?prefix={name}"


# --- scale-out ----------------------------------------------------------------------------------


async def test_worker_processes_share_the_work_and_each_node_runs_once(
    redis_server: RedisServer, workers_factory: Any
) -> None:
    url = url_for(redis_server, "scale")
    workers = workers_factory(url, delay=0.01)
    for _ in range(3):
        workers.start()  # `flowdsl worker --broker ... --import redis_steps`

    async def all_reading() -> bool:
        assert len(workers.running()) == 3, workers.output()
        return await waiting_workers(url) == 3

    await wait_for(all_reading)
    keys = [f"k{i}" for i in range(60)]
    async with fd.Context(batch=True, broker=url, store=url, workers=0) as ctx:
        results = await ctx.map(fan, keys, progress=False)
        await check_every_run_finished_once(ctx, keys, results)
    log = read_log(workers.log)
    executions = Counter(what for what, _ in log)
    assert executions == Counter(line for k in keys for line in fan_lines(k))
    by_process = Counter(pid for _, pid in log)
    assert set(by_process) == {p.pid for p in workers.processes}, by_process
    # SIGTERM stops a command-line worker cleanly.
    for process in workers.processes:
        process.send_signal(signal.SIGTERM)
    for process in workers.processes:
        assert process.wait(timeout=30) == 0, workers.output()


# --- chaos --------------------------------------------------------------------------------------


async def test_sigkilled_workers_lose_nothing_and_commit_nothing_twice(
    redis_server: RedisServer, workers_factory: Any
) -> None:
    url = url_for(redis_server, "chaos")
    workers = workers_factory(url, delay=0.05)
    rng = random.Random(5)
    lease = 1.0
    for _ in range(3):
        workers.start(lease=lease)
    keys = [f"k{i}" for i in range(100)]
    kills = 0
    # Workers are killed at random while they hold tasks: one task may lose several workers,
    # which is what the chaos is about, not a poison task (max_deliveries has its own tests).
    async with fd.Context(batch=True, broker=url, store=url, workers=0, max_deliveries=100) as ctx:
        results: list[Any] = []

        async def batch() -> None:
            results.extend(await ctx.map(fan, keys, progress=False))

        async with anyio.create_task_group() as tg:
            tg.start_soon(batch)
            while not results:
                # A random instant: whatever the victim holds is mid-step, mid-commit...
                await anyio.sleep(rng.uniform(0.1, 0.4))
                holders = await holding_tasks(ctx.queue, workers)
                if results or not holders:
                    continue
                rng.choice(holders).kill()
                kills += 1
                workers.start(lease=lease)
        await check_every_run_finished_once(ctx, keys, results)
        runs = await ctx.store.list_runs(limit=1000)
        attempts = [
            record.attempts
            for run in runs
            for record in (await ctx.store.load_nodes(run.run_id)).values()
        ]
    assert kills >= 2
    # Killed workers held tasks: those came back to live workers (every run finished,
    # above), each a fresh first attempt: a worker's death is not the step's failure.
    assert set(attempts) == {1}
    executions = Counter(what for what, _ in read_log(workers.log))
    # At least once each (a killed worker's step runs again), and committed once above.
    assert set(executions) == {line for k in keys for line in fan_lines(k)}


async def test_a_server_killed_and_restarted_mid_batch_loses_nothing(
    redis_server: RedisServer, workers_factory: Any
) -> None:
    url = url_for(redis_server, "restart")
    workers = workers_factory(url, delay=0.05)
    for _ in range(2):
        workers.start(lease=2.0)
    keys = [f"k{i}" for i in range(60)]
    async with fd.Context(batch=True, broker=url, store=url, workers=0) as ctx:
        results: list[Any] = []

        async def batch() -> None:
            results.extend(await ctx.map(fan, keys, progress=False))

        async def under_way() -> bool:
            return len(read_log(workers.log)) >= 60  # a sixth of the steps ran

        async with anyio.create_task_group() as tg:
            tg.start_soon(batch)
            await wait_for(under_way)
            redis_server.kill()  # SIGKILL: appendfsync always keeps every acknowledged write
            await anyio.to_thread.run_sync(redis_server.restart)
            assert not results  # the restart came in the middle of the batch
        await check_every_run_finished_once(ctx, keys, results)
    # The workers rode out the restart: still serving.
    assert len(workers.running()) == 2, workers.output()
    executions = Counter(what for what, _ in read_log(workers.log))
    assert set(executions) == {line for k in keys for line in fan_lines(k)}
