"""The workers' side of batch mode: a :class:`Worker` takes tasks off the broker, runs each
node with the same runner real-time mode uses, commits the node's record to the store
(first commit wins), then completes the task.  A worker that dies leaves its leases to
expire; the task goes to another worker and counts as another attempt; past the step's
retries it is dead-lettered and the run fails with that record.  :func:`serve` is what
``flowdsl worker`` runs.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import uuid
from typing import Any

import anyio
import anyio.abc

from ... import _codec, _otel
from ..._define.dsl import registered_unit
from ..._define.graph import Node, NodeKind
from ..._engine.runner import run_node_cached
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

__all__ = ["TRANSIENT", "UnknownStep", "Worker", "serve"]

log = logging.getLogger("flowdsl.batch")


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
    ) -> None:
        if concurrency < 1:
            raise ConfigError(f"worker concurrency must be at least 1, not {concurrency}")
        self.broker = broker
        self.store = store
        self.concurrency = concurrency
        self.lease = lease
        self.llm = llm
        self.local = local
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
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
                    await limiter.acquire()
                    self._held.add(item.task_id)
                    tg.start_soon(self._serve, item, limiter)

    async def _heartbeat(self) -> None:
        while True:
            await anyio.sleep(self.lease / 3)
            if self._held:
                try:
                    await self.broker.extend(sorted(self._held), self.lease)
                except TRANSIENT as exc:
                    log.warning("worker %s: cannot renew leases: %s", self.name, exc)

    async def _serve(self, item: Claimed, limiter: anyio.Semaphore) -> None:
        try:
            await self.handle(item)
        except TRANSIENT as exc:
            # The task could not be completed (the broker or store is away): its lease
            # runs out and it is handed out again; the journal keeps it from running twice.
            log.warning("worker %s: task %s left to its lease: %s", self.name, item.task_id, exc)
        finally:
            self._held.discard(item.task_id)
            limiter.release()
            self.processed += 1
            if self.on_complete is not None:
                self.on_complete()

    async def handle(self, item: Claimed) -> None:
        """Run one claimed task to its completion message.

        Whatever is wrong with one task (its message, its step, the state it reads) fails
        that task's run, never the worker: the worker goes on serving the others.
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
            await self._handle(item, task)
        except UnknownStep as exc:
            log.error("task %s of run %s refused: %s", item.task_id, task.run_id, exc)
            await self._fail(item, task.run_id, task.node_id, _bare(exc), "config", dead=True)
        except (ConfigError, CheckpointError) as exc:
            kind = "config" if isinstance(exc, ConfigError) else "checkpoint"
            log.warning("task %s of run %s failed: %s", item.task_id, task.run_id, exc)
            await self._fail(item, task.run_id, task.node_id, _bare(exc), kind)

    async def _handle(self, item: Claimed, task: TaskMessage) -> None:
        node = self._node(task)
        args, kwargs = self._arguments(task, node)
        unit = node.fn
        assert unit is not None
        if item.deliveries > 1:
            stored = await self.store.load_node(task.run_id, task.node_id)
            if stored is not None:
                # Committed by a worker that died before completing the task.
                await self._complete(item, task, stored)
                return
            if item.deliveries > unit.retries + 1:
                reason = (
                    f"handed out {item.deliveries} times; the workers running it died "
                    f"(retries={unit.retries})"
                )
                await self._fail(item, task.run_id, task.node_id, reason, "dead", dead=True)
                return
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
                first_attempt=item.deliveries,
                commit=False,
                batch=True,
            )
            record, _ = await _otel.node_span(sink, node, work, parent=task.trace)
        except StepFailed as exc:
            kind = "codec" if isinstance(exc, CodecError) else "step"
            cause = exc.__cause__
            detail = f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)
            await self._fail(
                item, task.run_id, task.node_id, f"step failed: {detail}", kind, sink.buffer
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
                return
            committed = False
        else:
            committed = await self.store.commit_node(task.run_id, record)
        if not committed:
            log.info(
                "node %s of run %s was already committed; this result is discarded",
                task.node_id,
                task.run_id,
            )
            stored = await self.store.load_node(task.run_id, task.node_id)
            record = stored if stored is not None else record
        await self._complete(item, task, record, sink.buffer if committed else [])

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
    ) -> None:
        failed = Completion(run_id, node_id, False, None, redact(error), kind)
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
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve tasks from *broker* until cancelled: what ``flowdsl worker`` runs.

    *imports* are modules to import first, so that their steps are known (the worker runs
    no others); *store* defaults to the broker's own file for the embedded SQLite queue;
    *seal* checks records and messages (a signing key's, see docs/security.md).
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
            worker = Worker(queue, journal, concurrency=concurrency, lease=lease, llm=llm)
            await worker.run(task_status=task_status)
        finally:
            with anyio.CancelScope(shield=True):
                await queue.close()
    finally:
        with anyio.CancelScope(shield=True):
            await journal.close()
