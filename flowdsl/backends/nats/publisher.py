"""Publishing to JetStream, pipelined: messages go out in order and their acks are awaited
together; a stream's refusal is a value (``Refused``), turned into an error by the caller
that knows which refusals are expected."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import attrs

from ..._errors import CheckpointError
from .link import ERR_PER_SUBJECT, NatsLink, quietly

__all__ = ["ERR_PER_SUBJECT", "Publisher", "Refused", "raise_refused"]


@attrs.frozen
class Refused:
    """A stream's refusal of a message (its JetStream API error)."""

    code: int
    err_code: int
    description: str


class Publisher:
    """JetStream publishes, pipelined: every message goes out in order, then all their
    acks are awaited (a round trip for the lot, not one each).

    Replies come to one wildcard inbox.  (nats-py's ``publish_async`` would do, but its
    reply handler raises instead of failing the future when a stream refuses a message,
    so a refused publish never completes.)
    """

    def __init__(self, link: NatsLink) -> None:
        self._link = link
        self._sub: Any = None
        self._prefix = ""
        self._generation = -1
        self._numbers = itertools.count()
        self._pending: dict[str, asyncio.Future[Refused | None]] = {}
        self._seqs: dict[str, int] = {}  # a stored message's stream sequence, until taken

    async def publish(
        self,
        messages: list[tuple[str, bytes, dict[str, str]]],
        sequences: list[int] | None = None,
    ) -> list[Any]:
        """A refusal or None for each message, in order; *sequences*, if given, gets each
        stored message's stream sequence (0 for a refused one)."""
        if self._sub is None or self._generation != self._link.generation:
            await self._subscribe()
        nc = self._link.nc
        loop = asyncio.get_running_loop()
        tokens = []
        try:
            for subject, data, headers in messages:
                token = str(next(self._numbers))
                self._pending[token] = loop.create_future()
                tokens.append(token)
                await nc.publish(subject, data, reply=self._prefix + token, headers=headers)
            results = [await self._pending[token] for token in tokens]
            if sequences is not None:
                sequences += [self._seqs.get(token, 0) for token in tokens]
        finally:
            for token in tokens:
                self._pending.pop(token, None)
                self._seqs.pop(token, None)
        away = next((r for r in results if r is not None and _is_away(r)), None)
        if away is not None:
            import nats.js.errors as je

            # JetStream is (re)starting: the caller retries the lot (Nats-Msg-Id dedupes).
            raise je.ServiceUnavailableError(
                code=away.code, err_code=away.err_code, description=away.description
            )
        return results

    async def _subscribe(self) -> None:
        await self.stop()
        nc = self._link.nc
        self._prefix = nc.new_inbox() + "."
        self._sub = await nc.subscribe(self._prefix + "*", cb=self._on_reply)
        self._generation = self._link.generation

    async def _on_reply(self, msg: Any) -> None:
        future = self._pending.get(msg.subject[len(self._prefix) :])
        if future is None or future.done():
            return
        headers = msg.headers
        if headers and headers.get("Status") == "503":  # no responders: no stream there
            future.set_result(Refused(503, 0, "no stream answered (JetStream away)"))
            return
        try:
            reply = json.loads(msg.data)
            error = reply.get("error") if isinstance(reply, dict) else None
            if error is None:
                self._seqs[msg.subject[len(self._prefix) :]] = int(reply.get("seq", 0))
                future.set_result(None)
            else:
                future.set_result(
                    Refused(
                        int(error.get("code", 0)),
                        int(error.get("err_code", 0)),
                        str(error.get("description", "")),
                    )
                )
        except (ValueError, TypeError, AttributeError):
            future.set_result(Refused(0, 0, f"an unreadable reply: {msg.data[:100]!r}"))

    async def stop(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            await quietly(sub.unsubscribe)


def _is_away(refused: Refused) -> bool:
    return refused.code == 503 and refused.err_code != ERR_PER_SUBJECT


def raise_refused(results: list[Refused | None], what: str, url: str) -> None:
    for result in results:
        if result is not None:
            raise CheckpointError(
                f"the NATS server at {url} refused to {what}: {result.description} "
                f"(error {result.err_code})",
                hint="A stream flowdsl uses was changed by hand, or the account's limits "
                "are reached; see docs/nats.md",
            )
