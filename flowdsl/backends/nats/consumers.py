"""The consumers of the NATS broker: ``Puller`` takes tasks off the workers' shared durable
consumer; ``LogReader`` follows the log stream's completions and events through one
ephemeral push consumer and keeps them until they are taken."""

from __future__ import annotations

import collections
import itertools
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import anyio
import attrs

from .frames import SLOTS, split
from .keys import BLOB_HEADER, Malformed, from_token, text_of
from .link import NatsLink, quietly

__all__ = ["LogReader", "Puller", "PushConsumer", "delivery"]

log = logging.getLogger("flowdsl.nats")

# A reader's events that nobody takes are dropped past this many (a client with no
# observed run has no use for other clients' events).
_EVENTS_KEPT: Final = 10_000


def delivery(msg: Any) -> tuple[int, int, int] | None:
    """A JetStream message's stream sequence, consumer sequence and delivery count, from
    its reply subject (``$JS.ACK.{stream}.{consumer}.{delivered}.{stream seq}.{consumer
    seq}...``); None for another message.  nats-py's ``metadata`` reads the same, and
    makes a datetime and five objects besides, for each message."""
    reply = msg.reply
    tokens: list[str] = reply.split(".") if reply else []
    if len(tokens) == 9 and tokens[0] == "$JS" and tokens[1] == "ACK":  # no domain
        try:
            return int(tokens[5]), int(tokens[6]), int(tokens[4])
        except ValueError:
            return None
    try:
        meta = msg.metadata
    except Exception:  # not a JetStream message (a flow-control probe, say)
        return None
    return int(meta.sequence.stream), int(meta.sequence.consumer), int(meta.num_delivered)


class Puller:
    """Pull requests on the shared durable consumer, answered on one inbox.

    A request asks for up to *n* messages; the server answers with messages and, when it
    has fewer, a status (404 no messages, 408 expired, 409 ...) sent to the request's own
    reply subject, which is how a request's end is told from an earlier one's.  Messages
    that arrive after their request was given up (a cancelled claim) are kept in
    ``spare`` and handed out first.
    """

    def __init__(self, link: NatsLink, stream: str, consumer: str) -> None:
        self._link = link
        self._subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = ""
        self._sub: Any = None
        self._generation = -1
        self._numbers = itertools.count()
        self._lock = anyio.Lock()
        self._arrived = anyio.Event()
        self._ended: set[str] = set()
        self.spare: list[Any] = []
        self.stale = False  # the consumer went away: make it again

    async def pull(self, limit: int, wait: float) -> list[Any]:
        async with self._lock:
            await self._subscribe()
            if len(self.spare) < limit:
                await self._request(limit - len(self.spare), None)
            if not self.spare:
                await self._request(1, wait)
            taken, self.spare = self.spare[:limit], self.spare[limit:]
            return taken

    async def _subscribe(self) -> None:
        if self._sub is not None and self._generation == self._link.generation:
            return
        nc = self._link.nc
        if self._sub is not None:
            await quietly(self._sub.unsubscribe)
        self._inbox = nc.new_inbox()
        self._sub = await nc.subscribe(f"{self._inbox}.*", cb=self._on_msg)
        self._generation = self._link.generation

    async def _on_msg(self, msg: Any) -> None:
        headers = msg.headers
        status = headers.get("Status") if headers else None
        if status is None:
            self.spare.append(msg)
        elif status != "100":  # 100: an idle heartbeat
            self._ended.add(msg.subject)
            deleted = status == "409" and "deleted" in str(headers.get("Description", "")).lower()
            if deleted or status == "503":  # the consumer is gone: make it again
                self.stale = True
        self._arrived.set()

    async def _request(self, n: int, wait: float | None) -> None:
        """One pull request, waited for until it ends, brings *n* messages, or (its end
        lost in a reconnect) a while after it should have ended."""
        reply = f"{self._inbox}.{next(self._numbers)}"
        request: dict[str, Any] = {"batch": n}
        if wait is None:
            request["no_wait"] = True
        else:
            request["expires"] = int(wait * 1e9)
        target = len(self.spare) + n
        self._ended.clear()  # the ends of requests given up earlier
        nc = self._link.nc
        try:
            await nc.publish(self._subject, json.dumps(request).encode(), reply=reply)
        except Exception as exc:  # the connection is away: the next claim tries again
            log.debug("pull request failed: %r", exc)
            await anyio.sleep(min(wait or 0.05, 0.25))
            return
        give_up = anyio.current_time() + (wait or 0) + min(self._link.url.options.timeout, 2.0)
        while len(self.spare) < target and reply not in self._ended:
            left = give_up - anyio.current_time()
            if left <= 0:
                break
            with anyio.move_on_after(left):
                await self._arrived.wait()
            if self._arrived.is_set():
                self._arrived = anyio.Event()
        self._ended.discard(reply)

    async def stop(self) -> None:
        if self._sub is not None:
            await quietly(self._sub.unsubscribe)
            self._sub = None


class PushConsumer:
    """An ephemeral consumer of a stream that pushes its messages, in order, to this
    process: :meth:`_begin` makes it (afresh), :meth:`_in_order` tells a message's stream
    sequence or a gap (messages dropped for a slow reader), :meth:`stop` ends it.  The
    consumer acks nothing and is dropped by the server a minute after its reader went."""

    def __init__(self, link: NatsLink, stream: str) -> None:
        self._link = link
        self._stream = stream
        self._sub: Any = None
        self._consumer: str | None = None
        self._token: object = None
        self._generation = -1
        self._cseq = 0
        self._broken = False

    @property
    def _stale(self) -> bool:
        """Whether to start again: never started, a gap, or a reconnect since."""
        return self._sub is None or self._broken or self._generation != self._link.generation

    def _on_msg(self, msg: Any) -> None:
        raise NotImplementedError

    async def _begin(self, what: str, **config: Any) -> None:
        """Make the consumer again, with *config* (``ConsumerConfig`` fields: where to
        start, which subjects) besides what every push consumer here has."""
        from nats.js.api import AckPolicy, ConsumerConfig

        await self.stop()
        nc = self._link.nc
        js = self._link.js
        self._cseq = 0
        self._broken = False
        self._generation = self._link.generation
        inbox = nc.new_inbox()
        token = object()
        self._token = token

        async def on_msg(msg: Any) -> None:
            if self._token is token:  # not a message of an earlier subscription
                self._on_msg(msg)

        self._sub = await nc.subscribe(inbox, cb=on_msg)
        settings = ConsumerConfig(
            deliver_subject=inbox,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=60.0,
            mem_storage=True,
            **config,
        )

        async def op() -> str:
            info = await js.add_consumer(self._stream, settings)
            return str(info.name)

        try:
            self._consumer = await self._link.call(what, op)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.stop()  # nothing left half made: the next use starts again
            raise

    def _in_order(self, msg: Any) -> int | None:
        """*msg*'s stream sequence; None for a message to drop: not from JetStream (a
        flow-control probe), or after a gap (then ``_broken`` until started again)."""
        got = delivery(msg)
        if got is None or self._broken:
            return None
        seq, cseq, _ = got
        if cseq != self._cseq + 1:
            self._broken = True
            return None
        self._cseq = cseq
        return seq

    async def stop(self) -> None:
        self._token = None
        sub, self._sub = self._sub, None
        consumer, self._consumer = self._consumer, None
        if sub is not None:
            await quietly(sub.unsubscribe)
        if consumer is not None and self._link.is_open:
            js = self._link.js
            with anyio.move_on_after(1):
                await quietly(lambda: js.delete_consumer(self._stream, consumer))


class LogReader(PushConsumer):
    """The completions and events of the log stream, pushed to this process by one
    ephemeral consumer and kept until taken.

    A position (and a cursor) is ``stream sequence * SLOTS + index``, the index of an
    entry in its message (0 for a message of one entry, see ``frames``), so that a reader
    taking at most *count* entries can stop inside a batch message.  ``position`` is the
    last position received: every entry after ``start`` up to it is in the buffers or was
    taken.  A cursor older than ``start`` (a caller that wants what this reader never
    asked for) makes the consumer start again from there; a reconnect or a gap in the
    consumer's sequence (messages dropped) makes it start again after ``position``.
    """

    def __init__(
        self,
        link: NatsLink,
        stream: str,
        prefix: str,
        large: Callable[[str, str], Awaitable[str]],
    ) -> None:
        super().__init__(link, stream)
        self._large = large
        self._prefix = prefix
        self._start: int | None = None
        self.position = 0
        # Texts, or the hashes of large ones (_Blob), fetched when taken.
        self._done: collections.deque[tuple[int, str | _Blob]] = collections.deque()
        self._events: collections.deque[tuple[int, str, str | _Blob]] = collections.deque()

    async def tail(self) -> int:
        js = self._link.js

        async def op() -> int:
            info = await js.stream_info(self._stream)
            return int(info.state.last_seq) * SLOTS + SLOTS - 1

        return await self._link.call("read the log's end", op)

    async def take_done(self, cursor: int, count: int | None = None) -> tuple[list[str], int]:
        """The completions after *cursor* (at most *count*), and the new cursor: the
        sequence of the last one taken while more wait, else the reader's position."""
        await self._ensure(cursor)
        done = self._done
        while done and done[0][0] <= cursor:
            done.popleft()
        n = len(done) if count is None else min(count, len(done))
        taken = [done.popleft() for _ in range(n)]
        position = taken[-1][0] if done else max(cursor, self.position)
        return [await self._resolve(t, "a completion") for _, t in taken], position

    async def take_events(
        self, cursor: int, count: int | None = None
    ) -> tuple[list[tuple[str, str]], int]:
        """The events after *cursor* (at most *count*), as :meth:`take_done`."""
        await self._ensure(cursor)
        events = self._events
        while events and events[0][0] <= cursor:
            events.popleft()
        n = len(events) if count is None else min(count, len(events))
        taken = [events.popleft() for _ in range(n)]
        position = taken[-1][0] if events else max(cursor, self.position)
        return [(r, await self._resolve(t, "an event")) for _, r, t in taken], position

    async def _resolve(self, text: str | _Blob, what: str) -> str:
        return text if isinstance(text, str) else await self._large(text.digest, what)

    async def _ensure(self, cursor: int) -> None:
        if self._start is None or cursor + 1 < self._start:
            await self._restart((cursor + 1) // SLOTS, rewind=True)
        elif self._stale:
            await self._restart((self.position + 1) // SLOTS, rewind=False)

    async def _restart(self, first: int, *, rewind: bool) -> None:
        """Read again from the message of stream sequence *first*."""
        from nats.js.api import DeliverPolicy

        if rewind:
            self._done.clear()
            self._events.clear()
            self._start = first * SLOTS
            self.position = first * SLOTS - 1
        await self._begin(
            "read completions",
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=max(1, first),
            filter_subject=f"{self._prefix}>",
        )

    def _on_msg(self, msg: Any) -> None:
        seq = self._in_order(msg)
        if seq is None:  # after a gap, the consumer starts again after `position`
            return
        base = seq * SLOTS
        if base <= self.position:
            return
        self.position = base + SLOTS - 1
        kind, _, token = msg.subject[len(self._prefix) :].partition(".")
        if kind == "batch":
            try:
                entries = split(msg.data)
            except Malformed as exc:
                log.warning("dropping a log batch on %s: %s", msg.subject, exc)
                return
            for i, (what, run, data) in enumerate(entries):
                self._keep(base + i, what, run, text_of(data))
            return
        headers = msg.headers
        digest = headers.get(BLOB_HEADER) if headers else None
        self._keep(base, kind, token, text_of(msg.data) if digest is None else _Blob(str(digest)))

    def _keep(self, position: int, kind: str, token: str, text: str | _Blob) -> None:
        if kind == "done":
            self._done.append((position, text))
        elif kind == "ev":
            try:
                run_id = from_token(token)
            except (ValueError, UnicodeDecodeError):
                log.warning("dropping an event of run token %r: not a flowdsl run", token)
                return
            self._events.append((position, run_id, text))
            if len(self._events) > _EVENTS_KEPT:
                self._events.popleft()


@attrs.frozen
class _Blob:
    digest: str
