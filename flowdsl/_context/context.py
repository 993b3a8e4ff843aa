"""Contexts and runs: where a flow runs, and the handle a caller holds on one run.

A :class:`Context` chooses the executor (real time in this process, or batch through a
queue), the store that keeps the journal, the LLM provider and who hears events.  The
scheduler is the same in every context; only the executor differs.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, TypeVar

import anyio
import anyio.abc
import attrs
from anyio.streams.memory import MemoryObjectSendStream

from .. import _codec, _otel
from .. import events as ev
from .._define.dsl import Flow
from .._define.graph import Node
from .._engine.derived import journaled_value
from .._engine.dynamic import ITEM_PROGRESS
from .._engine.resume import plan_reuse
from .._engine.scheduler import Executor, Plan, RunState, drive
from .._errors import CheckpointError, CodecError, ConfigError, FlowError, StepFailed
from .._records import RunRecord, RunStatus, add_usage

__all__ = ["Context", "Run", "current_context", "run"]

R = TypeVar("R")

_CURRENT: contextvars.ContextVar[Context | None] = contextvars.ContextVar(
    "flowdsl_context", default=None
)
_DEFAULT: Context | None = None


def current_context() -> Context:
    """The context entered with ``async with``, or a process-wide real-time default."""
    ctx = _CURRENT.get()
    if ctx is not None:
        return ctx
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Context()
    return _DEFAULT


def plan_of(flow: Flow[..., Any]) -> Plan:
    plan: Plan | None = getattr(flow, "_fd_plan", None)
    if plan is None or plan.graph is not flow.graph:
        plan = Plan(flow.graph)
        flow._fd_plan = plan  # type: ignore[attr-defined]
    return plan


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


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
        """Every event of the run, from its start, until it ends."""
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


class Context:
    """Where flows run.  See the API contract for the options.

    ``async with ctx:`` opens the store's connections and makes *ctx* the current context,
    so that ``await flow(...)`` inside the block runs in it; runs started with
    :meth:`start` belong to the block, which waits for them when it ends.
    """

    def __init__(
        self,
        *,
        batch: bool = False,
        store: Any = None,
        broker: str | None = None,
        workers: int | None = None,
        llm: Any = None,
        on_event: Callable[[Any], None] | None = None,
        max_concurrency: int | None = None,
        progress: bool | None = None,
        worker_concurrency: int = 16,
        lease: float = 30.0,
    ) -> None:
        if on_event is not None and inspect.iscoroutinefunction(on_event):
            raise ConfigError(
                "on_event must be a plain function; it is called synchronously for every event",
                hint="Use `run.events()` to consume events asynchronously",
            )
        if max_concurrency is not None and max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be at least 1, not {max_concurrency}")
        if workers is not None and workers < 0:
            raise ConfigError(f"workers must be 0 or more, not {workers}")
        if (broker is not None or workers is not None) and not batch:
            raise ConfigError(
                "broker= and workers= configure batch mode",
                hint="Pass batch=True: fd.Context(batch=True, broker=...)",
            )
        self.batch = batch
        self.broker = broker
        self.workers = workers
        self.llm = llm
        self.on_event = on_event
        self.max_concurrency = max_concurrency
        self.progress = progress
        self.worker_concurrency = worker_concurrency
        if lease <= 0:
            raise ConfigError(f"lease must be a positive number of seconds, not {lease}")
        self.lease = lease
        self.store, self.queue = _open_backends(store, broker, batch=batch)
        self._executor: Executor | None = None
        self._workers: list[Any] = []
        self._started: set[Run] = set()
        self._idle: anyio.Event | None = None
        self._limiter: anyio.CapacityLimiter | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._tg_cm: Any = None
        self._token: contextvars.Token[Context | None] | None = None
        self._entered = 0
        self._users = 0
        self._active: dict[str, Run] = {}

    def __repr__(self) -> str:
        mode = "batch" if self.batch else "real-time"
        return f"<flowdsl.Context {mode} store={self.store.url!r}>"

    # --- lifetime -------------------------------------------------------------------------

    async def __aenter__(self) -> Context:
        if self._entered:
            raise ConfigError(
                "this context is already entered", hint="Enter a context once: `async with ctx:`"
            )
        await self.store.open()
        try:
            if self.queue is not None:
                await self.queue.open()
            self._setup()
            self._tg_cm = anyio.create_task_group()
            self._tg = await self._tg_cm.__aenter__()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._close_backends()
            raise
        self._token = _CURRENT.set(self)
        self._entered = 1
        try:
            await self._start_services(self._tg)
        except BaseException as exc:
            await self.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def _start_services(self, tg: anyio.abc.TaskGroup) -> None:
        """Batch mode: the completion listener and the in-process workers."""
        from .._executors.batch import BatchExecutor, Worker

        if not isinstance(self._executor, BatchExecutor):
            return
        await self._executor.start(tg)
        count = self.workers if self.workers is not None else 4
        self._workers = [
            Worker(
                self.queue,
                self.store,
                concurrency=self.worker_concurrency,
                lease=self.lease,
                llm=self.llm,
                local=True,
            )
            for _ in range(count)
        ]
        for worker in self._workers:
            self._executor.attach(worker)
            await tg.start(worker.run)

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> bool | None:
        try:
            assert self._tg_cm is not None
            assert self._tg is not None
            from_wait = False
            if et is None:
                # Runs started in the block belong to it: wait for them, then stop the
                # services (listener, in-process workers), which never end on their own.
                try:
                    # A run parked on a wait is left waiting (in the store), not awaited.
                    while any(not r.parked for r in self._started):
                        self._idle = anyio.Event()
                        await self._idle.wait()
                except BaseException as waiting:
                    et, exc, tb, from_wait = type(waiting), waiting, waiting.__traceback__, True
            self._tg.cancel_scope.cancel()
            try:
                suppressed = bool(await self._tg_cm.__aexit__(et, exc, tb))
            except BaseExceptionGroup as group:
                # The task group wraps what the block raised; the block's own error is
                # what the caller should see, not a group of one.
                if exc is not None and _only(group, exc):
                    raise exc from exc.__cause__
                raise
            if from_wait and not suppressed:
                assert exc is not None
                raise exc
            return suppressed
        finally:
            self._tg = self._tg_cm = None
            if self._token is not None:
                _CURRENT.reset(self._token)
                self._token = None
            self._entered = 0
            self._workers = []
            with anyio.CancelScope(shield=True):
                await self._close_backends()

    async def _close_backends(self) -> None:
        # A provider reopens its connections lazily, per event loop: closing here keeps
        # scripts (fd.run) from leaving sockets to the garbage collector.
        aclose = getattr(self.llm, "aclose", None)
        if aclose is not None:
            await aclose()
        if self.queue is not None:
            await self.queue.close()
        await self.store.close()

    @contextlib.asynccontextmanager
    async def _using(self) -> AsyncIterator[None]:
        """Open what a call made without ``async with ctx`` needs, for its duration."""
        if self._entered:
            yield
            return
        if self.batch:
            async with self:
                yield
            return
        if self._users == 0:
            await self.store.open()
        self._users += 1
        try:
            yield
        finally:
            self._users -= 1
            if self._users == 0:
                with anyio.CancelScope(shield=True):
                    await self._close_backends()

    def _setup(self) -> None:
        if self._executor is None:
            if self.batch:
                from .._executors.batch import BatchExecutor

                self._executor = BatchExecutor(self.queue)
            else:
                from .._executors.realtime import RealtimeExecutor

                self._executor = RealtimeExecutor(self.store, self.llm)
        if self.max_concurrency is not None and self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.max_concurrency)

    # --- running --------------------------------------------------------------------------

    async def run(
        self, flow: Flow[..., R], /, *args: Any, run_id: str | None = None, **kwargs: Any
    ) -> R:
        """Run *flow* to its result in this context."""
        _check_flow(flow)
        async with self._using():
            return await self._run(flow, args, kwargs, run_id)

    async def _run(
        self, flow: Flow[..., R], args: tuple[Any, ...], kwargs: dict[str, Any], run_id: str | None
    ) -> R:
        self._setup()
        run, fresh = await self._prepare(flow, args, kwargs, run_id, watch=False)
        if not fresh:
            return await run.result()  # type: ignore[no-any-return]
        return await self._execute(run)  # type: ignore[no-any-return]

    async def start(
        self, flow: Flow[..., Any], /, *args: Any, run_id: str | None = None, **kwargs: Any
    ) -> Run:
        """Start *flow* in the background; idempotent by *run_id*."""
        _check_flow(flow)
        if self._tg is None:
            raise ConfigError(
                "start() needs an entered context",
                flow=flow.name,
                hint="Write `async with ctx: run = await ctx.start(...)`, or use "
                "`await ctx.run(...)` to wait for the result",
            )
        run, fresh = await self._prepare(flow, args, kwargs, run_id, watch=True)
        if fresh:
            self._started.add(run)
            self._tg.start_soon(self._execute_quietly, run, name=f"flowdsl run {run.run_id}")
        return run

    async def map(
        self,
        flow: Flow[..., R],
        inputs: Iterable[Any],
        /,
        *,
        concurrency: int | None = None,
        return_exceptions: bool = False,
        run_ids: Sequence[str] | None = None,
        progress: bool | None = None,
    ) -> list[R | BaseException]:
        """One run per input; results in input order, with a progress bar on a terminal.

        Each input is the flow's single argument; for a flow of several parameters, give a
        tuple (positional) or a dict (keyword) per input.
        """
        _check_flow(flow)
        items = list(inputs)
        if run_ids is not None and len(run_ids) != len(items):
            raise ConfigError(
                f"{len(run_ids)} run ids for {len(items)} inputs",
                flow=flow.name,
                hint="Give one run id per input, or none",
            )
        calls = [_as_call(flow, item) for item in items]
        limiter = anyio.CapacityLimiter(concurrency) if concurrency else None
        show = self.progress if progress is None else progress
        async with self._using():
            return await self._map(flow, calls, run_ids, limiter, show, return_exceptions)

    async def _map(
        self,
        flow: Flow[..., R],
        calls: list[tuple[tuple[Any, ...], dict[str, Any]]],
        run_ids: Sequence[str] | None,
        limiter: anyio.CapacityLimiter | None,
        show: bool | None,
        return_exceptions: bool,
    ) -> list[R | BaseException]:
        from .progress import progress_for

        results: list[Any] = [None] * len(calls)
        with progress_for(flow.name, len(calls), show) as bar:

            async def one(i: int) -> None:
                args, kwargs = calls[i]
                rid = run_ids[i] if run_ids is not None else None
                ITEM_PROGRESS.set(bar)  # this task's runs count their maps' items on the bar
                bar.started()
                try:
                    if limiter is None:
                        results[i] = await self.run(flow, *args, run_id=rid, **kwargs)
                    else:
                        async with limiter:
                            results[i] = await self.run(flow, *args, run_id=rid, **kwargs)
                except FlowError as exc:
                    bar.failed()
                    if not return_exceptions:
                        raise
                    results[i] = exc
                else:
                    bar.done()

            try:
                async with anyio.create_task_group() as tg:
                    for i in range(len(calls)):
                        tg.start_soon(one, i)
            except BaseExceptionGroup as group:
                # Surface the first flowdsl failure itself, not a group of one.
                flow_errors, rest = group.split(FlowError)
                if rest is None and flow_errors is not None:
                    leaf = _first_leaf(flow_errors)
                    raise leaf from leaf.__cause__
                raise
        return results

    # --- internals ------------------------------------------------------------------------

    async def _prepare(
        self,
        flow: Flow[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        run_id: str | None,
        *,
        watch: bool,
    ) -> tuple[Run, bool]:
        """Make the run record, or find the existing run; ``fresh`` says whether to execute.

        An existing run is not run twice: a finished one gives its stored result, a failed
        or cancelled one its failure (resume it explicitly), and one left running by a
        process that died is resumed from its journal.
        """
        if run_id is not None and run_id in self._active:
            return self._active[run_id], False
        plan = plan_of(flow)
        inputs = flow.bind(args, kwargs)
        types = flow.input_types
        encoded: dict[str, Any] = {}
        decoded: dict[str, Any] = {}
        for name, value in inputs.items():
            try:
                data, value2 = _codec.roundtrip(value, types.get(name, Any), what=f"input {name!r}")
            except CodecError as exc:
                raise CodecError(
                    exc.problem,
                    flow=flow.name,
                    hint=f"Pass a value of the type `{flow.name}` annotates for {name!r}: "
                    "flow inputs cross the codec like step results",
                ) from exc
            encoded[name] = data
            decoded[name] = value2
        now = time.time()
        record = RunRecord(
            run_id=run_id or new_run_id(),
            flow=flow.name,
            flow_ref=flow.ref,
            fingerprint=plan.fingerprint,
            inputs=_codec.dumps(encoded),
            status=RunStatus.RUNNING,
            created_at=now,
            updated_at=now,
        )
        stored, created = await self.store.create_run(record)
        run = Run(stored.run_id, flow, self, observed=self.on_event is not None)
        run.plan = plan
        if watch:
            run._watch()
        if not created:
            _check_same_flow(stored, flow)
            if stored.status.ended:
                self._settle_from_record(run, stored)
                return run, False
            run.resuming = True
        run.inputs = decoded
        self._active[run.run_id] = run
        return run, True

    def _settle_from_record(self, run: Run, record: RunRecord) -> None:
        if record.status is RunStatus.FINISHED:
            run._settle(RunStatus.FINISHED, _decode_result(record, run.flow))
        else:
            run._settle(record.status, error=_stored_failure(record))

    async def resume(
        self, run_id: str, /, *, strict: bool = False, flow: Flow[..., Any] | None = None
    ) -> Any:
        """Finish a failed, cancelled or crashed run; return its result.

        Finished nodes are read back from the journal and never run again; nodes that were
        in flight run again (at-least-once).  Nodes whose step code, ``version`` or wiring
        changed run again with everything downstream; ``strict=True`` refuses any change
        with :class:`CheckpointError`.  *flow* defaults to the one the run record names.
        """
        async with self._using():
            self._setup()
            if run_id in self._active:
                return await self._active[run_id].result()
            record = await self.store.get_run(run_id)
            if record is None:
                raise CheckpointError(
                    f"no run {run_id!r} in store {self.store.url}",
                    hint="Check the run id (`flowdsl runs list`) and the store URL",
                )
            flow = flow if flow is not None else import_flow(record)
            _check_flow(flow)
            _check_same_flow(record, flow)
            run = Run(run_id, flow, self, observed=self.on_event is not None)
            run.plan = plan_of(flow)
            if record.status is RunStatus.FINISHED:
                self._settle_from_record(run, record)
                return await run.result()
            if strict and record.fingerprint != run.plan.fingerprint:
                raise CheckpointError(
                    f"the graph of flow {flow.name!r} changed since run {run_id!r} started",
                    flow=flow.name,
                    hint="Resume without strict=True to re-run what changed",
                )
            run.inputs = _decode_inputs(record, flow)
            run.resuming = True
            self._active[run_id] = run
            return await self._execute(run, strict=strict)

    async def signal(self, run_id: str, name: str, value: Any) -> None:
        """Send *value* as signal *name* to run *run_id* (waiting or not yet at its wait),
        from any process: a wait in it for *name* takes it (each signal once)."""
        from .signals import send_signal

        async with self._using():
            await send_signal(self.store, run_id, name, _codec.encode(value, what="the signal"))
        run = self._active.get(run_id)
        if run is not None and run.waker is not None:
            run.waker()

    async def _replay(
        self, run: Run, state: RunState, ready: list[Node], strict: bool
    ) -> list[Node]:
        """Feed the journal into *state*; return the nodes that must still run."""
        plan = run.plan
        journal = await self.store.load_nodes(run.run_id)
        reuse = plan_reuse(
            flow=run.flow_name,
            run_id=run.run_id,
            nodes=plan.nodes,
            order=plan.graph.order,
            markers=plan.markers,
            journal=journal,
            strict=strict,
        )
        if reuse.stale:
            await self.store.forget_nodes(run.run_id, list(reuse.stale))
        await self.store.update_run(
            run.run_id, status=RunStatus.RUNNING, fingerprint=plan.fingerprint
        )
        now = time.time()
        if run.observed:
            for node_id in reuse.stale:
                run.emit(
                    ev.StepInvalidated(
                        run.run_id,
                        node_id,
                        now,
                        "changed" if node_id in reuse.changed else "upstream",
                    )
                )
        pending = list(ready)
        dispatch: list[Node] = []
        while pending:
            node = pending.pop(0)
            if node.id not in reuse.reused:
                dispatch.append(node)
                continue
            value = journaled_value(run, node, journal)
            if journal[node.id].usage:
                run.add_usage(journal[node.id].usage or {})
            if run.observed:
                run.emit(ev.StepReused(run.run_id, node.id, now, "journal"))
            pending.extend(state.complete(node.id, value))
        return dispatch

    async def _execute_quietly(self, run: Run) -> None:
        try:
            await self._execute(run)
        except (StepFailed, CheckpointError):
            pass  # kept on the run; whoever awaits run.result() gets it
        finally:
            self._started.discard(run)
            if self._idle is not None and all(r.parked for r in self._started):
                self._idle.set()

    async def _execute(self, run: Run, *, strict: bool = False) -> Any:
        if _otel.configured() is None:
            return await self._drive(run, strict=strict)
        with _otel.run_span(run):  # OpenTelemetry: a span around the drive (see _otel)
            return await self._drive(run, strict=strict)

    async def _drive(self, run: Run, *, strict: bool = False) -> Any:
        flow = run.flow
        state = RunState(run.plan, run.inputs)
        assert self._executor is not None
        on_skipped = _skip_reporter(run) if run.observed else None
        watch = getattr(self._executor, "watch", None)
        if watch is not None:
            watch(run)
        try:
            if run.observed:
                run.emit(ev.RunStarted(run.run_id, flow.name, time.time(), run.resuming))
            ready = state.start()
            if run.resuming:
                ready = await self._replay(run, state, ready, strict)
                resuming = getattr(self._executor, "resuming", None)
                if resuming is not None:
                    await resuming(run)
            output = await drive(
                run,
                state,
                ready,
                self._executor,
                limiter=self._limiter,
                on_skipped=on_skipped,
                store=self.store,
            )
            data, value = _codec.roundtrip(output, flow.return_type, what="the flow's result")
        except (StepFailed, CheckpointError) as exc:
            node = exc.node
            with anyio.CancelScope(shield=True):
                await self.store.update_run(
                    run.run_id, status=RunStatus.FAILED, error=str(exc), failed_node=node
                )
            if run.observed:
                run.emit(ev.RunFailed(run.run_id, time.time(), str(exc), node))
            run._settle(RunStatus.FAILED, error=exc)
            raise
        except anyio.get_cancelled_exc_class():
            if run.parked:
                # Left waiting for a signal: it stays so in the store, for a resume.
                run._settle(RunStatus.WAITING, error=_still_waiting(run))
                raise
            with anyio.CancelScope(shield=True):
                await self.store.update_run(
                    run.run_id, status=RunStatus.CANCELLED, error="cancelled"
                )
            if run.observed:
                run.emit(ev.RunFailed(run.run_id, time.time(), "cancelled", cancelled=True))
            run._settle(RunStatus.CANCELLED, error=_cancelled(run))
            raise
        finally:
            self._active.pop(run.run_id, None)
            if watch is not None:
                self._executor.unwatch(run)  # type: ignore[attr-defined]
            ended = getattr(self._executor, "ended", None)
            if ended is not None and run.status in (RunStatus.FAILED, RunStatus.CANCELLED):
                with anyio.CancelScope(shield=True):
                    await ended(run, False)
            # A cancelled run's provider batch jobs are cancelled too, when no other run
            # has requests in them.
            cancel_batches = getattr(self.llm, "cancel_batches", None)
            if cancel_batches is not None and run.status is RunStatus.CANCELLED:
                with anyio.CancelScope(shield=True):
                    await cancel_batches(run.run_id, self.store)
        await self.store.update_run(
            run.run_id, status=RunStatus.FINISHED, result=_codec.dumps(data)
        )
        if run.observed:
            run.emit(ev.RunFinished(run.run_id, time.time(), data, run.usage))
        run._settle(RunStatus.FINISHED, value)
        return value


def import_flow(record: RunRecord) -> Flow[..., Any]:
    """The flow a run record names by ``module:qualname``."""
    import importlib

    module_name, _, qualname = record.flow_ref.partition(":")
    if "<locals>" in qualname:
        raise ConfigError(
            f"the flow of run {record.run_id!r} was defined inside a function "
            f"({record.flow_ref}), so it cannot be imported",
            flow=record.flow,
            hint="Pass the flow: `ctx.resume(run_id, flow=my_flow)`",
        )
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"cannot import the flow of run {record.run_id!r} from {record.flow_ref!r}: {exc}",
            flow=record.flow,
            hint="Make the module importable here (PYTHONPATH), or pass the flow: "
            "`ctx.resume(run_id, flow=my_flow)`",
        ) from exc
    if not isinstance(obj, Flow):
        raise ConfigError(
            f"{record.flow_ref!r} is not a flow",
            flow=record.flow,
            hint="Pass the flow: `ctx.resume(run_id, flow=my_flow)`",
        )
    return obj


def _check_same_flow(record: RunRecord, flow: Flow[..., Any]) -> None:
    if record.flow != flow.name:
        raise CheckpointError(
            f"run {record.run_id!r} exists and belongs to flow {record.flow!r}",
            flow=flow.name,
            hint="Choose another run id, or resume it with its own flow",
        )


def _decode_result(record: RunRecord, flow: Flow[..., Any]) -> Any:
    try:
        return _codec.decode(record.result or "null", flow.return_type, what="the stored result")
    except CodecError as exc:
        raise CheckpointError(
            f"the stored result of run {record.run_id!r} cannot be read: {exc.problem}",
            flow=flow.name,
            hint="The store is corrupted or the flow's return type changed",
        ) from exc


def _decode_inputs(record: RunRecord, flow: Flow[..., Any]) -> dict[str, Any]:
    try:
        data = _codec.loads(record.inputs)
        if not isinstance(data, dict):
            raise CodecError("inputs are not a JSON object")
        types = flow.input_types
        if set(data) != set(types):
            raise CodecError(
                f"the run's inputs {sorted(data)} do not match the flow's parameters "
                f"{sorted(types)}"
            )
        return {
            name: _codec.from_data(value, types.get(name, Any), what=f"input {name!r}")
            for name, value in data.items()
        }
    except CodecError as exc:
        raise CheckpointError(
            f"the stored inputs of run {record.run_id!r} cannot be read: {exc.problem}",
            flow=flow.name,
            hint="The store is corrupted, or the flow's parameters changed since the run",
        ) from exc


DEFAULT_BATCH_FILE = ".flowdsl/flowdsl.db"


def _open_backends(store: Any, broker: str | None, *, batch: bool) -> tuple[Any, Any]:
    """The store and (in batch mode) the queue a context's options name.

    Batch mode with no broker keeps its queue and its store in one SQLite file: the
    store's file if it is SQLite, else ``.flowdsl/flowdsl.db`` in the working directory.
    With a broker and no store, the journal lives on the broker's server.
    """
    from ..backends import open_store

    if not batch:
        return open_store(store), None
    from ..backends import link, open_broker

    if broker is None:
        if isinstance(store, str) and store.startswith("sqlite:"):
            broker = store
        else:
            broker = f"sqlite:///{DEFAULT_BATCH_FILE}"
    queue = open_broker(broker)
    if store is None:
        # The broker's own server keeps the journal unless told otherwise.
        store = broker
    journal = open_store(store)
    link(journal, queue)
    return journal, queue


def _check_flow(flow: Any) -> None:
    if not isinstance(flow, Flow):
        name = getattr(flow, "__name__", type(flow).__name__)
        raise ConfigError(
            f"{name!r} is not a flow",
            hint="Pass a function decorated with @fd.flow; a step runs by calling it directly",
        )


def _as_call(flow: Flow[..., Any], item: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if len(flow.signature.parameters) == 1:
        return (item,), {}
    if isinstance(item, dict):
        return (), dict(item)
    if isinstance(item, tuple | list):
        return tuple(item), {}
    raise ConfigError(
        f"input {item!r} does not fit a flow of {len(flow.signature.parameters)} parameters",
        flow=flow.name,
        hint="Give a tuple (positional) or a dict (keyword) per input",
    )


def _only(group: BaseExceptionGroup[Any], exc: BaseException) -> bool:
    """Whether *group* holds *exc* and nothing else but cancellations."""
    mine, rest = group.split(lambda e: e is exc)
    if mine is None:
        return False
    if rest is None:
        return True
    _, other = rest.split(anyio.get_cancelled_exc_class())
    return other is None


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _skip_reporter(run: Run) -> Callable[[list[str]], None]:
    def report(node_ids: list[str]) -> None:
        now = time.time()
        for node_id in node_ids:
            run.emit(ev.StepSkipped(run.run_id, node_id, now))

    return report


def _stored_failure(record: RunRecord) -> BaseException:
    return StepFailed(
        f"the run ended {record.status.value}: {record.error}",
        flow=record.flow,
        node=record.failed_node,
        run_id=record.run_id,
        hint=f"Resume it with `ctx.resume({record.run_id!r})`",
    )


def _still_waiting(run: Run) -> BaseException:
    return FlowError(
        "the run is waiting for a signal, and its context ended",
        flow=run.flow_name,
        hint=f"Send the signal (`ctx.signal({run.run_id!r}, name, value)` or `flowdsl "
        f"signal`), then `ctx.resume({run.run_id!r})` from any process",
    )


def _cancelled(run: Run) -> BaseException:
    return StepFailed(
        "the run was cancelled",
        flow=run.flow_name,
        run_id=run.run_id,
        hint=f"Resume it with `ctx.resume({run.run_id!r})`",
    )


def run(flow: Flow[..., R], /, *args: Any, **kwargs: Any) -> R:
    """Run *flow* from synchronous code and return its result.

    Inside a running event loop (a notebook cell), it runs the flow on a fresh loop in a
    helper thread; there, ``await flow(...)`` is the better spelling.
    """
    import concurrent.futures
    import functools

    backend = kwargs.pop("backend", "asyncio")
    call = functools.partial(current_context().run, flow, *args, **kwargs)
    if not _in_event_loop():
        return anyio.run(call, backend=backend)

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="flowdsl-run") as pool:
        return pool.submit(anyio.run, call, backend=backend).result()


def _in_event_loop() -> bool:
    import asyncio
    import sys

    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        pass
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_task()
            return True
        except RuntimeError:
            pass
    return False
