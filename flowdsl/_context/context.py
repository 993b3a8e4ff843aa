"""Contexts: where flows run.

A :class:`Context` chooses the executor (real time in this process, or batch through a
queue), the store that keeps the journal, the LLM provider and who hears events.  The
scheduler is the same in every context; only the executor differs.  A run's own handle is
:class:`~flowdsl._context.run.Run`; what a store gives back on resume is read in
:mod:`.stored`; reaching a context from plain code is :mod:`.sync`.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import anyio
import anyio.abc

from .. import _codec, _otel
from .. import events as ev
from .._define.dsl import Flow
from .._engine.lease import DEFAULT_TTL, LeaseKeeper
from .._engine.scheduler import Executor, NodeHook, RunState, drive
from .._errors import CheckpointError, ConfigError, StepFailed
from .._executors.batch import DEFAULT_MAX_DELIVERIES, BatchExecutor, Worker
from .._executors.batch.worker import DEFAULT_ASYNC_CONCURRENCY as _ASYNC
from .._executors.batch.worker import check_count
from .._executors.realtime import RealtimeExecutor
from .._records import RunRecord, RunStatus
from .._secret import redact
from .._tracebacks import failure_traceback
from .._urls import hide_credentials
from ..backends import Store
from ..llm import Provider
from .calls import (
    as_call,
    check_flow,
    flow_arguments,
    given_options,
    only_besides_cancellations,
)
from .cancel import cancel_run, record_cancelled, status_after_failure, stop_drive
from .leases import claim, keeping, observe
from .mapping import map_runs
from .options import check_leases, check_options, open_backends
from .run import (
    Run,
    before_each_node,
    new_run_id,
    plan_of,
    skip_reporter,
    still_waiting,
)
from .signals import signal_run
from .stored import (
    check_same_flow,
    decode_inputs,
    encode_inputs,
    import_flow,
    replay,
    settle_from_record,
)

__all__ = ["CURRENT", "Context", "before_each_node"]

R = TypeVar("R")

CURRENT: contextvars.ContextVar[Context | None] = contextvars.ContextVar(
    "flowdsl_context", default=None
)
"""The context entered with ``async with`` in this task (see :func:`.sync.current_context`)."""


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
        store: str | Store | None = None,
        broker: str | None = None,
        workers: int | None = None,
        llm: Provider | None = None,
        on_event: Callable[[Any], None] | None = None,
        max_concurrency: int | None = None,
        progress: bool | None = None,
        worker_concurrency: int = 16,
        worker_async_concurrency: int = _ASYNC,
        lease: float = 30.0,
        max_deliveries: int | None = None,
        run_lease: float = DEFAULT_TTL,
        signing_key: Any = None,
        old_signing_keys: Sequence[Any] = (),
    ) -> None:
        check_options(
            on_event=on_event,
            max_concurrency=max_concurrency,
            workers=workers,
            broker=broker,
            batch=batch,
        )
        self.batch = batch
        self.broker = broker
        self.workers = workers
        self.llm = llm
        self.on_event = on_event
        self.max_concurrency = max_concurrency
        self.progress = progress
        self.worker_concurrency = worker_concurrency
        self.worker_async_concurrency = worker_async_concurrency
        check_leases(lease=lease, run_lease=run_lease, max_deliveries=max_deliveries)
        check_count("async_concurrency", worker_async_concurrency)
        self.lease = lease
        self.max_deliveries = max_deliveries
        keys = (signing_key, old_signing_keys)
        self.store, self.queue = open_backends(store, broker, batch=batch, keys=keys)
        self.seal = self.store.seal
        self._leases = LeaseKeeper(self.store, ttl=run_lease)
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
        self._before: NodeHook | None = None  # see before_each_node

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
        self._token = CURRENT.set(self)
        self._entered = 1
        try:
            self._tg.start_soon(self._leases.keep, name="flowdsl run leases")
            await self._start_services(self._tg)
        except BaseException as exc:
            await self.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def _start_services(self, tg: anyio.abc.TaskGroup) -> None:
        """Batch mode: the completion listener and the in-process workers."""
        if not isinstance(self._executor, BatchExecutor):
            return
        assert self.queue is not None  # batch mode always has one
        await self._executor.start(tg)
        count = self.workers if self.workers is not None else 4
        self._workers = [
            Worker(
                self.queue,
                self.store,
                concurrency=self.worker_concurrency,
                async_concurrency=self.worker_async_concurrency,
                lease=self.lease,
                llm=self.llm,
                local=True,
                max_deliveries=self.max_deliveries or DEFAULT_MAX_DELIVERIES,
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
                if exc is not None and only_besides_cancellations(group, exc):
                    raise exc from exc.__cause__
                raise
            if from_wait and not suppressed:
                assert exc is not None
                raise exc
            return suppressed
        finally:
            self._tg = self._tg_cm = None
            if self._token is not None:
                CURRENT.reset(self._token)
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
                assert self.queue is not None  # batch mode always has one
                self._executor = BatchExecutor(
                    self.queue, store=self.store, max_deliveries=self.max_deliveries
                )
            else:
                self._executor = RealtimeExecutor(self.store, self.llm)
        if self.max_concurrency is not None and self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.max_concurrency)

    # --- running --------------------------------------------------------------------------

    async def run(
        self,
        flow: Flow[..., R],
        /,
        *args: Any,
        run_id: str | None = None,
        inputs: Mapping[str, Any] | None = None,
        wait: bool | None = None,
        **kwargs: Any,
    ) -> R:
        """Run *flow* to its result in this context.

        The flow's arguments follow it, positional or keyword; ``inputs={...}`` gives its
        keyword arguments as one mapping instead, for a flow with a parameter named like
        an option (``run_id``, ``inputs``, ``wait``).  *run_id* names the run: a finished
        run of that id gives its stored result instead of running again, and one another
        live process drives is waited for (``wait=False``: :class:`RunBusy` instead).
        """
        check_flow(flow)
        given = given_options(run_id=run_id, inputs=inputs, wait=wait)
        args, kwargs = flow_arguments(flow, args, kwargs, inputs, given=given, call="ctx.run")
        async with self._using():
            return await self._run(flow, args, kwargs, run_id, wait is not False)

    async def _run(
        self,
        flow: Flow[..., R],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        run_id: str | None,
        wait: bool = True,
    ) -> R:
        self._setup()
        run, how, record = await self._prepare(flow, args, kwargs, run_id, watch=False, wait=wait)
        if how == "observe":
            return await observe(self, run, record, strict=False)  # type: ignore[no-any-return]
        if how == "done":
            return await run.result()  # type: ignore[no-any-return]
        return await self._execute(run)  # type: ignore[no-any-return]

    async def start(
        self,
        flow: Flow[..., Any],
        /,
        *args: Any,
        run_id: str | None = None,
        inputs: Mapping[str, Any] | None = None,
        wait: bool | None = None,
        **kwargs: Any,
    ) -> Run:
        """Start *flow* in the background; idempotent by *run_id*.

        The flow's arguments are given as to :meth:`run`.  A run of that id another live
        process drives is followed, not run again (``wait=False``: :class:`RunBusy`).
        """
        check_flow(flow)
        given = given_options(run_id=run_id, inputs=inputs, wait=wait)
        args, kwargs = flow_arguments(flow, args, kwargs, inputs, given=given, call="ctx.start")
        if self._tg is None:
            raise ConfigError(
                "start() needs an entered context",
                flow=flow.name,
                hint="Write `async with ctx: run = await ctx.start(...)`, or use "
                "`await ctx.run(...)` to wait for the result",
            )
        run, how, record = await self._prepare(
            flow, args, kwargs, run_id, watch=True, wait=wait is not False
        )
        if how != "done":
            self._started.add(run)
            name = f"flowdsl run {run.run_id}"
            self._tg.start_soon(self._execute_quietly, run, record, name=name)
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
        """One run per input; results in input order, with a progress bar (terminal, notebook).

        Each input is the flow's single argument; for a flow of several parameters, give a
        tuple (positional) or a dict (keyword) per input.
        """
        check_flow(flow)
        items = list(inputs)
        if run_ids is not None and len(run_ids) != len(items):
            raise ConfigError(
                f"{len(run_ids)} run ids for {len(items)} inputs",
                flow=flow.name,
                hint="Give one run id per input, or none",
            )
        calls = [as_call(flow, item) for item in items]
        limiter = anyio.CapacityLimiter(concurrency) if concurrency else None
        show = self.progress if progress is None else progress
        async with self._using():
            return await map_runs(self, flow, calls, run_ids, limiter, show, return_exceptions)

    # --- internals ------------------------------------------------------------------------

    async def _prepare(
        self,
        flow: Flow[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        run_id: str | None,
        *,
        watch: bool,
        wait: bool = True,
    ) -> tuple[Run, str, RunRecord | None]:
        """Make the run record, or find the existing run: the run, whether to ``"drive"``
        it, ``"observe"`` it or not (``"done"``), and the record as read.  A finished run
        gives its stored result, a failed or cancelled one its failure, one another live
        process drives is observed, one left by a process that died is resumed."""
        if run_id is not None and run_id in self._active:
            return self._active[run_id], "done", None
        plan = plan_of(flow)
        encoded, decoded = encode_inputs(flow, flow.bind(args, kwargs))
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
            check_same_flow(stored, flow)
            if stored.status.ended:
                settle_from_record(run, stored)
                return run, "done", stored
            run.resuming = True
        run.inputs = decoded
        return run, await claim(self, run, stored, wait=wait), stored

    async def signal(self, run_id: str, name: str, value: Any) -> None:
        """Send *value* as signal *name* to run *run_id*, from any process: the next wait
        for *name* in the run takes it (each signal once; see ``_engine/waits.py``)."""
        async with self._using():
            await signal_run(self.store, self._active.get(run_id), run_id, name, value)

    async def cancel(self, run_id: str) -> list[str]:
        """Cancel run *run_id* from any process (a drive of it here stops too) and the provider
        batch jobs holding only its requests (``llm=``'s); their ids (see ``cancel.py``)."""
        async with self._using():
            jobs = await cancel_run(self.store, self.llm, run_id)
            await stop_drive(self._active.get(run_id))
            return jobs

    async def resume(
        self,
        run_id: str,
        /,
        *,
        strict: bool = False,
        flow: Flow[..., Any] | None = None,
        wait: bool = True,
    ) -> Any:
        """Finish a failed, cancelled or crashed run; return its result.

        Finished nodes are read back from the journal and never run again; nodes that were
        in flight run again (at-least-once).  Nodes whose step code, ``version`` or wiring
        changed run again with everything downstream; ``strict=True`` refuses any change
        with :class:`CheckpointError`.  *flow* defaults to the one the run record names.

        A run another live process drives is not driven twice: this waits for its result
        (taking over if that process dies); ``wait=False`` raises :class:`RunBusy`.
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
            check_flow(flow)
            check_same_flow(record, flow)
            run = Run(run_id, flow, self, observed=self.on_event is not None)
            run.plan = plan_of(flow)
            if record.status is RunStatus.FINISHED:
                settle_from_record(run, record)
                return await run.result()
            if strict and record.fingerprint != run.plan.fingerprint:
                raise CheckpointError(
                    f"the graph of flow {flow.name!r} changed since run {run_id!r} started",
                    flow=flow.name,
                    hint="Resume without strict=True to re-run what changed",
                )
            run.inputs = decode_inputs(record, flow)
            run.resuming = True
            how = await claim(self, run, record, wait=wait)
            if how == "observe":
                return await observe(self, run, record, strict=strict)
            if how == "done":
                return await run.result()
            return await self._execute(run, strict=strict)

    async def _execute_quietly(self, run: Run, record: RunRecord | None) -> None:
        try:  # another process holds the lease: follow it; else drive
            await (observe(self, run, record, strict=False) if run.holder else self._execute(run))
        except (StepFailed, CheckpointError):
            pass  # kept on the run; whoever awaits run.result() gets it
        finally:
            self._started.discard(run)
            if self._idle is not None and all(r.parked for r in self._started):
                self._idle.set()

    async def _execute(self, run: Run, *, strict: bool = False) -> Any:
        """Drive *run*, whose lease this context holds, to its end."""
        if self._leases.local:
            # Only this process sees the store: the lease cannot be lost, and giving it
            # up never suspends (no scope, nothing more per run: thousands run at once).
            try:
                return await self._spanned(run, strict)
            finally:
                await self._leases.release(run.run_id)
        async with keeping(self, run):
            return await self._spanned(run, strict)
        # Another process took the run over (this one stalled past its lease): it drives
        # the run now, and this one waits for its end like any observer.
        return await observe(self, run, None, strict=strict)

    async def _spanned(self, run: Run, strict: bool) -> Any:
        if _otel.configured() is None:
            return await self._drive(run, strict=strict)
        with _otel.run_span(run):  # OpenTelemetry: a span around the drive (see _otel)
            return await self._drive(run, strict=strict)

    async def _drive(self, run: Run, *, strict: bool = False) -> Any:
        flow = run.flow
        state = RunState(run.plan, run.inputs)
        assert self._executor is not None
        on_skipped = skip_reporter(run) if run.observed else None
        executor = self._executor
        executor.watch(run)
        try:
            if run.observed:
                run.emit(ev.RunStarted(run.run_id, flow.name, time.time(), run.resuming))
            ready = state.start()
            if run.resuming:
                ready, kept = await replay(self.store, run, state, ready, strict)
                await executor.resuming(run, kept)
            output = await drive(
                run,
                state,
                ready,
                self._executor,
                limiter=self._limiter,
                on_skipped=on_skipped,
                before=self._before,
                store=self.store,
            )
            data, value = _codec.roundtrip(output, flow.return_type, what="the flow's result")
        except (StepFailed, CheckpointError) as exc:
            if run.cancelling:  # ctx.cancel(run_id): raised by the run's node group
                await record_cancelled(self.store, run)
                raise
            node = exc.node
            with anyio.CancelScope(shield=True):
                status = await status_after_failure(self.store, run.run_id)
                await self.store.update_run(
                    run.run_id,
                    status=status,
                    error=redact(hide_credentials(str(exc))),
                    failed_node=node,
                    traceback=failure_traceback(exc),
                )
            if run.observed:
                run.emit(ev.RunFailed(run.run_id, time.time(), str(exc), node))
            run._settle(RunStatus.FAILED, error=exc)
            raise
        except anyio.get_cancelled_exc_class():
            if run.lease_lost:
                raise  # the run is another process's now: nothing to write, nothing to say
            if run.parked:
                # Left waiting for a signal: it stays so in the store, for a resume.
                run._settle(RunStatus.WAITING, error=still_waiting(run))
                raise
            await record_cancelled(self.store, run)
            raise
        finally:
            self._active.pop(run.run_id, None)
            executor.unwatch(run)
            if run.status in (RunStatus.FAILED, RunStatus.CANCELLED):
                with anyio.CancelScope(shield=True):
                    await executor.ended(run, False)
            # A cancelled run's provider batch jobs are cancelled too, when no other run
            # has requests in them (ctx.cancel has done it already).
            cancel_batches = getattr(self.llm, "cancel_batches", None)
            if cancel_batches and run.status is RunStatus.CANCELLED and not run.cancelling:
                with anyio.CancelScope(shield=True):
                    await cancel_batches(run.run_id, self.store)
        await self.store.update_run(
            run.run_id, status=RunStatus.FINISHED, result=_codec.dumps(data)
        )
        if run.observed:
            run.emit(ev.RunFinished(run.run_id, time.time(), data, run.usage))
        run._settle(RunStatus.FINISHED, value)
        return value
