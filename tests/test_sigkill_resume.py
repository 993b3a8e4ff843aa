"""A real process running a durable flow is SIGKILLed; another process resumes it.

The child (``tests/_sigkill_target.py``) runs a chain of steps on an SQLite file; each
step logs ``start``/``done`` lines to a file shared by every process.  The parent watches
the child's stdout, kills it with SIGKILL at a chosen or random point, then opens the same
file itself and resumes the run.  What must hold:

- the file is readable and consistent: the journal is a prefix of the chain;
- nodes committed before the kill never run again (exactly-once for finished nodes);
- the node in flight at the kill runs again, once (at-least-once for in-flight nodes);
- the resumed result is the uninterrupted one.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest

import flowdsl as fd
from flowdsl.backends.sqlite.store import SQLiteStore

import _sigkill_target as target

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

TESTS = Path(__file__).parent
LABELS = [target.label_of(i) for i in range(target.LENGTH)]


@attrs.frozen
class Line:
    pid: int
    kind: str  # "start" or "done"
    label: str


@pytest.fixture
def log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The execution log every process appends to (this one too, when it resumes)."""
    path = tmp_path / "steps.log"
    monkeypatch.setenv("FD_SIGKILL_LOG", str(path))
    monkeypatch.delenv("FD_SIGKILL_STOP_AT", raising=False)
    monkeypatch.delenv("FD_SIGKILL_ECHO", raising=False)
    return path


def spawn(
    db: Path, log: Path, *, resume: bool = False, stop_at: str | None = None, long: bool = False
) -> Any:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    env["FD_SIGKILL_LOG"] = str(log)
    env["FD_SIGKILL_ECHO"] = "1"
    env.pop("FD_SIGKILL_STOP_AT", None)
    if stop_at is not None:
        env["FD_SIGKILL_STOP_AT"] = stop_at
    args = [str(db), "run"] + (["--resume"] if resume else []) + (["--long"] if long else [])
    return subprocess.Popen(
        [sys.executable, "-c", "import _sigkill_target; _sigkill_target.main()", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def read_line(proc: Any) -> str:
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=30)
        pytest.fail(f"the child exited with {proc.returncode}: {proc.stderr.read()}")
    return str(line).strip()


def kill(proc: Any) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    proc.stdout.close()
    proc.stderr.close()


def kill_when(proc: Any, line: str) -> None:
    """Kill the child as soon as it prints *line*."""
    while read_line(proc) != line:
        pass
    kill(proc)


def kill_after(proc: Any, count: int) -> None:
    """Kill the child as soon as it has printed *count* lines."""
    for _ in range(count):
        read_line(proc)
    kill(proc)


def lines_of(log: Path) -> list[Line]:
    out = []
    for text in log.read_text().splitlines():
        pid, kind, label = text.split()
        out.append(Line(int(pid), kind, label))
    return out


def done_counts(lines: list[Line]) -> Counter[str]:
    return Counter(line.label for line in lines if line.kind == "done")


async def journal_labels(
    db: Path, flow: fd.Flow[..., Any] = target.chain
) -> tuple[fd.RunStatus, list[str]]:
    """The run's status and the labels of its journaled nodes, read by this process."""
    store = SQLiteStore(db)
    await store.open()
    try:
        run = await store.get_run("run")
        assert run is not None
        nodes = await store.load_nodes("run")
    finally:
        await store.close()
    graph = flow.graph
    return run.status, sorted(graph[node_id].args[0].value for node_id in nodes)


def assert_consistent(db: Path) -> None:
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


async def resume_here(db: Path, *, via_start: bool = False) -> str:
    async with fd.Context(store=f"sqlite:///{db}") as ctx:
        if via_start:
            # A run left RUNNING by a dead process: starting its id resumes it.
            run = await ctx.start(target.chain, target.SEED, run_id="run")
            return str(await run.result())
        return str(await ctx.resume("run"))  # the flow is imported by its recorded name


# --- a kill with a known node in flight ---------------------------------------------------


@pytest.mark.parametrize("stop", [0, 1, 13, target.LENGTH - 1])
async def test_a_killed_run_resumes_in_another_process(
    tmp_path: Path, log: Path, stop: int
) -> None:
    db = tmp_path / "runs.db"
    stuck = LABELS[stop]
    proc = spawn(db, log, stop_at=stuck)
    # Every node before `stuck` is committed by then: it is a chain.
    await anyio.to_thread.run_sync(kill_when, proc, f"start {stuck}")

    assert_consistent(db)
    status, journaled = await journal_labels(db)
    assert status is fd.RunStatus.RUNNING  # nobody got to say otherwise
    assert journaled == LABELS[:stop]
    before = lines_of(log)
    assert done_counts(before) == Counter(LABELS[:stop])

    assert await resume_here(db) == target.expected()

    after = lines_of(log)[len(before) :]
    assert {line.pid for line in after} == {os.getpid()}
    # Finished before the kill: never again.  In flight: once more.  The rest: once.
    assert done_counts(after) == Counter(LABELS[stop:])
    starts = Counter(line.label for line in lines_of(log) if line.kind == "start")
    assert starts == Counter(LABELS) + Counter([stuck])
    status, journaled = await journal_labels(db)
    assert status is fd.RunStatus.FINISHED
    assert journaled == LABELS


async def test_several_kills_then_a_start_in_this_process_finishes_the_run(
    tmp_path: Path, log: Path
) -> None:
    db = tmp_path / "runs.db"
    stops = [LABELS[5], LABELS[17], LABELS[18], LABELS[30]]
    await anyio.to_thread.run_sync(kill_when, spawn(db, log, stop_at=stops[0]), f"start {stops[0]}")
    for stuck in stops[1:]:
        # Each child resumes the run the previous one left, and is killed in turn.
        child = spawn(db, log, resume=True, stop_at=stuck)
        await anyio.to_thread.run_sync(kill_when, child, f"start {stuck}")
        status, journaled = await journal_labels(db)
        assert status is fd.RunStatus.RUNNING
        assert journaled == LABELS[: LABELS.index(stuck)]

    assert await resume_here(db, via_start=True) == target.expected()
    lines = lines_of(log)
    assert done_counts(lines) == Counter(LABELS)
    starts = Counter(line.label for line in lines if line.kind == "start")
    assert starts == Counter(LABELS) + Counter(stops)
    assert len({line.pid for line in lines}) == len(stops) + 1
    assert_consistent(db)


async def test_a_child_that_resumes_a_killed_run_reports_the_result(
    tmp_path: Path, log: Path
) -> None:
    db = tmp_path / "runs.db"
    await anyio.to_thread.run_sync(
        kill_when, spawn(db, log, stop_at=LABELS[9]), f"start {LABELS[9]}"
    )
    proc = spawn(db, log, resume=True)
    out, err = await anyio.to_thread.run_sync(proc.communicate)
    assert proc.returncode == 0, err
    assert out.splitlines()[-1] == f"result {target.expected()}"
    assert done_counts(lines_of(log)) == Counter(LABELS)


# --- kills at random instants, while nodes commit as fast as they can ---------------------


LONG_LABELS = [target.label_of(i) for i in range(target.LONG)]


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_a_kill_at_a_random_instant_leaves_a_resumable_prefix(
    tmp_path: Path, log: Path, seed: int
) -> None:
    db = tmp_path / "runs.db"
    proc = spawn(db, log, long=True)
    # Each step prints two lines as it runs and commits right after the second; the child
    # keeps running while this process reads, so killing it right after line k lands a
    # little after step k/2, wherever it then is: in a step's body, in the middle of a
    # commit, in the scheduler.
    k = random.Random(seed).randrange(1, target.LONG)
    await anyio.to_thread.run_sync(kill_after, proc, k)

    assert_consistent(db)
    status, journaled = await journal_labels(db, target.long_chain)
    assert status is fd.RunStatus.RUNNING, "the run ended before the kill: make it longer"
    m = len(journaled)
    assert journaled == LONG_LABELS[:m], "the journal is not a prefix of the chain"
    in_flight = LONG_LABELS[m] if m < target.LONG else None
    before = lines_of(log)
    done_before = done_counts(before)
    assert set(done_before.values()) <= {1}
    # Every committed node had finished its body; at most the next one finished without
    # its record becoming durable.
    assert set(LONG_LABELS[:m]) <= set(done_before)
    assert set(done_before) - set(LONG_LABELS[:m]) <= {in_flight}

    assert await resume_here(db) == target.expected(target.LONG)
    after = done_counts(lines_of(log)[len(before) :])
    assert after == Counter(LONG_LABELS[m:])  # nothing committed ran again
    total = done_counts(lines_of(log))
    assert all(total[label] == 1 for label in LONG_LABELS if label != in_flight)
    if in_flight is not None:
        assert total[in_flight] in (1, 2)  # in flight: at least once, at most twice
