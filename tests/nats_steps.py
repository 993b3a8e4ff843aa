"""The NATS tests' flows and steps, importable by worker processes (``--import
nats_steps``: the shared ones are :mod:`server_steps`), a worker process entry point, and
the NATS entries of the store and broker conformance suites.

    python nats_steps.py serve BROKER_URL STORE_URL [--lease S] [--concurrency N]

serves tasks (``flowdsl._executors.batch.serve``) and prints ``ready`` once it takes them.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import Any

import anyio

import flowdsl as fd

from server_steps import (
    CHAIN,
    DELAY_ENV,
    FAN,
    LOG_ENV,
    chain,
    executions,
    expected_chain,
    expected_fan,
    fan,
    fan_lines,
    log,
    read_log,
    session_server,
)

__all__ = [
    "CHAIN",
    "DELAY_ENV",
    "FAN",
    "LOG_ENV",
    "big_flow",
    "chain",
    "conformance_broker",
    "conformance_store",
    "executions",
    "expected_chain",
    "expected_fan",
    "fan",
    "fan_lines",
    "read_log",
    "single",
]


@fd.step
async def shout(text: str) -> str:
    log(f"shout:{text}")
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
    log(f"work:{key}")
    return f"worked {key}"


@fd.flow
async def single(key: str) -> str:
    return await work(key)


# --- the store conformance suite's NATS entry -------------------------------------------------


def conformance_store(tmp: Path) -> Any:
    """A NATS store for tests/test_store_conformance.py: one nats-server for the session
    (started on first use, stopped when the tests end), one bucket per test directory, so
    that two stores of one test share their data and tests never see each other's.  Values
    above 256 bytes go to blobs (SQLite's inline limit), so the suite's large values
    exercise the chunked blobs."""
    import pytest
    import sniffio

    from flowdsl.backends.nats.store import NATSStore

    from _servers import NatsServer

    if sniffio.current_async_library() != "asyncio":
        pytest.skip("the NATS store runs on asyncio only (it refuses trio: test_nats_store)")
    server = session_server("nats-server", NatsServer)
    prefix = "conf-" + hashlib.sha256(str(tmp).encode()).hexdigest()[:16]
    return NATSStore(server.url, prefix=prefix, inline_max=256)


def conformance_broker(tmp: Path) -> Any:
    """A NATS broker for tests/test_broker_conformance.py, on the store suite's server and
    under the same prefix as :func:`conformance_store` of *tmp*."""
    from flowdsl.backends.nats.broker import NATSBroker

    from _servers import NatsServer

    store = conformance_store(tmp)  # starts the server once, and names the prefix
    return NATSBroker(session_server("nats-server", NatsServer).url, prefix=store.bucket)


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
