"""Redis: the journal in hashes and the queue in Redis Streams, on one server.

Importing this package imports redis-py; ``flowdsl.backends`` does so only when a
``redis://`` URL is asked for.
"""

from __future__ import annotations

from .broker import RedisBroker
from .store import RedisStore

__all__ = ["RedisBroker", "RedisStore", "open_broker", "open_store"]


def open_store(url: str) -> RedisStore:
    return RedisStore.from_url(url)


def open_broker(url: str) -> RedisBroker:
    return RedisBroker(url)
