"""Steps and flows for the batch-mode tests, importable by worker processes.

A worker process finds a step by ``module:qualname``, so steps it runs must live in a
module on its ``PYTHONPATH`` (``tests/``), not inside a test function or ``__main__``.

Two environment variables steer the steps, so that a test can set them for one process
(a worker, a client) and not another:

- ``FLOWDSL_TEST_EXEC_LOG``: a file to which every step appends one JSON line when it
  starts and one when it ends (``pid``, ``run``, ``node``, ``attempt``, ``label``,
  ``event``, ``at``).
  Lines are appended with ``O_APPEND`` in one ``write``, so the lines of several processes
  never interleave.  :func:`read_log` reads it back.
- ``FLOWDSL_TEST_HOLD``: comma-separated step labels; a step called with one of them never
  ends in that process (it is in flight when the test kills the process).
- ``FLOWDSL_TEST_KILL``: comma-separated step labels; a step called with one of them
  SIGKILLs its own process as it starts (a step that kills every worker that runs it).
- ``FLOWDSL_TEST_FAIL``: comma-separated step labels; a step called with one of them
  raises ``RuntimeError`` after it starts (a bug, fixed by unsetting it and resuming).

Results depend only on the label and the inputs (SHA-256), identical in every process.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from typing import Any

import anyio

import flowdsl as fd
from flowdsl._engine.runner import current_scope

__all__ = [
    "EXEC_LOG",
    "FAIL",
    "HOLD",
    "KILL",
    "diamond",
    "expected_chain",
    "expected_diamond",
    "expected_trio_chain",
    "fragile",
    "fragile_chain",
    "log_line",
    "mix",
    "parity",
    "read_log",
    "resume_chain",
    "slow_chain",
    "stalls",
    "trio_chain",
    "work",
]

EXEC_LOG = "FLOWDSL_TEST_EXEC_LOG"
HOLD = "FLOWDSL_TEST_HOLD"
KILL = "FLOWDSL_TEST_KILL"
FAIL = "FLOWDSL_TEST_FAIL"


def _log(event: str, label: str = "") -> None:
    scope = current_scope()
    if scope is not None:
        log_line(event, scope.run_id, scope.node_id, label=label, attempt=scope.attempt)


def log_line(event: str, run_id: str, node_id: str, *, label: str = "", attempt: int = 0) -> None:
    """Append one line to the execution log, if this process has one."""
    path = os.environ.get(EXEC_LOG)
    if not path:
        return
    line = json.dumps(
        {
            "pid": os.getpid(),
            "run": run_id,
            "node": node_id,
            "attempt": attempt,
            "label": label,
            "event": event,
            "at": time.time(),
        }
    )
    fd_ = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd_, (line + "\n").encode())
    finally:
        os.close(fd_)


def read_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The execution log's lines; a missing file is an empty log."""
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def mix(label: str, *values: Any) -> int:
    text = json.dumps([label, list(values)], separators=(",", ":"))
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


async def _body(label: str, x: int, delay: float) -> int:
    _log("start", label)
    if label in os.environ.get(KILL, "").split(","):
        os.kill(os.getpid(), signal.SIGKILL)
    if label in os.environ.get(FAIL, "").split(","):
        raise RuntimeError(f"step {label!r} fails ({FAIL})")
    if delay > 0:
        await anyio.sleep(delay)
    if label in os.environ.get(HOLD, "").split(","):
        await anyio.sleep_forever()
    _log("end", label)
    return mix(label, x)


@fd.step(retries=5)
async def work(label: str, x: int, delay: float = 0.0) -> int:
    """A deterministic int; retried when the worker running it dies (up to 5 times)."""
    return await _body(label, x, delay)


@fd.step
async def fragile(label: str, x: int, delay: float = 0.0) -> int:
    """:func:`work` with ``retries=0``: a worker that dies running it fails the run."""
    return await _body(label, x, delay)


@fd.step(retries=5)
async def total(a: int, b: int, c: int) -> int:
    _log("start")
    _log("end")
    return (a + b + c) % 1_000_003


@fd.branch(retries=5)  # every node of the diamond survives its worker being killed
async def parity(x: int) -> str:
    _log("start")
    _log("end")
    return "even" if x % 2 == 0 else "odd"


@fd.flow
async def diamond(x: int, delay: float) -> int:
    """Fan-out of three, fan-in, and a branch of two cases."""
    a = await work("a", x, delay)
    b = await work("b", a, delay)
    c = await work("c", a, delay)
    d = await work("d", a, delay)
    e = await total(b, c, d)
    return await parity(e).cases(
        even=lambda: work("even", e, delay),
        odd=lambda: work("odd", e, delay),
    )


def expected_diamond(x: int) -> tuple[int, set[str], str]:
    """:func:`diamond`'s result, the node ids that run, and the case skipped."""
    a = mix("a", x)
    e = (mix("b", a) + mix("c", a) + mix("d", a)) % 1_000_003
    case, other = ("even", "odd") if e % 2 == 0 else ("odd", "even")
    ran = {"work", "work-2", "work-3", "work-4", "total", "parity", f"parity.{case}/work"}
    return mix(case, e), ran, f"parity.{other}/work"


@fd.flow
async def resume_chain(x: int) -> int:
    """a -> b -> (c1, c2, c3) -> sum; hold ``c2`` to crash a client with it in flight."""
    a = await work("a", x)
    b = await work("b", a)
    c1 = await work("c1", b)
    c2 = await work("c2", b)
    c3 = await work("c3", b)
    out: int = await total(c1, c2, c3)  # `step(retries=...)` is typed as returning Any
    return out


@fd.flow
async def fragile_chain(x: int) -> int:
    """:func:`resume_chain` whose ``c2`` has no retries."""
    a = await work("a", x)
    b = await work("b", a)
    c1 = await work("c1", b)
    c2 = await fragile("c2", b)
    c3 = await work("c3", b)
    out: int = await total(c1, c2, c3)  # `step(retries=...)` is typed as returning Any
    return out


@fd.flow
async def stalls(x: int) -> int:
    """A node without retries after an ordinary one: hold ``stall`` to kill its worker."""
    a = await work("a", x)
    return await fragile("stall", a)


@fd.flow
async def trio_chain(x: int) -> int:
    """a -> b -> c, none with retries: kill a worker between b's commit and its ack."""
    a = await fragile("a", x)
    b = await fragile("b", a)
    return await fragile("c", b)


def expected_trio_chain(x: int) -> int:
    return mix("c", mix("b", mix("a", x)))


@fd.flow
async def slow_chain(x: int, delay: float) -> int:
    """a -> b -> c, each step taking *delay* seconds: long enough for a second process to
    come while the first drives it."""
    a = await fragile("a", x, delay)
    b = await fragile("b", a, delay)
    return await fragile("c", b, delay)


def expected_chain(x: int) -> int:
    b = mix("b", mix("a", x))
    return (mix("c1", b) + mix("c2", b) + mix("c3", b)) % 1_000_003
