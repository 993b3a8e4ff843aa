"""Backends: where journals live and what carries tasks, one package per technology.

Each backend keeps its store and its broker together (``sqlite/``, ``redis/``, ``nats/``;
``memory`` has a store only).  This module holds the one table that maps a URL's scheme to a
backend; a backend that needs an optional client library is imported only when its URL is
asked for, so ``import flowdsl`` never imports redis or nats.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import attrs

from .._errors import ConfigError
from .._urls import hide_credentials
from .base import Broker, Store
from .memory import MemoryStore

__all__ = [
    "DEFAULT_BATCH_FILE",
    "SCHEMES",
    "Backend",
    "Broker",
    "MemoryStore",
    "Store",
    "backend_for",
    "link",
    "open_broker",
    "open_store",
]

# Where batch mode keeps its embedded queue and journal when no URL is given.
DEFAULT_BATCH_FILE = ".flowdsl/flowdsl.db"


@attrs.frozen
class Backend:
    """One row of the scheme table: a backend package and the URLs it serves."""

    name: str
    schemes: tuple[str, ...]
    module: str  # relative to this package, imported on first use
    example: str
    has_broker: bool = True


# The one scheme table.  The CLI, the context and the error hints all read it.
BACKENDS: tuple[Backend, ...] = (
    Backend("memory", ("memory",), ".memory", "memory://", has_broker=False),
    Backend("sqlite", ("sqlite",), ".sqlite", "sqlite:///path.db"),
    Backend("redis", ("redis", "rediss"), ".redis", "redis://host:6379/0"),
    Backend("nats", ("nats", "tls"), ".nats", "nats://host:4222"),
)
SCHEMES = {scheme: b for b in BACKENDS for scheme in b.schemes}


def _examples(*, brokers: bool = False) -> str:
    shown = [b.example for b in BACKENDS if b.has_broker or not brokers]
    return ", ".join(shown[:-1]) + " or " + shown[-1]


def backend_for(url: str, *, what: str = "store") -> Backend:
    """The row of the scheme table that serves *url*, or a ConfigError naming them all."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    backend = SCHEMES.get(scheme)
    if backend is None or (what == "broker" and not backend.has_broker):
        raise ConfigError(
            f"unknown {what} URL {hide_credentials(url)!r}",
            hint=f"Use {_examples(brokers=what == 'broker')}",
        )
    return backend


def _package(backend: Backend) -> ModuleType:
    return importlib.import_module(backend.module, __name__)


def open_store(spec: object, *, batch: bool = False) -> Store:
    """A store from a URL (``memory://``, ``sqlite:///path.db``, ``redis://host/0``,
    ``nats://host:4222``), a store object, or None (the in-memory store)."""
    if spec is None:
        return MemoryStore()
    if not isinstance(spec, str):
        if isinstance(spec, Store):
            return spec
        raise ConfigError(
            f"store must be a URL or a store object, not {type(spec).__name__}",
            hint="For example store='sqlite:///runs.db'",
        )
    backend = backend_for(spec)
    store: Store = _package(backend).open_store(spec)
    return store


def open_broker(url: str) -> Broker:
    """A broker from its URL; brokers that need an optional client are imported here only."""
    backend = backend_for(url, what="broker")
    broker: Broker = _package(backend).open_broker(url)
    return broker


def link(store: Store, broker: Broker) -> None:
    """Let a broker share its store's connection where the backend allows it (one SQLite
    file for journal and queue, so that a commit and a completion are one transaction).
    The broker checks what it commits as the store does (the store's seal)."""
    broker.seal = store.seal
    broker.share_store(store)
