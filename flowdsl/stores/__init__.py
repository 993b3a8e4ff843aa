"""Stores: where run records and node journals are kept.

``memory`` (the real-time default) and ``sqlite`` (the durable embedded default) live
here; stores that need an optional client library are imported only when asked for.
"""

from __future__ import annotations

from typing import Any

from .._errors import ConfigError
from ._base import Store
from .memory import MemoryStore

__all__ = ["MemoryStore", "Store", "open_store"]


def open_store(spec: Any, *, batch: bool = False) -> Any:
    """A store from a URL (``memory://``, ``sqlite:///path.db``, ``redis://host/0``), a store
    object, or None."""
    if spec is None:
        return MemoryStore()
    if not isinstance(spec, str):
        if isinstance(spec, Store):
            return spec
        raise ConfigError(
            f"store must be a URL or a store object, not {type(spec).__name__}",
            hint="For example store='sqlite:///runs.db'",
        )
    scheme = spec.split(":", 1)[0].lower() if ":" in spec else ""
    if scheme == "memory":
        return MemoryStore()
    if scheme == "sqlite":
        from .sqlite import SQLiteStore

        return SQLiteStore.from_url(spec)
    if scheme in ("redis", "rediss"):
        from .redis import RedisStore

        return RedisStore.from_url(spec)
    if scheme in ("nats", "tls"):
        from .nats import NATSStore

        return NATSStore.from_url(spec)
    raise ConfigError(
        f"unknown store URL {spec!r}",
        hint="Use memory://, sqlite:///path.db, redis://host:6379/0 or nats://host:4222",
    )
