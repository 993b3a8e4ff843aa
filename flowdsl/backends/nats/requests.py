"""Requests to the NATS server, pipelined: every request goes out, then all the replies are
awaited together (a round trip for the lot, not one each, and no task per request).

The JetStream publishes of :class:`~flowdsl.backends.nats.publisher.Publisher` go through
it, and so do the batched reads of the KV bucket (the journal records a batch of
completions is checked against).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from typing import Any

from .link import NatsLink, quietly

__all__ = ["Requests"]


class Requests:
    """Pipelined requests whose replies come to one wildcard inbox."""

    def __init__(self, link: NatsLink) -> None:
        self._link = link
        self._sub: Any = None
        self._prefix = ""
        self._generation = -1
        self._numbers = itertools.count()
        self._pending: dict[str, asyncio.Future[Any]] = {}

    async def request(
        self,
        items: list[tuple[str, bytes]],
        headers: Sequence[dict[str, str] | None] | None = None,
    ) -> list[Any]:
        """Send each ``(subject, payload)`` (with the *headers* of the same index, if given)
        with its own reply subject; the replies (nats-py messages), in the order of *items*.
        The caller bounds the wait (a reply lost in a reconnect never comes)."""
        if self._sub is None or self._generation != self._link.generation:
            await self._subscribe()
        nc = self._link.nc
        loop = asyncio.get_running_loop()
        tokens = []
        try:
            for i, (subject, data) in enumerate(items):
                token = str(next(self._numbers))
                self._pending[token] = loop.create_future()
                tokens.append(token)
                more = headers[i] if headers is not None else None
                await nc.publish(subject, data, reply=self._prefix + token, headers=more)
            return [await self._pending[token] for token in tokens]
        finally:
            for token in tokens:
                self._pending.pop(token, None)

    async def _subscribe(self) -> None:
        await self.stop()
        nc = self._link.nc
        self._prefix = nc.new_inbox() + "."
        self._sub = await nc.subscribe(self._prefix + "*", cb=self._on_reply)
        self._generation = self._link.generation

    async def _on_reply(self, msg: Any) -> None:
        future = self._pending.get(msg.subject[len(self._prefix) :])
        if future is not None and not future.done():
            future.set_result(msg)

    async def stop(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            await quietly(sub.unsubscribe)
