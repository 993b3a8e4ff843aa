"""Batch mode on NATS across processes: worker processes share the work, SIGKILLed
workers and a nats-server killed and restarted mid-batch lose nothing and commit nothing
twice.  Real nats-server processes (file storage), real worker processes (``flowdsl
worker``, or ``nats_steps.py serve`` for a short lease), the client in this process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import flowdsl as fd
from flowdsl.backends.nats.broker import NATSBroker

import nats_steps as ns
from _servers import NatsServer

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def anyio_backend() -> Any:
    return ("asyncio", {"debug": False})  # debug mode's slow-callback checks cost here


class Workers:
    """The worker processes of one test; :meth:`close` kills those still alive."""

    def __init__(self, directory: Path, url: str, delay: float) -> None:
        self.dir = directory
        self.url = url
        self.log = directory / "exec.log"
        self.delay = delay
        self.procs: list[subprocess.Popen[bytes]] = []
        self.killed: set[int] = set()

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
        env[ns.LOG_ENV] = str(self.log)
        env[ns.DELAY_ENV] = str(self.delay)
        return env

    def start(self, *, lease: float = 30.0, concurrency: int = 4, cli: bool = False) -> Any:
        if cli:
            args = [
                "-m", "flowdsl", "worker", "--broker", self.url, "--store", self.url,
                "--import", "nats_steps", "--concurrency", str(concurrency),
                "--async-concurrency", str(concurrency), "--lease", str(lease),
            ]  # fmt: skip
        else:
            args = [
                "-c", "import nats_steps; nats_steps.main()", "serve", self.url, self.url,
                "--lease", str(lease), "--concurrency", str(concurrency),
            ]  # fmt: skip
        n = len(self.procs)
        with open(self.dir / f"w{n}.out", "wb") as out, open(self.dir / f"w{n}.err", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, *args], env=self.env(), cwd=self.dir, stdout=out, stderr=err
            )
        self.procs.append(proc)
        return proc

    def output(self, proc: Any) -> str:
        n = self.procs.index(proc)
        return (self.dir / f"w{n}.out").read_text() + (self.dir / f"w{n}.err").read_text()

    async def ready(self, *procs: Any) -> None:
        """Until each process says it serves (``ready``, or the CLI's ``serving``)."""
        with anyio.fail_after(30):
            while not all(
                ("ready" in self.output(p) or "serving" in self.output(p)) for p in procs
            ):
                self.check()
                await anyio.sleep(0.05)  # other processes' output has no notification

    def kill(self, proc: Any) -> None:
        self.killed.add(proc.pid)
        proc.kill()
        proc.wait()

    def check(self) -> None:
        for proc in self.procs:
            if proc.pid not in self.killed and proc.poll() is not None:
                raise AssertionError(f"a worker exited ({proc.returncode}):\n{self.output(proc)}")

    def executions(self) -> list[tuple[str, int]]:
        return ns.read_log(self.log)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _serving(output: str) -> bool:
    return "ready" in output or "serving" in output


@pytest.fixture
def workers(tmp_path: Path, nats_server: NatsServer) -> Iterator[Workers]:
    w = Workers(tmp_path, f"{nats_server.url}?prefix=scale", delay=0.02)
    yield w
    w.close()


async def finish_all(ctx: fd.Context, runs: list[fd.Run], workers: Workers, limit: float) -> None:
    with anyio.fail_after(limit):
        for run in runs:
            with anyio.move_on_after(limit) as scope:
                await run.result()
            workers.check()  # a worker that died explains a timeout
            assert not scope.cancelled_caught


async def check_journals(ctx: fd.Context, keys: list[str], expected_nodes: int) -> None:
    """Every run finished with all its nodes journaled, each once (KV keys are unique; a
    second commit of a node would have failed, not added a record)."""
    for key in keys:
        record = await ctx.store.get_run(key)
        assert record is not None
        assert record.status is fd.RunStatus.FINISHED, key
        assert len(await ctx.store.load_nodes(key)) == expected_nodes, key


async def test_worker_processes_share_the_work_and_each_node_runs_once(
    workers: Workers,
) -> None:
    procs = [workers.start(cli=True, concurrency=4) for _ in range(3)]
    await workers.ready(*procs)
    keys = [f"k{i}" for i in range(24)]
    async with fd.Context(batch=True, broker=workers.url, store=workers.url, workers=0) as ctx:
        runs = [await ctx.start(ns.fan, key, run_id=key) for key in keys]
        await finish_all(ctx, runs, workers, 60)
        assert [await r.result() for r in runs] == [ns.expected_fan(k) for k in keys]
        await check_journals(ctx, keys, ns.FAN + 2)
        queue: NATSBroker = ctx.queue
        assert await queue.pending() == 0
    executions = workers.executions()
    counts = Counter(what for what, _ in executions)
    assert counts == Counter(line for key in keys for line in ns.fan_lines(key))
    by_process = Counter(pid for _, pid in executions)
    assert len(by_process) >= 2, by_process  # the work was shared


async def test_sigkilled_workers_lose_no_run_and_commit_nothing_twice(
    workers: Workers,
) -> None:
    workers.delay = 0.15  # steps long enough to be killed in the middle of
    procs = [workers.start(lease=1.0, concurrency=3) for _ in range(3)]
    await workers.ready(*procs)
    keys = [f"c{i}" for i in range(12)]
    async with fd.Context(batch=True, broker=workers.url, store=workers.url, workers=0) as ctx:
        runs = [await ctx.start(ns.chain, key, run_id=key) for key in keys]
        with anyio.fail_after(30):
            while len(workers.executions()) < 10:
                workers.check()
                await anyio.sleep(0.02)
        assert len(workers.executions()) < len(keys) * ns.CHAIN  # in the middle
        for proc in procs[:2]:
            workers.kill(proc)  # in the middle of their steps, leases held
        replacement = workers.start(lease=1.0, concurrency=3)
        await workers.ready(replacement)
        await finish_all(ctx, runs, workers, 60)
        assert [await r.result() for r in runs] == [ns.expected_chain(k) for k in keys]
        await check_journals(ctx, keys, ns.CHAIN)
    counts = Counter(what for what, _ in workers.executions())
    expected = Counter(f"link{i}:{key}" for key in keys for i in range(ns.CHAIN))
    assert set(counts) == set(expected)
    # Only the steps the killed workers were running ran again (3 slots each).
    assert sum(counts.values()) - sum(expected.values()) <= 2 * 3


@pytest.mark.parametrize("how", ["restart", "kill"])
async def test_a_nats_server_restarted_mid_batch_loses_nothing(
    workers: Workers, nats_server: NatsServer, how: str
) -> None:
    workers.delay = 0.05
    procs = [workers.start(lease=2.0, concurrency=4) for _ in range(2)]
    await workers.ready(*procs)
    keys = [f"s{i}" for i in range(16)]
    async with fd.Context(batch=True, broker=workers.url, store=workers.url, workers=0) as ctx:
        runs = [await ctx.start(ns.fan, key, run_id=key) for key in keys]
        with anyio.fail_after(30):
            while len(workers.executions()) < 12:
                workers.check()
                await anyio.sleep(0.02)
        assert len(workers.executions()) < len(keys) * (ns.FAN + 2)  # in the middle
        if how == "kill":
            nats_server.kill()  # a crash: no shutdown, JetStream recovers its files
        # Same port and store directory: the streams, the consumer and the bucket survive.
        await anyio.to_thread.run_sync(nats_server.restart)
        await finish_all(ctx, runs, workers, 90)
        assert [await r.result() for r in runs] == [ns.expected_fan(k) for k in keys]
        await check_journals(ctx, keys, ns.FAN + 2)
    counts = Counter(what for what, _ in workers.executions())
    assert set(counts) == {line for key in keys for line in ns.fan_lines(key)}
