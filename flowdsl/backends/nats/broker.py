"""Batch mode on NATS JetStream: any number of workers, on any number of machines.

Layout, under the deployment's prefix (``prefix=``, default ``flowdsl``; the store's bucket
has the same name, see ``store``), ``{run}`` and ``{node}`` being base64url
tokens of the ids::

    stream {prefix}_tasks    work-queue retention; subject {prefix}.tasks.{run}.{node};
                             at most one message per subject, a second one refused
                             (DiscardNewPerSubject): a node queued or held is not queued twice
    consumer workers         the durable pull consumer every worker shares; explicit acks,
                             AckWait = the workers' lease, MaxDeliver = max_deliver
    stream {prefix}_log      limits retention, max_age: {prefix}.log.done.{run} completions
                             and {prefix}.log.ev.{run} events, read by stream sequence;
                             {prefix}.log.batch carries many of both at once (frames)
    stream {prefix}_dead     dead letters, {prefix}.dead.{run}

A task's lease is JetStream's ack timer: ``claim`` pulls messages off the consumer
(``no_wait`` for what is there, else one long poll that returns as soon as a task
arrives), a task a dead worker held is redelivered after AckWait, and its
``num_delivered`` is the attempt.  ``extend`` sends ``+WPI`` (in progress) for the
messages this process holds, which restarts their timers.  A task is acked only once
its completion is published, which the worker does only after committing the node to
the store (KV create, first commit wins): a crash between any two of these steps leaves
the task to be redelivered, and its next worker finds the committed record and completes
with it (docs/nats.md has the whole argument).  The optional ``commit_and_complete`` hook
is not offered: JetStream has no transaction spanning a KV write and two messages, and
the worker's default order is already the right one.

Completions and events share one stream so that a reader sees a node's events before its
completion (they are published in that order), and the client reads both through one
ephemeral consumer that pushes them as they come; a cursor is a stream sequence, so
``completions(None)`` means "from now on" and a client on another machine can follow a
run.  After a reconnect the consumer is made again from the last sequence read.

A publish retried after a lost reply is stored once: a task's subject refuses a second
message while the first is queued or held, and the log's and dead letters' publishes carry
a ``Nats-Msg-Id`` fixed across the retries of one call.  Calls ride out a server restart
(transient errors are retried with backoff for ``retry_for`` seconds, see ``NatsLink``);
an ack lost in a restart makes the task come back once more, which is harmless (above).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from typing import Any, Final

import anyio
from anyio.lowlevel import checkpoint_if_cancelled

from ..._errors import ConfigError
from ..base import Broker
from ..messages import Claimed, Finished
from . import frames
from .bucket import Bucket
from .consumers import LogReader, Puller, delivery
from .keys import (
    BLOB_HEADER,
    Malformed,
    dead_letter_of,
    dump_json,
    task_ids,
    text_of,
    to_bytes,
    to_token,
)
from .link import NatsLink, quietly
from .publisher import ERR_PER_SUBJECT, Publisher, Refused, raise_refused
from .streams import ensure_streams, stream_name
from .url import NatsURL, nats_modules

__all__ = ["NATSBroker"]

log = logging.getLogger("flowdsl.nats")

CONSUMER: Final = "workers"
#: Seconds a claim waits for a task when none is queued (it returns as soon as one comes).
LONG_POLL: Final = 1.0
_MAX_ACK_PENDING: Final = 100_000
_ERR_NO_MESSAGE: Final = 10057  # a message deleted or acked meanwhile


class NATSBroker(Broker):
    """A task queue on NATS JetStream, shared by every worker that can reach the server.

    *url* is ``nats://[token@|user:password@]host:4222[,host2:4222...]`` (``tls://`` for
    TLS) with the options of :class:`~flowdsl.backends.nats.url.NatsOptions` in its query
    string or as keywords; give the store the same URL.
    """

    def __init__(self, url: str, **options: Any) -> None:
        nats_modules()
        self._url = NatsURL.parse(url, **options)
        self.url = self._url.shown
        self.options = self._url.options
        prefix = self.options.prefix
        self._prefix = prefix
        self.tasks_stream = stream_name(prefix, "tasks")
        self.log_stream = stream_name(prefix, "log")
        self.dead_stream = stream_name(prefix, "dead")
        self._link = NatsLink(self._url)
        self._opened = False
        self._held: dict[str, Any] = {}  # task id -> the message, until acked or termed
        self._puller: Puller | None = None
        self._reader: LogReader | None = None
        self._ack_wait: float | None = None  # the consumer's AckWait, once checked
        self._bucket: Bucket | None = None  # for large messages, opened when one comes
        self._publisher = Publisher(self._link)
        self._message_max = 512 * 1024

    def __repr__(self) -> str:
        return f"<NATSBroker {self.url!r} prefix={self._prefix!r}>"

    @property
    def link(self) -> NatsLink:
        return self._link

    # --- lifetime -------------------------------------------------------------------------

    async def open(self) -> None:
        await checkpoint_if_cancelled()
        if self._opened:
            return
        await self._link.open()
        try:
            await ensure_streams(self._link, self.options, self.url)
        except BaseException:
            await self._link.close()
            raise
        self._reader = LogReader(
            self._link, self.log_stream, f"{self._prefix}.log.", self._large_text
        )
        # Headers and the JSON around a payload must fit beside it in one message.
        self._message_max = int(self._link.nc.max_payload or 1024 * 1024) * 3 // 4
        self._opened = True

    async def close(self) -> None:
        if not self._opened:
            return
        self._opened = False
        with anyio.CancelScope(shield=True):
            # Tasks taken and not finished go back at once (the worker was stopped); each
            # counts as a delivery, as a lease that ran out would.
            held = [*self._held.values(), *(self._puller.spare if self._puller else [])]
            self._held.clear()
            for msg in held:
                await quietly(msg.nak)
            if self._puller is not None:
                await self._puller.stop()
                self._puller = None
            await self._publisher.stop()
            if self._reader is not None:
                await self._reader.stop()
                self._reader = None
            self._bucket = None
            await self._link.close()

    def _js(self) -> Any:
        if not self._opened:
            raise ConfigError(
                f"the queue {self.url} is not open", hint="Use the context with `async with ctx:`"
            )
        return self._link.js

    # --- publishing -----------------------------------------------------------------------

    async def _publish(
        self,
        items: list[tuple[str, bytes]],
        what: str,
        *,
        run_id: str | None = None,
        ids: bool = True,
    ) -> list[Refused | None]:
        """Publish *items* in order and wait for every ack: None for a stored message, or
        why the stream refused it.  With *ids*, one Nats-Msg-Id per message, kept across
        retries: a retry after a lost reply is not stored twice.  Tasks go without: their
        subject holds one message at most, which refuses a retried one just as well, and
        the ids the server would keep for its duplicate window cost CPU on every task."""
        self._js()
        messages: list[tuple[str, bytes, dict[str, str] | None]] = []
        # One random id per call, numbered per message: unique.
        call = uuid.uuid4().hex if ids else ""
        for i, (subject, data) in enumerate(items):
            headers = {"Nats-Msg-Id": f"{call}.{i}"} if ids else {}
            if len(data) > self._message_max:
                bucket = await self._blobs()
                headers[BLOB_HEADER] = await bucket.put_blob(data, run_id)
                data = b""
            messages.append((subject, data, headers or None))
        publisher = self._publisher
        timeout = self.options.timeout

        async def op() -> list[Refused | None]:
            with anyio.fail_after(timeout):
                return await publisher.publish(messages)

        return await self._link.call(what, op, run_id=run_id)

    async def _blobs(self) -> Bucket:
        if self._bucket is None:
            self._bucket = await Bucket.open(self._link, self.options)
        return self._bucket

    async def _payload(self, msg: Any, what: str) -> str:
        """A message's text, fetched from the bucket when it was too large to send."""
        headers = msg.headers
        digest = headers.get(BLOB_HEADER) if headers else None
        if digest is None:
            return text_of(msg.data)
        return await self._large_text(digest, what)

    async def _large_text(self, digest: str, what: str) -> str:
        bucket = await self._blobs()
        try:
            return text_of(await bucket.get_blob(digest, what))
        except Malformed as exc:
            # The worker or the listener reports it as a malformed message.
            log.warning("NATS at %s: %s", self.url, exc)
            return ""

    async def _publish_log(
        self, entries: list[tuple[str, str, bytes]], what: str, run_id: str | None
    ) -> None:
        """Publish ``(kind, run token, payload)`` entries in order, in as few messages as
        fit (frames): a publish and an ack for the lot, not one each."""
        log = frames.messages(self._prefix, entries, self._message_max)
        raise_refused(await self._publish(log, what, run_id=run_id), what, self.url)

    # --- tasks ----------------------------------------------------------------------------

    async def enqueue(self, tasks: list[tuple[str, str, str]]) -> None:
        await checkpoint_if_cancelled()
        if not tasks:
            return
        items = [
            (f"{self._prefix}.tasks.{to_token(run_id)}.{to_token(node_id)}", to_bytes(payload))
            for run_id, node_id, payload in tasks
        ]
        results = await self._publish(items, "queue a task", run_id=tasks[0][0], ids=False)
        # Refused per subject: the node is queued or held already, as the protocol wants.
        raise_refused(
            [r for r in results if r is not None and r.err_code != ERR_PER_SUBJECT],
            "queue a task",
            self.url,
        )

    async def claim(self, worker: str, limit: int, lease: float) -> list[Claimed]:
        await checkpoint_if_cancelled()
        self._js()
        puller = await self._consumer(lease)
        msgs = await puller.pull(limit, LONG_POLL)
        claimed = []
        for msg in msgs:
            got = delivery(msg)
            if got is None:  # not from JetStream: not a task (the inbox is ours alone)
                log.warning("NATS at %s: dropping a message that is not a task", self.url)
                continue
            task_id = f"{got[0]}.{got[2]}"
            self._held[task_id] = msg
            payload = await self._payload(msg, "a task")
            run_id, node_id = task_ids(self._prefix, msg.subject)
            claimed.append(Claimed(task_id, got[2], payload, run_id, node_id))
        return claimed

    async def drop_queued(self, run_id: str) -> None:
        """A failed or cancelled run's tasks leave the queue (a worker holding one finishes
        it; its ack then finds nothing)."""
        for seq, _ in await self._run_tasks(run_id):
            await self._delete_task(seq, run_id)

    async def redeliver(
        self,
        run_id: str,
        *,
        skip: Collection[str] = (),
        alive: Callable[[str], bool] | None = None,
    ) -> None:
        """A resumed run's tasks are handed out afresh: each is published again as a new
        message (so its delivery count starts over) in place of the old one, except those
        of the nodes in *skip* (committed: the resume reuses them), which are only
        removed, and those this process's workers hold, left to them.  (JetStream does
        not say which worker holds a message, so *alive* cannot be asked: a live worker
        elsewhere holding an old one may finish it too; the first commit wins.)"""
        mine = {int(msg.metadata.sequence.stream) for msg in self._held.values()}
        for seq, raw in await self._run_tasks(run_id):
            if task_ids(self._prefix, str(raw.subject))[1] in skip:
                await self._delete_task(seq, run_id)
                continue
            if seq in mine:
                continue
            await self._delete_task(seq, run_id)
            digest = (raw.headers or {}).get(BLOB_HEADER)
            data = bytes(raw.data or b"")
            if digest is not None:  # a large task: _publish stores it by hash again
                data = to_bytes(await self._large_text(digest, "a task"))
            items = [(str(raw.subject), data)]
            results = await self._publish(items, "queue a task again", run_id=run_id, ids=False)
            raise_refused(
                [r for r in results if r is not None and r.err_code != ERR_PER_SUBJECT],
                "queue a task again",
                self.url,
            )

    async def _run_tasks(self, run_id: str) -> list[tuple[int, Any]]:
        """``(sequence, message)`` of every task of the run in the stream, queued or held.

        Read one by one (next message by subject); never by purging the run's subjects:
        on nats-server 2.9 a subject-filtered purge of a work-queue stream moves the
        consumer past the other subjects' messages, which are then never delivered.
        """
        from nats.js.errors import NotFoundError

        js = self._js()
        subject = f"{self._prefix}.tasks.{to_token(run_id)}.*"
        found: list[tuple[int, Any]] = []
        seq = 1
        while True:

            async def op(seq: int = seq) -> Any:
                try:
                    return await js.get_msg(self.tasks_stream, seq=seq, subject=subject, next=True)
                except NotFoundError:
                    return None

            raw = await self._link.call("list a run's tasks", op, run_id=run_id)
            if raw is None:
                return found
            found.append((int(raw.seq), raw))
            seq = int(raw.seq) + 1

    async def _delete_task(self, seq: int, run_id: str) -> None:
        from nats.js.errors import APIError

        js = self._js()

        async def op() -> None:
            try:
                await js.delete_msg(self.tasks_stream, seq)
            except APIError as exc:
                if exc.err_code != _ERR_NO_MESSAGE:  # acked meanwhile: gone already
                    raise

        await self._link.call("remove a task", op, run_id=run_id)

    async def _consumer(self, lease: float) -> Puller:
        """The shared durable consumer, made on first use; its AckWait is the lease, raised
        (never lowered) when a worker with a longer lease joins, so that no worker's
        heartbeats come too late for the consumer."""
        if (
            self._puller is not None
            and not self._puller.stale
            and self._ack_wait is not None
            and lease <= self._ack_wait
        ):
            return self._puller
        from nats.js.api import AckPolicy, ConsumerConfig
        from nats.js.errors import NotFoundError

        js = self._js()

        async def op() -> float:
            try:
                info = await js.consumer_info(self.tasks_stream, CONSUMER)
            except NotFoundError:
                info = None
            if info is not None and float(info.config.ack_wait or 0) >= lease:
                return float(info.config.ack_wait)
            if info is not None:
                config = info.config
                config.ack_wait = lease
            else:
                config = ConsumerConfig(
                    durable_name=CONSUMER,
                    description="flowdsl workers",
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=lease,
                    max_deliver=self.options.max_deliver,
                    max_ack_pending=_MAX_ACK_PENDING,
                    filter_subject=f"{self._prefix}.tasks.>",
                )
            created = await js.add_consumer(self.tasks_stream, config)
            return float(created.config.ack_wait)

        self._ack_wait = await self._link.call("create the workers' consumer", op)
        if self._puller is None:
            self._puller = Puller(self._link, self.tasks_stream, CONSUMER)
        self._puller.stale = False
        return self._puller

    async def extend(self, task_ids: list[str], lease: float) -> None:
        if not self._opened:
            return
        msgs = [self._held[t] for t in task_ids if t in self._held]
        if self._puller is not None:
            msgs += self._puller.spare  # delivered to us, not yet claimed
        for msg in msgs:
            await quietly(msg.in_progress)
        if self._ack_wait is not None and lease > self._ack_wait:
            await self._consumer(lease)

    async def complete(
        self,
        task_id: str,
        run_id: str,
        node_id: str,
        payload: str,
        *,
        events: list[tuple[str, str]] | None = None,
    ) -> None:
        item = Finished(task_id, run_id, node_id, payload, tuple(events or ()))
        await self.complete_many([item])

    async def dead_letter(
        self,
        task_id: str,
        run_id: str,
        node_id: str,
        payload: str,
        reason: str,
        *,
        events: list[tuple[str, str]] | None = None,
    ) -> None:
        item = Finished(task_id, run_id, node_id, payload, tuple(events or ()), dead=reason)
        await self.complete_many([item])

    async def complete_many(self, items: Sequence[Finished]) -> None:
        """Complete or dead-letter *items*: their dead letters, then each one's events and
        completion in order (on the log stream, so a reader sees the events first, framed
        in batch messages), pipelined, a round trip for each kind; then the acks.  The
        completion first, the ack last: a crash in between redelivers the task, whose next
        worker completes it again (a second completion is ignored)."""
        await checkpoint_if_cancelled()
        if not items:
            return
        what = "record dead letters"
        dead = [
            (
                f"{self._prefix}.dead.{to_token(i.run_id)}",
                await self._dead_record(i.task_id, i.run_id, i.node_id, i.dead),
            )
            for i in items
            if i.dead is not None
        ]
        if dead:
            raise_refused(await self._publish(dead, what), what, self.url)
        entries: list[tuple[str, str, bytes]] = []
        for item in items:
            entries += [("ev", to_token(r), to_bytes(t)) for r, t in item.events]
            entries.append(("done", to_token(item.run_id), to_bytes(item.payload)))
        await self._publish_log(entries, "publish completions", items[0].run_id)
        for item in items:  # the acks go out together (nats-py sends its buffer at once)
            msg = self._held.pop(item.task_id, None)
            if msg is not None:
                # Term for a dead letter: no more deliveries, the work queue drops it.
                await quietly(msg.ack if item.dead is None else msg.term)

    async def _dead_record(self, task_id: str, run_id: str, node_id: str, reason: str) -> bytes:
        msg = self._held.get(task_id)
        payload = await self._payload(msg, "a task") if msg is not None else ""
        fields = {"run_id": run_id, "node_id": node_id, "reason": reason, "at": time.time()}
        return dump_json({**fields, "payload": payload})

    async def dead_letters(self, run_id: str) -> list[dict[str, Any]]:
        from nats.js.errors import NotFoundError

        js = self._js()
        subject = f"{self._prefix}.dead.{to_token(run_id)}"
        out: list[dict[str, Any]] = []
        seq = 1
        while True:

            async def op(seq: int = seq) -> Any:
                try:
                    return await js.get_msg(self.dead_stream, seq=seq, subject=subject, next=True)
                except NotFoundError:
                    return None

            raw = await self._link.call("read the dead letters", op, run_id=run_id)
            if raw is None:
                return out
            out.append(dead_letter_of(raw.data or b"", run_id))
            seq = int(raw.seq) + 1

    # --- completions and events -----------------------------------------------------------

    async def completions(self, cursor: Any) -> tuple[list[str], Any]:
        await checkpoint_if_cancelled()
        reader = self._log()
        if cursor is None:
            return [], await reader.tail()
        return await reader.take_done(int(cursor))

    async def read_completions(self, cursor: Any, *, count: int) -> tuple[list[str], Any]:
        """At most *count* of the completions pushed to this process after *cursor*."""
        await checkpoint_if_cancelled()
        reader = self._log()
        if cursor is None:
            return [], await reader.tail()
        return await reader.take_done(int(cursor), max(1, count))

    async def forget_completions(self, upto: Any) -> None:
        # Completions stay for max_age (the stream's limit), for slower readers elsewhere.
        return None

    async def publish_events(self, events: list[tuple[str, str]]) -> None:
        if events:
            entries = [("ev", to_token(r), to_bytes(t)) for r, t in events]
            await self._publish_log(entries, "publish events", events[0][0])

    async def events(self, cursor: Any) -> tuple[list[tuple[str, str]], Any]:
        reader = self._log()
        if cursor is None:
            return [], await reader.tail()
        return await reader.take_events(int(cursor))

    async def read_events(self, cursor: Any, *, count: int) -> tuple[list[tuple[str, str]], Any]:
        """At most *count* of the events pushed to this process after *cursor*."""
        reader = self._log()
        if cursor is None:
            return [], await reader.tail()
        return await reader.take_events(int(cursor), max(1, count))

    async def forget_events(self, run_id: str) -> None:
        # Events stay for max_age, as completions do.  Not purged by subject: on
        # nats-server 2.9 a subject-filtered purge made the push consumer reading the log
        # skip messages of other subjects (completions), seen in this package's tests.
        return None

    def _log(self) -> LogReader:
        self._js()
        assert self._reader is not None
        return self._reader

    # --- for tests and progress displays --------------------------------------------------

    async def pending(self) -> int:
        """Tasks queued or held."""
        js = self._js()

        async def op() -> int:
            info = await js.stream_info(self.tasks_stream)
            return int(info.state.messages)

        return await self._link.call("count the tasks", op)
