"""What every system in ``benchmarks/peers/`` runs: one definition of each workload.

The step bodies and the sizes come from :mod:`benchmarks.workloads` (the module flowdsl's own
benchmarks use); this module adds only what the peers need on top of them: the sizes of a
quick run, the crash-and-resume chain, and two helpers.  Each system wraps the *same*
``async def`` (``w.inc.fn``, ``w.leaf.fn``, ``w.rotate.fn``, ``logged_rotate.fn``) in its own
step decorator or node, so a workload cannot drift from one system to another.

W1  ``w.inc.fn`` x :data:`CHAIN_STEPS`, ``Sizes.w1_runs`` runs in sequence, in memory.
W2  ``w.prepare.fn`` -> :data:`FANOUT` x ``w.leaf.fn`` (``sleep(LEAF_DELAY)``) ->
    ``w.total.fn``, ``Sizes.w2_runs`` runs at once; timed, then a tracemalloc pass.
W3  steps: ``w.rotate.fn`` x :data:`CHAIN_STEPS` on 1 KB text, every result durable in
    SQLite, ``Sizes.w3_runs`` runs in sequence.
    long: one chain of ``Sizes.long_chain`` such steps (``Sizes.snapshot_chain`` when the
    state is the list of every result); file size / raw bytes, ms per step first and last 20.
    resume: :data:`CRASH_CHAIN` steps of ``logged_rotate``; the process is SIGKILLed while
    step :data:`CRASH_AT` runs, and a fresh process finishes the run.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import anyio
import attrs

import flowdsl as fd
from benchmarks import workloads as w

__all__ = [
    "CHAIN_STEPS",
    "CRASH_AT",
    "CRASH_CHAIN",
    "CRASH_GRACE",
    "FANOUT",
    "FULL",
    "LEAF_DELAY",
    "QUICK",
    "RESULT_BYTES",
    "Sizes",
    "crash_text",
    "drive",
    "expected_fanout",
    "file_bytes",
    "logged_rotate",
    "rotated",
    "set_log",
    "w",
]

T = TypeVar("T")

CHAIN_STEPS = w.CHAIN_STEPS
FANOUT = w.FANOUT
LEAF_DELAY = w.LEAF_DELAY
#: The JSON bytes of one W3 result (a string of ``w.RESULT_CHARS`` letters, quotes included).
RESULT_BYTES = len(json.dumps("x" * w.RESULT_CHARS).encode())

#: The resume workload: a chain of this many steps, killed while step CRASH_AT (1-based) runs,
#: so that CRASH_AT - 1 steps have finished.
CRASH_CHAIN = 20
CRASH_AT = 11
#: How long step CRASH_AT has been running when the parent kills the process: a real step (an
#: LLM call) runs for seconds, so a background checkpoint write of the step before it has
#: had time to land.
CRASH_GRACE = 0.2


@attrs.frozen
class Sizes:
    """The counts one benchmark run uses: the workloads' own, or a quick run's."""

    w1_runs: int
    w2_runs: int
    w3_runs: int  # durable 10-step runs in sequence, the same count for every system
    long_chain: int  # flowdsl's ``w.long_chain`` has exactly w.LONG_CHAIN steps
    snapshot_chain: int  # LangGraph with state = the list of all results: grows as N^2


FULL = Sizes(
    w1_runs=w.W1_RUNS, w2_runs=w.W2_RUNS, w3_runs=50, long_chain=w.LONG_CHAIN, snapshot_chain=400
)
QUICK = Sizes(w1_runs=100, w2_runs=20, w3_runs=10, long_chain=w.LONG_CHAIN, snapshot_chain=100)


def rotated(text: str, steps: int) -> str:
    """What a chain of *steps* ``rotate`` steps returns: the check on every W3 result."""
    k = steps % len(text)
    return text[k:] + text[:k]


def expected_fanout(x: int) -> int:
    """What one W2 run returns for input *x*."""
    return sum(x + i for i in range(FANOUT))


def crash_text() -> str:
    """The input of the resume workload (1 KB as JSON)."""
    return w.seed_texts(1, seed=1111)[0]


# --- the resume workload's step --------------------------------------------------------

#: Where ``logged_rotate`` appends ``start N`` / ``end N`` lines (set per process).
_LOG: int | None = None
#: The step at which ``logged_rotate`` waits to be killed (set in the crashing process only).
_HANG_AT: int | None = None


def set_log(path: Path | None, *, hang_at: int | None = None) -> None:
    """Log this process's steps to *path*; make step *hang_at* wait to be killed."""
    global _LOG, _HANG_AT
    if _LOG is not None:
        os.close(_LOG)
    # O_APPEND and one write per line: each line reaches the kernel whole, so it survives a
    # SIGKILL of this process.
    _LOG = None if path is None else os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    _HANG_AT = hang_at


def _log(line: str) -> None:
    if _LOG is not None:
        os.write(_LOG, f"{line}\n".encode())


@fd.step
async def logged_rotate(text: str, step: int) -> str:
    """``w.rotate`` that logs when it starts and ends (the log counts what re-ran)."""
    _log(f"start {step}")
    if step == _HANG_AT:
        await anyio.sleep(math.inf)  # until the parent's SIGKILL
    result: str = await w.rotate.fn(text)
    _log(f"end {step}")
    return result


# --- helpers -------------------------------------------------------------------------------


def drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends to its result, synchronously.

    LangGraph's ``SqliteSaver`` serves synchronous graphs only: their nodes call the same
    ``async def`` step bodies through this (about a microsecond per call).
    """
    try:
        coro.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    coro.close()
    raise RuntimeError("drive() runs step bodies that never await; this one suspended")


def file_bytes(path: Path) -> int:
    """An SQLite database's size on disk: the file and its write-ahead log."""
    return sum(
        candidate.stat().st_size for candidate in (path, Path(f"{path}-wal")) if candidate.exists()
    )
