"""flowdsl: the flows of :mod:`benchmarks.workloads`, run in an ``fd.Context`` on asyncio.

In memory for W1 and W2 (``fd.Context()``), on the SQLite store for W3
(``fd.Context(store="sqlite:///...")``, its defaults: WAL, ``synchronous=NORMAL``).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import flowdsl as fd

from . import _measure as m
from ._workloads import CHAIN_STEPS, CRASH_CHAIN, Sizes, crash_text, logged_rotate, rotated, w

__all__ = ["crash", "crash_chain", "long_chain", "resume", "w1", "w2", "w3_full", "w3_steps"]


def url_of(path: Path) -> str:
    return f"sqlite:///{path}"


def w1(sizes: Sizes, directory: Path) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        async with fd.Context() as ctx:

            async def one(i: int) -> bool:
                return bool(await ctx.run(w.chain, i) == i + CHAIN_STEPS)

            return await m.sequence(one, sizes.w1_runs)

    return asyncio.run(main())


def w2(sizes: Sizes, directory: Path) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        async with fd.Context() as ctx:

            async def call(x: int, delay: float) -> int:
                return await ctx.run(w.fanout, x, delay)

            return await m.fanout(call, sizes.w2_runs)

    return asyncio.run(main())


def w3_steps(sizes: Sizes, directory: Path, *, query: str = "") -> dict[str, Any]:
    texts = m.texts_for(sizes.w3_runs)

    async def main() -> dict[str, Any]:
        async with fd.Context(store=url_of(directory / "flowdsl.db") + query) as ctx:

            async def one(i: int) -> bool:
                text = texts[i]
                return bool(await ctx.run(w.durable_chain, text) == rotated(text, CHAIN_STEPS))

            return await m.sequence(one, sizes.w3_runs)

    return asyncio.run(main())


def w3_full(sizes: Sizes, directory: Path) -> dict[str, Any]:
    """The same with ``synchronous=FULL``: every commit synced to the disk, as LangGraph's
    ``SqliteSaver`` and DBOS do by default."""
    return w3_steps(sizes, directory, query="?durability=full")


def long_chain(sizes: Sizes, directory: Path) -> dict[str, Any]:
    path = directory / "flowdsl_long.db"

    async def chain(text: str) -> str:
        async with fd.Context(store=url_of(path)) as ctx:
            return await ctx.run(w.long_chain, text)

    # ``w.long_chain`` has w.LONG_CHAIN steps, whatever the sizes say.
    return asyncio.run(m.long_chain(chain, w.LONG_CHAIN, path))


# --- resume ----------------------------------------------------------------------------


@fd.flow
async def crash_chain(text: str) -> str:
    for step in range(1, CRASH_CHAIN + 1):
        text = await logged_rotate(text, step)
    return text


def crash(directory: Path) -> dict[str, Any]:
    async def main() -> None:
        async with fd.Context(store=url_of(directory / "flowdsl_crash.db")) as ctx:
            await ctx.run(crash_chain, crash_text(), run_id="crash")

    asyncio.run(main())
    return {}


def resume(directory: Path) -> dict[str, Any]:
    async def main() -> str:
        async with fd.Context(store=url_of(directory / "flowdsl_crash.db")) as ctx:
            result: str = await ctx.resume("crash")
            return result

    start = time.perf_counter()
    result = asyncio.run(main())
    return {"resume_s": time.perf_counter() - start, "correct": result == m.crash_expected()}
