"""NATS JetStream: the journal in a key-value bucket and the queue in streams.

Importing this package imports nats-py; ``flowdsl.backends`` does so only when a
``nats://`` URL is asked for.
"""

from __future__ import annotations

from .broker import NATSBroker
from .store import NATSStore

__all__ = ["NATSBroker", "NATSStore", "open_broker", "open_store"]


def open_store(url: str) -> NATSStore:
    return NATSStore.from_url(url)


def open_broker(url: str) -> NATSBroker:
    return NATSBroker(url)
