"""The floor: the same step bodies awaited directly on asyncio, results journaled by bare sqlite3.

No engine at all: what the work itself costs, and the bar every system's figure is divided
by.  Each entry point runs in its own process (see ``_child``) and returns a JSON-able dict.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from . import _measure as m
from ._workloads import CHAIN_STEPS, CRASH_CHAIN, Sizes, crash_text, logged_rotate, rotated, w

__all__ = ["crash", "long_chain", "resume", "w1", "w2", "w3_steps"]


def w1(sizes: Sizes, directory: Path) -> dict[str, Any]:
    async def one(i: int) -> bool:
        return await w.chain_floor(i) == i + CHAIN_STEPS

    return asyncio.run(m.sequence(one, sizes.w1_runs))


def w2(sizes: Sizes, directory: Path) -> dict[str, Any]:
    return asyncio.run(m.fanout(w.fanout_floor_asyncio, sizes.w2_runs))


def w3_steps(sizes: Sizes, directory: Path) -> dict[str, Any]:
    journal = w.BareJournal(directory / "floor.db")
    texts = m.texts_for(sizes.w3_runs)

    async def one(i: int) -> bool:
        text = texts[i]
        return await w.durable_chain_floor(text, journal, f"run-{i}") == rotated(text, CHAIN_STEPS)

    try:
        return asyncio.run(m.sequence(one, sizes.w3_runs))
    finally:
        journal.close()


def long_chain(sizes: Sizes, directory: Path) -> dict[str, Any]:
    path = directory / "floor_long.db"
    steps = sizes.long_chain

    async def chain(text: str) -> str:
        journal = w.BareJournal(path)
        try:
            for i in range(steps):
                text = await w.rotate.fn(text)
                journal.write("long", i, json.dumps(text))
        finally:
            journal.close()
        return text

    return asyncio.run(m.long_chain(chain, steps, path))


# --- resume: a hand-written journal that skips what it already holds -------------------


async def _crash_chain(path: Path) -> str:
    journal = w.BareJournal(path)
    try:
        done = dict(journal.db.execute("SELECT node_id, value FROM results WHERE run_id = 'crash'"))
        text = crash_text()
        for step in range(1, CRASH_CHAIN + 1):
            if step in done:
                text = json.loads(done[step])
                continue
            text = await logged_rotate.fn(text, step)
            journal.write("crash", step, json.dumps(text))
    finally:
        journal.close()
    return text


def crash(directory: Path) -> dict[str, Any]:
    asyncio.run(_crash_chain(directory / "floor_crash.db"))
    return {}


def resume(directory: Path) -> dict[str, Any]:
    start = time.perf_counter()
    result = asyncio.run(_crash_chain(directory / "floor_crash.db"))
    return {"resume_s": time.perf_counter() - start, "correct": result == m.crash_expected()}
