"""W1: a chain of 10 trivial steps, 500 runs in sequence: flowdsl's overhead per step.

The floor awaits the same 10 functions directly.  Overhead per step is
``(flowdsl time - floor time) / (runs x steps)``, so it includes everything a run costs
(its record in the in-memory store, the codec on its input and result), spread over its
steps.  Both systems run in one entered ``fd.Context()`` on asyncio, then on trio.

    python -m benchmarks.w1_chain [--quick]
"""

from __future__ import annotations

import time

import anyio

import flowdsl as fd

from . import workloads as w
from ._harness import Config, Section, Table, Target, interleaved, median, paired

__all__ = ["run"]

TARGET_US = 25.0
BACKENDS = ("asyncio", "trio")


async def _measure(rounds: int, runs: int) -> dict[str, list[float]]:
    async with fd.Context() as ctx:

        async def floor() -> float:
            start = time.perf_counter()
            for i in range(runs):
                await w.chain_floor(i)
            return time.perf_counter() - start

        async def flowdsl() -> float:
            start = time.perf_counter()
            for i in range(runs):
                await ctx.run(w.chain, i)
            return time.perf_counter() - start

        return await interleaved(rounds, {"floor": floor, "flowdsl": flowdsl})


def run(config: Config) -> Section:
    rounds = config.pick(default=15, quick=5)
    runs = w.W1_RUNS
    steps = runs * w.CHAIN_STEPS
    section = Section(
        "w1",
        f"W1: chain of {w.CHAIN_STEPS} trivial steps, {runs} runs in sequence "
        f"(medians of {rounds} interleaved rounds)",
    )
    table = Table(
        "µs per step",
        ["backend", "floor (direct await)", "flowdsl", "overhead", "µs per run", "x floor"],
    )
    for backend in BACKENDS:
        times = anyio.run(_measure, rounds, runs, backend=backend)
        floor, flowdsl = times["floor"], times["flowdsl"]
        overhead = paired(flowdsl, floor, lambda a, b: (a - b) / steps * 1e6)
        ratio = paired(flowdsl, floor, lambda a, b: a / b)
        table.add(
            backend,
            median(floor) / steps * 1e6,
            median(flowdsl) / steps * 1e6,
            overhead,
            median(flowdsl) / runs * 1e6,
            ratio,
        )
        section.targets.append(Target(f"overhead per step on {backend}", overhead, TARGET_US, "µs"))
        section.data[backend] = {
            "floor_s": floor,
            "flowdsl_s": flowdsl,
            "overhead_us_per_step": overhead,
            "ratio": ratio,
        }
    section.tables.append(table)
    section.notes.append(
        "overhead = (flowdsl - floor) / steps, per round; it includes each run's own cost "
        "(record, codec of input and result) spread over its 10 steps"
    )
    section.data.update(runs=runs, steps_per_run=w.CHAIN_STEPS, rounds=rounds)
    return section


if __name__ == "__main__":
    from ._harness import standalone

    standalone(run)
