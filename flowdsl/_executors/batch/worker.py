"""The workers' side of batch mode: a :class:`Worker` takes tasks off the broker, runs each
node with the same runner real-time mode uses, commits the node's record to the store
(first commit wins), then completes the task.  :func:`serve` is what ``flowdsl worker``
runs.

Before it runs anything, a worker reads the journal for the tasks it has just claimed (one
read for the lot): a node whose record is committed is never run again, however many
times its task is handed out, and whatever a resume did to its delivery count; its task is
completed with the committed record.  That closes the window between a worker's commit
and its acknowledgement: a worker killed there leaves a task whose next taker finds the
record.

A worker holds up to ``async_concurrency`` tasks at once (default 1000): async steps
waiting on I/O (an LLM call) cost a task and a few kilobytes each, so a high limit lets
one worker keep hundreds of calls in flight.  Steps that are plain functions run in
threads, ``concurrency`` at a time (default 16); while sync steps come, the worker takes
only as many tasks as can soon have a thread, so that it does not hoard sync work other
workers could do.  It fetches as many tasks as it has room for in one broker call, and
hands finished ones to a :class:`~.finisher.Finisher`, which commits and completes them
many at a time.

A worker that dies leaves its leases to expire; the task goes to another worker.  That is
not the step's failure: ``retries`` count the step's own exceptions, afresh on each
delivery.  A task handed out more than ``max_deliveries`` times (the run's setting, else
the worker's) is a poison task: some input kills every worker that takes it, so it is
dead-lettered unrun and the run fails with an error that says so.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import anyio
import anyio.abc

from ... import _otel
from ..._define.dsl import registered_unit
from ..._define.graph import Node, NodeKind
from ..._engine.lease import mark_alive, mark_gone, new_owner
from ..._engine.runner import describe, run_node_cached
from ..._engine.slots import Slot, occupy
from ..._errors import CheckpointError, CodecError, ConfigError, StepFailed
from ..._integrity import Seal
from ..._records import NodeRecord
from ..._secret import redact
from ..._tracebacks import failure_traceback
from ...backends.base import Broker, Store
from ...backends.messages import (
    Claimed,
    Completion,
    Finished,
    TaskMessage,
    decode_task,
    encode_completion,
    encode_event,
    peek_run_id,
)
from .collector import tuned_collector
from .completions import ok_completion
from .finisher import TRANSIENT, Finisher
from .pool import TaskPool
from .refusals import (
    DEFAULT_MAX_DELIVERIES,
    UnknownStep,
    bare,
    check_count,
    check_max_deliveries,
    decode_args,
    unknown_step,
)

__all__ = [
    "DEFAULT_ASYNC_CONCURRENCY",
    "DEFAULT_MAX_DELIVERIES",
    "TRANSIENT",
    "UnknownStep",
    "Worker",
    "check_count",
    "check_max_deliveries",
    "serve",
]

log = logging.getLogger("flowdsl.batch")

#: Tasks a worker holds at once by default: async steps waiting on I/O, mostly.
DEFAULT_ASYNC_CONCURRENCY: Final = 1000

#: For flowdsl's own crash tests: called with the (run id, node id) pairs a batch
#: committed first, once that one write is done and before its tasks are completed (a
#: test SIGKILLs the worker there).
after_commit: Callable[[Sequence[tuple[str, str]]], None] | None = None


def _after_commit(committed: Sequence[tuple[str, str]]) -> None:
    if after_commit is not None:
        after_commit(committed)


class _WorkerSink:
    """Collects the events of an observed node on a worker, for the broker."""

    __slots__ = ("buffer", "flow_name", "observed", "run_id")

    def __init__(self, run_id: str, flow_name: str, observed: bool) -> None:
        self.run_id = run_id
        self.flow_name = flow_name
        self.observed = observed
        self.buffer: list[tuple[str, str]] = []

    def emit(self, event: Any) -> None:
        self.buffer.append((self.run_id, encode_event(event)))


class Worker:
    """Takes tasks off a broker and runs them.

    Up to ``async_concurrency`` tasks are held at once, of which ``concurrency`` sync
    steps run in threads; leases last ``lease`` seconds and are renewed while a task is
    held, so a slow but live step keeps its task.  A worker runs only the steps
    registered in this process (defined in it, notebooks included, or in the modules it
    was told to import): a task naming any other is refused without importing anything
    and dead-lettered.  ``local`` says the worker runs inside a context (in-process).
    """

    def __init__(
        self,
        broker: Broker,
        store: Store,
        *,
        concurrency: int = 8,
        async_concurrency: int = DEFAULT_ASYNC_CONCURRENCY,
        lease: float = 30.0,
        llm: Any = None,
        local: bool = False,
        poll_interval: float = 0.001,
        max_poll_interval: float = 0.05,
        name: str | None = None,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
    ) -> None:
        check_count("concurrency", concurrency)
        check_count("async_concurrency", async_concurrency)
        check_max_deliveries(max_deliveries)
        self.max_deliveries = max_deliveries
        self.broker = broker
        self.store = store
        self.concurrency = concurrency
        self.async_concurrency = async_concurrency
        self.lease = lease
        self.llm = llm
        self.local = local
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        # Named as a lease owner is (host, pid, start time...): a resume on this machine
        # can tell whether the worker holding a task still runs (see BatchExecutor).
        self.name = name or str(new_owner())
        self.on_complete: Any = None
        self._wake = anyio.Event()
        # Each task held, from its claim to its acknowledgement, and the slot it holds in
        # _capacity (async_concurrency of them); a step waiting for a provider batch job
        # lends its slot back meanwhile (_engine.slots), so the worker takes others.
        self._held: dict[str, Slot] = {}
        self._capacity = anyio.Semaphore(async_concurrency)
        self._room = anyio.Event()  # set when the sync steps' room may have grown
        self._threads = anyio.Semaphore(concurrency)
        self.waiting_for_thread = 0
        self._sync_last = True  # the kind of the last step to start (see _room_for)
        self._unsorted: set[str] = set()  # claimed tasks whose kind of step is not known yet
        self.processed = 0
        self.finisher = Finisher(
            broker, store, name=self.name, on_commit=_after_commit, released=self._release
        )

    @property
    def held(self) -> int:
        """Tasks this worker holds: running, waiting for a thread or being finished."""
        return len(self._held)

    def poke(self) -> None:
        self._wake.set()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve tasks until cancelled."""
        mark_alive(self.name, self)  # a resume here leaves this worker's tasks to it
        try:
            async with anyio.create_task_group() as tg:
                pool = TaskPool(tg)
                tg.start_soon(self._heartbeat, pool)
                tg.start_soon(self.finisher.run)
                task_status.started()
                await self._fetch(pool)
        finally:
            mark_gone(self.name)

    def _room_for(self) -> int:
        """How many tasks to fetch now.  While the last step to start was a sync one (and
        before any started), no more than can take a thread soon: a worker does not hoard
        sync tasks that other workers could run."""
        room = self._capacity.value
        if self._sync_last:
            waiting = self.waiting_for_thread + len(self._unsorted)
            room = min(room, self.concurrency - waiting)
        return room

    async def _fetch(self, pool: TaskPool) -> None:
        idle = self.poll_interval
        while True:
            free = self._room_for()
            if free <= 0:
                if self._capacity.value == 0:  # until a slot is free (or lent)
                    await self._capacity.acquire()
                    self._capacity.release()
                else:  # until sync steps take threads
                    self._room = room = anyio.Event()
                    await room.wait()
                continue
            try:
                claimed = await self.broker.claim(self.name, free, self.lease)
            except TRANSIENT as exc:
                log.warning("worker %s: %s; trying again", self.name, exc)
                await anyio.sleep(self.max_poll_interval * 10)
                continue
            if not claimed:
                with anyio.move_on_after(idle):
                    await self._wake.wait()
                if self._wake.is_set():
                    self._wake = anyio.Event()
                    idle = self.poll_interval
                else:
                    idle = min(idle * 2, self.max_poll_interval)
                continue
            idle = self.poll_interval
            # A delivery this worker already holds (a message handed out twice over a
            # reconnect) is being served: not again.
            fresh = {c.task_id: c for c in claimed if c.task_id not in self._held}
            slots = {}
            for task_id in fresh:
                try:
                    self._capacity.acquire_nowait()  # `free` counted them
                except anyio.WouldBlock:  # a broker that gave more than asked
                    await self._capacity.acquire()
                slots[task_id] = self._held[task_id] = Slot(self._capacity)
            self._unsorted.update(fresh)
            committed = await self._committed(list(fresh.values()))
            for task_id, item in fresh.items():
                pool.start_soon(self._serve, item, slots[task_id], committed)

    def _sorted(self, task_id: str) -> None:
        if task_id in self._unsorted:
            self._unsorted.discard(task_id)
            self._room.set()

    def _release(self, task_ids: Sequence[str]) -> None:
        for task_id in task_ids:
            slot = self._held.pop(task_id, None)
            if slot is not None:
                slot.release()
        self.processed += len(task_ids)
        self._room.set()
        if self.on_complete is not None:
            self.on_complete()

    async def _committed(
        self, claimed: Sequence[Claimed]
    ) -> Mapping[tuple[str, str], NodeRecord] | None:
        """The committed records of the claimed tasks' nodes, in one read; ``None`` when
        the read failed (each task then reads its own)."""
        keys = [(c.run_id, c.node_id) for c in claimed if c.run_id and c.node_id]
        try:
            return await self.store.lookup_nodes(keys)
        except (*TRANSIENT, CheckpointError) as exc:
            log.warning("worker %s: cannot read the journal at once: %s", self.name, exc)
            return None

    async def _heartbeat(self, pool: TaskPool) -> None:
        while True:
            await anyio.sleep(self.lease / 3)
            pool.trim()
            if self._held:
                try:
                    await self.broker.extend(sorted(self._held), self.lease)
                except TRANSIENT as exc:
                    log.warning("worker %s: cannot renew leases: %s", self.name, exc)

    async def _serve(
        self,
        item: Claimed,
        slot: Slot,
        committed: Mapping[tuple[str, str], NodeRecord] | None,
    ) -> None:
        finished = None
        # The job runs in a context of its own (see TaskPool): a step waiting for a
        # provider batch job lends the slot from there.
        occupy(slot)
        try:
            finished = await self.settle(item, committed)
        except TRANSIENT as exc:
            # The task could not be run (the store is away): its lease runs out and it is
            # handed out again; the journal keeps it from running twice.
            log.warning("worker %s: task %s left to its lease: %s", self.name, item.task_id, exc)
        finally:
            self._sorted(item.task_id)
            if finished is None:
                self._release([item.task_id])
            else:
                self.finisher.put(finished)

    async def handle(
        self, item: Claimed, committed: Mapping[tuple[str, str], NodeRecord] | None = None
    ) -> None:
        """Run one claimed task to its completion, alone (not in a batch)."""
        await self.finisher.finish([await self.settle(item, committed)])

    async def settle(
        self, item: Claimed, committed: Mapping[tuple[str, str], NodeRecord] | None = None
    ) -> Finished:
        """Run one claimed task; what to finish it with (see :class:`Finisher`).

        *committed* holds the journal's records read for a batch of claimed tasks (see
        :meth:`_committed`); without it, the task's own node is looked up.  Whatever is
        wrong with one task (its message, its step, the state it reads) fails that task's
        run, never the worker: the worker goes on serving the others.
        """
        try:
            task = decode_task(item.payload, self.store.seal)
        except CheckpointError as exc:
            # Malformed, or not written by a client with this worker's key: never run,
            # dead-lettered so that a person can see it.
            run_id = item.run_id or peek_run_id(item.payload) or "?"
            node_id = item.node_id or exc.node or "?"
            log.error("task %s refused: %s", item.task_id, exc)
            return self._fail(item, run_id, node_id, bare(exc), "checkpoint", dead=True)
        try:
            return await self._handle(item, task, committed)
        except UnknownStep as exc:
            log.error("task %s of run %s refused: %s", item.task_id, task.run_id, exc)
            return self._fail(item, task.run_id, task.node_id, bare(exc), "config", dead=True)
        except (ConfigError, CheckpointError) as exc:
            kind = "config" if isinstance(exc, ConfigError) else "checkpoint"
            log.warning("task %s of run %s failed: %s", item.task_id, task.run_id, exc)
            return self._fail(item, task.run_id, task.node_id, bare(exc), kind)

    async def _handle(
        self,
        item: Claimed,
        task: TaskMessage,
        committed: Mapping[tuple[str, str], NodeRecord] | None,
    ) -> Finished:
        key = (task.run_id, task.node_id)
        if committed is not None and (item.run_id, item.node_id) == key:
            stored = committed.get(key)
        else:
            stored = await self.store.load_node(task.run_id, task.node_id)
        if stored is not None:
            # Committed already (by a worker that died before completing the task, or by
            # one still holding a copy of it): never run twice, whatever the delivery count.
            return self._done(item, task, stored)
        limit = task.max_deliveries or self.max_deliveries
        if item.deliveries > limit:
            reason = (
                f"a poison task: handed out {item.deliveries} times, more than "
                f"max_deliveries={limit}; every worker that took it died or lost its lease "
                "before finishing it"
            )
            return self._fail(item, task.run_id, task.node_id, reason, "dead", dead=True)
        node = self._node(task)
        args, kwargs = decode_args(task, node.fn)
        sink = _WorkerSink(task.run_id, task.flow, task.observed)
        try:
            self._sync_last = node.fn is not None and not node.fn.is_async
            if not self._sync_last:
                self._sorted(item.task_id)
                record = await self._run(task, node, args, kwargs, sink)
            else:
                # A plain function takes one of the worker's threads.
                self.waiting_for_thread += 1
                self._sorted(item.task_id)
                try:
                    await self._threads.acquire()
                finally:
                    self.waiting_for_thread -= 1
                    self._room.set()
                try:
                    record = await self._run(task, node, args, kwargs, sink)
                finally:
                    self._threads.release()
        except StepFailed as exc:
            kind = "codec" if isinstance(exc, CodecError) else "step"
            cause = exc.__cause__
            detail = describe(cause) if cause is not None else str(exc)
            error = f"step failed: {detail}"
            return self._fail(
                item,
                task.run_id,
                task.node_id,
                error,
                kind,
                sink.buffer,
                traceback=failure_traceback(exc),
            )
        # A node's events reach the broker after its record is committed (a StepFinished
        # means the result is journaled) and no later than its completion (which may end
        # the run, and with it the scheduler's interest in the run's events): they go
        # with the completion (atomically where the broker `carries_events`).
        return self._done(item, task, record, sink.buffer, commit=True)

    async def _run(
        self,
        task: TaskMessage,
        node: Node,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        sink: _WorkerSink,
    ) -> NodeRecord:
        work = run_node_cached(
            self.store,
            sink,
            node,
            args,
            kwargs,
            marker=task.marker,
            llm=self.llm,
            commit=False,
            batch=True,
        )
        if _otel.configured() is None:  # nobody traces: no span, not even its frame
            record, _ = await work
        else:
            record, _ = await _otel.node_span(sink, node, work, parent=task.trace)
        return record

    def _done(
        self,
        item: Claimed,
        task: TaskMessage,
        record: NodeRecord,
        events: list[tuple[str, str]] | None = None,
        *,
        commit: bool = False,
    ) -> Finished:
        payload = ok_completion(task.run_id, task.node_id, record, self.store.seal)
        return Finished(
            item.task_id,
            task.run_id,
            task.node_id,
            payload,
            tuple(events or ()),
            record if commit else None,
        )

    def _fail(
        self,
        item: Claimed,
        run_id: str,
        node_id: str,
        error: str,
        kind: str,
        events: list[tuple[str, str]] | None = None,
        *,
        dead: bool = False,
        traceback: str | None = None,
    ) -> Finished:
        failed = Completion(run_id, node_id, False, None, redact(error), kind, traceback)
        payload = encode_completion(failed, self.store.seal)
        return Finished(
            item.task_id,
            run_id,
            node_id,
            payload,
            tuple(events or ()),
            dead=error if dead else None,
        )

    def _node(self, task: TaskMessage) -> Node:
        # Only steps this process registered (imported by the operator's --import, or
        # defined here): a task is data, and what it names is never imported.
        unit = registered_unit(task.step)
        if unit is None:
            raise unknown_step(task)
        kind = NodeKind.BRANCH if task.kind == "branch" else NodeKind.STEP
        if (kind is NodeKind.BRANCH) != (unit.kind == "branch"):
            raise CheckpointError(
                f"the task says {task.kind!r} but {task.step!r} is a {unit.kind}",
                flow=task.flow,
                node=task.node_id,
            )
        return Node(task.node_id, kind, unit.name, labels=task.labels, fn=unit)


async def serve(
    broker: str,
    *,
    store: str | None = None,
    imports: tuple[str, ...] = (),
    concurrency: int = 16,
    async_concurrency: int = DEFAULT_ASYNC_CONCURRENCY,
    lease: float = 30.0,
    llm: Any = None,
    seal: Seal | None = None,
    max_deliveries: int = DEFAULT_MAX_DELIVERIES,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve tasks from *broker* until cancelled: what ``flowdsl worker`` runs.

    *concurrency* sync steps run at once (in threads), of up to *async_concurrency* tasks
    held; *imports* are modules to import first, so that their steps are known (the worker runs
    no others); *store* defaults to the broker's own file for the embedded SQLite queue;
    *seal* checks records and messages (a signing key's, see docs/security.md);
    *max_deliveries* is for the tasks of runs that do not set their own
    (``fd.Context(max_deliveries=...)``).
    """
    from ...backends import link, open_broker, open_store

    for module in imports:
        try:
            importlib.import_module(module)
        except Exception as exc:
            raise ConfigError(
                f"cannot import {module!r}: {type(exc).__name__}: {exc}",
                hint="Check the module name and PYTHONPATH of the worker",
            ) from exc
    if store is None:
        store = broker  # the broker's own server keeps the journal, as for the clients
    queue = open_broker(broker)
    journal = open_store(store)
    if seal is not None:
        journal.seal = seal
    link(journal, queue)
    await journal.open()
    try:
        await queue.open()
        try:
            worker = Worker(
                queue,
                journal,
                concurrency=concurrency,
                async_concurrency=async_concurrency,
                lease=lease,
                llm=llm,
                max_deliveries=max_deliveries,
            )
            with tuned_collector():
                await worker.run(task_status=task_status)
        finally:
            with anyio.CancelScope(shield=True):
                await queue.close()
    finally:
        with anyio.CancelScope(shield=True):
            await journal.close()
