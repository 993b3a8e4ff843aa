"""Flows and steps the Redis and NATS tests share, importable by worker processes (through
``--import redis_steps`` or ``nats_steps``, which import this module), and the session
server behind each store and broker conformance suite.

Every step appends ``<step>:<key>:<pid>`` to the execution log named by
``FLOWDSL_TEST_LOG`` (one line per finished execution, written with O_APPEND so that
processes never interleave lines), so a test can say which node ran how many times in
which process.  Results are deterministic functions of the inputs, so any process
computes the same.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import anyio

import flowdsl as fd

__all__ = [
    "CHAIN",
    "DELAY_ENV",
    "FAN",
    "LOG_ENV",
    "chain",
    "executions",
    "expected_chain",
    "expected_fan",
    "fan",
    "fan_lines",
    "log",
    "read_log",
    "session_server",
]

LOG_ENV = "FLOWDSL_TEST_LOG"
DELAY_ENV = "FLOWDSL_TEST_DELAY"  # seconds each step sleeps (default 0)
RETRIES = 20  # generous: a SIGKILLed worker's task comes back as another attempt


def log(line: str) -> None:
    """Append *line* and this process's pid to the execution log, if one is named."""
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    fd_ = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd_, f"{line}:{os.getpid()}\n".encode())
    finally:
        os.close(fd_)


def read_log(path: Path) -> list[tuple[str, int]]:
    """``(step:key, pid)`` per finished execution."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        what, _, pid = line.rpartition(":")
        out.append((what, int(pid)))
    return out


def executions(path: Path) -> Counter[str]:
    return Counter(what for what, _ in read_log(path))


def _mix(*parts: Any) -> int:
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:8], 16)


async def _pause() -> None:
    delay = float(os.environ.get(DELAY_ENV, "0") or 0)
    if delay:
        await anyio.sleep(delay)


@fd.step(retries=RETRIES)
async def seed(key: str) -> int:
    await _pause()
    value = _mix("seed", key)
    log(f"seed:{key}")
    return value


@fd.step(retries=RETRIES)
async def part(key: str, i: int, x: int) -> int:
    await _pause()
    value = _mix("part", key, i, x)
    log(f"part{i}:{key}")
    return value


@fd.step(retries=RETRIES)
async def total(key: str, xs: list[int]) -> int:
    await _pause()
    value = sum(xs) % 1_000_003
    log(f"total:{key}")
    return value


FAN = 4


@fd.flow
async def fan(key: str) -> int:
    """seed -> FAN parts in parallel -> total: FAN + 2 nodes."""
    x = await seed(key)
    parts = [await part(key, i, x) for i in range(FAN)]
    return await total(key, parts)


def expected_fan(key: str) -> int:
    x = _mix("seed", key)
    return sum(_mix("part", key, i, x) for i in range(FAN)) % 1_000_003


def fan_lines(key: str) -> list[str]:
    """What the log says of one run of :func:`fan`."""
    return [f"seed:{key}", *(f"part{i}:{key}" for i in range(FAN)), f"total:{key}"]


@fd.step(retries=RETRIES)
async def link(key: str, i: int, x: int) -> int:
    await _pause()
    value = _mix("link", key, i, x)
    log(f"link{i}:{key}")
    return value


CHAIN = 4


@fd.flow
async def chain(key: str) -> int:
    """CHAIN steps one after the other."""
    x = 0
    for i in range(CHAIN):
        x = await link(key, i, x)
    return x


def expected_chain(key: str) -> int:
    x = 0
    for i in range(CHAIN):
        x = _mix("link", key, i, x)
    return x


# --- the conformance suites' servers ----------------------------------------------------------

_SERVERS: dict[str, Any] = {}


def session_server(binary: str, server_type: Any) -> Any:
    """One running *server_type* (``RedisServer`` or ``NatsServer`` from ``_servers``) of
    *binary* for the session: started on first use, stopped and its directory removed when
    the tests end, started again if it was stopped."""
    from _servers import require_binary

    server = _SERVERS.get(binary)
    if server is None or not server.running:
        directory = Path(tempfile.mkdtemp(prefix=f"flowdsl-{binary}-"))
        server = server_type(require_binary(binary), directory)
        server.start()
        atexit.register(shutil.rmtree, directory, True)
        atexit.register(server.stop)
        _SERVERS[binary] = server
    return server
