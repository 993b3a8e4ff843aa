"""A watch of the values written under part of a bucket, pushed as they are written.

A batch client checks every successful completion against the journal (the record a
completion carries must be the one its worker committed), and a read of a record is a
request and a reply.  The records a client checks were all written a moment before, so
:class:`Watch` follows the writes instead: one ephemeral consumer of the bucket's own
stream pushes every record written under the watched keys, and the check takes it from
there, one message a record where a read is two (each with its server-side work).

What is taken from a watch is what a read would have found at some moment after the
watch began: the server stored that value under that key (the watch reads the stream the
bucket keeps its values in, as a read does), and no delete, purge or newer value of the
key has been seen since.  A gap in the messages (some dropped for a slow reader, a
reconnect) empties the watch and starts it afresh: a delete missed in the gap must not
leave an old value behind.  Keys this process deletes (:meth:`Watch.forget`, before the
deletes) take no value until their delete markers have come, so a watch that lags behind
never hands out a value this process deleted.  What the watch does not hold (written
before it began, taken already, or dropped past :data:`KEPT`) the caller reads as before,
so nothing depends on the watch keeping up; it only saves reads when it does.  The store
goes further and only takes a record that is exactly the one it expects: anything else is
read (``NATSStore.lookup_nodes``), so the watch can spare a read but never decide a check.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from .consumers import PushConsumer
from .link import NatsLink

__all__ = ["KEPT", "Watch"]

#: Values a watch keeps until taken; the oldest go first (values written for other
#: clients' runs are never taken here).
KEPT: Final = 8192


class Watch(PushConsumer):
    """The latest value of each key under *pattern* (a key filter such as ``node.>``)
    written since the watch began, kept until taken; see the module's notes."""

    def __init__(self, link: NatsLink, stream: str, key_prefix: str, pattern: str) -> None:
        super().__init__(link, stream)
        self._key_prefix = key_prefix  # "$KV.{bucket}.": a message's subject is this + key
        self._subject = key_prefix + pattern
        self._values: dict[str, bytes] = {}
        # Keys being deleted by this process, with how many of their delete markers are
        # still to come: none of their values is kept until then (a lagging watch may
        # still bring the values from before the deletes).
        self._forgotten: dict[str, int] = {}
        #: The stream sequence of the last message seen (0: none since it began).
        self.position = 0

    def __contains__(self, key: str) -> bool:
        return key in self._values

    async def take(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values of *keys* the watch holds, removed from it (None where it holds
        none): a key is taken once, a second reader of it reads the bucket."""
        if self._stale:
            from nats.js.api import DeliverPolicy

            self._values.clear()
            self._forgotten.clear()
            await self._begin(
                "watch the journal", deliver_policy=DeliverPolicy.NEW, filter_subject=self._subject
            )
        values = self._values
        return [values.pop(key, None) for key in keys]

    def forget(self, keys: Sequence[str]) -> None:
        """*keys* are about to be deleted: take none of their values until the watch has
        seen their delete markers."""
        if self._sub is None:
            return  # not following: it will never see their values from before
        forgotten = self._forgotten
        for key in keys:
            self._values.pop(key, None)
            forgotten[key] = forgotten.get(key, 0) + 1
        if len(self._forgotten) > KEPT:  # deletes whose markers never came (they failed)
            self._values.clear()
            self._forgotten.clear()
            self._broken = True  # started afresh at the next take

    def _on_msg(self, msg: Any) -> None:
        seq = self._in_order(msg)
        if seq is None:
            if self._broken:  # messages were dropped: a delete among them would leave
                self._values.clear()  # an old value here
            return
        self.position = seq
        key = msg.subject[len(self._key_prefix) :]
        values = self._values
        values.pop(key, None)  # a newer value goes last, to be dropped last
        headers = msg.headers
        forgotten = self._forgotten
        if headers and "KV-Operation" in headers:
            if forgotten.get(key, 0) > 1:
                forgotten[key] -= 1
            else:
                forgotten.pop(key, None)
            return  # a delete or a purge: the key holds nothing now
        if key in forgotten:
            return  # written before a delete of this process's that is still to come
        values[key] = bytes(msg.data)
        if len(values) > KEPT:
            del values[next(iter(values))]
