"""Executors: how each kind of context carries a ready node to where it runs.

``realtime``: in this process, as soon as the node is ready.  ``batch``: the node travels
as a task message through a broker (``sqlite``, the embedded default; Redis Streams and
NATS JetStream to scale out) to workers, and its completion comes back.
"""

from __future__ import annotations

from typing import Any

from .._errors import ConfigError

__all__ = ["link", "open_broker"]


def link(store: Any, queue: Any) -> None:
    """Let an embedded queue share its store's connection when both use one file."""
    from ..stores.sqlite import SQLiteStore
    from .sqlite import SQLiteBroker

    if (
        isinstance(queue, SQLiteBroker)
        and isinstance(store, SQLiteStore)
        and store.path == queue.path
        and store.path != ":memory:"
    ):
        queue.share(store)


def open_broker(url: str) -> Any:
    """A broker from its URL; brokers that need an optional client are imported here only."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "sqlite":
        from ..stores.sqlite import SQLiteStore
        from .sqlite import SQLiteBroker

        return SQLiteBroker(SQLiteStore.from_url(url).path)
    if scheme in ("redis", "rediss"):
        from .redis import RedisBroker

        return RedisBroker(url)
    if scheme in ("nats", "tls"):
        from .nats import NATSBroker

        return NATSBroker(url)
    raise ConfigError(
        f"unknown broker URL {url!r}",
        hint="Use sqlite:///path.db (the embedded queue), redis://host:6379/0 or nats://host:4222",
    )
