"""Chaos: worker processes SIGKILLed mid-step while many batch runs go on.

Worker processes (``_worker_proc.py serve``, asyncio, a 1 s lease) serve one SQLite file;
the test process schedules the runs (``workers=0``).  A seeded killer waits until a
worker has a step in flight, SIGKILLs it at a random instant and starts a replacement.
Whatever the instants: every run finishes with the right result, the journal holds one
record per node and that record comes from a real execution, and a node never starts again
once its record is committed.  Losing a worker is not the step's failure: a step without
retries whose worker died runs again on another worker.
"""

from __future__ import annotations

import contextlib
import random
import sqlite3
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import flowdsl as fd

import batch_steps as bs
from _worker_proc import Procs

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

LEASE = 1.0  # seconds: a dead worker's tasks go to another within about this long
RUNS = 10
KILLS = 4  # fewer than max_deliveries (5): no node of `diamond` can be dead-lettered


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'q.db'}"


@pytest.fixture
def procs(tmp_path: Path, url: str) -> Iterator[Procs]:
    procs = Procs(tmp_path, url)
    yield procs
    procs.close()


def in_flight(log: list[dict[str, Any]]) -> Counter[int]:
    """Steps started and not ended, by process id."""
    open_steps: Counter[tuple[int, str, str, int]] = Counter()
    for line in log:
        key = (line["pid"], line["run"], line["node"], line["attempt"])
        open_steps[key] += 1 if line["event"] == "start" else -1
    busy: Counter[int] = Counter()
    for (pid, *_), n in open_steps.items():
        if n > 0:
            busy[pid] += n
    return busy


async def kill_mid_step(
    procs: Procs, live: list[subprocess.Popen[bytes]], rng: random.Random, delay: float
) -> int:
    """SIGKILL a live worker that has a step in flight, at a random instant of it; start
    a replacement.  The killed process's id."""

    def busy_worker() -> subprocess.Popen[bytes] | None:
        busy = in_flight(bs.read_log(procs.log))
        candidates = [w for w in live if busy[w.pid]]
        return rng.choice(candidates) if candidates else None

    await anyio.sleep(rng.uniform(0, 0.3))  # kills spread over the runs' lifetime
    victim: subprocess.Popen[bytes] = await procs.wait_for(busy_worker, "a busy worker")
    await anyio.sleep(rng.uniform(0, delay))  # a random point of the step (or just after)
    procs.kill(victim)
    live.remove(victim)
    live.append(procs.serve(lease=LEASE, concurrency=3))
    return victim.pid


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_workers_killed_mid_step_lose_nothing_and_commit_nothing_twice(
    tmp_path: Path, url: str, procs: Procs, seed: int
) -> None:
    rng = random.Random(seed)
    delays = [rng.uniform(0.03, 0.12) for _ in range(RUNS)]
    live = [procs.serve(lease=LEASE, concurrency=3) for _ in range(2)]
    killed: list[int] = []
    with anyio.fail_after(90):
        async with fd.Context(batch=True, store=url, workers=0) as ctx:
            runs = [
                await ctx.start(bs.diamond, x, delays[x], run_id=f"chaos-{x}") for x in range(RUNS)
            ]
            for _ in range(KILLS):
                killed.append(await kill_mid_step(procs, live, rng, max(delays)))
            results: list[Any] = []
            with anyio.move_on_after(60):
                results = [await run.result() for run in runs]
            procs.check()  # a replacement that died explains a timeout
            journals = {f"chaos-{x}": await ctx.store.load_nodes(f"chaos-{x}") for x in range(RUNS)}
            records = [await ctx.store.get_run(f"chaos-{x}") for x in range(RUNS)]
            dead = [await ctx.queue.dead_letters(f"chaos-{x}") for x in range(RUNS)]

    # Every run finished with the right result and the right nodes; nothing dead.
    assert results == [bs.expected_diamond(x)[0] for x in range(RUNS)]
    assert all(r is not None and r.status is fd.RunStatus.FINISHED for r in records)
    assert [set(journals[f"chaos-{x}"]) for x in range(RUNS)] == [
        bs.expected_diamond(x)[1] for x in range(RUNS)
    ]
    assert dead == [[]] * RUNS
    with contextlib.closing(sqlite3.connect(tmp_path / "q.db")) as db:
        twice = db.execute(
            "SELECT run_id, node_id FROM nodes GROUP BY run_id, node_id HAVING COUNT(*) > 1"
        ).fetchall()
        left = db.execute("SELECT COUNT(*) FROM fd_tasks").fetchone()[0]
    assert twice == []
    assert left == 0  # every task completed, none held by the dead

    log = bs.read_log(procs.log)
    ends = {(line["run"], line["node"], line["attempt"]) for line in log if line["event"] == "end"}
    for run_id, journal in journals.items():
        for node_id, record in journal.items():
            # The committed record comes from an execution that ended ...
            assert (run_id, node_id, record.attempts) in ends, (run_id, node_id)
            # ... and once it was committed, the node never started again.
            starts = [
                line["at"]
                for line in log
                if (line["run"], line["node"], line["event"]) == (run_id, node_id, "start")
            ]
            assert max(starts) <= record.finished_at, (run_id, node_id)

    # The chaos happened: kills interrupted steps, whose tasks were handed out again.
    interrupted = in_flight(log)
    assert sum(interrupted[pid] for pid in killed) >= 1
    assert not set(interrupted) - set(killed)  # only the killed left steps unfinished
    ran_in = Counter((line["run"], line["node"]) for line in log if line["event"] == "start")
    assert max(ran_in.values()) > 1
    # A node a dead worker left is a fresh first attempt on the next: no retry was spent.
    assert all(r.attempts == 1 for journal in journals.values() for r in journal.values())


async def test_a_step_without_retries_whose_worker_died_runs_again_elsewhere(
    url: str, procs: Procs
) -> None:
    """The worker running ``stall`` (retries=0) is killed; its replacement takes the task
    once the lease runs out and runs it: a lost worker is not the step's failure."""
    first = procs.serve(lease=LEASE, hold="stall")
    with anyio.fail_after(60):
        async with fd.Context(batch=True, store=url, workers=0) as ctx:
            stalled = await ctx.start(bs.stalls, 9, run_id="stalled")
            good = [await ctx.start(bs.diamond, x, 0.01, run_id=f"good-{x}") for x in range(3)]

            def stall_started() -> bool:
                return any(
                    (line["run"], line["label"], line["event"]) == ("stalled", "stall", "start")
                    for line in bs.read_log(procs.log)
                )

            await procs.wait_for(stall_started, "the stall step to start")
            procs.kill(first)
            second = procs.serve(lease=LEASE)
            result = await stalled.result()
            assert [await run.result() for run in good] == [
                bs.expected_diamond(x)[0] for x in range(3)
            ]
            dead = await ctx.queue.dead_letters("stalled")
            journal = await ctx.store.load_nodes("stalled")

    assert result == bs.mix("stall", bs.mix("a", 9))
    assert dead == []
    assert set(journal) == {"work", "fragile"}
    assert journal["fragile"].attempts == 1
    stall_runs = [
        (line["pid"], line["event"])
        for line in bs.read_log(procs.log)
        if (line["run"], line["label"]) == ("stalled", "stall")
    ]
    assert stall_runs == [(first.pid, "start"), (second.pid, "start"), (second.pid, "end")]
