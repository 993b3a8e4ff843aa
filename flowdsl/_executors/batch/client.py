"""The client's side of batch mode: :class:`BatchExecutor`, the executor the scheduler talks
to.  ``execute`` encodes the node's arguments into a task, enqueues it, and waits for the
completion; a listener task reads completions (and the events of observed runs) off the
broker and wakes the waiting nodes.  The scheduler does not know the difference.

On asyncio a node in flight is no task of its own: ``execute`` gives the scheduler a
future, which the listener settles with the node's outcome, and a flusher task sends the
tasks queued meanwhile.  Thousands of nodes wait at once, and a task each (its coroutine,
its context, its wake-up) cost the client more than the rest of a step.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Collection
from typing import TYPE_CHECKING, Any, TypeAlias

import anyio
import anyio.abc
import attrs
import sniffio

from ... import _codec, _otel
from ..._define.graph import Node, NodeKind
from ..._engine.lease import process_alive
from ..._engine.scheduler import Executor
from ..._errors import (
    CheckpointError,
    CodecError,
    ConfigError,
    StepCodecFailed,
    StepFailed,
)
from ..._records import NodeRecord
from ...backends.base import Broker, Store
from ...backends.messages import (
    Completion,
    decode_completion,
    decode_event,
    peek_run_id,
    task_text,
)
from .worker import TRANSIENT, Worker

__all__ = ["BatchExecutor", "RemoteError", "StepCheckpointFailed", "StepConfigFailed"]

log = logging.getLogger("flowdsl.batch")

_FORGET_EVERY = 1000  # completions read between two calls of broker.forget_completions
# Completions (or events) taken off the broker per read: a backlog is decoded and checked
# against the journal (one read of the store) a bounded batch at a time.
READ_BATCH = 500


class StepConfigFailed(StepFailed, ConfigError):
    """A step that the worker could not import or configure: both a :class:`StepFailed`
    and a :class:`ConfigError`."""


class StepCheckpointFailed(StepFailed, CheckpointError):
    """A node whose task message or state was malformed."""


class _Waiter:
    """A node waiting for its completion, where the event loop is not asyncio's (on
    asyncio a bare future of the loop does it: no event, no object of ours)."""

    __slots__ = ("_completion", "_error", "_event")

    def __init__(self, event: anyio.Event) -> None:
        self._event = event
        self._completion: Completion | None = None
        self._error: Exception | None = None

    def done(self) -> bool:
        return self._event.is_set()

    def set_result(self, completion: Completion) -> None:
        self._completion = completion
        self._event.set()

    def set_exception(self, error: Exception) -> None:
        self._error = error
        self._event.set()

    async def wait(self) -> Completion:
        await self._event.wait()
        if self._error is not None:
            raise self._error
        assert self._completion is not None
        return self._completion


if TYPE_CHECKING:
    import asyncio

    class _NodeFuture(asyncio.Future[tuple[NodeRecord, Any]]):
        key: tuple[str, str]
        run: Any
        node: Node

    AnyWaiter: TypeAlias = "_NodeFuture | _Waiter"


@functools.cache
def _node_future_type() -> type[_NodeFuture]:
    """The future of a node on asyncio (made on first use: ``import flowdsl`` does not
    import asyncio)."""
    import asyncio

    class NodeFuture(asyncio.Future):  # type: ignore[type-arg]
        __slots__ = ("_executor", "key", "node", "run")

        def __init__(self, loop: Any, executor: BatchExecutor, run: Any, node: Node) -> None:
            super().__init__(loop=loop)
            self._executor = executor
            self.key = (run.run_id, node.id)
            self.run = run
            self.node = node

        def cancel(self, msg: Any = None) -> bool:
            # Whoever cancels the node (its run's task, the scheduler's group) cancels
            # this: it waits no more, and is sent no more.
            if not self.done():
                self._executor._cancelled(self)  # type: ignore[arg-type]
            return super().cancel(msg)

    return NodeFuture  # type: ignore[return-value]


class BatchExecutor(Executor):
    """The scheduler's side of batch mode."""

    def __init__(
        self,
        broker: Broker,
        *,
        store: Store | None = None,
        poll_interval: float = 0.002,
        max_poll_interval: float = 0.05,
        max_deliveries: int | None = None,
    ) -> None:
        self.broker = broker
        # Carried in every task: how many deliveries before a poison task (None: the
        # worker's own setting).
        self.max_deliveries = max_deliveries
        # The journal a successful completion must agree with (None: not checked).
        self.store = store
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self._waiting: dict[tuple[str, str], AnyWaiter] = {}
        # The running asyncio loop, whose futures the waiting nodes await (None: another
        # event loop, an event per node).
        self._loop: Any = None
        self._future_type: Any = None
        self._flush_wanted = anyio.Event()
        self._observed: dict[str, Any] = {}  # run id -> run, for events
        self._cursor: Any = None
        self._event_cursor: Any = None
        self._wake = anyio.Event()
        self._local_workers: list[Worker] = []
        self._forget: list[str] = []  # ended observed runs whose events can go
        self._outbox: list[tuple[str, str, str]] = []  # tasks to enqueue
        self._read = 0  # completions read since the broker last forgot old ones
        self._flushing = False

    async def start(self, tg: anyio.abc.TaskGroup) -> None:
        _, self._cursor = await self.broker.completions(None)
        _, self._event_cursor = await self.broker.events(None)
        tg.start_soon(self._listen, name="flowdsl batch listener")
        if sniffio.current_async_library() == "asyncio":
            import asyncio

            self._future_type = _node_future_type()
            tg.start_soon(self._flusher, name="flowdsl batch flusher")
            self._loop = asyncio.get_running_loop()

    def attach(self, worker: Worker) -> None:
        """An in-process worker: poke it on enqueue, and let it poke us on completion."""
        self._local_workers.append(worker)
        worker.on_complete = self.poke

    def poke(self) -> None:
        self._wake.set()

    def watch(self, run: Any) -> None:
        if run.observed:
            self._observed[run.run_id] = run
            # A run resumed in the same context: its events are wanted again.
            while run.run_id in self._forget:
                self._forget.remove(run.run_id)

    async def resuming(self, run: Any, reused: Collection[str] = ()) -> None:
        """A run resumes: its tasks still queued, or held by workers that are gone with
        the run's last driver, are handed out afresh; those of the *reused* nodes
        (committed: the resume took their results from the journal) are dropped, never
        sent again; those a live worker holds are left to it."""
        await self.broker.redeliver(run.run_id, skip=reused, alive=process_alive)

    async def ended(self, run: Any, ok: bool) -> None:
        """A run ended; if it failed or was cancelled, its queued tasks are dropped."""
        if not ok:
            await self.broker.drop_queued(run.run_id)

    def unwatch(self, run: Any) -> None:
        if self._observed.pop(run.run_id, None) is not None:
            self._forget.append(run.run_id)

    def execute(
        self, run: Any, node: Node, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Awaitable[tuple[NodeRecord, Any]]:
        if self._loop is None:
            return self._execute(run, node, args, kwargs)
        # On asyncio the node is a future, settled by the listener with the node's outcome:
        # no task, no coroutine per node (the scheduler's group holds the future itself),
        # and the outbox is sent by the flusher task.
        future: _NodeFuture = self._future_type(self._loop, self, run, node)
        try:
            text = self._task_text(run, node, args, kwargs)
        except StepFailed as exc:
            future.set_exception(exc)
            return future
        self._waiting[future.key] = future
        self._outbox.append((run.run_id, node.id, text))
        if not self._flushing:
            self._flushing = True
            self._flush_wanted.set()
        return future

    async def _execute(
        self, run: Any, node: Node, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[NodeRecord, Any]:
        text = self._task_text(run, node, args, kwargs)
        key = (run.run_id, node.id)
        waiter = _Waiter(anyio.Event())
        self._waiting[key] = waiter
        try:
            self._outbox.append((run.run_id, node.id, text))
            if not self._flushing:
                await self._flush()
            completion = await waiter.wait()
        finally:
            self._waiting.pop(key, None)
        return self._outcome(run, node, completion)

    def _task_text(
        self, run: Any, node: Node, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> str:
        unit = node.fn
        assert unit is not None
        try:
            data, kw_data = _codec.arguments_to_data(args, kwargs, node.id)
        except CodecError as exc:
            raise StepCodecFailed(
                f"cannot send the node's arguments to a worker: {exc.problem}",
                flow=run.flow_name,
                node=node.id,
                run_id=run.run_id,
                hint=exc.hint,
            ) from exc
        text = task_text(
            run.run_id,
            node.id,
            run.flow_name,
            unit.ref,
            node.kind.value,
            node.labels,
            data,
            kw_data,
            run.plan.markers[node.id],
            run.observed,
            _otel.carrier(),
            self.max_deliveries,
            self.broker.seal,
        )
        return text

    def _settle(self, future: _NodeFuture, completion: Completion) -> None:
        """Give a node's future its outcome (the listener has its completion)."""
        if self._waiting.get(future.key) is future:
            del self._waiting[future.key]
        try:
            outcome = self._outcome(future.run, future.node, completion)
        except Exception as exc:
            future.set_exception(exc)
        else:
            future.set_result(outcome)

    def _cancelled(self, future: _NodeFuture) -> None:
        """A node's future is cancelled (its run failed or was cancelled): it waits no
        more, and its task is not sent if it is still in the outbox."""
        if self._waiting.get(future.key) is future:
            del self._waiting[future.key]
            run_id, node_id = future.key
            self._outbox = [t for t in self._outbox if t[0] != run_id or t[1] != node_id]

    async def _flusher(self) -> None:
        """Sends the outbox of the nodes :meth:`execute` made futures of."""
        while True:
            await self._flush_wanted.wait()
            self._flush_wanted = anyio.Event()
            await self._flush(fail_waiters=True)

    async def _flush(self, *, fail_waiters: bool = False) -> None:
        """Enqueue what the outbox holds, in as few transactions as it takes.

        Siblings made ready by one completion all reach ``execute`` in the same tick: the
        first one yields once so that the others can add theirs, then sends them all.
        """
        self._flushing = True
        try:
            # Not a cancellation point: the outbox holds other nodes' tasks, and only a
            # flush sends them.
            await anyio.lowlevel.cancel_shielded_checkpoint()
            while self._outbox:
                batch, self._outbox = self._outbox, []
                try:
                    if fail_waiters:
                        await self.broker.enqueue(batch)
                    else:
                        # A node sends its siblings' tasks, other runs' too: its own run
                        # being cancelled meanwhile must not lose theirs.
                        with anyio.CancelScope(shield=True):
                            await self.broker.enqueue(batch)
                except Exception as exc:
                    # Every node of the batch fails with the broker's error (the one that
                    # sent it too, through its waiter); the others' batches go on.
                    self._fail_batch(batch, exc)
                    continue
                for worker in self._local_workers:
                    worker.poke()
                self.poke()
        finally:
            self._flushing = False

    def _fail_batch(self, batch: list[tuple[str, str, str]], exc: Exception) -> None:
        for run_id, node_id, _ in batch:
            future = self._waiting.pop((run_id, node_id), None)
            if future is not None and not future.done():
                future.set_exception(exc)

    def _outcome(self, run: Any, node: Node, completion: Completion) -> tuple[NodeRecord, Any]:
        if completion.ok and completion.record is None:
            raise StepCheckpointFailed(
                "the worker's completion says ok but carries no record",
                flow=run.flow_name,
                node=node.id,
                run_id=run.run_id,
                hint="The queue holds data flowdsl did not write",
            )
        if completion.ok and completion.record is not None:
            record = completion.record
            try:
                if node.kind is NodeKind.BRANCH:
                    value = _codec.loads(record.value)
                    if value not in node.labels:
                        raise CodecError(f"case {value!r} is none of {list(node.labels)}")
                else:
                    assert node.fn is not None
                    value = _codec.decode(
                        record.value, node.fn.return_type, what=f"the result of {node.id!r}"
                    )
            except CodecError as exc:
                raise StepCheckpointFailed(
                    f"the worker's result cannot be read: {exc.problem}",
                    flow=run.flow_name,
                    node=node.id,
                    run_id=run.run_id,
                    hint="The queue or store holds data flowdsl did not write",
                ) from exc
            return record, value
        cls: type[StepFailed] = {
            "config": StepConfigFailed,
            "codec": StepCodecFailed,
            "checkpoint": StepCheckpointFailed,
        }.get(completion.error_kind or "", StepFailed)
        hint = None
        if completion.error_kind == "dead":
            hint = (
                "A worker process died (or stalled past its lease) each time it ran this "
                "step: find what kills it (memory, a crash in native code), or raise "
                "max_deliveries; the task is on the dead-letter list (`flowdsl runs show`)"
            )
        raise cls(
            completion.error or "failed on a worker",
            flow=run.flow_name,
            node=node.id,
            run_id=run.run_id,
            hint=hint,
        ) from RemoteError(completion.error or "", completion.traceback)

    async def _listen(self) -> None:
        idle = self.poll_interval
        while True:
            try:
                got = await self._drain()
            except TRANSIENT as exc:
                # The broker is away (restarting, unreachable): keep listening; the runs
                # waiting here get their completions once it is back.
                log.warning("batch listener: %s; trying again", exc)
                await anyio.sleep(self.max_poll_interval * 10)
                continue
            if got:
                idle = self.poll_interval
                continue
            with anyio.move_on_after(idle if self._waiting else self.max_poll_interval):
                await self._wake.wait()
            if self._wake.is_set():
                self._wake = anyio.Event()
                idle = self.poll_interval
            else:
                idle = min(idle * 2, self.max_poll_interval)

    async def _drain(self) -> bool:
        texts, self._cursor = await self.broker.read_completions(self._cursor, count=READ_BATCH)
        self._read += len(texts)
        if self._read >= _FORGET_EVERY:
            # Completions are read, not removed: let the broker drop old ones now and then.
            self._read = 0
            await self.broker.forget_completions(self._cursor)
        accepted: list[tuple[AnyWaiter, Completion]] = []
        seal, waiting = self.broker.seal, self._waiting
        for text in texts:
            try:
                completion = decode_completion(text, seal)
            except CheckpointError as exc:
                run_id = peek_run_id(text)
                log.error("refusing a completion (run %s): %s", run_id, exc)
                continue
            waiter = waiting.get((completion.run_id, completion.node_id))
            if waiter is not None and not waiter.done():
                accepted.append((waiter, completion))
        if self.store is not None and any(_journaled(c) for _, c in accepted):
            accepted = await self._agreeing(accepted)
        # Events before completions: a node's events are published no later than its
        # completion, and a waiter woken first may end its run and stop watching it before
        # the run's last events are delivered.
        while self._forget:
            await self.broker.forget_events(self._forget.pop())
        while self._observed:
            # Every event published so far, in batches: those of the nodes completed here
            # were published before their completions.
            events, self._event_cursor = await self.broker.read_events(
                self._event_cursor, count=READ_BATCH
            )
            for run_id, text in events:
                run = self._observed.get(run_id)
                if run is None:
                    continue
                try:
                    run.emit(decode_event(text))
                except (CodecError, Exception) as exc:  # an event is a report: never fatal
                    log.warning("dropping a malformed event of run %s: %s", run_id, exc)
            if len(events) < READ_BATCH:
                break
        for waiter, completion in accepted:
            # Not if its node was cancelled meanwhile, or a copy of the completion came
            # first (a redelivered task's).
            if waiter.done():
                continue
            if isinstance(waiter, _Waiter):
                waiter.set_result(completion)
            else:
                self._settle(waiter, completion)
        return bool(texts)

    async def _agreeing(
        self, accepted: list[tuple[AnyWaiter, Completion]]
    ) -> list[tuple[AnyWaiter, Completion]]:
        """The completions that agree with the journal.

        A worker commits a node's record before it completes the task, so a successful
        completion's record is in the journal by the time it is read: one that is not, or
        that differs, was not written by a worker (or the journal was changed).  Without
        a record the completion is refused and the node goes on waiting for its worker's;
        with a different record the node fails with a CheckpointError.
        """
        store = self.store
        assert store is not None
        keys = [(c.run_id, c.node_id) for _, c in accepted if _journaled(c)]
        results: dict[tuple[str, str], NodeRecord | BaseException | None]
        try:
            # One read for the whole batch (one pipeline, one SELECT, pipelined KV gets).
            # The completions were verified (their checks hold): a journaled record the
            # same as the one its completion carries needs no second verification.
            sealed = {(c.run_id, c.node_id): c.record for _, c in accepted if c.record is not None}
            found = await store.lookup_nodes(keys, expected=sealed)
            results = {key: found.get(key) for key in keys}
        except CheckpointError:
            # A record that cannot be read fails its node alone: read them one by one
            # to tell which.
            results = {}

            async def read(key: tuple[str, str]) -> None:
                try:
                    results[key] = await store.load_node(*key)
                except CheckpointError as exc:
                    results[key] = exc

            async with anyio.create_task_group() as tg:
                for key in keys:
                    tg.start_soon(read, key)
        out = []
        for waiter, completion in accepted:
            if not _journaled(completion):
                # A failure, or an "ok" without a record (refused by _outcome).
                out.append((waiter, completion))
                continue
            journaled = results.get((completion.run_id, completion.node_id))
            if journaled is completion.record:
                # The store found the very record the completion carries (see
                # lookup_nodes' *expected*): it agrees, and there is nothing to take from it.
                out.append((waiter, completion))
            elif isinstance(journaled, BaseException):
                error = f"the journal cannot be read: {journaled}"
                out.append((waiter, _refused(completion, error)))
            elif journaled is None:
                log.error(
                    "refusing a completion of node %r of run %r: the journal has no record "
                    "of it (a forged completion?)",
                    completion.node_id,
                    completion.run_id,
                )
            elif not _same(journaled, completion.record):
                error = (
                    "the completion disagrees with the journal's record of the node (the "
                    "queue or the store was tampered with)"
                )
                log.error("node %r of run %r: %s", completion.node_id, completion.run_id, error)
                out.append((waiter, _refused(completion, error)))
            else:
                out.append((waiter, attrs.evolve(completion, record=journaled)))
        return out


def _journaled(completion: Completion) -> bool:
    """Whether *completion* says a record was committed (so the journal must have it)."""
    return completion.ok and completion.record is not None


def _same(journaled: NodeRecord, sent: NodeRecord | None) -> bool:
    if sent is None or sent.attempts != journaled.attempts or sent.code != journaled.code:
        return False
    if sent.value == journaled.value:
        return True
    # A store may keep a value's text in another spelling (SQLite escapes lone surrogates).
    try:
        return bool(_codec.loads(sent.value) == _codec.loads(journaled.value))
    except CodecError:
        return False


def _refused(completion: Completion, error: str) -> Completion:
    return Completion(completion.run_id, completion.node_id, False, None, error, "checkpoint")


class RemoteError(Exception):
    """The description of an exception raised in a worker process, and its traceback as
    the worker formatted it (``remote_traceback``, kept with the failed run)."""

    def __init__(self, description: str, remote_traceback: str | None = None) -> None:
        super().__init__(description)
        self.remote_traceback = remote_traceback
