"""Publishing to JetStream, pipelined: messages go out in order and their acks are awaited
together; a stream's refusal is a value (``Refused``), turned into an error by the caller
that knows which refusals are expected."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, Final

import attrs

from ..._errors import CheckpointError
from .link import ERR_PER_SUBJECT, NatsLink
from .requests import Requests

__all__ = ["ERR_PER_SUBJECT", "Publisher", "Refused", "raise_refused"]


@attrs.frozen
class Refused:
    """A stream's refusal of a message (its JetStream API error)."""

    code: int
    err_code: int
    description: str


class Publisher:
    """JetStream publishes, pipelined: every message goes out in order, then all their
    acks are awaited (a round trip for the lot, not one each), through :class:`Requests`.

    (nats-py's ``publish_async`` would do, but its reply handler raises instead of failing
    the future when a stream refuses a message, so a refused publish never completes.)
    """

    def __init__(self, link: NatsLink) -> None:
        self._requests = Requests(link)

    async def publish(
        self,
        messages: Sequence[tuple[str, bytes, dict[str, str] | None]],
        sequences: list[int] | None = None,
    ) -> list[Any]:
        """A refusal or None for each message, in order; *sequences*, if given, gets each
        stored message's stream sequence (0 for a refused one)."""
        replies = await self._requests.request(
            [(subject, data) for subject, data, _ in messages],
            [headers for _, _, headers in messages],
        )
        acks = [_ack_of(msg) for msg in replies]
        if sequences is not None:
            sequences += [seq for _, seq in acks]
        results = [refused for refused, _ in acks]
        away = next((r for r in results if r is not None and _is_away(r)), None)
        if away is not None:
            import nats.js.errors as je

            # JetStream is (re)starting: the caller retries the lot (stored ones are refused
            # as duplicates: by Nats-Msg-Id, or a task by its subject).
            raise je.ServiceUnavailableError(
                code=away.code, err_code=away.err_code, description=away.description
            )
        return results

    async def stop(self) -> None:
        await self._requests.stop()


# A stored message's ack, as servers write it (2.9 puts spaces after some separators):
# read without a JSON parse.
_STORED: Final = re.compile(
    rb'\{"stream": ?"[^"\\]*", ?(?:"domain": ?"[^"\\]*", ?)?'
    rb'"seq": ?(\d+)(?:, ?"duplicate": ?true)?\}'
)


def _ack_of(msg: Any) -> tuple[Refused | None, int]:
    """A publish's reply: the stream's refusal, or None and the stored message's sequence."""
    headers = msg.headers
    if headers and headers.get("Status") == "503":  # no responders: no stream there
        return Refused(503, 0, "no stream answered (JetStream away)"), 0
    stored = _STORED.fullmatch(msg.data)
    if stored is not None:
        return None, int(stored[1])
    try:
        reply = json.loads(msg.data)
        error = reply.get("error") if isinstance(reply, dict) else None
        if error is None:
            return None, int(reply.get("seq", 0))
        refused = Refused(
            int(error.get("code", 0)),
            int(error.get("err_code", 0)),
            str(error.get("description", "")),
        )
        return refused, 0
    except (ValueError, TypeError, AttributeError):
        return Refused(0, 0, f"an unreadable reply: {msg.data[:100]!r}"), 0


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
