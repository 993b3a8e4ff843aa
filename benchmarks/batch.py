"""Batch throughput (issue 20): W2 in batch mode on the embedded SQLite queue, Redis Streams
and NATS JetStream, beside real time and the raw broker floors, in one run.

Measured side by side in interleaved rounds:

- real time, in-memory store (``fd.Context()``), in this process: W2 with ``--runs`` runs
  at once;
- batch on each broker, as an application runs it: a client process with
  ``fd.Context(batch=True, broker=URL, store=URL, workers=0)`` and 2 worker processes
  (``flowdsl._executors.batch.serve``, as ``flowdsl worker`` runs it), all three started
  for the measurement on a fresh queue, so that no other broker's idle workers or this
  process's heap weigh on it; the same W2 (1 step -> 20 steps of ``sleep(0.05)`` -> 1
  reduce);
- the raw floors, 1 KB messages: redis-py XADD / XREADGROUP + XACK one at a time and
  pipelined by 100; nats-py JetStream publish / fetch + ack one at a time and batched by
  100 (``redis_bench`` and ``nats_bench`` define them).

Beside runs per second: CPU per step of the client process and of the two worker
processes (``process_time`` and ``/proc``); then, in a second pass with tracemalloc on in
the client and in fresh worker processes, memory per in-flight run: traced bytes at the
batch's peak above its start (client plus workers; real time: the one process) / runs.

The worker processes run with ``--concurrency`` slots each (1,000 by default, what
``flowdsl worker`` holds for async steps unless told otherwise).

    python -m benchmarks.batch [--quick] [--runs N] [--rounds N] [--concurrency C] [--json F]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import AsyncExitStack, ExitStack, contextmanager
from pathlib import Path
from typing import Any

import anyio
import attrs
from rich.console import Console

import flowdsl as fd

from . import nats_bench, redis_bench
from . import workloads as w
from ._brokers import Call, caller, w2_apart
from ._harness import Config, Section, Table, Target, interleaved, median, paired, run_section
from .w2_fanout import batch

__all__ = ["main", "measure", "run"]

RUNS_TARGET = 300.0  # W2 runs/s in batch, on each broker (issue 20)
MEMORY_TARGET = 2.0  # memory per in-flight batch run (client + workers) x real time's
PROCESSES = 2
STEPS = w.FANOUT + 2
CONCURRENCY = 1000  # slots per worker process: the workers' own default for async steps
BROKERS = ("SQLite queue", "Redis", "NATS")
REAL_TIME = "real time, memory store"


@attrs.frozen
class Measured:
    """One batch of W2 runs: wall time, latencies, CPU and memory."""

    wall: float
    p50: float
    p99: float
    client_cpu: float  # seconds of this process's CPU during the batch
    worker_cpu: float  # seconds of the worker processes' CPU during the batch


# A worker process for the memory pass: serves like ``worker_processes``' with tracemalloc
# on; SIGUSR1 writes "current peak" (bytes) to the file named after the concurrency and
# resets the peak.
_TRACED_SERVE = """
import functools, signal, sys, tracemalloc, anyio
from flowdsl._executors.batch import serve

tracemalloc.start()

def report(*_):
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    with open(sys.argv[3], "w") as f:
        f.write(f"{current} {peak}")

signal.signal(signal.SIGUSR1, report)

async def main() -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(functools.partial(
            serve, sys.argv[1], imports=("benchmarks.workloads",),
            concurrency=int(sys.argv[2]), async_concurrency=int(sys.argv[2]),
        ))
        print("ready", flush=True)

anyio.run(main)
"""


@contextmanager
def _traced_workers(url: str, concurrency: int, directory: Path) -> Iterator[Callable[[], Any]]:
    """2 traced worker processes serving *url*; yields ``probe()``, an async call giving
    the summed ``(current, peak)`` traced bytes since the last probe."""
    import signal
    import subprocess
    import sys

    from ._harness import ROOT, subprocess_env

    files = [directory / f"mem-{os.getpid()}-{time.monotonic_ns()}-{i}" for i in range(PROCESSES)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _TRACED_SERVE, url, str(concurrency), str(f)],
            cwd=ROOT,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        for f in files
    ]

    async def probe() -> tuple[int, int]:
        for f in files:
            f.unlink(missing_ok=True)
        for proc in procs:
            proc.send_signal(signal.SIGUSR1)
        with anyio.fail_after(10):
            while not all(f.exists() and f.read_text() for f in files):  # noqa: ASYNC110
                await anyio.sleep(0.01)  # another process writes them: nothing to wait on
        pairs = [tuple(int(x) for x in f.read_text().split()) for f in files]
        return sum(p[0] for p in pairs), sum(p[1] for p in pairs)

    try:
        for proc in procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"worker process {proc.pid} did not start")
        yield probe
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)


async def _memory(
    urls: dict[str, str], probes: dict[str, Callable[[], Any]], rounds: int, runs: int
) -> dict[str, list[float]]:
    """Bytes per in-flight run, traced: the client's peak above its start (this process)
    plus the workers' peaks above theirs; real time: this process alone."""
    import tracemalloc

    async with AsyncExitStack() as stack:
        contexts = {REAL_TIME: fd.Context()} | {
            name: fd.Context(batch=True, broker=url, store=url, workers=0)
            for name, url in urls.items()
        }
        callers = {n: caller(await stack.enter_async_context(c)) for n, c in contexts.items()}
        for call in callers.values():  # warm up untraced: caches, connections, imports
            await batch(call, min(runs, 100), w.LEAF_DELAY)

        def one(name: str) -> Callable[[], Coroutine[Any, Any, float]]:
            async def measure() -> float:
                probe = probes.get(name)
                before = (await probe())[0] if probe is not None else 0  # resets their peaks
                tracemalloc.reset_peak()
                base = tracemalloc.get_traced_memory()[0]
                await batch(callers[name], runs, w.LEAF_DELAY)
                grown = tracemalloc.get_traced_memory()[1] - base
                if probe is not None:
                    grown += (await probe())[1] - before  # the workers' peaks above their start
                return grown / runs

            return measure

        tracemalloc.start()
        try:
            return await interleaved(rounds, {n: one(n) for n in callers}, warmup=0)
        finally:
            tracemalloc.stop()


async def _w2(call: Call, runs: int) -> Measured:
    cpu0 = time.process_time()
    b = await batch(call, runs, w.LEAF_DELAY)
    return Measured(b.wall, b.p50, b.p99, time.process_time() - cpu0, 0.0)


def _w2_apart(url: str, runs: int, concurrency: int) -> Callable[[], Coroutine[Any, Any, Any]]:
    """W2 on the broker at *url* (a template with ``{n}``) in a client process and worker
    processes of their own, started for this measurement, on a fresh queue each time."""
    fresh = itertools.count()

    async def measure() -> Measured:
        figures = await anyio.to_thread.run_sync(
            functools.partial(w2_apart, url.format(n=next(fresh)), runs, PROCESSES, concurrency)
        )
        return Measured(**figures)

    return measure


async def _measure(
    urls: dict[str, str], rounds: int, runs: int, concurrency: int, messages: int
) -> dict[str, list[Any]]:
    redis_url = urls["Redis"].partition("?")[0]
    nats_url = urls["NATS"].partition("?")[0]
    async with fd.Context() as ctx:
        call = caller(ctx)
        systems: dict[str, Callable[[], Coroutine[Any, Any, Any]]] = {
            REAL_TIME: lambda: _w2(call, runs)
        }
        systems |= {name: _w2_apart(url, runs, concurrency) for name, url in urls.items()}
        systems |= {
            "redis-py, one at a time": lambda: redis_bench.floor_one_at_a_time(redis_url, messages),
            f"redis-py, pipelined x{redis_bench.PIPELINE}": lambda: redis_bench.floor_pipelined(
                redis_url, messages * 10
            ),
            "nats-py, one at a time": lambda: nats_bench.floor_one_at_a_time(nats_url, messages),
            f"nats-py, batched x{nats_bench.BATCH}": lambda: nats_bench.floor_batched(
                nats_url, messages * 5
            ),
        }
        return await interleaved(rounds, systems)


def run(config: Config) -> Section:
    """For ``python -m benchmarks``: the suite's options."""
    rounds = config.pick(default=3, quick=1)
    runs = 1000 if not config.quick else 100
    return measure(
        rounds=rounds,
        runs=runs,
        concurrency=CONCURRENCY,
        messages=2000,
        memory_rounds=config.pick(default=2, quick=1),
    )


def measure(
    *, rounds: int, runs: int, concurrency: int, messages: int, memory_rounds: int = 1
) -> Section:
    section = Section(
        "batch",
        f"Batch throughput: W2 ({runs} runs at once) on 2 worker processes x {concurrency} "
        f"slots per broker, beside real time and the raw broker floors (medians of {rounds} "
        "interleaved rounds)",
    )
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flowdsl-batch-")))
        redis = stack.enter_context(redis_bench.redis_server())
        nats = stack.enter_context(nats_bench.nats_server())
        urls = {  # templates: each measurement gets a fresh queue
            "SQLite queue": f"sqlite:///{tmp}/queue-{{n}}.db",
            "Redis": f"{redis}?prefix=w2-{{n}}",
            "NATS": f"{nats}?prefix=w2-{{n}}",
        }
        results = anyio.run(functools.partial(_measure, urls, rounds, runs, concurrency, messages))
    with ExitStack() as stack:  # the memory pass: tracemalloc slows what it watches
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flowdsl-batch-")))
        redis = stack.enter_context(redis_bench.redis_server())
        nats = stack.enter_context(nats_bench.nats_server())
        urls = {
            "SQLite queue": f"sqlite:///{tmp}/queue.db",
            "Redis": f"{redis}?prefix=mem",
            "NATS": f"{nats}?prefix=mem",
        }
        probes = {
            name: stack.enter_context(_traced_workers(url, concurrency, tmp))
            for name, url in urls.items()
        }
        memory = anyio.run(functools.partial(_memory, urls, probes, memory_rounds, runs))
    _report(section, results, memory, runs=runs, concurrency=concurrency)
    section.data.update(runs=runs, rounds=rounds, concurrency=concurrency, messages=messages)
    return section


def _report(
    section: Section,
    results: dict[str, list[Any]],
    memory: dict[str, list[float]],
    *,
    runs: int,
    concurrency: int,
) -> None:
    base: list[Measured] = results[REAL_TIME]
    table = Table(
        f"W2: {runs} runs at once (1 -> {w.FANOUT} x sleep({w.LEAF_DELAY}) -> 1)",
        [
            "mode",
            "runs/s",
            "p50 ms",
            "p99 ms",
            "x real-time runs/s",
            "client CPU µs/step",
            "worker CPU µs/step",
            "KiB per in-flight run",
            "memory x real time",
        ],
    )
    for name in (REAL_TIME, *BROKERS):
        measured: list[Measured] = results[name]
        rates = [runs / m.wall for m in measured]
        per_run = memory[name]
        steps = runs * STEPS
        table.add(
            name if name == REAL_TIME else f"batch, {name}",
            median(rates),
            median([m.p50 for m in measured]) * 1e3,
            median([m.p99 for m in measured]) * 1e3,
            paired([m.wall for m in base], [m.wall for m in measured], lambda a, b: a / b),
            median([m.client_cpu / steps * 1e6 for m in measured]),
            median([m.worker_cpu / steps * 1e6 for m in measured]) if name != REAL_TIME else "-",
            median(per_run) / 1024,
            paired(per_run, memory[REAL_TIME], _ratio),
        )
        section.data[name] = [attrs.asdict(m) for m in measured]
        if name != REAL_TIME:
            section.targets += [
                Target(f"W2 in batch, {name}", median(rates), RUNS_TARGET, "runs/s", at_least=True),
                Target(
                    f"memory per in-flight batch run, {name}, x real time",
                    paired(per_run, memory[REAL_TIME], _ratio),
                    MEMORY_TARGET,
                    "x",
                ),
            ]
    floors = Table(
        "raw broker floors, 1 KB messages, same run (produce + consume + ack)",
        ["client", "messages/s"],
    )
    for name, values in results.items():
        if name not in (REAL_TIME, *BROKERS):
            floors.add(name, median(values))
            section.data[name] = values
    section.tables += [table, floors]
    section.notes += [
        f"worker processes: {concurrency} slots each (the workers' own default for async "
        "steps, issue 20's worker side)",
        "CPU µs/step: CPU seconds of the client process (or of both worker processes) during "
        f"the batch / ({runs} runs x {STEPS} steps); real time's client CPU includes running "
        "the steps",
        "memory (a separate pass, tracemalloc slowing what it watches): traced bytes at the "
        "batch's peak above its start, / runs; batch: the client's plus both workers' "
        "(each worker's peak above its own start); real time: the one process's",
        "redis-server (appendonly, appendfsync everysec) and nats-server (-js, file storage) on "
        "loopback, started by the benchmark; server, client and workers share the 2 cores",
    ]


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("inf")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.batch")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per measurement")
    parser.add_argument("--runs", type=int, default=None, help="W2 runs (default 1000)")
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY, help="slots per worker")
    parser.add_argument("--messages", type=int, default=2000, help="floor messages, one at a time")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    config = Config(quick=args.quick, rounds=args.rounds)
    rounds = config.pick(default=3, quick=1)
    runs = args.runs or (1000 if not args.quick else 100)

    def run_it(_: Config) -> Section:
        return measure(
            rounds=rounds,
            runs=runs,
            concurrency=args.concurrency,
            messages=args.messages,
            memory_rounds=config.pick(default=2, quick=1),
        )

    section = run_section(run_it, config)
    section.show(Console())
    if args.json is not None:
        args.json.write_text(json.dumps(section.to_json(), indent=2, default=str))


if __name__ == "__main__":
    main()
