"""The benchmark workloads, defined once: flowdsl, its floors and (later) its peers run these.

Every workload is a handful of plain ``async def`` functions.  Here they are decorated as
flowdsl steps, and ``step.fn`` is the undecorated function, so a floor (or a peer in
``benchmarks/peers/``: LangGraph, DBOS) awaits exactly the code that flowdsl runs::

    from benchmarks import workloads as w

    w.inc.fn  # the plain function behind the step
    w.chain  # the flowdsl flow
    w.chain_floor  # the same functions awaited directly

The steps live in this importable module (not in ``__main__``) so that batch worker
processes started with ``imports=("benchmarks.workloads",)`` can run them.

W1  ``chain``: :data:`CHAIN_STEPS` trivial steps in a row, :data:`W1_RUNS` runs in sequence.
W2  ``fanout``: one step, :data:`FANOUT` steps that each sleep ``delay`` seconds (a stand-in
    for an LLM call), one reduce step; :data:`W2_RUNS` runs at once.  ``delay=0`` makes
    every step trivial (batch throughput).
W3  ``durable_chain``: W1's chain with 1 KB results; ``long_chain``: :data:`LONG_CHAIN` such
    steps, the last of which can be made to fail once (resume).
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import anyio

import flowdsl as fd

__all__ = [
    "CHAIN_STEPS",
    "FANOUT",
    "LEAF_DELAY",
    "LONG_CHAIN",
    "RESULT_CHARS",
    "W1_RUNS",
    "W2_RUNS",
    "BareJournal",
    "chain",
    "chain_floor",
    "durable_chain",
    "durable_chain_floor",
    "fail_once",
    "fanout",
    "fanout_anyio",
    "fanout_floor_asyncio",
    "fanout_floor_trio",
    "gather",
    "inc",
    "leaf",
    "long_chain",
    "prepare",
    "rotate",
    "seed_texts",
    "total",
]

CHAIN_STEPS = 10
W1_RUNS = 500
FANOUT = 20
LEAF_DELAY = 0.05
W2_RUNS = 200
LONG_CHAIN = 1000
#: A string of this many ASCII letters encodes to 1,024 bytes of JSON (quotes included).
RESULT_CHARS = 1022


# --- W1: a chain of trivial steps ---------------------------------------------------------


@fd.step
async def inc(x: int) -> int:
    return x + 1


@fd.flow
async def chain(x: int) -> int:
    for _ in range(CHAIN_STEPS):
        x = await inc(x)
    return x


async def chain_floor(x: int) -> int:
    fn = inc.fn
    for _ in range(CHAIN_STEPS):
        x = await fn(x)
    return x


# --- W2: fan-out and reduce ---------------------------------------------------------------


@fd.step
async def prepare(x: int) -> int:
    return x


@fd.step
async def leaf(x: int, i: int, delay: float) -> int:
    await anyio.sleep(delay)
    return x + i


@fd.step
async def total(parts: list[int]) -> int:
    return sum(parts)


@fd.flow
async def fanout(x: int, delay: float) -> int:
    a = await prepare(x)
    parts = [await leaf(a, i, delay) for i in range(FANOUT)]  # no data between them: concurrent
    return await total(parts)


async def fanout_floor_asyncio(x: int, delay: float) -> int:
    a = await prepare.fn(x)
    parts = await asyncio.gather(*(leaf.fn(a, i, delay) for i in range(FANOUT)))
    result: int = await total.fn(list(parts))
    return result


async def fanout_floor_trio(x: int, delay: float) -> int:
    import trio

    a = await prepare.fn(x)
    parts = [0] * FANOUT

    async def one(i: int) -> None:
        parts[i] = await leaf.fn(a, i, delay)

    async with trio.open_nursery() as nursery:
        for i in range(FANOUT):
            nursery.start_soon(one, i)
    result: int = await total.fn(parts)
    return result


async def fanout_anyio(x: int, delay: float) -> int:
    """W2 written by hand with an anyio task group: what a portable version costs."""
    a = await prepare.fn(x)
    parts = [0] * FANOUT

    async def one(i: int) -> None:
        parts[i] = await leaf.fn(a, i, delay)

    async with anyio.create_task_group() as tg:
        for i in range(FANOUT):
            tg.start_soon(one, i)
    result: int = await total.fn(parts)
    return result


async def gather(calls: list[Callable[[], Coroutine[Any, Any, Any]]]) -> list[float]:
    """Start every call at once with the backend's own primitive (no anyio task per call,
    so neither side pays for the launcher); return each call's latency in seconds."""
    latencies = [0.0] * len(calls)

    async def timed(i: int) -> None:
        start = time.perf_counter()
        await calls[i]()
        latencies[i] = time.perf_counter() - start

    import sniffio

    if sniffio.current_async_library() == "trio":
        import trio

        async with trio.open_nursery() as nursery:
            for i in range(len(calls)):
                nursery.start_soon(timed, i)
    else:
        await asyncio.gather(*(timed(i) for i in range(len(calls))))
    return latencies


# --- W3: durable chains of 1 KB results ---------------------------------------------------

#: When a list, ``rotate`` appends ``time.perf_counter()`` to it: per-step times of a chain.
STAMPS: list[float] | None = None
#: When true, ``fail_once`` raises once (and disarms itself): a run to resume.
ARMED = False


@fd.step
async def rotate(text: str) -> str:
    if STAMPS is not None:
        STAMPS.append(time.perf_counter())
    # A rotation of an aperiodic string is a new string: no two results of a run are equal,
    # so the store's content hash cannot deduplicate them.
    return text[1:] + text[0]


@fd.step
async def fail_once(text: str) -> str:
    global ARMED
    if ARMED:
        ARMED = False
        raise RuntimeError("failing once, as the benchmark asked")
    result: str = await rotate.fn(text)
    return result


@fd.flow
async def durable_chain(text: str) -> str:
    for _ in range(CHAIN_STEPS):
        text = await rotate(text)
    return text


@fd.flow
async def long_chain(text: str) -> str:
    for _ in range(LONG_CHAIN - 1):
        text = await rotate(text)
    return await fail_once(text)


def seed_texts(n: int, seed: int) -> list[str]:
    """*n* different random strings of :data:`RESULT_CHARS` letters (1 KB as JSON)."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return ["".join(rng.choices(letters, k=RESULT_CHARS)) for _ in range(n)]


class BareJournal:
    """The floor under a durable step: one INSERT and COMMIT per result, WAL mode,
    ``synchronous=NORMAL`` (what flowdsl's SQLite store promises too)."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = NORMAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS results "
            "(run_id TEXT, node_id INTEGER, value TEXT, PRIMARY KEY (run_id, node_id))"
        )

    def write(self, run_id: str, node: int, value: str) -> None:
        self.db.execute("BEGIN")
        self.db.execute("INSERT INTO results VALUES (?, ?, ?)", (run_id, node, value))
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.db.close()


async def durable_chain_floor(text: str, journal: BareJournal, run_id: str) -> str:
    """W3's floor: the chain awaited directly, each result journaled by bare sqlite3."""
    import json

    fn = rotate.fn
    for i in range(CHAIN_STEPS):
        text = await fn(text)
        journal.write(run_id, i, json.dumps(text))
    return text
