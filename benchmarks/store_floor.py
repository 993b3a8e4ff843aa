"""The floor under a durable step: bare sqlite3 beside ``SQLiteStore.commit_node``.

    python benchmarks/store_floor.py [--rounds 21] [--steps 500]

Prints, from one process:

- the median µs per step of (a) one bare sqlite3 INSERT + COMMIT of a 1 KB row in WAL mode
  with synchronous=NORMAL, and (b) ``SQLiteStore.commit_node`` of a NodeRecord holding 1 KB
  of distinct data, measured in interleaved rounds (a, b, b, a, ...) and reported as the
  median of the rounds' per-step means;
- for one 1,000-step chain written through the store: the file size after the WAL is
  checkpointed, divided by the raw result bytes (bare sqlite3 beside it), and the mean ms
  per step of the first 20 and the last 20 steps.

Targets (issue 3): (b) at most 150 µs per step; size at most 1.5x; the last 20 steps no
slower than the first 20.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import anyio

from flowdsl import _codec
from flowdsl._records import NodeRecord, RunRecord, RunStatus
from flowdsl.backends.sqlite.store import SQLiteStore

_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 "


def distinct_values(n: int, seed: int) -> list[str]:
    """*n* different JSON strings of exactly 1,024 bytes each."""
    rng = random.Random(seed)
    return [_codec.dumps("".join(rng.choices(_ALPHABET, k=1022))) for _ in range(n)]


def run_record(run_id: str) -> RunRecord:
    now = time.time()
    return RunRecord(run_id, "chain", "bench:chain", "fp", "{}", RunStatus.RUNNING, now, now)


# --- (a) bare sqlite3 ------------------------------------------------------------------------


class Bare:
    """What a hand-written journal costs: one row per result, one transaction per row."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path)
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = NORMAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS results "
            "(run_id TEXT, node_id TEXT, value TEXT, PRIMARY KEY (run_id, node_id))"
        )
        self.db.commit()

    def write(self, run_id: str, values: list[str]) -> list[float]:
        times = []
        for i, value in enumerate(values):
            start = time.perf_counter()
            self.db.execute("INSERT INTO results VALUES (?, ?, ?)", (run_id, f"step_{i}", value))
            self.db.commit()
            times.append(time.perf_counter() - start)
        return times

    def close(self) -> None:
        self.db.close()


# --- (b) the store ---------------------------------------------------------------------------


async def store_write(store: SQLiteStore, run_id: str, values: list[str]) -> list[float]:
    await store.create_run(run_record(run_id))
    now = time.time()
    records = [NodeRecord(f"step_{i}", v, 1, now, now, "code") for i, v in enumerate(values)]
    times = []
    for record in records:
        start = time.perf_counter()
        await store.commit_node(run_id, record)
        times.append(time.perf_counter() - start)
    return times


# --- runs ------------------------------------------------------------------------------------


async def per_step(directory: Path, rounds: int, steps: int) -> tuple[float, float]:
    """Median over interleaved rounds of the mean µs per step: (bare, store)."""
    bare = Bare(directory / "bare.db")
    store = SQLiteStore(directory / "store.db")
    await store.open()
    bare_means: list[float] = []
    store_means: list[float] = []
    try:
        for r in range(rounds):
            values = distinct_values(steps, seed=r)
            order = ("bare", "store") if r % 2 == 0 else ("store", "bare")
            for system in order:
                if system == "bare":
                    bare_means.append(statistics.fmean(bare.write(f"run-{r}", values)))
                else:
                    times = await store_write(store, f"run-{r}", values)
                    store_means.append(statistics.fmean(times))
    finally:
        bare.close()
        await store.close()
    return statistics.median(bare_means) * 1e6, statistics.median(store_means) * 1e6


async def chain(directory: Path, n: int) -> tuple[float, float, float, float]:
    """One *n*-step chain: (store size ratio, bare size ratio, first-20 ms, last-20 ms)."""
    values = distinct_values(n, seed=12345)
    raw_bytes = sum(len(v.encode()) for v in values)
    path = directory / f"chain{n}.db"
    store = SQLiteStore(path)
    await store.open()
    times = await store_write(store, "chain", values)
    await store.close()  # the last connection out checkpoints the WAL into the file
    bare_path = directory / f"bare{n}.db"
    bare = Bare(bare_path)
    bare.write("chain", values)
    bare.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    bare.close()
    return (
        size_of(path) / raw_bytes,
        size_of(bare_path) / raw_bytes,
        statistics.fmean(times[:20]) * 1e3,
        statistics.fmean(times[-20:]) * 1e3,
    )


def size_of(path: Path) -> int:
    wal = Path(f"{path}-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


async def amain(rounds: int, steps: int) -> None:
    with tempfile.TemporaryDirectory(prefix="flowdsl-store-floor-") as tmp:
        directory = Path(tmp)
        bare_us, store_us = await per_step(directory, rounds, steps)
        ratio, bare_ratio, first, last = await chain(directory, 1000)
    print(f"W3 store floor: {rounds} interleaved rounds x {steps} steps, 1 KB per step")
    print(f"  (a) bare sqlite3 INSERT+COMMIT, WAL/NORMAL   {bare_us:7.1f} us/step (median)")
    print(f"  (b) SQLiteStore.commit_node                  {store_us:7.1f} us/step (median)")
    print(f"      store overhead over bare                 {store_us - bare_us:+7.1f} us/step")
    print("  1,000-step chain, 1 KB distinct results per step")
    print(f"      file size / raw result bytes: store {ratio:.3f}, bare sqlite3 {bare_ratio:.3f}")
    print(f"      ms per step, first 20 -> last 20: {first:.3f} -> {last:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description="bare sqlite3 beside SQLiteStore.commit_node")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args()
    anyio.run(amain, args.rounds, args.steps)


if __name__ == "__main__":
    main()
