"""Batch mode on Redis Streams: any number of workers, on any number of machines.

Layout, under the deployment's key prefix (``prefix=``, default ``flowdsl``; the store's
keys share it, see ``store``)::

    {prefix}:tasks         stream of ready tasks, read through the consumer group "workers"
    {prefix}:queued        hash: [run_id, node_id] -> the id of its entry in tasks
    {prefix}:completions   stream of completions, read by cursor (entry id)
    {prefix}:events        stream of observed runs' events, read by cursor
    {prefix}:dead          stream of dead-lettered tasks

A task's lease is its pending entry in the consumer group: ``claim`` reads new entries
with XREADGROUP (blocking briefly when there are none) and, every second or so, takes
over entries left pending longer than the lease by a dead worker with XAUTOCLAIM; the
group's delivery count is the attempt.  ``extend`` resets a held entry's idle time
(XCLAIM ... JUSTID, only while this worker still owns it).

Every write that must be atomic is one Lua script (``scripts``): enqueueing (an entry per node while
it is queued or held: the ``queued`` hash), completing (XACK + XDEL + clear ``queued`` +
XADD the completion), dead-lettering, and, when the store lives under the same prefix
on the same server, committing a node's record together with completing its task
(:meth:`RedisBroker.commit_and_complete`): two workers finishing one node, or a crash
between two writes, can never commit twice or lose a completion.

Streams stay bounded: a completed task's entry is deleted; completions, events and dead
letters are trimmed to about ``keep`` entries (``?keep=``, default 100000) as they are
added.  A reader that falls further behind than that loses the oldest.

Calls ride out a server restart (connection errors are retried with backoff, see
``RedisLink``).  A lost reply can make a task count one more delivery, or publish a
completion twice; both are harmless (the scheduler takes the first completion).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from typing import Any, Final

import anyio

from ..._errors import CheckpointError
from ..._records import NodeRecord
from ..base import Broker, Store
from ..messages import Claimed, Completion, Finished, encode_completion
from . import scripts
from .batches import finish_many_call
from .keys import (
    Layout,
    Malformed,
    dead_letter_of,
    encode_node,
    entry_field,
    entry_fields,
    entry_key,
    entry_payload,
    event_args,
    from_bytes,
    queued_field,
    stream_entries,
    to_bytes,
)
from .link import Command, LuaScript, RedisLink, RedisURL, parse_keep, parse_prefix, require_asyncio
from .store import RedisStore

__all__ = ["RedisBroker"]

log = logging.getLogger("flowdsl.redis")

GROUP: Final = "workers"
_READ_COUNT: Final = 1000  # completions or events per read
_ALL: Final = 1 << 62  # no bound of a caller's own (each read is still _READ_COUNT at most)
_CONSUMER_SWEEP: Final = 600.0  # seconds between sweeps of departed workers' consumer names

_CHUNK: Final = 500

_SCRIPTS: Final = {
    "enqueue": LuaScript.of(scripts.ENQUEUE),
    "claim": LuaScript.of(scripts.CLAIM),
    "extend": LuaScript.of(scripts.EXTEND),
    "commit_and_complete": LuaScript.of(scripts.COMMIT_AND_COMPLETE),
    "run_tasks": LuaScript.of(scripts.RUN_TASKS),
    "finish_many": LuaScript.of(scripts.FINISH_MANY),
}


class RedisBroker(Broker):
    """A task queue on Redis Streams, shared by every client and worker of a deployment.

    *url* is ``redis://[user:password@]host:port/db`` (``rediss://`` for TLS) with
    optional ``?prefix=NAME&keep=N``.  *claim_block* is how long (seconds) a worker's
    claim waits on the server for a new task when there is none; *read_block*, how long
    a read of completions waits for one.  *retry_for* is how long calls ride out a server
    that went away before giving up.
    """

    # complete, commit_and_complete and dead_letter take the node's events and publish
    # them in the same script as the completion.
    carries_events = True

    def __init__(
        self,
        url: str,
        *,
        prefix: str | None = None,
        keep: int | None = None,
        claim_block: float = 1.0,
        read_block: float = 0.05,
        retry_for: float = 30.0,
    ) -> None:
        parsed = RedisURL.parse(url)
        self._link = RedisLink(parsed, retry_for=retry_for)
        self.prefix = parse_prefix(parsed, prefix)
        self.keep = parse_keep(parsed, keep)
        self.url = parsed.shown
        self.claim_block = claim_block
        self.read_block = read_block
        self.layout = Layout(self.prefix)
        p = self.prefix
        self.tasks_key = f"{p}:tasks"
        self.queued_key = f"{p}:queued"
        self.completions_key = f"{p}:completions"
        self.events_key = f"{p}:events"
        self.dead_key = f"{p}:dead"
        self._holders: dict[str, str] = {}  # task id -> the consumer (worker) holding it
        self._reclaim_cursor = "0-0"
        self._next_reclaim = 0.0
        self._next_sweep = 0.0
        # Events fetched along with completions, for the next events() call.
        self._event_buffer: list[tuple[str, str, str]] = []  # (entry id, run id, text)
        self._events_upto: str | None = None
        self._events_wanted = False

    def __repr__(self) -> str:
        state = "open" if self._link.is_open else "closed"
        return f"<RedisBroker {self.url!r} prefix={self.prefix!r} {state}>"

    # --- lifetime -------------------------------------------------------------------------

    async def open(self) -> None:
        if self._link.is_open:
            require_asyncio(self.url)
            return
        await self._link.open()
        try:
            await self._ensure_group()
            await self._sweep_consumers()
        except BaseException:
            await self._link.close()
            raise

    async def close(self) -> None:
        self._holders.clear()
        self._event_buffer, self._events_upto, self._events_wanted = [], None, False
        await self._link.close()

    async def _ensure_group(self) -> None:
        client = self._link.require("queue")

        async def create() -> None:
            try:
                await client.xgroup_create(self.tasks_key, GROUP, id="0", mkstream=True)
            except Exception as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

        await self._link.call("creating the consumer group", create)

    def holds(self, store: Store) -> bool:
        """Whether *store* keeps its journal on this broker's server, under its prefix:
        then a node's commit and its task's completion are one script."""
        return isinstance(store, RedisStore) and store.server == (
            self._link.url.connect,
            self.prefix,
        )

    async def _run(self, name: str, what: str, keys: list[str], args: list[Any]) -> Any:
        self._link.require("queue")
        script = _SCRIPTS[name]
        return await self._link.call(what, lambda: self._link.run_script(script, keys, args))

    # --- tasks ----------------------------------------------------------------------------

    async def enqueue(self, tasks: list[tuple[str, str, str]]) -> None:
        if not tasks:
            return
        args: list[Any] = []
        for run_id, node_id, payload in tasks:
            args += [
                queued_field(run_id, node_id),
                to_bytes(run_id),
                to_bytes(node_id),
                to_bytes(payload),
            ]
        await self._run("enqueue", "enqueueing tasks", [self.tasks_key, self.queued_key], args)

    async def claim(self, worker: str, limit: int, lease: float) -> list[Claimed]:
        if limit < 1:
            return []
        now = anyio.current_time()
        if now >= self._next_reclaim:
            self._next_reclaim = now + min(1.0, lease / 4)
            args = [GROUP, worker, limit, str(int(lease * 1000)), self._reclaim_cursor]
            result = await self._claim_script(args)
            self._reclaim_cursor = from_bytes(result[0], "cursor")
            entries = [(e[0], int(e[1]), e[2]) for e in result[1]]
            if not entries and self.claim_block > 0:
                entries = await self._read_new(worker, limit, self.claim_block)
        else:
            # No lease to look into: new tasks alone, in one read that waits for them.
            entries = await self._read_new(worker, limit, self.claim_block)
        if now >= self._next_sweep:
            await self._sweep_consumers()
        return [self._claimed(worker, *entry) for entry in entries]

    async def _claim_script(self, args: list[Any]) -> Any:
        try:
            return await self._run("claim", "claiming tasks", [self.tasks_key], args)
        except CheckpointError as exc:
            if "NOGROUP" not in str(exc):
                raise
        # The server lost the group (restarted without its data, or keys deleted).
        await self._ensure_group()
        return await self._run("claim", "claiming tasks", [self.tasks_key], args)

    async def _read_new(self, worker: str, limit: int, block: float) -> list[tuple[Any, int, Any]]:
        """Tasks never handed out (XREADGROUP ... >), first deliveries, waiting up to
        *block* seconds for one (0: not at all)."""
        self._link.require("queue")
        command: list[bytes | str | int] = [b"XREADGROUP", b"GROUP", GROUP, worker]
        command += [b"COUNT", limit]
        if block > 0:
            command += [b"BLOCK", max(1, int(block * 1000))]
        command += [b"STREAMS", self.tasks_key, b">"]
        try:
            reply = await self._link.call("claiming tasks", lambda: self._command(command))
        except CheckpointError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self._ensure_group()  # as for the script; the next claim reads again
            return []
        entries = stream_entries(reply).get(self.tasks_key, [])
        return [(entry_id, 1, fields) for entry_id, fields in entries]

    def _claimed(self, worker: str, entry_id: Any, deliveries: int, fields: Any) -> Claimed:
        task_id = from_bytes(entry_id, "entry id")
        self._holders[task_id] = worker
        fields = entry_fields(fields)
        return Claimed(
            task_id,
            deliveries,
            entry_payload(fields),
            entry_field(fields, b"run") or None,
            entry_field(fields, b"node") or None,
        )

    async def extend(self, task_ids: list[str], lease: float) -> None:
        by_worker: dict[str, list[str]] = {}
        for task_id in task_ids:
            worker = self._holders.get(task_id)
            if worker is not None:
                by_worker.setdefault(worker, []).append(task_id)
        for worker, ids in by_worker.items():
            await self._run("extend", "renewing leases", [self.tasks_key], [GROUP, worker, *ids])

    async def complete(
        self,
        task_id: str,
        run_id: str,
        node_id: str,
        payload: str,
        *,
        events: list[tuple[str, str]] | None = None,
    ) -> None:
        """Remove the task and publish its completion, with the node's *events* before it,
        atomically (the script of a batch, with one task)."""
        item = Finished(task_id, run_id, node_id, payload, tuple(events or ()))
        await self._finish_many([item], f"completing node {node_id!r} of run {run_id!r}")

    async def commit_and_complete(
        self,
        task_id: str,
        run_id: str,
        record: NodeRecord,
        payload: str,
        *,
        events: list[tuple[str, str]] | None = None,
    ) -> bool:
        """Commit *record* to the journal, publish the node's *events* and complete the
        task, atomically: True.  When the node was committed before, nothing changes:
        False (the worker then completes the task with that record).  A malformed record
        in its place fails the node with a checkpoint error: the task is completed with
        that failure, True."""
        field, digest, blob = encode_node(record, self.seal.node(run_id, record))
        node_id = record.node_id
        keys = [
            self.layout.nodes(run_id),
            self.layout.blob(digest) if digest else self.layout.no_blob,
            self.layout.blobrefs,
            self.tasks_key,
            self.queued_key,
            self.completions_key,
            self.events_key,
        ]
        args = [
            to_bytes(node_id),
            field,
            digest,
            blob,
            GROUP,
            task_id,
            queued_field(run_id, node_id),
            to_bytes(payload),
            self.keep,
            *event_args(events),
        ]
        self._holders.pop(task_id, None)
        what = f"committing node {node_id!r} of run {run_id!r}"
        done = await self._run("commit_and_complete", what, keys, args)
        if done == 1:
            return True
        return await self._committed_before(Finished(task_id, run_id, node_id, payload), done)

    async def complete_many(self, items: Sequence[Finished]) -> None:
        """Complete or dead-letter *items* (with their events) in one script."""
        if items:
            await self._finish_many(items, f"completing {len(items)} tasks")

    async def commit_and_complete_many(self, items: Sequence[Finished]) -> list[bool]:
        """:meth:`commit_and_complete` for each item, in one script."""
        if not items:
            return []
        results = await self._finish_many(items, f"committing {len(items)} nodes")
        pairs = zip(items, results, strict=True)
        return [result == 1 or await self._committed_before(item, result) for item, result in pairs]

    async def _finish_many(self, items: Sequence[Finished], what: str) -> list[Any]:
        for item in items:
            self._holders.pop(item.task_id, None)
        fixed = [self.tasks_key, self.queued_key, self.completions_key, self.events_key]
        keys, args = finish_many_call(
            self.layout, self.seal, [*fixed, self.dead_key], GROUP, self.keep, items
        )
        return list(await self._run("finish_many", what, keys, args))

    async def _committed_before(self, item: Finished, raw: Any) -> bool:
        """False when *raw*, the record committed first, is sound (the worker completes
        the task with it), else True: the task is completed with a checkpoint failure."""
        reader = RedisStore.reading_through(self._link, self.prefix)
        reader.seal = self.seal
        try:
            await reader.node_from_raw(item.run_id, item.node_id, raw)
        except CheckpointError as exc:
            failed = Completion(item.run_id, item.node_id, False, None, str(exc), "checkpoint")
            payload = encode_completion(failed, self.seal)
            await self.complete(item.task_id, item.run_id, item.node_id, payload)
            return True
        return False

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
        await self._finish_many([item], f"dead-lettering node {node_id!r} of run {run_id!r}")

    async def dead_letters(self, run_id: str) -> list[dict[str, Any]]:
        client = self._link.require("queue")
        entries = await self._link.call(
            "reading dead letters", lambda: client.xrange(self.dead_key, "-", "+")
        )
        wanted = to_bytes(run_id)
        out: list[dict[str, Any]] = []
        for _entry_id, fields in entries:
            if fields.get(b"run") == wanted:
                try:
                    out.append(dead_letter_of(fields))
                except (ValueError, Malformed) as exc:
                    log.warning("skipping a malformed dead letter of run %s: %s", run_id, exc)
        return out

    async def drop_queued(self, run_id: str) -> None:
        """Remove a run's tasks that no worker has taken (the run ended without them).
        Tasks being worked on finish, and their completions go unread."""
        await self._each_chunk(run_id, "drop")

    async def redeliver(
        self,
        run_id: str,
        *,
        skip: Collection[str] = (),
        alive: Callable[[str], bool] | None = None,
    ) -> None:
        """Hand a run's taken tasks out afresh, as new entries whose delivery counts start
        again (a resume: the workers that took them may have died with the run's client;
        waiting out their leases, then counting those deliveries toward a poison task,
        would punish the node for the crash); delete those of the nodes in *skip*
        (committed: the resume reuses them); leave those held by a live worker (one of
        this process's, or one *alive* vouches for) to it.  A worker still running one
        that was handed out again commits first or finds the other's record: the journal
        keeps one."""
        live = set(self._holders.values())
        if alive is not None:
            client = self._link.require("queue")
            consumers = await self._link.call(
                "listing the workers", lambda: client.xinfo_consumers(self.tasks_key, GROUP)
            )
            for consumer in consumers:
                name = consumer["name"]
                text = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
                if alive(text):  # idle now, it may claim one before the script runs
                    live.add(text)
        extra = [str(len(skip)).encode(), *(to_bytes(n) for n in skip)]
        await self._each_chunk(run_id, "redeliver", extra + [to_bytes(n) for n in live])

    async def _each_chunk(self, run_id: str, action: str, extra: list[bytes] | None = None) -> None:
        start = "-"
        while True:
            scanned, tail = await self._run(
                "run_tasks",
                f"{action} tasks of run {run_id!r}",
                [self.tasks_key, self.queued_key],
                [GROUP, to_bytes(run_id), start, _CHUNK, action, *(extra or [])],
            )
            if int(scanned) < _CHUNK:
                return
            start = "(" + from_bytes(tail, "entry id")

    async def pending(self) -> int:
        """Tasks queued or held (for progress displays and tests)."""
        client = self._link.require("queue")
        return int(await self._link.call("counting tasks", lambda: client.xlen(self.tasks_key)))

    async def _sweep_consumers(self) -> None:
        """Forget the consumer names of departed workers (none of their tasks pending)."""
        self._next_sweep = anyio.current_time() + _CONSUMER_SWEEP
        client = self._link.require("queue")

        async def sweep() -> None:
            for consumer in await client.xinfo_consumers(self.tasks_key, GROUP):
                if consumer["pending"] == 0 and consumer["idle"] > _CONSUMER_SWEEP * 1000:
                    await client.xgroup_delconsumer(self.tasks_key, GROUP, consumer["name"])

        await self._link.call("sweeping consumers", sweep, on_response=lambda exc: None)

    # --- completions and events -----------------------------------------------------------

    async def completions(self, cursor: Any) -> tuple[list[str], Any]:
        return await self.read_completions(cursor, count=_READ_COUNT)

    async def read_completions(self, cursor: Any, *, count: int) -> tuple[list[str], Any]:
        """At most *count* completions after *cursor* (one XREAD ... COUNT), waiting up to
        ``read_block`` for one.

        While someone reads :meth:`events` too, the same read fetches the events
        published meanwhile (one round trip, woken by either) into a buffer that the next
        :meth:`events` call returns at once.  So a run's events, published by its worker
        before the node's completion, are in hand before the scheduler could see the run
        end and stop watching it.
        """
        if cursor is None:
            return [], await self._last_id(self.completions_key)
        streams = {self.completions_key: cursor}
        if self._events_wanted and self._events_upto is not None:
            streams[self.events_key] = self._events_upto
        self._events_wanted = False
        replies = await self._read(streams, self.read_block, count)
        entries = replies.get(self.completions_key, [])
        self._buffer_events(replies.get(self.events_key, []))
        if not entries:
            return [], cursor
        texts = [entry_payload(fields) for _, fields in entries]
        return texts, from_bytes(entries[-1][0], "entry id")

    async def forget_completions(self, upto: Any) -> None:
        """Nothing to do: the stream is trimmed to ``keep`` entries as completions come."""

    async def publish_events(self, events: list[tuple[str, str]]) -> None:
        if not events:
            return
        self._link.require("queue")
        head: list[bytes | str | int] = [b"XADD", self.events_key, b"MAXLEN", b"~", self.keep]
        commands: list[Command] = [
            [*head, b"*", b"run", to_bytes(run_id), b"payload", to_bytes(text)]
            for run_id, text in events
        ]

        async def publish() -> None:
            for reply in await self._link.send(commands):
                if isinstance(reply, Exception):
                    raise reply

        await self._link.call("publishing events", publish)

    async def events(self, cursor: Any) -> tuple[list[tuple[str, str]], Any]:
        return await self.read_events(cursor, count=_ALL)

    async def read_events(self, cursor: Any, *, count: int) -> tuple[list[tuple[str, str]], Any]:
        """At most *count* events after *cursor*: those the last read of completions
        fetched along, else one XREAD; what is left over waits for the next call."""
        if cursor is None:
            last = await self._last_id(self.events_key)
            self._events_upto, self._event_buffer = last, []
            return [], last
        self._events_wanted = True
        if self._events_upto is None or entry_key(self._events_upto) < entry_key(cursor):
            self._events_upto, self._event_buffer = str(cursor), []
        if not self._event_buffer:
            replies = await self._read({self.events_key: self._events_upto}, 0.0, count)
            self._buffer_events(replies.get(self.events_key, []))
        after = entry_key(cursor)
        newer = [e for e in self._event_buffer if entry_key(e[0]) > after]
        taken, self._event_buffer = newer[:count], newer[count:]
        if not taken:
            return [], cursor
        return [(run_id, text) for _, run_id, text in taken], taken[-1][0]

    def _buffer_events(self, entries: list[Any]) -> None:
        for entry_id, fields in entries:
            text_id = from_bytes(entry_id, "entry id")
            self._event_buffer.append((text_id, entry_field(fields, b"run"), entry_payload(fields)))
            self._events_upto = text_id

    async def forget_events(self, run_id: str) -> None:
        """Nothing to do: other machines may still be watching the run; the stream is
        trimmed to ``keep`` entries as events come."""

    async def run_events(self, run_id: str, cursor: str = "0") -> tuple[list[str], str]:
        """The events (JSON text) of one observed run published after *cursor* (``"0"``:
        all the stream still holds), and the new cursor: for watching a run from
        another process or machine.  Decode them with
        ``flowdsl.backends.messages.decode_event``."""
        entries = (await self._read({self.events_key: cursor}, 0.0)).get(self.events_key, [])
        wanted = to_bytes(run_id)
        texts = [entry_payload(f) for _, f in entries if entry_fields(f).get(b"run") == wanted]
        new = from_bytes(entries[-1][0], "entry id") if entries else cursor
        return texts, new

    async def watch(self, run_id: str, *, poll: float = 0.1) -> AsyncIterator[str]:
        """Every event (JSON text) of an observed run, from the oldest the stream holds,
        as it comes, until cancelled."""
        cursor = "0"
        while True:
            texts, cursor = await self.run_events(run_id, cursor)
            for text in texts:
                yield text
            if not texts:
                await anyio.sleep(poll)

    async def _last_id(self, key: str) -> str:
        client = self._link.require("queue")
        last = await self._link.call(
            "reading a stream", lambda: client.xrevrange(key, "+", "-", count=1)
        )
        return from_bytes(last[0][0], "entry id") if last else "0-0"

    async def _read(
        self, streams: dict[str, Any], block: float, count: int = _READ_COUNT
    ) -> dict[str, list[tuple[bytes, list[Any]]]]:
        self._link.require("queue")
        command: list[bytes | str | int] = [b"XREAD", b"COUNT", max(1, min(count, _READ_COUNT))]
        if block > 0:
            command += [b"BLOCK", int(block * 1000)]
        command += [b"STREAMS", *streams, *(str(cursor) for cursor in streams.values())]
        reply = await self._link.call("reading a stream", lambda: self._command(command))
        return stream_entries(reply)

    async def _command(self, command: Command) -> Any:
        """One command's reply as the server gave it (an error reply raised)."""
        [reply] = await self._link.send([command])
        if isinstance(reply, Exception):
            raise reply
        return reply
