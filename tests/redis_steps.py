"""Flows and steps for the Redis tests, importable by worker processes (``--import
redis_steps``), and a shared server for the store conformance suite.

Every step appends ``<step>:<key> <pid>`` to the execution log named by
``FLOWDSL_TEST_LOG`` (one line per finished execution, written with O_APPEND so that
processes never interleave lines), so a test can say which node ran how many times in
which process.
Results are deterministic functions of the inputs, so any process computes the same.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import anyio

import flowdsl as fd

__all__ = [
    "DELAY_ENV",
    "FAN",
    "LOG_ENV",
    "chain",
    "conformance_store",
    "expected_chain",
    "expected_fan",
    "fan",
    "fan_log_lines",
    "read_log",
]

LOG_ENV = "FLOWDSL_TEST_LOG"
DELAY_ENV = "FLOWDSL_TEST_DELAY"  # seconds each step sleeps (default 0)
RETRIES = 20  # generous: a SIGKILLed worker's task comes back as another attempt


def _log(line: str) -> None:
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    fd_ = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd_, f"{line} {os.getpid()}\n".encode())
    finally:
        os.close(fd_)


def read_log(path: Path) -> list[tuple[str, int]]:
    """``(what ran, the pid it ran in)`` per finished execution."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        what, _, pid = line.rpartition(" ")
        out.append((what, int(pid)))
    return out


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
    _log(f"seed:{key}")
    return value


@fd.step(retries=RETRIES)
async def part(key: str, i: int, x: int) -> int:
    await _pause()
    value = _mix("part", key, i, x)
    _log(f"part{i}:{key}")
    return value


@fd.step(retries=RETRIES)
async def total(key: str, xs: list[int]) -> int:
    await _pause()
    value = sum(xs) % 1_000_003
    _log(f"total:{key}")
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


@fd.step(retries=RETRIES)
async def link(key: str, i: int, x: int) -> int:
    await _pause()
    value = _mix("link", key, i, x)
    _log(f"link{i}:{key}")
    return value


CHAIN = 5


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


def fan_log_lines(key: str) -> list[str]:
    return [f"seed:{key}", *(f"part{i}:{key}" for i in range(FAN)), f"total:{key}"]


# --- the store conformance suite's Redis entry ------------------------------------------------

_SERVER: Any = None


def conformance_store(tmp: Path) -> Any:
    """A Redis store for tests/test_store_conformance.py: one redis-server for the session
    (started on first use, stopped when the tests end), one key prefix per test directory,
    so that two stores of one test share their data and tests never see each other's."""
    import pytest
    import sniffio

    from flowdsl.backends.redis.store import RedisStore

    from _servers import RedisServer, require_binary

    if sniffio.current_async_library() != "asyncio":
        pytest.skip("the Redis store runs on asyncio only (it refuses trio: test_redis_store)")
    global _SERVER
    if _SERVER is None or not _SERVER.running:
        directory = Path(tempfile.mkdtemp(prefix="flowdsl-redis-"))
        server = RedisServer(require_binary("redis-server"), directory)
        server.start()
        atexit.register(shutil.rmtree, directory, True)
        atexit.register(server.stop)
        _SERVER = server
    prefix = "conformance-" + hashlib.sha256(str(tmp).encode()).hexdigest()[:16]
    return RedisStore(_SERVER.url, prefix=prefix)


def conformance_broker(tmp: Path) -> Any:
    """A Redis broker for tests/test_broker_conformance.py, on the store suite's server and
    under the same prefix as :func:`conformance_store` of *tmp*: a claim that finds nothing
    returns at once (no blocking read), so that tests wait on their own conditions."""
    from flowdsl.backends.redis.broker import RedisBroker

    store = conformance_store(tmp)  # starts the server once, and names the prefix
    return RedisBroker(_SERVER.url, prefix=store.prefix, claim_block=0)
