"""W3: durable steps on SQLite: per-step cost, storage, and resume of a 1,000-node run.

1. W1's chain with 1 KB results, every result checkpointed
   (``fd.Context(store="sqlite:///...")``), beside its floor: the same functions awaited
   directly, each result written by a bare sqlite3 INSERT + COMMIT (WAL,
   ``synchronous=NORMAL``).  Every run starts from a different random text and every step
   rotates it, so no two results are equal and the store's content hash saves nothing.
2. One 1,000-step chain of 1 KB results: the file's size over the raw result bytes, and the
   ms per step of the first 20 and the last 20 steps (each step records
   ``time.perf_counter()`` when it starts; a step's time is the gap to the next one).
3. Resume: the same 1,000-node run made to fail once at its last node, then
   ``ctx.resume(run_id)`` from a newly opened context: time to the result.  Once more in a
   fresh Python process, imports included, for information.

    python -m benchmarks.w3_durable [--quick]
"""

from __future__ import annotations

import contextlib
import itertools
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import anyio

import flowdsl as fd

from . import workloads as w
from ._harness import (
    ROOT,
    Config,
    Section,
    Table,
    Target,
    interleaved,
    median,
    paired,
    subprocess_env,
)

__all__ = ["run"]

STEP_TARGET_US = 150.0
STORAGE_TARGET = 1.5
RESUME_TARGET_MS = 100.0


def url_of(path: Path) -> str:
    return f"sqlite:///{path}"  # an absolute path: sqlite:////tmp/...


def size_of(path: Path) -> int:
    total = 0
    for suffix in ("", "-wal"):
        candidate = Path(f"{path}{suffix}")
        if candidate.exists():
            total += candidate.stat().st_size
    return total


# --- 1. per durable step ----------------------------------------------------------------


async def _per_step(directory: Path, rounds: int, runs: int) -> dict[str, list[float]]:
    batches = iter([w.seed_texts(runs, seed=r) for r in range(rounds + 1)] * 2)
    floor_batches: Iterator[list[str]] = iter(
        [w.seed_texts(runs, seed=1000 + r) for r in range(rounds + 1)]
    )
    journal = w.BareJournal(directory / "floor.db")
    round_no = 0
    try:
        async with fd.Context(store=url_of(directory / "flowdsl.db")) as ctx:

            async def floor() -> float:
                nonlocal round_no
                round_no += 1
                texts = next(floor_batches)
                start = time.perf_counter()
                for i, text in enumerate(texts):
                    await w.durable_chain_floor(text, journal, f"r{round_no}-{i}")
                return time.perf_counter() - start

            async def flowdsl() -> float:
                texts = next(batches)
                start = time.perf_counter()
                for text in texts:
                    await ctx.run(w.durable_chain, text)
                return time.perf_counter() - start

            return await interleaved(rounds, {"floor": floor, "flowdsl": flowdsl})
    finally:
        journal.close()


# --- 2. a 1,000-step chain ----------------------------------------------------------------


async def _long_chain(directory: Path, k: int) -> dict[str, float]:
    text = w.seed_texts(1, seed=5000 + k)[0]
    path = directory / f"long{k}.db"
    w.STAMPS = stamps = list[float]()
    try:
        start = time.perf_counter()
        async with fd.Context(store=url_of(path)) as ctx:
            result = await ctx.run(w.long_chain, text)
        wall = time.perf_counter() - start
    finally:
        w.STAMPS = None
    raw = _raw_bytes(text, w.LONG_CHAIN)
    floor_path = directory / f"long_floor{k}.db"
    journal = w.BareJournal(floor_path)
    w.STAMPS = floor_stamps = list[float]()
    try:
        value = text
        for i in range(w.LONG_CHAIN):
            value = await w.rotate.fn(value)
            journal.write("chain", i, json.dumps(value))
    finally:
        w.STAMPS = None
        journal.close()
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    floor_gaps = [b - a for a, b in itertools.pairwise(floor_stamps)]
    return {
        "ratio": size_of(path) / raw,
        "floor_ratio": size_of(floor_path) / raw,
        "first_ms": sum(gaps[:20]) / 20 * 1e3,
        "last_ms": sum(gaps[-20:]) / 20 * 1e3,
        "floor_first_ms": sum(floor_gaps[:20]) / 20 * 1e3,
        "floor_last_ms": sum(floor_gaps[-20:]) / 20 * 1e3,
        "wall_s": wall,
        "correct": float(result == value),
    }


def _raw_bytes(text: str, steps: int) -> int:
    """The JSON bytes of the chain's results (every rotation has the same length)."""
    return len(json.dumps(text).encode()) * steps


# --- 3. resume ----------------------------------------------------------------------------


async def _failed_run(path: Path, run_id: str, text: str) -> None:
    """A 1,000-node run whose nodes are all finished but the last, which failed."""
    w.ARMED = True
    try:
        async with fd.Context(store=url_of(path)) as ctx:
            with contextlib.suppress(fd.StepFailed):
                await ctx.run(w.long_chain, text, run_id=run_id)
    finally:
        w.ARMED = False


async def _resume(directory: Path, k: int, expected: str, text: str) -> dict[str, float]:
    path = directory / f"resume{k}.db"
    run_id = f"resume-{k}"
    await _failed_run(path, run_id, text)
    start = time.perf_counter()
    async with fd.Context(store=url_of(path)) as ctx:
        opened = time.perf_counter()
        result = await ctx.resume(run_id)
        done = time.perf_counter()
    return {
        "with_open_ms": (done - start) * 1e3,
        "resume_ms": (done - opened) * 1e3,
        "correct": float(result == expected),
    }


async def _expected(text: str) -> str:
    value = text
    for _ in range(w.LONG_CHAIN):
        value = await w.rotate.fn(value)
    return value


_FRESH = """
import sys, time, anyio, flowdsl as fd
import benchmarks.workloads  # the flow's module: a resume never imports what a record names
async def main():
    async with fd.Context(store=sys.argv[1]) as ctx:
        result = await ctx.resume(sys.argv[2])
    print(len(result))
anyio.run(main)
"""


def _fresh_process_resume(directory: Path, text: str) -> float:
    path = directory / "resume_fresh.db"
    anyio.run(_failed_run, path, "fresh", text)
    env = subprocess_env()
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", _FRESH, url_of(path), "fresh"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - start


# --- the section ------------------------------------------------------------------------


def run(config: Config) -> Section:
    rounds = config.pick(default=9, quick=3)
    runs = w.W1_RUNS if not config.quick else 100
    repeats = config.pick(default=5, quick=2)
    steps = runs * w.CHAIN_STEPS
    section = Section(
        "w3",
        f"W3: durable steps on SQLite (1 KB results; {runs} runs x {w.CHAIN_STEPS} steps, "
        f"medians of {rounds} interleaved rounds)",
    )
    with tempfile.TemporaryDirectory(prefix="flowdsl-w3-") as tmp:
        directory = Path(tmp)
        times = anyio.run(_per_step, directory, rounds, runs)
        chains = [anyio.run(_long_chain, directory, k) for k in range(repeats)]
        text = w.seed_texts(1, seed=7)[0]
        expected = anyio.run(_expected, text)
        resumes = [anyio.run(_resume, directory, k, expected, text) for k in range(repeats)]
        fresh = _fresh_process_resume(directory, text)

    floor, flowdsl = times["floor"], times["flowdsl"]
    overhead = paired(flowdsl, floor, lambda a, b: (a - b) / steps * 1e6)
    per_step = median(flowdsl) / steps * 1e6
    table = Table(
        "per durable step (µs)",
        ["system", "µs per step", "overhead over floor", "x floor"],
    )
    table.add("floor: direct await + sqlite3 INSERT+COMMIT", median(floor) / steps * 1e6, 0.0, 1.0)
    table.add(
        "flowdsl, store=sqlite", per_step, overhead, paired(flowdsl, floor, lambda a, b: a / b)
    )
    section.tables.append(table)

    def med(key: str, rows: list[dict[str, float]]) -> float:
        return median([row[key] for row in rows])

    storage = Table(
        f"one {w.LONG_CHAIN:,}-step chain, 1 KB per result (median of {repeats})",
        ["system", "file / raw bytes", "ms/step first 20", "ms/step last 20"],
    )
    storage.add(
        "bare sqlite3, one row per result",
        med("floor_ratio", chains),
        med("floor_first_ms", chains),
        med("floor_last_ms", chains),
    )
    storage.add("flowdsl", med("ratio", chains), med("first_ms", chains), med("last_ms", chains))
    section.tables.append(storage)

    resume = Table(
        f"resume of a {w.LONG_CHAIN:,}-node run, all finished but the last (median of {repeats})",
        ["measure", "ms"],
    )
    resume.add("ctx.resume(run_id) in an open context", med("resume_ms", resumes))
    resume.add("opening the context + ctx.resume", med("with_open_ms", resumes))
    resume.add("a fresh Python process (start, imports, resume), once", fresh * 1e3)
    section.tables.append(resume)

    section.targets += [
        Target("µs per durable step", per_step, STEP_TARGET_US, "µs"),
        Target("file size / raw result bytes", med("ratio", chains), STORAGE_TARGET, "x"),
        Target(
            "resume, opening the context included",
            med("with_open_ms", resumes),
            RESUME_TARGET_MS,
            "ms",
        ),
    ]
    wrong = sum(1 for row in chains + resumes if not row["correct"])
    section.notes.append(
        "every result equals the plain-Python chain's"
        if not wrong
        else f"{wrong} results DIFFER from the plain-Python chain's: the figures are suspect"
    )
    section.notes.append(
        f"the {w.LONG_CHAIN:,}-step run took {med('wall_s', chains) * 1e3:.0f} ms "
        "end to end (opening the store included)"
    )
    section.data.update(
        runs=runs,
        rounds=rounds,
        floor_s=floor,
        flowdsl_s=flowdsl,
        overhead_us_per_step=overhead,
        long_chain=chains,
        resume=resumes,
        fresh_process_resume_s=fresh,
    )
    return section


if __name__ == "__main__":
    from ._harness import standalone

    standalone(run)
