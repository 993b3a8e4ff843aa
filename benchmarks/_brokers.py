"""What the batch-mode benchmarks share: worker processes, the calls they measure, and
the Redis and NATS sections' tables and targets.

``benchmarks.batch`` (the embedded queue), ``redis_bench`` and ``nats_bench`` start worker
processes and run the same W2 calls the same way; each broker module measures only its own
floor (raw client throughput) and the server it starts.  The Redis and NATS reports come
from :func:`report`, so they cannot drift apart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Coroutine, Iterator
from contextlib import AsyncExitStack, ExitStack, contextmanager
from pathlib import Path
from typing import Any

import anyio

import flowdsl as fd

from . import workloads as w
from ._harness import ROOT, Section, Table, Target, interleaved, median, subprocess_env
from .w2_fanout import Batch, batch

__all__ = [
    "TARGET_SHARE",
    "TRIVIAL_CONCURRENCY",
    "TRIVIAL_RUNS",
    "W2_SLOTS",
    "Call",
    "caller",
    "report",
    "trivial_and_w2",
    "trivial_rounds",
    "w2_apart",
    "w2_on",
    "worker_processes",
]

TARGET_SHARE = 0.40  # flowdsl's steps/s per worker process, as a share of the floor
TRIVIAL_RUNS = 100
STEPS = w.FANOUT + 2
TRIVIAL_CONCURRENCY = 64  # slots per worker process for trivial steps
W2_SLOTS = 32  # slots per worker process for W2: what makes latency the bound
PROCESS_COUNTS = (("flowdsl, 1 worker process", 1), ("flowdsl, 2 worker processes", 2))


# A worker process: `serve` keeps the journal on the broker's own server or file, as the
# clients' contexts do.  argv[2] is its slots, for sync and async tasks alike: the workload
# steps are async, and `concurrency` alone caps only sync ones.
_SERVE = """
import functools, sys, anyio
from flowdsl._executors.batch import serve

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
def worker_processes(
    url: str, count: int, concurrency: int, *, tree: str | Path | None = None
) -> Iterator[list[int]]:
    """*count* processes serving *url* (broker and store); yields their pids once all serve.

    *tree*, a checkout of another commit, runs that commit's flowdsl in them instead of
    this one's (the workloads still come from here)."""
    env = subprocess_env()
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(tree).resolve()), str(ROOT)])
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SERVE, url, str(concurrency)],
            cwd=ROOT if tree is None else tree,  # `-c` puts it first on the import path
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"worker process {proc.pid} did not start (exit {proc.poll()})")
        yield [proc.pid for proc in procs]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# A client process for `w2_apart`: W2 on the broker at argv[1], argv[2] runs after a
# warm-up, measuring its own CPU and that of the worker processes named by pid after it;
# prints one JSON object.
_CLIENT = """
import json, os, sys, time, anyio
import flowdsl as fd
from benchmarks import workloads as w
from benchmarks.w2_fanout import batch

url, runs, pids = sys.argv[1], int(sys.argv[2]), [int(p) for p in sys.argv[3:]]

def cpu(pid):
    with open(f"/proc/{pid}/stat", encoding="ascii") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

async def main():
    async with fd.Context(batch=True, broker=url, store=url, workers=0) as ctx:
        call = lambda i, delay: ctx.run(w.fanout, i, delay)
        await batch(call, min(100, runs), w.LEAF_DELAY)  # warm up: connections, caches
        client0, workers0 = time.process_time(), sum(cpu(p) for p in pids)
        b = await batch(call, runs, w.LEAF_DELAY)
        client, workers = time.process_time() - client0, sum(cpu(p) for p in pids) - workers0
    print(json.dumps({"wall": b.wall, "p50": b.p50, "p99": b.p99,
                      "client_cpu": client, "worker_cpu": workers}), flush=True)

anyio.run(main)
"""


def w2_apart(url: str, runs: int, processes: int, concurrency: int) -> dict[str, float]:
    """W2 with *runs* runs at once on the broker at *url*, as an application runs it: a
    client process of its own and *processes* fresh worker processes, nothing else.

    Returns the client's figures: ``wall``, ``p50``, ``p99`` (seconds), and the CPU
    seconds of the client and of the workers during the batch (``client_cpu``,
    ``worker_cpu``).  A blocking call: run it in a thread from async code.
    """
    with worker_processes(url, processes, concurrency) as pids:
        done = subprocess.run(
            [sys.executable, "-c", _CLIENT, url, str(runs), *map(str, pids)],
            cwd=ROOT,
            env=subprocess_env(),
            capture_output=True,
            text=True,
            check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(f"the W2 client process failed (exit {done.returncode}):\n{done.stderr}")
    figures: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


Call = Callable[[int, float], Coroutine[Any, Any, int]]


def caller(ctx: fd.Context) -> Call:
    """W2's flow run in *ctx*: ``call(i, delay)``."""

    def call(i: int, delay: float) -> Coroutine[Any, Any, int]:
        return ctx.run(w.fanout, i, delay)

    return call


async def trivial_rounds(
    urls: dict[str, str],
    rounds: int,
    floors: dict[str, Callable[[], Coroutine[Any, Any, Any]]],
) -> dict[str, list[Any]]:
    """Interleaved rounds of the *floors* and of flowdsl with trivial steps on each of
    *urls* (a batch context with no workers of its own: the worker processes serve it)."""
    async with AsyncExitStack() as stack:
        callers = {
            name: caller(
                await stack.enter_async_context(
                    fd.Context(batch=True, broker=url, store=url, workers=0)
                )
            )
            for name, url in urls.items()
        }

        def flowdsl(call: Call) -> Callable[[], Coroutine[Any, Any, Batch]]:
            return lambda: batch(call, TRIVIAL_RUNS, 0.0)

        systems = dict(floors)
        systems.update({name: flowdsl(call) for name, call in callers.items()})
        return await interleaved(rounds, systems)


async def w2_on(url: str, runs: int) -> Batch:
    """W2 with *runs* runs at once on the broker at *url* (after a short warm-up)."""
    async with fd.Context(batch=True, broker=url, store=url, workers=0) as ctx:
        call = caller(ctx)
        await batch(call, min(50, runs), w.LEAF_DELAY)  # warm up: connections, imports
        return await batch(call, runs, w.LEAF_DELAY)


def trivial_and_w2(
    server: str,
    trivial: Callable[[dict[str, str]], Coroutine[Any, Any, dict[str, list[Any]]]],
    runs: int,
) -> tuple[dict[str, list[Any]], Batch]:
    """The Redis and NATS sections' measurements on *server* (a URL without a query):
    *trivial* with the URLs of 1 and 2 worker processes serving trivial steps (each set
    on a prefix of its own), then W2 with *runs* runs on 2 worker processes."""
    urls = {name: f"{server}?prefix=p{count}" for name, count in PROCESS_COUNTS}
    with ExitStack() as stack:
        for name, count in PROCESS_COUNTS:
            stack.enter_context(worker_processes(urls[name], count, TRIVIAL_CONCURRENCY))
        measured = anyio.run(trivial, urls)
    w2_url = f"{server}?prefix=w2"
    with worker_processes(w2_url, 2, W2_SLOTS):
        w2 = anyio.run(w2_on, w2_url, runs)
    return measured, w2


def report(
    section: Section,
    trivial: dict[str, Any],
    w2: Any,
    *,
    runs: int,
    floors: tuple[tuple[str, str, str], tuple[str, str, str]],
) -> dict[str, Any]:
    """Add the throughput and W2 tables and their targets to *section*; return the data.

    *floors* names the one-at-a-time floor and the batched one as ``(key in trivial,
    label in the table, key in the data)``.
    """
    (one_key, one_label, one_data), (many_key, many_label, many_data) = floors
    floor = median(trivial[one_key])
    many = median(trivial[many_key])
    table = Table(
        "1 KB messages (floor) and trivial steps (flowdsl: W2 with delay 0, "
        f"{TRIVIAL_RUNS} runs x {STEPS} steps at once)",
        ["system", "messages or steps/s", "per worker process", "per process / floor"],
    )
    table.add(one_label, floor, "-", "-")
    table.add(many_label, many, "-", "-")
    data: dict[str, Any] = {one_data: floor, many_data: many}
    for name, processes in PROCESS_COUNTS:
        steps = median([TRIVIAL_RUNS * STEPS / b.wall for b in trivial[name]])
        per_process = steps / processes
        table.add(name, steps, per_process, f"{per_process / floor:.0%}")
        data[name] = steps
        section.targets.append(
            Target(
                f"{name}: steps/s per process >= {TARGET_SHARE:.0%} of the one-at-a-time floor",
                per_process,
                TARGET_SHARE * floor,
                "steps/s",
                at_least=True,
            )
        )
    slots = 2 * W2_SLOTS
    bound = slots / (w.FANOUT * w.LEAF_DELAY)  # runs/s if only the stand-in latency limits
    w2_table = Table(
        f"W2: {runs} runs at once, {w.FANOUT} leaves of {w.LEAF_DELAY * 1000:.0f} ms, "
        f"2 worker processes x {W2_SLOTS} slots",
        ["runs/s", "latency bound runs/s", "share of the bound", "p50 s", "p99 s", "wall s"],
    )
    w2_rate = runs / w2.wall
    w2_table.add(w2_rate, bound, f"{w2_rate / bound:.0%}", w2.p50, w2.p99, w2.wall)
    data["w2"] = {"runs": runs, "wall_s": w2.wall, "runs_per_s": w2_rate, "bound": bound}
    section.targets.append(
        Target(
            "W2 runs/s within 80% of the latency bound (slots / (leaves x delay))",
            w2_rate,
            0.8 * bound,
            "runs/s",
            at_least=True,
        )
    )
    section.tables += [table, w2_table]
    section.notes.append(
        f"W2 bound: {slots} worker slots, each leaf holding one for {w.LEAF_DELAY} s, "
        f"{w.FANOUT} leaves a run (the 2 trivial steps of a run are not counted)"
    )
    return data
