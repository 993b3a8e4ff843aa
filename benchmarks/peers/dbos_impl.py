"""DBOS: each workload as an async ``@DBOS.workflow()`` of ``@DBOS.step()`` s on SQLite.

The system database is an SQLite file (``system_database_url="sqlite:///..."``, DBOS's
defaults: a rollback journal, Python's ``synchronous=FULL``).  The fan-out starts its steps
with ``asyncio.gather`` in a fixed order, as DBOS documents for concurrent steps.  DBOS has
no in-memory mode, so it has no W1 row: its W3 row is its cost per step.  Resume is DBOS's
own: ``DBOS.launch()`` in a fresh process recovers the pending workflow, and the benchmark
waits on its handle.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from dbos import DBOS, DBOSConfig, SetWorkflowID, WorkflowHandleAsync

from . import _measure as m
from ._workloads import (
    CHAIN_STEPS,
    CRASH_CHAIN,
    FANOUT,
    Sizes,
    crash_text,
    logged_rotate,
    rotated,
    w,
)

__all__ = ["crash", "long_chain", "resume", "w2", "w3_steps"]

T = TypeVar("T")
#: How often a handle polls the system database for the result (DBOS's default: 1 s).
POLL = 0.01


@contextmanager
def launched(path: Path) -> Iterator[None]:
    config: DBOSConfig = {
        "name": "flowdsl-peers",
        "system_database_url": f"sqlite:///{path}",
        "log_level": "WARNING",
    }
    DBOS(config=config)
    DBOS.launch()
    try:
        yield
    finally:
        DBOS.destroy()


def in_dbos(path: Path, main: Callable[[], Any]) -> Any:
    with launched(path):
        return asyncio.run(main())


# --- steps: the shared step bodies, as DBOS steps -------------------------------------------


@DBOS.step()
async def prepare_step(x: int) -> int:
    result: int = await w.prepare.fn(x)
    return result


@DBOS.step()
async def leaf_step(x: int, i: int, delay: float) -> int:
    result: int = await w.leaf.fn(x, i, delay)
    return result


@DBOS.step()
async def total_step(parts: list[int]) -> int:
    result: int = await w.total.fn(parts)
    return result


@DBOS.step()
async def rotate_step(text: str) -> str:
    result: str = await w.rotate.fn(text)
    return result


@DBOS.step()
async def logged_step(text: str, step: int) -> str:
    result: str = await logged_rotate.fn(text, step)
    return result


# --- workflows ------------------------------------------------------------------------------


@DBOS.workflow()
async def fanout_workflow(x: int, delay: float) -> int:
    a = await prepare_step(x)
    parts = await asyncio.gather(*(leaf_step(a, i, delay) for i in range(FANOUT)))
    return await total_step(list(parts))


@DBOS.workflow()
async def chain_workflow(text: str) -> str:
    for _ in range(CHAIN_STEPS):
        text = await rotate_step(text)
    return text


@DBOS.workflow()
async def long_workflow(text: str, steps: int) -> str:
    for _ in range(steps):
        text = await rotate_step(text)
    return text


@DBOS.workflow()
async def crash_workflow(text: str) -> str:
    for step in range(1, CRASH_CHAIN + 1):
        text = await logged_step(text, step)
    return text


# --- entry points -----------------------------------------------------------------------------


def w2(sizes: Sizes, directory: Path) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        return await m.fanout(fanout_workflow, sizes.w2_runs)

    result: dict[str, Any] = in_dbos(directory / "dbos.db", main)
    return result


def w3_steps(sizes: Sizes, directory: Path) -> dict[str, Any]:
    texts = m.texts_for(sizes.w3_runs)

    async def one(i: int) -> bool:
        return await chain_workflow(texts[i]) == rotated(texts[i], CHAIN_STEPS)

    async def main() -> dict[str, Any]:
        return await m.sequence(one, sizes.w3_runs)

    result: dict[str, Any] = in_dbos(directory / "dbos.db", main)
    return result


def long_chain(sizes: Sizes, directory: Path) -> dict[str, Any]:
    path = directory / "dbos_long.db"
    steps = sizes.long_chain

    async def chain(text: str) -> str:
        # Launched here so that the file is closed (DBOS.destroy) before it is measured.
        with launched(path):
            result: str = await long_workflow(text, steps)
        return result

    return asyncio.run(m.long_chain(chain, steps, path))


def crash(directory: Path) -> dict[str, Any]:
    async def main() -> None:
        with SetWorkflowID("crash"):
            await crash_workflow(crash_text())

    in_dbos(directory / "dbos_crash.db", main)
    return {}


def resume(directory: Path) -> dict[str, Any]:
    async def main() -> str:
        # DBOS.launch() has found the pending workflow and queued it for recovery.
        handle: WorkflowHandleAsync[str] = await DBOS.retrieve_workflow_async("crash")
        result: str = await handle.get_result(polling_interval_sec=POLL)
        return result

    start = time.perf_counter()
    result = in_dbos(directory / "dbos_crash.db", main)
    return {"resume_s": time.perf_counter() - start, "correct": result == m.crash_expected()}
