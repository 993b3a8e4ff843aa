"""What the NATS test modules share: a URL with a prefix of its own, and a broker opened on
it.  A module takes the fixtures by importing them (``from _nats_fixtures import broker,
url``): each test gets streams and a bucket that no other test sees."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from flowdsl.backends.nats.broker import NATSBroker

from _servers import NatsServer

__all__ = ["broker", "fresh", "url"]


def fresh(server: NatsServer, **options: Any) -> str:
    """A URL with a prefix of its own: streams and bucket no other run of the test sees."""
    query = "&".join(f"{k}={v}" for k, v in {"prefix": _prefix(), **options}.items())
    return f"{server.url}?{query}"


def _prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def url(nats_server: NatsServer) -> str:
    return fresh(nats_server)


@pytest.fixture
async def broker(url: str) -> AsyncIterator[NATSBroker]:
    b = NATSBroker(url)
    await b.open()
    try:
        yield b
    finally:
        await b.close()
