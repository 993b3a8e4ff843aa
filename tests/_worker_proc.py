"""Subprocesses for the batch tests: worker processes, and a client that dies mid-run.

    python _worker_proc.py serve URL [--import MODULE ...] [--concurrency N] [--lease S]
    python _worker_proc.py start URL FLOW RUN_ID X [--workers N]

``serve`` runs :func:`flowdsl._executors.batch.serve` on asyncio and prints ``ready`` once
it takes tasks.  ``start`` starts ``FLOW`` (``module:name``) on input ``X`` (an int) in a
batch context on ``URL`` with ``N`` in-process workers, prints ``started``, and prints the
result when the run ends; tests kill it before.

Tests drive them through :class:`Procs`, which puts ``tests/`` on their ``PYTHONPATH``,
runs them in the test's directory, keeps their output in files and kills them all at
teardown.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio

import flowdsl as fd
from flowdsl._executors.batch import serve

from batch_steps import EXEC_LOG, HOLD

TESTS = Path(__file__).resolve().parent


class Procs:
    """The subprocesses of one test; :meth:`close` kills those still alive."""

    def __init__(self, directory: Path, url: str) -> None:
        self.dir = directory
        self.url = url
        self.log = directory / "exec.jsonl"  # the steps' execution log, every process
        self.procs: list[subprocess.Popen[bytes]] = []
        self._names: dict[int, str] = {}
        self._killed: set[int] = set()

    def env(self, hold: str = "") -> dict[str, str]:
        env = dict(os.environ)
        path = [str(TESTS), *filter(None, [env.get("PYTHONPATH")])]
        env["PYTHONPATH"] = os.pathsep.join(path)
        env[EXEC_LOG] = str(self.log)
        env[HOLD] = hold
        return env

    def serve(
        self,
        *,
        imports: Sequence[str] = ("batch_steps",),
        lease: float = 30.0,
        concurrency: int = 4,
        hold: str = "",
    ) -> subprocess.Popen[bytes]:
        """A worker process serving the test's queue."""
        args = ["serve", self.url, "--lease", str(lease), "--concurrency", str(concurrency)]
        for module in imports:
            args += ["--import", module]
        return self._spawn(args, hold)

    def client(
        self, flow: str, run_id: str, x: int, *, workers: int = 2, hold: str = ""
    ) -> subprocess.Popen[bytes]:
        """A process that starts *flow* with in-process workers and waits for it."""
        return self._spawn(
            ["start", self.url, flow, run_id, str(x), "--workers", str(workers)], hold
        )

    def _spawn(self, args: list[str], hold: str) -> subprocess.Popen[bytes]:
        name = f"proc{len(self.procs)}"
        with (
            open(self.dir / f"{name}.out", "wb") as out,
            open(self.dir / f"{name}.err", "wb") as err,
        ):
            proc = subprocess.Popen(
                [sys.executable, str(TESTS / "_worker_proc.py"), *args],
                env=self.env(hold),
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


async def serve_main(url: str, imports: tuple[str, ...], concurrency: int, lease: float) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(_serve, url, imports, concurrency, lease)
        print("ready", flush=True)


async def _serve(
    url: str,
    imports: tuple[str, ...],
    concurrency: int,
    lease: float,
    *,
    task_status: Any = anyio.TASK_STATUS_IGNORED,
) -> None:
    await serve(url, imports=imports, concurrency=concurrency, lease=lease, task_status=task_status)


async def start_main(url: str, flow_ref: str, run_id: str, x: int, workers: int) -> None:
    module, _, name = flow_ref.partition(":")
    flow = getattr(importlib.import_module(module), name)
    async with fd.Context(batch=True, store=url, workers=workers) as ctx:
        run = await ctx.start(flow, x, run_id=run_id)
        print("started", flush=True)
        print(await run.result(), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve")
    p_serve.add_argument("url")
    p_serve.add_argument("--import", dest="imports", action="append", default=[])
    p_serve.add_argument("--concurrency", type=int, default=4)
    p_serve.add_argument("--lease", type=float, default=30.0)
    p_start = sub.add_parser("start")
    p_start.add_argument("url")
    p_start.add_argument("flow")
    p_start.add_argument("run_id")
    p_start.add_argument("x", type=int)
    p_start.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if args.command == "serve":
        anyio.run(serve_main, args.url, tuple(args.imports), args.concurrency, args.lease)
    else:
        anyio.run(start_main, args.url, args.flow, args.run_id, args.x, args.workers)


if __name__ == "__main__":
    main()
