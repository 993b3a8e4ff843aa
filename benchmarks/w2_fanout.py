"""W2: one step, a fan-out to 20 steps that each sleep 50 ms, one reduce; 200 runs at once.

The floor runs the same functions with the backend's own primitives: ``asyncio.gather``
for the fan-out on asyncio, a nursery on trio.  Both systems' 200 runs are started at once
by the same launcher (``asyncio.gather`` / a trio nursery), so neither side pays for it.

Two passes, because tracemalloc slows everything it watches: a timing pass (runs per
second, p50 and p99 latency of a run), then a memory pass (the peak traced memory during a
batch above what was traced before it, divided by the number of runs: memory per in-flight
run).

    python -m benchmarks.w2_fanout [--quick]
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import attrs

import flowdsl as fd

from . import workloads as w
from ._harness import Config, Section, Table, Target, interleaved, median, paired, percentile

__all__ = ["Batch", "run"]

WALL_TARGET = 1.5
MEMORY_TARGET = 1.5
Flowish = Callable[[int, float], Coroutine[Any, Any, int]]


@attrs.frozen
class Batch:
    """One batch of runs started at once."""

    wall: float
    p50: float
    p99: float

    @classmethod
    def of(cls, wall: float, latencies: list[float]) -> Batch:
        return cls(wall, percentile(latencies, 50), percentile(latencies, 99))


async def batch(call: Flowish, runs: int, delay: float) -> Batch:
    calls = [_bind(call, i, delay) for i in range(runs)]
    start = time.perf_counter()
    latencies = await w.gather(calls)
    return Batch.of(time.perf_counter() - start, latencies)


async def peak_per_run(call: Flowish, runs: int, delay: float) -> float:
    """Bytes of traced memory at the batch's peak, above the start, per run."""
    calls = [_bind(call, i, delay) for i in range(runs)]
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    await w.gather(calls)
    return (tracemalloc.get_traced_memory()[1] - base) / runs


def _bind(call: Flowish, i: int, delay: float) -> Callable[[], Coroutine[Any, Any, int]]:
    return lambda: call(i, delay)


def floor_of(backend: str) -> Flowish:
    return w.fanout_floor_trio if backend == "trio" else w.fanout_floor_asyncio


async def _timing(backend: str, rounds: int, runs: int) -> dict[str, list[Batch]]:
    floor = floor_of(backend)
    async with fd.Context() as ctx:

        def flowdsl(i: int, delay: float) -> Coroutine[Any, Any, int]:
            return ctx.run(w.fanout, i, delay)

        return await interleaved(
            rounds,
            {
                "floor": lambda: batch(floor, runs, w.LEAF_DELAY),
                "flowdsl": lambda: batch(flowdsl, runs, w.LEAF_DELAY),
                "anyio": lambda: batch(w.fanout_anyio, runs, w.LEAF_DELAY),
            },
        )


async def _memory(backend: str, rounds: int, runs: int) -> dict[str, list[float]]:
    floor = floor_of(backend)
    async with fd.Context() as ctx:

        def flowdsl(i: int, delay: float) -> Coroutine[Any, Any, int]:
            return ctx.run(w.fanout, i, delay)

        # Warm up untraced: first-use caches (plans, codec hooks) are not per-run memory.
        await batch(flowdsl, runs, w.LEAF_DELAY)
        await batch(floor, runs, w.LEAF_DELAY)
        await batch(w.fanout_anyio, runs, w.LEAF_DELAY)
        tracemalloc.start()
        try:
            return await interleaved(
                rounds,
                {
                    "floor": lambda: peak_per_run(floor, runs, w.LEAF_DELAY),
                    "flowdsl": lambda: peak_per_run(flowdsl, runs, w.LEAF_DELAY),
                    "anyio": lambda: peak_per_run(w.fanout_anyio, runs, w.LEAF_DELAY),
                },
                warmup=0,
            )
        finally:
            tracemalloc.stop()


def run(config: Config) -> Section:
    rounds = config.pick(default=9, quick=3)
    memory_rounds = config.pick(default=3, quick=1)
    runs = w.W2_RUNS
    steps = w.FANOUT + 2
    section = Section(
        "w2",
        f"W2: 1 step -> {w.FANOUT} x sleep({w.LEAF_DELAY}) -> reduce, {runs} runs at once "
        f"(medians of {rounds} interleaved rounds; memory: {memory_rounds})",
    )
    table = Table(
        "throughput, latency, memory",
        [
            "backend / system",
            "runs/s",
            "p50 ms",
            "p99 ms",
            "KiB per in-flight run",
            "wall x floor",
            "memory x floor",
        ],
    )
    for backend in ("asyncio", "trio"):
        times = anyio.run(_timing, backend, rounds, runs, backend=backend)
        memory = anyio.run(_memory, backend, memory_rounds, runs, backend=backend)
        floor_walls = [b.wall for b in times["floor"]]
        wall_ratio = paired([b.wall for b in times["flowdsl"]], floor_walls, _div)
        memory_ratio = paired(memory["flowdsl"], memory["floor"], _div)
        floor_name = "asyncio.gather" if backend == "asyncio" else "trio nursery"
        systems = (("floor", floor_name), ("anyio", "anyio task group"), ("flowdsl", "flowdsl"))
        for system, label in systems:
            batches = times[system]
            table.add(
                f"{backend}: {label}",
                median([runs / b.wall for b in batches]),
                median([b.p50 for b in batches]) * 1e3,
                median([b.p99 for b in batches]) * 1e3,
                median(memory[system]) / 1024,
                paired([b.wall for b in batches], floor_walls, _div),
                paired(memory[system], memory["floor"], _div),
            )
        overhead = paired(
            [b.wall for b in times["flowdsl"]],
            [b.wall for b in times["floor"]],
            lambda a, b: (a - b) / (runs * steps) * 1e6,
        )
        section.data[backend] = {
            "wall_s": {k: [b.wall for b in v] for k, v in times.items()},
            "p50_s": {k: [b.p50 for b in v] for k, v in times.items()},
            "p99_s": {k: [b.p99 for b in v] for k, v in times.items()},
            "bytes_per_run": memory,
            "wall_ratio": wall_ratio,
            "memory_ratio": memory_ratio,
            "wall_overhead_us_per_step": overhead,
        }
        if backend == "asyncio":
            section.targets += [
                Target("wall time x plain-asyncio floor", wall_ratio, WALL_TARGET, "x"),
                Target("memory per in-flight run x floor", memory_ratio, MEMORY_TARGET, "x"),
            ]
        else:
            section.notes.append(
                f"trio (for information): wall {wall_ratio:.2f}x, memory {memory_ratio:.2f}x "
                "the trio-nursery floor"
            )
    section.tables.append(table)
    section.notes.append(
        "anyio task group: the same fan-out written by hand on anyio (for information: what "
        "a portable hand-written version costs)"
    )
    section.notes.append(
        "latency of a run: from its call to its result, all runs called at once; memory: "
        "tracemalloc's peak during the batch above the traced memory before it, / runs "
        "(a separate pass: tracemalloc slows the code it watches)"
    )
    section.data.update(runs=runs, rounds=rounds, memory_rounds=memory_rounds)
    return section


def _div(a: float, b: float) -> float:
    return a / b


if __name__ == "__main__":
    from ._harness import standalone

    standalone(run)
