"""Flows and steps for the NATS tests, importable by worker processes (``--import
nats_steps``), a worker process entry point, and a shared server for the store
conformance suite.

Every step appends ``<step>:<key>:<pid>`` to the execution log named by
``FLOWDSL_TEST_LOG`` (one line per finished execution, written with O_APPEND so that
processes never interleave lines), so a test can say which node ran how many times in
which process.  Results are deterministic functions of the inputs, so any process
computes the same.

    python nats_steps.py serve BROKER_URL STORE_URL [--lease S] [--concurrency N]

serves tasks (``flowdsl._executors.batch.serve``) and prints ``ready`` once it takes them.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import anyio

import flowdsl as fd

__all__ = [
    "DELAY_ENV",
    "LOG_ENV",
    "chain",
    "conformance_store",
    "expected_chain",
    "expected_fan",
    "fan",
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


def fan_lines(key: str) -> list[str]:
    return [f"seed:{key}", *(f"part{i}:{key}" for i in range(FAN)), f"total:{key}"]


@fd.step(retries=RETRIES)
async def link(key: str, i: int, x: int) -> int:
    await _pause()
    value = _mix("link", key, i, x)
    _log(f"link{i}:{key}")
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


@fd.step
async def shout(text: str) -> str:
    _log(f"shout:{text}")
    return text.upper()


@fd.step
async def big(n: int) -> str:
    """A result of *n* bytes: past the inline limit, or past the server's max payload."""
    return ("0123456789abcdef" * (n // 16 + 1))[:n]


@fd.step
async def size(text: str) -> int:
    return len(text)


@fd.flow
async def big_flow(n: int) -> int:
    return await size(await big(n))


@fd.step(retries=0)
async def work(key: str) -> str:
    _log(f"work:{key}")
    return f"worked {key}"


@fd.flow
async def single(key: str) -> str:
    return await work(key)


# --- the store conformance suite's NATS entry -------------------------------------------------

_SERVER: Any = None


def conformance_store(tmp: Path) -> Any:
    """A NATS store for tests/test_store_conformance.py: one nats-server for the session
    (started on first use, stopped when the tests end), one bucket per test directory, so
    that two stores of one test share their data and tests never see each other's.  Values
    above 256 bytes go to blobs (SQLite's inline limit), so the suite's large values
    exercise the chunked blobs."""
    import pytest
    import sniffio

    from flowdsl.backends.nats.store import NATSStore

    from _servers import NatsServer, require_binary

    if sniffio.current_async_library() != "asyncio":
        pytest.skip("the NATS store runs on asyncio only (it refuses trio: test_nats_store)")
    global _SERVER
    if _SERVER is None or not _SERVER.running:
        directory = Path(tempfile.mkdtemp(prefix="flowdsl-nats-"))
        server = NatsServer(require_binary("nats-server"), directory)
        server.start()
        atexit.register(shutil.rmtree, directory, True)
        atexit.register(server.stop)
        _SERVER = server
    prefix = "conf-" + hashlib.sha256(str(tmp).encode()).hexdigest()[:16]
    return NATSStore(_SERVER.url, prefix=prefix, inline_max=256)


def conformance_broker(tmp: Path) -> Any:
    """A NATS broker for tests/test_broker_conformance.py, on the store suite's server and
    under the same prefix as :func:`conformance_store` of *tmp*."""
    from flowdsl.backends.nats.broker import NATSBroker

    store = conformance_store(tmp)  # starts the server once, and names the prefix
    return NATSBroker(_SERVER.url, prefix=store.bucket)


# --- a worker process -------------------------------------------------------------------------


async def _serve_main(broker: str, store: str, lease: float, concurrency: int) -> None:
    from flowdsl._executors.batch import serve

    async with anyio.create_task_group() as tg:
        await tg.start(
            lambda task_status: serve(
                broker,
                store=store,
                imports=("nats_steps",),
                concurrency=concurrency,
                async_concurrency=concurrency,  # few tasks each: spread over processes
                lease=lease,
                task_status=task_status,
            )
        )
        print("ready", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve")
    p_serve.add_argument("broker")
    p_serve.add_argument("store")
    p_serve.add_argument("--lease", type=float, default=30.0)
    p_serve.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    anyio.run(_serve_main, args.broker, args.store, args.lease, args.concurrency)


if __name__ == "__main__":
    sys.exit(main())
