"""How a workload is measured, the same way for every system: each system module hands these
functions its own way of running one run, and gets back the JSON-able record the parent
process collects.

W2 reuses :func:`benchmarks.w2_fanout.batch` and :func:`benchmarks.w2_fanout.peak_per_run`,
so the peers' figures are taken exactly as flowdsl's own W2 figures are.
"""

from __future__ import annotations

import gc
import itertools
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from benchmarks import w2_fanout

from ._workloads import (
    CRASH_CHAIN,
    LEAF_DELAY,
    RESULT_BYTES,
    crash_text,
    expected_fanout,
    file_bytes,
    rotated,
    w,
)

__all__ = [
    "crash_expected",
    "fanout",
    "long_chain",
    "long_chain_sync",
    "sequence",
    "sequence_sync",
    "texts_for",
    "warmup_of",
]

#: Per-step times are averaged over this many steps at the start and at the end of a chain.
EDGE = 20


def warmup_of(runs: int) -> int:
    """Untimed runs before the timed ones: first-use costs (imports, caches, plans, the
    database's first pages) are not what a steady-state figure should see."""
    return max(1, runs // 10)


def texts_for(runs: int) -> list[str]:
    """A different 1 KB text per run, warm-up runs included (no two results are equal)."""
    return w.seed_texts(warmup_of(runs) + runs, seed=runs)


async def sequence(one: Callable[[int], Awaitable[bool]], runs: int) -> dict[str, Any]:
    """Warm-up runs, then *runs* runs one after the other: ``one(i)`` runs run *i* and says
    whether its result was right."""
    warmup = warmup_of(runs)
    correct = True
    for i in range(warmup):
        correct &= await one(i)
    gc.collect()
    start = time.perf_counter()
    for i in range(warmup, warmup + runs):
        correct &= await one(i)
    return {"seconds": time.perf_counter() - start, "runs": runs, "correct": correct}


def sequence_sync(one: Callable[[int], bool], runs: int) -> dict[str, Any]:
    """:func:`sequence` for a synchronous API (LangGraph's ``SqliteSaver``): no event loop."""
    warmup = warmup_of(runs)
    correct = True
    for i in range(warmup):
        correct &= one(i)
    gc.collect()
    start = time.perf_counter()
    for i in range(warmup, warmup + runs):
        correct &= one(i)
    return {"seconds": time.perf_counter() - start, "runs": runs, "correct": correct}


async def fanout(
    call: Callable[[int, float], Coroutine[Any, Any, int]], runs: int
) -> dict[str, Any]:
    """W2: a warm-up batch, a timed batch of *runs* runs at once, then a traced batch."""
    correct = await call(7, 0.0) == expected_fanout(7)
    await w2_fanout.batch(call, warmup_of(runs), LEAF_DELAY)
    gc.collect()
    timed = await w2_fanout.batch(call, runs, LEAF_DELAY)
    gc.collect()
    tracemalloc.start()
    try:
        per_run = await w2_fanout.peak_per_run(call, runs, LEAF_DELAY)
    finally:
        tracemalloc.stop()
    return {
        "wall": timed.wall,
        "p50": timed.p50,
        "p99": timed.p99,
        "bytes_per_run": per_run,
        "runs": runs,
        "correct": correct,
    }


async def long_chain(
    chain: Callable[[str], Awaitable[str]], steps: int, path: Path
) -> dict[str, Any]:
    """One chain of *steps* ``rotate`` steps; *chain* closes its store before it returns.

    ``w.rotate`` stamps the time each step starts; a step's time is the gap to the next
    stamp, so it includes the checkpoint written after the step.
    """
    text = w.seed_texts(1, seed=5000 + steps)[0]
    w.STAMPS = stamps = list[float]()
    try:
        start = time.perf_counter()
        result = await chain(text)
        wall = time.perf_counter() - start
    finally:
        w.STAMPS = None
    return _chain_record(text, result, stamps, wall, steps, path)


def long_chain_sync(chain: Callable[[str], str], steps: int, path: Path) -> dict[str, Any]:
    """:func:`long_chain` for a synchronous API."""
    text = w.seed_texts(1, seed=5000 + steps)[0]
    w.STAMPS = stamps = list[float]()
    try:
        start = time.perf_counter()
        result = chain(text)
        wall = time.perf_counter() - start
    finally:
        w.STAMPS = None
    return _chain_record(text, result, stamps, wall, steps, path)


def _chain_record(
    text: str, result: str, stamps: list[float], wall: float, steps: int, path: Path
) -> dict[str, Any]:
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    size = file_bytes(path)
    raw = steps * RESULT_BYTES
    return {
        "steps": steps,
        "file_bytes": size,
        "raw_bytes": raw,
        "ratio": size / raw,
        "first_ms": sum(gaps[:EDGE]) / EDGE * 1e3,
        "last_ms": sum(gaps[-EDGE:]) / EDGE * 1e3,
        "wall": wall,
        "correct": result == rotated(text, steps) and len(stamps) == steps,
    }


def crash_expected() -> str:
    """What the resume workload returns."""
    return rotated(crash_text(), CRASH_CHAIN)
