"""One run of a flow: its id, its events as they happen, and its result."""

from __future__ import annotations

import contextlib
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

import anyio
import attrs
from anyio.streams.memory import MemoryObjectSendStream

from .. import events as ev
from .._define.dsl import Flow
from .._engine.scheduler import Plan
from .._errors import FlowError, StepFailed
from .._records import Lease, RunRecord, RunStatus, add_usage

if TYPE_CHECKING:
    from .._engine.scheduler import NodeHook
    from .context import Context

__all__ = ["Run", "before_each_node", "new_run_id", "plan_of"]


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def plan_of(flow: Flow[..., Any]) -> Plan:
    """The scheduler's plan of *flow*'s graph, made once per graph and kept on the flow."""
    plan: Plan | None = getattr(flow, "_fd_plan", None)
    if plan is None or plan.graph is not flow.graph:
        plan = Plan(flow.graph)
        flow._fd_plan = plan  # type: ignore[attr-defined]
    return plan


@attrs.define(eq=False)
class Run:
    """One run of a flow: its id, its events as they happen, and its result."""

    run_id: str
    flow: Flow[..., Any]
    context: Context = attrs.field(repr=False)
    observed: bool = attrs.field(default=False, repr=False)
    _history: list[Any] | None = attrs.field(default=None, init=False, repr=False)
    _subscribers: list[MemoryObjectSendStream[Any]] = attrs.field(
        factory=list, init=False, repr=False
    )
    _done: anyio.Event | None = attrs.field(default=None, init=False, repr=False)
    _result: Any = attrs.field(default=None, init=False, repr=False)
    _error: BaseException | None = attrs.field(default=None, init=False, repr=False)
    status: RunStatus = attrs.field(default=RunStatus.RUNNING, init=False)
    inputs: dict[str, Any] = attrs.field(factory=dict, repr=False)
    plan: Plan = attrs.field(default=None, repr=False)
    resuming: bool = attrs.field(default=False, repr=False)

    usage: dict[str, Any] | None = attrs.field(default=None, repr=False)
    # Set by the scheduler while everything the run can do waits for a signal (parked),
    # and to wake its waits when a signal is sent through this context.
    parked: bool = attrs.field(default=False, repr=False)
    waker: Callable[[], None] | None = attrs.field(default=None, repr=False)
    # The run lease (see _context/leases.py): who else drives it, while this context
    # observes; whether this context lost it while driving; the scope losing it cancels.
    holder: Lease | None = attrs.field(default=None, repr=False)
    lease_lost: bool = attrs.field(default=False, repr=False)
    lease_scope: anyio.CancelScope | None = attrs.field(default=None, repr=False)
    # The node group of this context's drive (the scheduler's), which ctx.cancel(run_id)
    # fails, and whether it did (then even a run waiting for a signal ends cancelled).
    node_group: Any = attrs.field(default=None, repr=False)
    cancelling: bool = attrs.field(default=False, repr=False)

    @property
    def flow_name(self) -> str:
        return self.flow.name

    def park(self, parked: bool) -> None:
        """The run waits only for signals now (or no longer): leaving its context does
        not wait for a parked run (see :mod:`._engine.waits`)."""
        self.parked = parked
        idle = self.context._idle
        if parked and idle is not None:
            idle.set()

    def add_usage(self, counts: dict[str, Any]) -> None:
        """Add a node's LLM usage to the run's totals (numbers are summed per key)."""
        self.usage = add_usage(self.usage, counts)

    def _watch(self) -> None:
        """Keep a history of events so that late subscribers see the run from its start."""
        self.observed = True
        if self._history is None:
            self._history = []
        if self._done is None:
            self._done = anyio.Event()

    def emit(self, event: Any) -> None:
        if self._history is not None:
            self._history.append(event)
        for stream in self._subscribers:
            try:
                stream.send_nowait(event)
            except anyio.BrokenResourceError:
                # A subscriber that stopped iterating run.events() early: drop it, the
                # run goes on.
                stream.close()
                self._subscribers = [s for s in self._subscribers if s is not stream]
        callback = self.context.on_event
        if callback is not None:
            callback(event)

    def _settle(
        self, status: RunStatus, result: Any = None, error: BaseException | None = None
    ) -> None:
        self.status = status
        self._result = result
        self._error = error
        for stream in self._subscribers:
            stream.close()
        self._subscribers.clear()
        if self._done is not None:
            self._done.set()

    async def result(self) -> Any:
        """Wait for the run to end; its result, or the :class:`StepFailed` that ended it."""
        if self._done is None:
            self._done = anyio.Event()
        if not self.status.ended:
            await self._done.wait()
        if self._error is not None:
            raise self._error
        return self._result

    async def events(self) -> AsyncIterator[Any]:
        """Every event of the run, from its start, until it ends (or is left waiting)."""
        history = list(self._history or ())
        if self.status.ended or self.status is RunStatus.WAITING:
            for event in history:
                yield event
            return
        send, receive = anyio.create_memory_object_stream[Any](math.inf)
        self._subscribers.append(send)
        # Closed however the caller stops iterating (a `break` included).
        async with receive:
            for event in history:
                yield event
            async for event in receive:
                yield event


def skip_reporter(run: Run) -> Callable[[list[str]], None]:
    """What the scheduler calls with the nodes a branch skipped: one event each."""

    def report(node_ids: list[str]) -> None:
        now = time.time()
        for node_id in node_ids:
            run.emit(ev.StepSkipped(run.run_id, node_id, now))

    return report


def stored_failure(record: RunRecord) -> BaseException:
    """What awaiting a run that ended failed or cancelled, in a store, raises."""
    error = record.error or ""
    where = f"flow {record.flow!r}, node {record.failed_node!r}: "
    if error.startswith(where):  # said once, by this error's own prefix
        error = error[len(where) :]
    return StepFailed(
        f"the run ended {record.status.value}: {error}",
        flow=record.flow,
        node=record.failed_node,
        run_id=record.run_id,
        hint=f"Resume it with `ctx.resume({record.run_id!r})`",
    )


def still_waiting(run: Run) -> BaseException:
    return FlowError(
        "the run is waiting for a signal, and its context ended",
        flow=run.flow_name,
        hint=f"Send the signal (`ctx.signal({run.run_id!r}, name, value)` or `flowdsl "
        f"signal`), then `ctx.resume({run.run_id!r})` from any process",
    )


def cancelled(run: Run) -> BaseException:
    """What awaiting a run that was cancelled here raises."""
    return StepFailed(
        "the run was cancelled",
        flow=run.flow_name,
        run_id=run.run_id,
        hint=f"Resume it with `ctx.resume({run.run_id!r})`",
    )


@contextlib.contextmanager
def before_each_node(ctx: Context, hook: NodeHook) -> Iterator[None]:
    """Inside the block, await *hook* as each node of *ctx*'s runs is dispatched.

    The typed hook :mod:`flowdsl.testing` crashes runs with; it sees every node, in real
    time and in batch mode alike, before the executor has it.
    """
    previous, ctx._before = ctx._before, hook
    try:
        yield
    finally:
        ctx._before = previous
