"""Subprocesses for the batch tests: worker processes, and a client that dies mid-run.

    python _worker_proc.py serve URL [--store URL] [--import MODULE ...] [--concurrency N]
                           [--lease S] [--max-deliveries N] [--kill-after-commit NODE]
    python _worker_proc.py start URL FLOW RUN_ID X [--store URL] [--workers N]

``serve`` runs :func:`flowdsl._executors.batch.serve` on asyncio and prints ``ready`` once
it takes tasks; with ``--kill-after-commit NODE`` it SIGKILLs itself as soon as it has
committed node NODE, before completing (acknowledging) its task.  ``start`` starts
``FLOW`` (``module:name``) on input ``X`` (an int) in a batch context on broker ``URL``
(and the store ``--store``, by default the broker's) with ``N`` in-process workers, prints
``started``, and prints the result when the run ends; tests kill it before.

Tests drive them through :class:`Procs`, which puts ``tests/`` on their ``PYTHONPATH``,
runs them in the test's directory, keeps their output in files and kills them all at
teardown.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio

import flowdsl as fd
from flowdsl._executors.batch import serve
from flowdsl._executors.batch import worker as worker_module

from batch_steps import EXEC_LOG, HOLD, KILL, log_line

TESTS = Path(__file__).resolve().parent


class Procs:
    """The subprocesses of one test; :meth:`close` kills those still alive."""

    def __init__(self, directory: Path, url: str, store: str | None = None) -> None:
        self.dir = directory
        self.url = url  # the broker
        self.store = store  # None: the broker's
        self.log = directory / "exec.jsonl"  # the steps' execution log, every process
        self.procs: list[subprocess.Popen[bytes]] = []
        self._names: dict[int, str] = {}
        self._killed: set[int] = set()

    def env(self, hold: str = "", kill: str = "") -> dict[str, str]:
        env = dict(os.environ)
        path = [str(TESTS), *filter(None, [env.get("PYTHONPATH")])]
        env["PYTHONPATH"] = os.pathsep.join(path)
        env[EXEC_LOG] = str(self.log)
        env[HOLD] = hold
        env[KILL] = kill
        return env

    def serve(
        self,
        *,
        imports: Sequence[str] = ("batch_steps",),
        lease: float = 30.0,
        concurrency: int = 4,
        hold: str = "",
        kill: str = "",
        max_deliveries: int | None = None,
        kill_after_commit: str | None = None,
        async_concurrency: int | None = None,
    ) -> subprocess.Popen[bytes]:
        """A worker process serving the test's queue.  It holds *async_concurrency* tasks
        at most, by default *concurrency*: tests that spread tasks over processes rely on
        each taking few."""
        args = ["serve", self.url, "--lease", str(lease), "--concurrency", str(concurrency)]
        args += ["--async-concurrency", str(async_concurrency or concurrency)]
        args += self._store_args()
        for module in imports:
            args += ["--import", module]
        if max_deliveries is not None:
            args += ["--max-deliveries", str(max_deliveries)]
        if kill_after_commit is not None:
            args += ["--kill-after-commit", kill_after_commit]
        return self._spawn(args, hold, kill)

    def client(
        self, flow: str, run_id: str, x: int, *, workers: int = 2, hold: str = ""
    ) -> subprocess.Popen[bytes]:
        """A process that starts *flow* with in-process workers and waits for it."""
        args = ["start", self.url, flow, run_id, str(x), "--workers", str(workers)]
        return self._spawn(args + self._store_args(), hold)

    def _store_args(self) -> list[str]:
        return [] if self.store is None else ["--store", self.store]

    def expect_death(self, proc: subprocess.Popen[bytes]) -> None:
        """A process the test expects to die by itself (a worker that kills itself)."""
        self._killed.add(proc.pid)

    def _spawn(self, args: list[str], hold: str, kill: str = "") -> subprocess.Popen[bytes]:
        name = f"proc{len(self.procs)}"
        with (
            open(self.dir / f"{name}.out", "wb") as out,
            open(self.dir / f"{name}.err", "wb") as err,
        ):
            proc = subprocess.Popen(
                [sys.executable, str(TESTS / "_worker_proc.py"), *args],
                env=self.env(hold, kill),
                cwd=self.dir,
                stdout=out,
                stderr=err,
            )
        self.procs.append(proc)
        self._names[proc.pid] = name
        return proc

    def output(self, proc: subprocess.Popen[bytes]) -> str:
        return (self.dir / f"{self._names[proc.pid]}.out").read_text()

    def errors(self, proc: subprocess.Popen[bytes]) -> str:
        return (self.dir / f"{self._names[proc.pid]}.err").read_text()

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL: no cleanup, no goodbye, leases left to run out."""
        self._killed.add(proc.pid)
        proc.kill()
        proc.wait()

    def check(self) -> None:
        """Fail with its stderr if a process died that the test did not kill."""
        for proc in self.procs:
            if proc.pid not in self._killed and proc.poll() is not None:
                raise AssertionError(
                    f"{self._names[proc.pid]} exited with {proc.returncode}:\n"
                    f"{self.errors(proc)[-3000:]}"
                )

    async def wait_for(self, condition: Callable[[], Any], what: str, limit: float = 20) -> Any:
        """Poll *condition* (state in files and other processes has no notification)
        until it is true; fail early if a process died."""
        try:
            with anyio.fail_after(limit):
                while not (value := condition()):
                    self.check()
                    await anyio.sleep(0.01)
        except TimeoutError:
            stderr = {self._names[p.pid]: self.errors(p)[-1500:] for p in self.procs}
            raise AssertionError(f"timed out waiting for {what}; stderr: {stderr}") from None
        return value

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


async def serve_main(args: argparse.Namespace) -> None:
    if args.kill_after_commit is not None:
        node = args.kill_after_commit

        def die(committed: Sequence[tuple[str, str]]) -> None:
            for run_id, node_id in committed:  # what this worker committed, for the tests
                log_line("commit", run_id, node_id)
            if any(node_id == node for _, node_id in committed):
                os.kill(os.getpid(), signal.SIGKILL)

        worker_module.after_commit = die
    async with anyio.create_task_group() as tg:
        await tg.start(_serve, args)
        print("ready", flush=True)


async def _serve(args: argparse.Namespace, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
    await serve(
        args.url,
        store=args.store,
        imports=tuple(args.imports),
        concurrency=args.concurrency,
        async_concurrency=args.async_concurrency,
        lease=args.lease,
        max_deliveries=args.max_deliveries,
        task_status=task_status,
    )


async def start_main(args: argparse.Namespace) -> None:
    module, _, name = args.flow.partition(":")
    flow = getattr(importlib.import_module(module), name)
    ctx = fd.Context(batch=True, broker=args.url, store=args.store, workers=args.workers)
    async with ctx:
        run = await ctx.start(flow, args.x, run_id=args.run_id)
        print("started", flush=True)
        print(await run.result(), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve")
    p_serve.add_argument("url")
    p_serve.add_argument("--import", dest="imports", action="append", default=[])
    p_serve.add_argument("--concurrency", type=int, default=4)
    p_serve.add_argument("--async-concurrency", type=int, default=4)
    p_serve.add_argument("--lease", type=float, default=30.0)
    p_serve.add_argument("--store", default=None)
    p_serve.add_argument("--max-deliveries", type=int, default=5)
    p_serve.add_argument("--kill-after-commit", default=None)
    p_start = sub.add_parser("start")
    p_start.add_argument("url")
    p_start.add_argument("flow")
    p_start.add_argument("run_id")
    p_start.add_argument("x", type=int)
    p_start.add_argument("--workers", type=int, default=2)
    p_start.add_argument("--store", default=None)
    args = parser.parse_args()
    anyio.run(serve_main if args.command == "serve" else start_main, args)


if __name__ == "__main__":
    main()
