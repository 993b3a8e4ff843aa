"""Worker throughput alone: how fast worker processes drain a queue of trivial tasks.

The batch benchmarks (``batch``, ``redis_bench``, ``nats_bench``) measure clients and
workers together; this one takes the client out.  It puts ``--tasks`` tasks of a trivial
step (``benchmarks.workloads.inc``) on a fresh queue at once, lets ``--processes`` worker
processes (``flowdsl._executors.batch.serve``, as ``flowdsl worker`` runs it) drain it,
and reports tasks per second per worker process: from the first enqueue to an empty
queue (every task committed to the journal and completed).

With ``--tree`` given more than once (source trees of flowdsl, say /work/main and a
worktree), the worker processes of each tree run in interleaved rounds on the same
machine in one run, so that the figures can be set side by side; the tasks are always
written by this process's flowdsl (the message format is the same).

    python -m benchmarks.worker_drain --broker redis --tree /work/main --tree .
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import anyio

from flowdsl.backends import open_broker

from ._brokers import worker_processes
from ._harness import ROOT


def _cpu(pid: int) -> float:
    """Seconds of CPU (user and system) process *pid* has used (Linux's /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _servers() -> list[int]:
    """The pids of the redis-server or nats-server this process started (if any)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == os.getpid() and name in ("redis-server", "nats-server"):
                found.append(int(entry.name))
    return found


def _tasks(count: int) -> list[tuple[str, str, str]]:
    from flowdsl.backends.messages import TaskMessage, encode_task

    run_id = uuid.uuid4().hex
    out = []
    for i in range(count):
        node_id = f"inc#{i}"
        task = TaskMessage(
            run_id=run_id,
            node_id=node_id,
            flow="drain",
            step="benchmarks.workloads:inc",
            kind="step",
            labels=(),
            args=(i,),
            kwargs={},
            marker="bench",
            observed=False,
        )
        out.append((run_id, node_id, encode_task(task)))
    return out


async def _drain(url: str, tasks: list[tuple[str, str, str]]) -> float:
    broker = open_broker(url)
    await broker.open()
    try:
        start = time.perf_counter()
        for i in range(0, len(tasks), 1000):
            await broker.enqueue(tasks[i : i + 1000])
        while await _pending(broker) > 0:  # noqa: ASYNC110 - other processes drain it
            await anyio.sleep(0.02)
        return time.perf_counter() - start
    finally:
        await broker.close()


async def _pending(broker: Any) -> int:
    count = broker.pending()  # the embedded queue's is synchronous
    return int(await count) if inspect.isawaitable(count) else int(count)


@contextmanager
def _server(kind: str) -> Iterator[str]:
    if kind == "redis":
        from .redis_bench import redis_server

        with redis_server() as url:
            yield url
    elif kind == "nats":
        from .nats_bench import nats_server

        with nats_server() as url:
            yield url
    else:
        with tempfile.TemporaryDirectory(prefix="flowdsl-drain-") as directory:
            yield directory


def _url(kind: str, base: str, name: str) -> str:
    if kind == "sqlite":
        return f"sqlite:///{base}/{name}.db"
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}prefix={name}"


async def _held_memory(directory: str, count: int) -> tuple[float, float]:
    """Bytes per task a worker holds while its async steps wait (W2's 50 ms leaves,
    made to wait long): ``(Python allocations, resident memory)``, each the growth
    from an idle worker to one holding *count* tasks, divided by *count*."""
    import tracemalloc

    from flowdsl._executors.batch import Worker
    from flowdsl.backends import link, open_store
    from flowdsl.backends.messages import TaskMessage, encode_task

    from . import workloads

    url = f"sqlite:///{directory}/memory.db"
    broker, store = open_broker(url), open_store(url)
    link(store, broker)
    await store.open()
    await broker.open()
    run_id = uuid.uuid4().hex
    step = workloads.leaf.ref  # type: ignore[attr-defined]
    tasks = [
        (
            run_id,
            f"leaf#{i}",
            encode_task(
                TaskMessage(
                    run_id, f"leaf#{i}", "m", step, "step", (), (i, i, 3600.0), {}, "m", False
                )
            ),
        )
        for i in range(count)
    ]
    worker = Worker(broker, store, async_concurrency=count)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            await anyio.sleep(0.2)
            tracemalloc.start()
            rss = _rss()
            await broker.enqueue(tasks)
            while worker.held < count or worker.waiting_for_thread or len(worker._unsorted):  # noqa: ASYNC110
                await anyio.sleep(0.05)
            await anyio.sleep(0.2)
            python = tracemalloc.get_traced_memory()[0]
            resident = _rss() - rss
            tracemalloc.stop()
            tg.cancel_scope.cancel()
    finally:
        await broker.close()
        await store.close()
    return python / count, resident / count


def _rss() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", choices=("sqlite", "redis", "nats"), default="sqlite")
    parser.add_argument("--tree", action="append", default=[])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--memory", type=int, metavar="N", help="measure bytes per held task, N held, and stop"
    )
    args = parser.parse_args(argv)
    if args.memory:
        with tempfile.TemporaryDirectory(prefix="flowdsl-memory-") as directory:
            python, resident = anyio.run(_held_memory, directory, args.memory)
        print(
            f"a worker holding {args.memory} async tasks: {python:,.0f} bytes of Python "
            f"allocations and {resident:,.0f} bytes resident per task"
        )
        return
    trees = args.tree or [str(ROOT)]
    rates: dict[str, list[float]] = {tree: [] for tree in trees}
    cpu: dict[str, list[float]] = {tree: [] for tree in trees}
    with _server(args.broker) as base:
        for round_ in range(args.rounds):
            for t, tree in enumerate(trees):
                url = _url(args.broker, base, f"d{round_}t{t}")
                tasks = _tasks(args.tasks)
                with ExitStack() as stack:
                    pids = stack.enter_context(
                        worker_processes(url, args.processes, args.concurrency, tree=tree)
                    )
                    servers = _servers()
                    before = sum(map(_cpu, pids))
                    server_before = sum(map(_cpu, servers))
                    wall = anyio.run(_drain, url, tasks)
                    used = sum(map(_cpu, pids)) - before
                    server_used = sum(map(_cpu, servers)) - server_before
                rate = args.tasks / wall / args.processes
                rates[tree].append(rate)
                cpu[tree].append(used / args.tasks * 1e6)
                print(
                    f"round {round_ + 1} {tree}: {rate:,.0f} tasks/s per process, "
                    f"{cpu[tree][-1]:.0f} us of worker CPU per task, "
                    f"{server_used / args.tasks * 1e6:.0f} us of server CPU per task",
                    flush=True,
                )
    for tree, values in rates.items():
        print(
            f"{args.broker} {tree}: median {statistics.median(values):,.0f} tasks/s per worker "
            f"process ({args.processes} processes, {args.tasks} tasks, rounds "
            + ", ".join(f"{v:,.0f}" for v in values)
            + f"); worker CPU per task: median {statistics.median(cpu[tree]):.0f} us"
        )


if __name__ == "__main__":
    main()
