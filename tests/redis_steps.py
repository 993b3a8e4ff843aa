"""The Redis tests' flows and steps, importable by worker processes (``--import
redis_steps``: the steps are :mod:`server_steps`'), and the Redis entries of the store and
broker conformance suites.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from server_steps import (
    DELAY_ENV,
    FAN,
    LOG_ENV,
    expected_fan,
    fan,
    fan_lines,
    read_log,
    session_server,
)

__all__ = [
    "DELAY_ENV",
    "FAN",
    "LOG_ENV",
    "conformance_broker",
    "conformance_store",
    "expected_fan",
    "fan",
    "fan_lines",
    "read_log",
]


# --- the store conformance suite's Redis entry ------------------------------------------------


def conformance_store(tmp: Path) -> Any:
    """A Redis store for tests/test_store_conformance.py: one redis-server for the session
    (started on first use, stopped when the tests end), one key prefix per test directory,
    so that two stores of one test share their data and tests never see each other's."""
    import pytest
    import sniffio

    from flowdsl.backends.redis.store import RedisStore

    from _servers import RedisServer

    if sniffio.current_async_library() != "asyncio":
        pytest.skip("the Redis store runs on asyncio only (it refuses trio: test_redis_store)")
    server = session_server("redis-server", RedisServer)
    prefix = "conformance-" + hashlib.sha256(str(tmp).encode()).hexdigest()[:16]
    return RedisStore(server.url, prefix=prefix)


def conformance_broker(tmp: Path) -> Any:
    """A Redis broker for tests/test_broker_conformance.py, on the store suite's server and
    under the same prefix as :func:`conformance_store` of *tmp*: a claim that finds nothing
    returns at once (no blocking read), so that tests wait on their own conditions."""
    from flowdsl.backends.redis.broker import RedisBroker

    from _servers import RedisServer

    store = conformance_store(tmp)  # starts the server once, and names the prefix
    server = session_server("redis-server", RedisServer)
    return RedisBroker(server.url, prefix=store.prefix, claim_block=0)
