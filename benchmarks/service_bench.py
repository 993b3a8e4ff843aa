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

    python -m benchmarks.service_bench [--seconds S] [--clients N] [--rate R]
                                       [--store sqlite|memory]
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="flowdsl serve: StartRun-to-finished")
    parser.add_argument("--seconds", type=float, default=SECONDS, help="per load")
    parser.add_argument("--clients", type=int, default=CLIENTS)
    parser.add_argument("--rate", type=float, default=TARGET_RUNS_PER_S)
    parser.add_argument("--store", choices=["sqlite", "memory"], default="sqlite")
    parser.add_argument(
        "--rounds", type=int, help="as `python -m benchmarks --quick` asks: N seconds per load"
    )
    args = parser.parse_args(argv)
    if args.rounds is not None:
        args.seconds = float(args.rounds)
    with tempfile.TemporaryDirectory(prefix="flowdsl-service-bench-") as tmp:
        served = f"sqlite:///{tmp}/served.db" if args.store == "sqlite" else "memory:"
        local = f"sqlite:///{tmp}/local.db" if args.store == "sqlite" else "memory:"
        proc, url = _serve(served)
        try:
            service = anyio.run(_through_service, url, args.clients, args.seconds, args.rate)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
            if proc.stderr is not None:
                proc.stderr.close()
        here = anyio.run(_in_process, local, args.clients, args.seconds, args.rate)
    print(
        f"trivial flow (1 step), {args.clients} concurrent clients, {args.store} store, "
        f"{args.seconds:g} s per load"
    )
    print(f"{'':40} {'runs/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    rows = (
        (f"flowdsl serve, {args.rate:g} runs/s offered", service[0]),
        ("flowdsl serve, flat out", service[1]),
        (f"in process, {args.rate:g} runs/s offered", here[0]),
        ("in process, flat out", here[1]),
    )
    for name, figures in rows:
        print(
            f"{name:40} {figures['runs_per_s']:8.0f} {figures['p50_ms']:8.2f} "
            f"{figures['p99_ms']:8.2f}"
        )
    paced = service[0]
    met = paced["runs_per_s"] >= 0.97 * args.rate and paced["p99_ms"] < TARGET_P99_MS
    met = met and args.rate >= TARGET_RUNS_PER_S and service[1]["runs_per_s"] >= args.rate
    print(
        f"target: >= {TARGET_RUNS_PER_S} runs/s with p99 < {TARGET_P99_MS:.0f} ms through the "
        f"service: {'met' if met else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
