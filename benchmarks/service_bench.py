"""The run service: a trivial flow started over gRPC, beside the same flow in process.

A ``flowdsl serve`` process (real time, SQLite store in a temporary directory) serves the
one-step flow below; this process runs CLIENTS concurrent clients, each an ``fd.Client``
with its own channel.  A run's latency is from sending StartRun to knowing it finished: the
StartRun reply when it already says so, else the end of its WatchRun stream.  Two loads:

- **at the target rate**: the clients together start RATE runs per second, each client one
  run every CLIENTS / RATE seconds (latency counted from when the run was due, so a slow
  reply that delays the next run is not hidden);
- **flat out**: each client starts its next run as soon as the last one finished; runs/s is
  the service's capacity, and the latency is mostly queueing (CLIENTS runs in flight).

Beside them, the same flow in one process: CLIENTS tasks doing ``await ctx.run(trivial, i)``
on an SQLite store, under the same two loads.

Targets (issue 17): at least 500 runs/s with p99 under 50 ms, 100 clients, 2-core machine.

``--repeat N`` runs N rounds, the service and the in-process figures interleaved (a fresh
service process each round), and prints each figure's median and range.  The machine's load
average is printed beside them: on a shared machine the tail latencies follow the load.

    python -m benchmarks.service_bench [--seconds S] [--clients N] [--rate R]
                                       [--store sqlite|memory] [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

import flowdsl as fd

__all__ = ["main", "trivial"]

# By name: run as `python -m`, this module is __main__ here, not what the service imports.
FLOW = "benchmarks.service_bench:trivial"
CLIENTS = 100
SECONDS = 10.0
TARGET_RUNS_PER_S = 500
TARGET_P99_MS = 50.0


@fd.step
async def echo(x: int) -> int:
    return x


@fd.flow
async def trivial(x: int) -> int:
    return await echo(x)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _summary(latencies: list[float], wall: float) -> dict[str, float]:
    return {
        "runs": len(latencies),
        "runs_per_s": len(latencies) / wall,
        "p50_ms": _percentile(latencies, 0.50) * 1000,
        "p99_ms": _percentile(latencies, 0.99) * 1000,
        "mean_ms": statistics.fmean(latencies) * 1000,
    }


async def _load(
    start_one: Any, *, clients: int, seconds: float, rate: float | None
) -> dict[str, float]:
    """Run *clients* loops of ``await start_one(client, i)`` for *seconds*; at *rate* runs/s
    in all (open loop), or back to back when *rate* is None."""
    latencies: list[float] = []
    period = clients / rate if rate else 0.0
    begun = time.perf_counter()
    deadline = begun + seconds

    async def one_client(k: int) -> None:
        due = begun + period * k / clients
        i = 0
        while True:
            now = time.perf_counter()
            if rate:
                if due > now:
                    await anyio.sleep(due - now)
                start = due
                due += period
            else:
                start = now
            if start >= deadline:
                return
            await start_one(k, i)
            latencies.append(time.perf_counter() - start)
            i += 1

    async with anyio.create_task_group() as tg:
        for k in range(clients):
            tg.start_soon(one_client, k)
    # Paced, the rate is the runs due in the window; flat out, what was done in the time.
    wall = seconds if rate else time.perf_counter() - begun
    return _summary(latencies, wall)


async def _through_service(
    url: str, clients: int, seconds: float, rate: float
) -> tuple[dict[str, float], dict[str, float]]:
    pool = [fd.Client(url) for _ in range(clients)]

    async def start_one(k: int, i: int) -> None:
        client = pool[k]
        run = await client.start(FLOW, {"x": i})
        if not run.ended:
            async for _ in client.watch(run.run_id):
                pass

    try:
        for k in range(clients):  # connect every channel, unmeasured
            await start_one(k, -1)
        paced = await _load(start_one, clients=clients, seconds=seconds, rate=rate)
        flat = await _load(start_one, clients=clients, seconds=seconds, rate=None)
    finally:
        for client in pool:
            await client.close()
    return paced, flat


async def _in_process(
    store: str, clients: int, seconds: float, rate: float
) -> tuple[dict[str, float], dict[str, float]]:
    async with fd.Context(store=store) as ctx:
        await ctx.run(trivial, -1)

        async def start_one(k: int, i: int) -> None:
            await ctx.run(trivial, i)

        paced = await _load(start_one, clients=clients, seconds=seconds, rate=rate)
        flat = await _load(start_one, clients=clients, seconds=seconds, rate=None)
    return paced, flat


def _serve(store: str) -> tuple[subprocess.Popen[str], str]:
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flowdsl",
            "serve",
            *("--store", store, "--import", "benchmarks.service_bench"),
            *("--listen", "127.0.0.1:0", "--grace", "5"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=root,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    match = re.search(r"listening on (grpc://\S+)", line)
    if match is None:
        proc.kill()
        raise SystemExit(f"flowdsl serve did not start: {line}{proc.stderr.read()}")
    return proc, match.group(1)


def _round(args: argparse.Namespace, tmp: str, n: int) -> list[dict[str, float]]:
    """One round: the service's two loads, then the in-process two."""
    served = f"sqlite:///{tmp}/served-{n}.db" if args.store == "sqlite" else "memory:"
    local = f"sqlite:///{tmp}/local-{n}.db" if args.store == "sqlite" else "memory:"
    proc, url = _serve(served)
    try:
        service = anyio.run(_through_service, url, args.clients, args.seconds, args.rate)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        if proc.stderr is not None:
            proc.stderr.close()
    here = anyio.run(_in_process, local, args.clients, args.seconds, args.rate)
    return [service[0], service[1], here[0], here[1]]


def _cell(values: list[float], digits: int) -> str:
    median = statistics.median(values)
    if len(values) == 1:
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="flowdsl serve: StartRun-to-finished")
    parser.add_argument("--seconds", type=float, default=SECONDS, help="per load")
    parser.add_argument("--clients", type=int, default=CLIENTS)
    parser.add_argument("--rate", type=float, default=TARGET_RUNS_PER_S)
    parser.add_argument("--store", choices=["sqlite", "memory"], default="sqlite")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; medians are printed")
    parser.add_argument(
        "--rounds", type=int, help="as `python -m benchmarks --quick` asks: N seconds per load"
    )
    args = parser.parse_args(argv)
    if args.rounds is not None:
        args.seconds = float(args.rounds)
    loads = [os.getloadavg()[0]]
    rounds = []
    with tempfile.TemporaryDirectory(prefix="flowdsl-service-bench-") as tmp:
        for n in range(args.repeat):
            rounds.append(_round(args, tmp, n))
            loads.append(os.getloadavg()[0])
    print(
        f"trivial flow (1 step), {args.clients} concurrent clients, {args.store} store, "
        f"{args.seconds:g} s per load, {args.repeat} round(s): median (min-max)"
    )
    print(
        f"machine: {os.cpu_count()} cores, 1-minute load average "
        + " -> ".join(f"{load:.1f}" for load in loads)
    )
    names = (
        f"flowdsl serve, {args.rate:g} runs/s offered",
        "flowdsl serve, flat out",
        f"in process, {args.rate:g} runs/s offered",
        "in process, flat out",
    )
    print(f"{'':36} {'runs/s':>18} {'p50 ms':>18} {'p99 ms':>20}")
    for i, name in enumerate(names):
        cells = [
            _cell([r[i]["runs_per_s"] for r in rounds], 0),
            _cell([r[i]["p50_ms"] for r in rounds], 2),
            _cell([r[i]["p99_ms"] for r in rounds], 1),
        ]
        print(f"{name:36} {cells[0]:>18} {cells[1]:>18} {cells[2]:>20}")
    paced = statistics.median(r[0]["p99_ms"] for r in rounds)
    rate = statistics.median(r[0]["runs_per_s"] for r in rounds)
    flat = statistics.median(r[1]["runs_per_s"] for r in rounds)
    met = rate >= 0.97 * args.rate and paced < TARGET_P99_MS
    met = met and args.rate >= TARGET_RUNS_PER_S and flat >= args.rate
    print(
        f"target: >= {TARGET_RUNS_PER_S} runs/s with p99 < {TARGET_P99_MS:.0f} ms through the "
        f"service (medians): {'met' if met else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
