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

from ... import _codec, _otel
from ..._define.dsl import registered_unit
from ..._define.graph import Node, NodeKind
from ..._engine.lease import mark_alive, mark_gone, new_owner
from ..._engine.runner import describe, run_node_cached
from ..._engine.slots import Slot, running_in
from ..._errors import (
    BackendUnavailable,
    CheckpointError,
    CodecError,
    ConfigError,
    FlowError,
    StepFailed,
)
from ..._integrity import Seal
from ..._records import NodeRecord
from ..._secret import redact
from ..._tracebacks import failure_traceback
from ...backends.base import Broker, Store
from ...backends.messages import (
    Claimed,
    Completion,
    TaskMessage,
    decode_task,
    encode_completion,
    encode_event,
    peek_run_id,
)

__all__ = ["DEFAULT_MAX_DELIVERIES", "TRANSIENT", "UnknownStep", "Worker", "serve"]

log = logging.getLogger("flowdsl.batch")

#: How many times a task may be handed out (its workers dying or losing its lease each
#: time) before it is dead-lettered as a poison task.
DEFAULT_MAX_DELIVERIES: Final = 5

#: For flowdsl's own crash tests: called with (run id, node id) once a node's record is
#: committed, before its task is completed (a test SIGKILLs the worker there).
after_commit: Callable[[str, str], None] | None = None


# Errors a broker or store raises when its server is away; loops wait them out.  Never
# CheckpointError (data that is wrong) or ConfigError (a setting that is wrong): waiting
# mends neither.  (BackendUnavailable is an OSError too, as ConnectionError.)
TRANSIENT = (BackendUnavailable, OSError)


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

    ``concurrency`` tasks run at once; leases last ``lease`` seconds and are renewed while
    a task runs, so a slow but live step keeps its task.  A worker runs only the steps
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
        lease: float = 30.0,
        llm: Any = None,
        local: bool = False,
        poll_interval: float = 0.001,
        max_poll_interval: float = 0.05,
        name: str | None = None,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
    ) -> None:
        if concurrency < 1:
            raise ConfigError(f"worker concurrency must be at least 1, not {concurrency}")
        check_max_deliveries(max_deliveries)
        self.max_deliveries = max_deliveries
        self.broker = broker
        self.store = store
        self.concurrency = concurrency
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
        self._held: set[str] = set()
        self.processed = 0

    def poke(self) -> None:
        self._wake.set()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve tasks until cancelled."""
        limiter = anyio.Semaphore(self.concurrency)
        mark_alive(self.name, self)  # a resume here leaves this worker's tasks to it
        try:
            await self._run(limiter, task_status)
        finally:
            mark_gone(self.name)

    async def _run(self, limiter: anyio.Semaphore, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._heartbeat)
            task_status.started()
            idle = self.poll_interval
            while True:
                free = limiter.value
                if free == 0:
                    await limiter.acquire()
                    limiter.release()
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
                for item in claimed:
                    self._held.add(item.task_id)
                committed = await self._committed(claimed)
                for item in claimed:
                    await limiter.acquire()
                    tg.start_soon(self._serve, item, Slot(limiter), committed)

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

    async def _heartbeat(self) -> None:
        while True:
            await anyio.sleep(self.lease / 3)
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
        try:
            with running_in(slot):  # a step waiting for a provider batch job lends it
                await self.handle(item, committed)
        except TRANSIENT as exc:
            # The task could not be completed (the broker or store is away): its lease
            # runs out and it is handed out again; the journal keeps it from running twice.
            log.warning("worker %s: task %s left to its lease: %s", self.name, item.task_id, exc)
        finally:
            self._held.discard(item.task_id)
            slot.release()
            self.processed += 1
            if self.on_complete is not None:
                self.on_complete()

    async def handle(
        self, item: Claimed, committed: Mapping[tuple[str, str], NodeRecord] | None = None
    ) -> None:
        """Run one claimed task to its completion message.

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
            await self._fail(item, run_id, node_id, _bare(exc), "checkpoint", dead=True)
            return
        try:
            await self._handle(item, task, committed)
        except UnknownStep as exc:
            log.error("task %s of run %s refused: %s", item.task_id, task.run_id, exc)
            await self._fail(item, task.run_id, task.node_id, _bare(exc), "config", dead=True)
        except (ConfigError, CheckpointError) as exc:
            kind = "config" if isinstance(exc, ConfigError) else "checkpoint"
            log.warning("task %s of run %s failed: %s", item.task_id, task.run_id, exc)
            await self._fail(item, task.run_id, task.node_id, _bare(exc), kind)

    async def _handle(
        self,
        item: Claimed,
        task: TaskMessage,
        committed: Mapping[tuple[str, str], NodeRecord] | None,
    ) -> None:
        key = (task.run_id, task.node_id)
        if committed is not None and (item.run_id, item.node_id) == key:
            stored = committed.get(key)
        else:
            stored = await self.store.load_node(task.run_id, task.node_id)
        if stored is not None:
            # Committed already (by a worker that died before completing the task, or by
            # one still holding a copy of it): never run twice, whatever the delivery count.
            await self._complete(item, task, stored)
            return
        limit = task.max_deliveries or self.max_deliveries
        if item.deliveries > limit:
            reason = (
                f"a poison task: handed out {item.deliveries} times, more than "
                f"max_deliveries={limit}; every worker that took it died or lost its lease "
                "before finishing it"
            )
            await self._fail(item, task.run_id, task.node_id, reason, "dead", dead=True)
            return
        node = self._node(task)
        args, kwargs = self._arguments(task, node)
        sink = _WorkerSink(task.run_id, task.flow, task.observed)
        try:
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
            record, _ = await _otel.node_span(sink, node, work, parent=task.trace)
        except StepFailed as exc:
            kind = "codec" if isinstance(exc, CodecError) else "step"
            cause = exc.__cause__
            detail = describe(cause) if cause is not None else str(exc)
            await self._fail(
                item,
                task.run_id,
                task.node_id,
                f"step failed: {detail}",
                kind,
                sink.buffer,
                traceback=failure_traceback(exc),
            )
            return
        # A node's events reach the broker after its record is committed (a StepFinished
        # means the result is journaled) and no later than its completion (which may end
        # the run, and with it the scheduler's interest in the run's events): they go
        # with the completion (atomically where the broker `carries_events`).
        if self.broker.holds(self.store):
            # The broker keeps the journal too: commit the record and complete the task
            # in one atomic operation (first commit wins; the completion carries it).
            completion = Completion(task.run_id, task.node_id, True, record)
            payload = encode_completion(completion, self.store.seal)
            if await self.broker.commit_and_complete(
                item.task_id, task.run_id, record, payload, events=sink.buffer
            ):
                if after_commit is not None:
                    after_commit(task.run_id, task.node_id)
                return
            first = False
        else:
            first = await self.store.commit_node(task.run_id, record)
            if first and after_commit is not None:
                after_commit(task.run_id, task.node_id)
        if not first:
            log.info(
                "node %s of run %s was already committed; this result is discarded",
                task.node_id,
                task.run_id,
            )
            stored = await self.store.load_node(task.run_id, task.node_id)
            record = stored if stored is not None else record
        await self._complete(item, task, record, sink.buffer if first else [])

    async def _complete(
        self,
        item: Claimed,
        task: TaskMessage,
        record: NodeRecord,
        events: list[tuple[str, str]] | None = None,
    ) -> None:
        completion = Completion(task.run_id, task.node_id, True, record)
        payload = encode_completion(completion, self.store.seal)
        await self.broker.complete(item.task_id, task.run_id, task.node_id, payload, events=events)

    async def _fail(
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
    ) -> None:
        failed = Completion(run_id, node_id, False, None, redact(error), kind, traceback)
        payload = encode_completion(failed, self.store.seal)
        if dead:
            await self.broker.dead_letter(
                item.task_id, run_id, node_id, payload, error, events=events
            )
        else:
            await self.broker.complete(item.task_id, run_id, node_id, payload, events=events)

    def _node(self, task: TaskMessage) -> Node:
        # Only steps this process registered (imported by the operator's --import, or
        # defined here): a task is data, and what it names is never imported.
        unit = registered_unit(task.step)
        if unit is None:
            raise _unknown_step(task)
        kind = NodeKind.BRANCH if task.kind == "branch" else NodeKind.STEP
        if (kind is NodeKind.BRANCH) != (unit.kind == "branch"):
            raise CheckpointError(
                f"the task says {task.kind!r} but {task.step!r} is a {unit.kind}",
                flow=task.flow,
                node=task.node_id,
            )
        return Node(task.node_id, kind, unit.name, labels=task.labels, fn=unit)

    def _arguments(self, task: TaskMessage, node: Node) -> tuple[tuple[Any, ...], dict[str, Any]]:
        unit = node.fn
        assert unit is not None
        positional, by_name = unit.param_types
        args = tuple(
            _decode_arg(
                data, positional[i] if i < len(positional) else Any, task, f"argument {i + 1}"
            )
            for i, data in enumerate(task.args)
        )
        kwargs = {
            k: _decode_arg(v, by_name.get(k, Any), task, f"argument {k!r}")
            for k, v in task.kwargs.items()
        }
        return args, kwargs


class UnknownStep(ConfigError):
    """A task naming a step this worker has not registered: refused, dead-lettered."""


def _unknown_step(task: TaskMessage) -> UnknownStep:
    module, _, qualname = task.step.partition(":")
    where = f"step {task.step!r}"
    in_process = "in-process workers: fd.Context(batch=True, workers=N)"
    if "<locals>" in qualname:
        problem = f"{where} is defined inside a function, which a worker process cannot import"
        hint = f"Move the step to a module's top level, or run {in_process}"
    elif module == "__main__":
        problem = (
            f"{where} is defined in __main__ (a notebook or the script that started the "
            "run), which a worker process cannot import"
        )
        hint = (
            "Move the step into a module and start workers with `--import MODULE`, or run "
            + in_process
        )
    else:
        problem = f"the task names {where}, which this worker does not know"
        hint = (
            "Start the worker with `--import MODULE` for the module that defines the step "
            f"(workers import only what they are told to), or run {in_process}"
        )
    return UnknownStep(
        f"{problem}; it was refused without importing anything",
        flow=task.flow,
        node=task.node_id,
        hint=hint,
    )


def check_max_deliveries(value: object) -> None:
    if type(value) is not int or value < 1:
        raise ConfigError(
            f"max_deliveries must be a whole number of at least 1, not {value!r}",
            hint="It is how many times a task may be handed out to workers that die "
            f"before it is dead-lettered (default {DEFAULT_MAX_DELIVERIES})",
        )


def _bare(exc: FlowError) -> str:
    """An error's own words, without the flow and node the scheduler's side adds back."""
    return f"{exc.problem.rstrip('.')}. {exc.hint}" if exc.hint else exc.problem


def _decode_arg(data: Any, tp: Any, task: TaskMessage, what: str) -> Any:
    try:
        return _codec.from_data(data, tp, what=what)
    except CodecError as exc:
        raise CheckpointError(
            f"{what} cannot be decoded: {exc.problem}", flow=task.flow, node=task.node_id
        ) from exc


async def serve(
    broker: str,
    *,
    store: str | None = None,
    imports: tuple[str, ...] = (),
    concurrency: int = 16,
    lease: float = 30.0,
    llm: Any = None,
    seal: Seal | None = None,
    max_deliveries: int = DEFAULT_MAX_DELIVERIES,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve tasks from *broker* until cancelled: what ``flowdsl worker`` runs.

    *imports* are modules to import first, so that their steps are known (the worker runs
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
                lease=lease,
                llm=llm,
                max_deliveries=max_deliveries,
            )
            await worker.run(task_status=task_status)
        finally:
            with anyio.CancelScope(shield=True):
                await queue.close()
    finally:
        with anyio.CancelScope(shield=True):
            await journal.close()
