"""Maps (issue 16): what an item of ``step.map`` costs, in real time and in batch mode.

- Real time: a 1,000-item map of trivial steps, against awaiting the same function 1,000
  times; the overhead per item is set beside W1's overhead per step, measured in the same
  process just before (target: at most 2x).
- Memory per in-flight item: a map of 2,000 items that all wait on one event; tracemalloc's
  traced memory while they all wait, above what it was before, per item (beside a plain task
  per item doing the same wait).
- Batch: a 1,000-item map of 50 ms items on the embedded queue, served by 2 worker
  processes, in items per second (beside W2's batch figures in docs/performance.md).

    python -m benchmarks.dynamic_map [--quick]
"""

from __future__ import annotations

import functools
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import anyio

import flowdsl as fd

from . import w1_chain
from ._brokers import W2_SLOTS, worker_processes
from ._harness import Config, Section, Table, Target, interleaved, median, paired

__all__ = ["run"]

ITEMS = 1000
IN_FLIGHT = 2000
BATCH_ITEMS = 1000
BATCH_DELAY = 0.05
PROCESSES = 2
RATIO_TARGET = 2.0


@fd.step
async def numbers(n: int) -> list[int]:
    return list(range(n))


@fd.step
async def bump(x: int) -> int:
    return x + 1


@fd.step
async def nap(x: int, delay: float) -> int:
    await anyio.sleep(delay)
    return x


@fd.flow
async def bump_all(n: int) -> list[int]:
    return await bump.map(await numbers(n))


@fd.flow
async def nap_all(n: int, delay: float) -> list[int]:
    return await nap.map(await numbers(n), delay=delay)


async def bump_all_floor(n: int) -> list[int]:
    xs = await numbers.fn(n)
    fn = bump.fn
    return [await fn(x) for x in xs]


_gate: dict[str, Any] = {}


@fd.step
async def hold(x: int) -> int:
    _gate["in"] += 1
    if _gate["in"] == _gate["n"]:
        _gate["all_in"].set()
    await _gate["go"].wait()
    return x


@fd.flow
async def hold_all(n: int) -> list[int]:
    return await hold.map(await numbers(n))


async def _timing(rounds: int, backend: str) -> dict[str, list[float]]:
    async with fd.Context() as ctx:

        async def floor() -> float:
            start = time.perf_counter()
            await bump_all_floor(ITEMS)
            return time.perf_counter() - start

        async def flowdsl() -> float:
            start = time.perf_counter()
            await ctx.run(bump_all, ITEMS)
            return time.perf_counter() - start

        return await interleaved(rounds, {"floor": floor, "flowdsl": flowdsl})


async def _memory(n: int) -> dict[str, float]:
    out: dict[str, float] = {}
    async with fd.Context() as ctx:
        _gate.update({"in": 0, "n": 2, "all_in": anyio.Event(), "go": anyio.Event()})
        _gate["go"].set()
        await ctx.run(hold_all, 2)  # warm: plans, codec hooks, first-use imports
        for name in ("flowdsl", "plain tasks"):
            _gate.update({"in": 0, "n": n, "all_in": anyio.Event(), "go": anyio.Event()})
            tracemalloc.start()
            try:
                base = tracemalloc.get_traced_memory()[0]
                async with anyio.create_task_group() as tg:
                    if name == "flowdsl":
                        tg.start_soon(ctx.run, hold_all, n)
                    else:
                        for i in range(n):
                            tg.start_soon(hold.fn, i)
                    await _gate["all_in"].wait()
                    out[name] = (tracemalloc.get_traced_memory()[0] - base) / n
                    _gate["go"].set()
            finally:
                tracemalloc.stop()
    return out


async def _batch(url: str, rounds: int) -> list[float]:
    walls = []
    async with fd.Context(batch=True, store=url, workers=0) as ctx:
        await ctx.run(nap_all, 4, 0.0)  # warm: the workers import this module
        for _ in range(rounds):
            start = time.perf_counter()
            result = await ctx.run(nap_all, BATCH_ITEMS, BATCH_DELAY)
            walls.append(time.perf_counter() - start)
            assert len(result) == BATCH_ITEMS
    return walls


def _per_w1_step(flowdsl: float, floor: float) -> float:
    return (flowdsl - floor) / ((w1_chain.w.W1_RUNS // 5) * w1_chain.w.CHAIN_STEPS) * 1e6


def run(config: Config) -> Section:
    rounds = config.pick(default=9, quick=3)
    section = Section(
        "map",
        f"Maps: a {ITEMS}-item map of trivial steps in real time (medians of {rounds} "
        f"interleaved rounds), memory per in-flight item, and a {BATCH_ITEMS}-item map of "
        f"{int(BATCH_DELAY * 1000)} ms items on {PROCESSES} worker processes",
    )
    per_item = Table(
        "real time: µs per item",
        ["backend", "floor (direct await)", "flowdsl", "overhead", "W1 overhead/step", "ratio"],
    )
    for backend in ("asyncio", "trio"):
        w1 = anyio.run(w1_chain._measure, rounds, w1_chain.w.W1_RUNS // 5, backend=backend)
        w1_overhead = paired(w1["flowdsl"], w1["floor"], _per_w1_step)
        times = anyio.run(_timing, rounds, backend, backend=backend)
        overhead = paired(times["flowdsl"], times["floor"], lambda a, b: (a - b) / ITEMS * 1e6)
        ratio = overhead / w1_overhead
        per_item.add(
            backend,
            median(times["floor"]) / ITEMS * 1e6,
            median(times["flowdsl"]) / ITEMS * 1e6,
            overhead,
            w1_overhead,
            ratio,
        )
        section.targets.append(
            Target(f"map overhead per item / W1 overhead per step on {backend}", ratio, 2.0, "x")
        )
        section.data[backend] = {
            "overhead_us_per_item": overhead,
            "w1_overhead_us_per_step": w1_overhead,
            "ratio": ratio,
        }
    memory = anyio.run(_memory, IN_FLIGHT)
    mem = Table(
        f"memory per in-flight item ({IN_FLIGHT} items waiting at once, asyncio)",
        ["system", "bytes per item"],
    )
    for name, value in memory.items():
        mem.add(name, value)
    section.data["memory_bytes_per_item"] = memory
    with tempfile.TemporaryDirectory(prefix="flowdsl-map-") as tmp:
        url = f"sqlite:///{Path(tmp)}/map.db"
        with worker_processes(url, PROCESSES, W2_SLOTS):
            walls = anyio.run(functools.partial(_batch, url, max(2, rounds // 3)))
    rate = median([BATCH_ITEMS / w for w in walls])
    bound = PROCESSES * W2_SLOTS / BATCH_DELAY
    batch = Table(
        f"batch: {BATCH_ITEMS} items of {int(BATCH_DELAY * 1000)} ms, {PROCESSES} worker "
        f"processes x {W2_SLOTS} slots",
        ["items/s", "wall s", "bound (slots / delay)", "share of bound"],
    )
    batch.add(rate, median(walls), bound, rate / bound)
    section.data["batch"] = {"walls_s": walls, "items_per_s": rate, "bound": bound}
    section.tables += [per_item, mem, batch]
    section.notes += [
        "overhead per item = (flowdsl - floor) / items, per round: it includes the run's own "
        "cost and the map's record, spread over its items; W1 is measured just before, in "
        f"the same process, with {w1_chain.w.W1_RUNS // 5} runs",
        "memory: tracemalloc's traced memory with every item waiting, above the memory "
        "before the run, per item; 'plain tasks' awaits the same function in one task each",
        "batch: the items are tasks on the embedded SQLite queue; the bound is what the "
        "workers' slots allow for 50 ms items",
    ]
    return section


if __name__ == "__main__":
    from benchmarks import dynamic_map  # by its name: worker processes import its steps
    from benchmarks._harness import standalone

    standalone(dynamic_map.run)
