"""What the service does, apart from gRPC: the runs it drives through one open Context.

:class:`RunService` owns an ``fd.Context`` (real time, or batch through a broker) and a
task group.  Each run it drives has a :class:`_Driver`: the task that runs or resumes it,
inside a cancel scope of its own so that one run can be cancelled.  Events reach the run's
:class:`~flowdsl.service._log.RunLog` through the context's ``on_event``.

Errors are :class:`ServiceError` with the gRPC status name the server layer sends.

One driver per run, across replicas: every drive goes through the context's run lease
(``_engine/lease.py``), taken with ``wait=False``.  A run whose lease another live process
holds (another replica on the same store) raises ``RunBusy`` and is left to it: this
service neither drives nor follows it.  When the service starts, and every
``take_over_every`` seconds after, it offers to drive every unfinished (running or
waiting) run of a flow it serves; the lease decides: a run whose driver died (its process
gone, on this machine; its lease run out, from another) is taken up and resumed from its
journal, the others are left to their drivers.  When it stops, runs that are still going
are put back as running, journal intact, lease given up, for another service to take up.

A driver's log is made before it drives but joins the :class:`LogBook` with the run's
first event, so a run found busy leaves no log behind: its watchers here follow it
through the store (see :meth:`RunService.watch`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import anyio
import anyio.abc
import attrs

from .. import _codec
from .. import events as ev
from .._context import Context
from .._context.cancel import cancel_run
from .._define.dsl import Flow
from .._engine.lease import (
    DEFAULT_TTL,
    describe_owner,
    mark_alive,
    mark_gone,
    new_owner,
    process_gone,
)
from .._errors import CheckpointError, CodecError, ConfigError, FlowError, RunBusy
from .._records import RunRecord, RunStatus
from ._errors import ServiceError
from ._flows import FlowRegistry
from ._log import Entry, LogBook, RunLog, history_of
from ._paging import after_cursor, decode_token, encode_token, status_filter

__all__ = ["RunService", "as_service_error"]

logger = logging.getLogger("flowdsl.service")

MAX_RUN_ID = 200
DEFAULT_PAGE = 50
MAX_PAGE = 1000

# The statuses a run has while its driver should be alive.  "waiting" comes with fd.wait_for.
_UNFINISHED = frozenset(status for status in RunStatus if status.value in ("running", "waiting"))


@attrs.define(eq=False)
class _Driver:
    """The task driving one run."""

    run_id: str
    flow: Flow[..., Any]
    scope: anyio.CancelScope = attrs.field(factory=anyio.CancelScope)
    started: anyio.Event = attrs.field(factory=anyio.Event)  # its record exists
    done: anyio.Event = attrs.field(factory=anyio.Event)
    handing_back: bool = False  # stopped by a stopping service: the run is not over
    failure: BaseException | None = None  # why it ended before the run started
    # Its log, until the run's first event adds it to the book (None after): a drive that
    # finds the run busy never adds it.
    pending: RunLog | None = None
    fresh: bool = False  # its drive began the run (a RunStarted that is not a resume)

    @property
    def busy(self) -> bool:
        """Another live process drives the run: this driver ran nothing."""
        return isinstance(self.failure, RunBusy)


class RunService:
    """The runs of the flows in *flows*, kept in *store* (and driven through *broker*)."""

    def __init__(
        self,
        flows: FlowRegistry,
        *,
        store: str | None = None,
        broker: str | None = None,
        workers: int | None = None,
        keep_logs: int = 10_000,
        poll: float = 0.5,
        take_over_every: float | None = 2.0,
        signing_key: Any = None,
        old_signing_keys: Sequence[Any] = (),
        llm: Any = None,
    ) -> None:
        self.flows = flows
        self.context = Context(
            llm=llm,  # its runs' provider: cancelling a run cancels the jobs only it holds
            store=store,
            broker=broker,
            batch=broker is not None,
            workers=workers,
            on_event=self._on_event,
            signing_key=signing_key,
            old_signing_keys=old_signing_keys,
        )
        self.store: Any = self.context.store
        self.poll = poll
        if take_over_every is not None and not take_over_every > 0:
            raise ConfigError(
                f"take_over_every must be a positive number of seconds, not {take_over_every}"
            )
        # A process-local store has no other driver whose runs could be orphaned.
        self.take_over_every = None if self.store.process_local else take_over_every
        self._logs = LogBook(keep_logs)
        self._drivers: dict[str, _Driver] = {}
        self._unserved: set[str] = set()  # runs of flows not served here, warned about
        self._tg: anyio.abc.TaskGroup | None = None
        self._accepting = False

    # --- lifetime -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[RunService]:
        """Open the context, take up orphaned runs; on the way out, hand back the rest."""
        async with self.context:
            # Read before the task group, so that an unreadable store is one plain error.
            records = await self._readable_runs()
            async with anyio.create_task_group() as tg:
                self._tg = tg
                self._accepting = True
                scanning = anyio.CancelScope()
                try:
                    await self.take_over(records)
                    if self.take_over_every is not None:
                        tg.start_soon(self._keep_taking_over, scanning, name="flowdsl take-over")
                    yield self
                finally:
                    scanning.cancel()
                    self._accepting = False
                    with anyio.CancelScope(shield=True):
                        await self._hand_back()
                    self._tg = None

    async def take_over(self, records: list[RunRecord] | None = None) -> list[str]:
        """Offer to drive every unfinished run of a served flow not driven here; the ids of
        the runs this service took up.

        The run lease decides: a run another live process drives is left to it (its
        driver here ends at once, ``RunBusy``), one whose driver is gone is resumed.
        """
        offered = []
        for record in await self.store.unfinished_runs() if records is None else records:
            if record.status not in _UNFINISHED or record.run_id in self._drivers:
                continue
            flow = self.flows.find(record.flow_ref)
            if flow is None:
                if record.run_id not in self._unserved:
                    self._unserved.add(record.run_id)
                    logger.warning(
                        "run %s of flow %s is left as it is: this service does not serve that flow",
                        record.run_id,
                        record.flow_ref,
                    )
                continue
            offered.append(await self._resume_driver(record, flow))
        taken = []
        for driver in offered:
            await driver.started.wait()
            if not driver.busy and driver.failure is None:
                taken.append(driver.run_id)
        return taken

    async def _readable_runs(self) -> list[RunRecord]:
        """The store's runs, read (and verified) once when the service starts: a record
        this service cannot read stops it there, with what to do."""
        try:
            records: list[RunRecord] = await self.store.list_runs(limit=2**62)
            return records
        except CheckpointError as exc:
            # Most often the store's records were signed with a key this service lacks.
            raise ConfigError(
                f"the service cannot read the runs in {self.store.url}: {exc.problem}",
                flow=exc.flow,
                node=exc.node,
                hint="If another key signed them, start the service with that key "
                "(--signing-key-env VAR; --old-signing-key-env VAR for a previous one)"
                + (f". Otherwise: {exc.hint}" if exc.hint else ""),
            ) from exc

    async def _keep_taking_over(self, scope: anyio.CancelScope) -> None:
        assert self.take_over_every is not None
        spent = 0.0
        with scope:
            while True:
                # A store that cannot select unfinished runs is read whole: then the scans
                # are spaced so that they take no more than a twentieth of the time.
                await anyio.sleep(max(self.take_over_every, 20 * spent))
                began = time.monotonic()
                try:
                    taken = await self.take_over()
                except FlowError as exc:
                    # A store that is away, or a record this service cannot read: it goes
                    # on serving, and the next round tries again.
                    logger.warning("taking up orphaned runs failed: %s", exc)
                    continue
                finally:
                    spent = time.monotonic() - began
                if taken:
                    logger.info("took up %d run(s) whose driver is gone: %s", len(taken), taken)

    async def drain(self, grace: float) -> None:
        """Refuse new runs and wait up to *grace* seconds for the driven ones to end."""
        self._accepting = False
        with anyio.move_on_after(grace):
            while self._drivers:
                await next(iter(self._drivers.values())).done.wait()

    async def _hand_back(self) -> None:
        drivers = list(self._drivers.values())
        for driver in drivers:
            driver.handing_back = True
            driver.scope.cancel()
        for driver in drivers:
            await driver.done.wait()

    @property
    def driving(self) -> list[str]:
        """The ids of the runs this service drives now."""
        return list(self._drivers)

    # --- the calls ------------------------------------------------------------------------

    async def start(
        self, flow_ref: str, input_json: str = "", run_id: str = ""
    ) -> tuple[RunRecord, bool]:
        """Start a run (or find the one *run_id* names); the record and whether it is new."""
        self._check_accepting()
        flow = self.flows.get(flow_ref)
        args, kwargs = self.flows.decode_call(flow, input_json)
        rid = _checked_run_id(run_id) if run_id else uuid.uuid4().hex[:16]
        driver = self._drivers.get(rid)
        record = None
        if driver is None and run_id:  # a fresh id names no run: no need to look
            record = await self.store.get_run(rid)
            driver = self._drivers.get(rid)  # it may have started while we read
        if driver is not None:
            _check_same_flow(rid, driver.flow.ref, flow)
            return await self._started(driver), False
        if record is not None:
            _check_same_flow(rid, record.flow_ref, flow)
            return record, False
        call = functools.partial(
            self.context.run, flow, *args, run_id=rid, inputs=kwargs, wait=False
        )
        driver = self._spawn(rid, flow, call)
        # Another replica may have started the same id at the same moment: then only the
        # call whose drive began the run says it was created (none, if the other
        # replica's drive took the lease first and this one's record was the new one).
        return await self._started(driver), driver.fresh

    async def get(self, run_id: str) -> RunRecord:
        return await self._record(run_id)

    async def cancel(self, run_id: str) -> RunRecord:
        """Stop the run; cancelling a cancelled run changes nothing."""
        driver = self._drivers.get(run_id)
        if driver is not None:
            driver.scope.cancel()
            await driver.done.wait()
            return await self._record(run_id)
        record = await self._record(run_id)
        if record.status is RunStatus.CANCELLED:
            return record
        if record.status not in _UNFINISHED:
            raise ServiceError(
                f"run {run_id!r} has already {record.status.value}",
                code="FAILED_PRECONDITION",
                flow=record.flow,
                hint="Only a running or waiting run can be cancelled",
            )
        # Nobody drives it here: mark it, so that no service takes it up again, holding its
        # lease meanwhile; a run another live process drives is that process's to cancel.
        async with self._lease_of(record) as owner:
            if owner is not None:
                raise ServiceError(
                    f"run {run_id!r} is being driven by {describe_owner(owner)}, not by this "
                    "service",
                    code="FAILED_PRECONDITION",
                    flow=record.flow,
                    hint="Cancel it through the service that drives it (the replica that "
                    "started or took it up)",
                )
            await cancel_run(self.store, self.context.llm, run_id)
        log = self._logs.get(run_id)
        if log is not None:
            log.append(ev.RunFailed(run_id, _now(), "cancelled", cancelled=True))
            self._logs.settled(log)
        return await self._record(run_id)

    @contextlib.asynccontextmanager
    async def _lease_of(self, record: RunRecord) -> AsyncIterator[str | None]:
        """Hold *record*'s run lease for the block (``None``), or yield the owner of the
        live driver that holds it."""
        run_id, owner = record.run_id, str(new_owner())
        mark_alive(owner, self)  # so that a take-over in this process waits for it
        try:
            held = await self.store.acquire_lease(run_id, owner, DEFAULT_TTL)
            if held is not None and process_gone(held.owner):
                held = await self.store.acquire_lease(
                    run_id, owner, DEFAULT_TTL, replacing=held.owner
                )
            if held is not None:
                yield held.owner
                return
            try:
                yield None
            finally:
                with anyio.CancelScope(shield=True):
                    await self.store.release_lease(run_id, owner)
        finally:
            mark_gone(owner)

    async def resume(self, run_id: str) -> RunRecord:
        """Drive a failed, cancelled or orphaned run again from its journal."""
        self._check_accepting()
        driver = self._drivers.get(run_id)
        if driver is not None:
            return await self._started(driver)
        record = await self._record(run_id)
        if record.status is RunStatus.FINISHED:
            return record
        flow = self.flows.find(record.flow_ref)
        if flow is None:
            raise ServiceError(
                f"run {run_id!r} is a run of {record.flow_ref}, which this service does not serve",
                code="FAILED_PRECONDITION",
                flow=record.flow,
                hint="Start the service with --import naming the flow's module",
            )
        driver = await self._resume_driver(record, flow)
        return await self._started(driver)

    async def signal(self, run_id: str, name: str, value_json: str) -> RunRecord:
        """Deliver *value_json* to the run's ``fd.wait_for(name, ...)``."""
        deliver: Callable[..., Awaitable[Any]] | None = getattr(self.context, "signal", None)
        if deliver is None:
            raise ServiceError(
                "this flowdsl cannot deliver signals (fd.wait_for is not available)",
                code="UNIMPLEMENTED",
                hint="Upgrade flowdsl on the service's side",
            )
        record = await self._record(run_id)
        if record.status not in _UNFINISHED:
            raise ServiceError(
                f"run {run_id!r} has {record.status.value}; nothing waits for {name!r}",
                code="FAILED_PRECONDITION",
                flow=record.flow,
                hint="Signal a run that is running or waiting",
            )
        if not name:
            raise ServiceError("a signal needs a name", code="INVALID_ARGUMENT", flow=record.flow)
        try:
            value = _codec.loads(value_json.strip() or "null")
        except CodecError as exc:
            raise ServiceError(
                f"value_json is not JSON: {exc.problem}", code="INVALID_ARGUMENT", flow=record.flow
            ) from None
        try:
            await deliver(run_id, name, value)
        except FlowError as exc:
            raise as_service_error(exc) from exc
        return await self._record(run_id)

    async def page(
        self, *, status: str = "", flow: str = "", page_size: int = 0, page_token: str = ""
    ) -> tuple[list[RunRecord], str]:
        """A page of the store's runs, newest first, and the token of the next page."""
        if page_size < 0:
            raise ServiceError(f"page_size {page_size} is negative", code="INVALID_ARGUMENT")
        size = min(page_size or DEFAULT_PAGE, MAX_PAGE)
        wanted = status_filter(status)
        cursor = decode_token(page_token) if page_token else None

        def keep(record: RunRecord) -> bool:
            if wanted is not None and record.status is not wanted:
                return False
            return not flow or flow in (record.flow_ref, record.flow)

        limit = size + 1
        while True:
            records: list[RunRecord] = await self.store.list_runs(limit=limit)
            rest = records[after_cursor(records, cursor) :]
            matches = [record for record in rest if keep(record)]
            if len(matches) > size or len(records) < limit:
                break
            limit *= 4
        page = matches[:size]
        more = len(matches) > size
        return page, encode_token(page[-1]) if more and page else ""

    async def watch(self, run_id: str, after_seq: int = 0) -> AsyncIterator[Entry]:
        """The run's events after *after_seq*, as they happen, until the run ends."""
        log = self._logs.get(run_id)
        if log is None:
            log = await self._stored_log(run_id)
        async for entry in log.follow(after_seq):
            yield entry

    # --- driving --------------------------------------------------------------------------

    def _spawn(
        self,
        run_id: str,
        flow: Flow[..., Any],
        call: Callable[[], Awaitable[Any]],
        log: RunLog | None = None,
    ) -> _Driver:
        """Drive the run with *call* (a drive taken with ``wait=False``); its events go to
        *log* (a fresh one by default) from the first on."""
        assert self._tg is not None
        driver = _Driver(run_id, flow)
        self._drivers[run_id] = driver
        driver.pending = self._logs.get(run_id) or log or RunLog(run_id)
        self._tg.start_soon(self._drive, driver, call, name=f"flowdsl service run {run_id}")
        return driver

    async def _drive(self, driver: _Driver, call: Callable[[], Awaitable[Any]]) -> None:
        try:
            with driver.scope:
                await call()
        except RunBusy as exc:
            driver.failure = exc  # another process drives it: nothing ran here
        except FlowError as exc:
            # A failed run is in the store; only a failure before the run began is news.
            driver.failure = exc
        except Exception as exc:
            logger.exception("driving run %s failed", driver.run_id)
            driver.failure = exc
        finally:
            if self._drivers.get(driver.run_id) is driver:
                del self._drivers[driver.run_id]
            log = self._logs.get(driver.run_id)
            if driver.pending is None and log is not None:
                log.close()
                self._logs.settled(log)
            if driver.handing_back:
                with anyio.CancelScope(shield=True):
                    await self._put_back(driver.run_id)
            driver.started.set()
            driver.done.set()

    async def _put_back(self, run_id: str) -> None:
        """A run stopped only because the service stops: running again, for the next one."""
        try:
            record = await self.store.get_run(run_id)
            if record is not None and record.status is RunStatus.CANCELLED:
                await self.store.update_run(run_id, status=RunStatus.RUNNING)
        except FlowError:
            logger.exception("run %s could not be put back as running", run_id)

    async def _resume_driver(self, record: RunRecord, flow: Flow[..., Any]) -> _Driver:
        run_id = record.run_id
        log = self._logs.get(run_id)
        if log is None:
            # Number its events on from what a watcher may have seen of its history.
            history = history_of(record, await self.store.load_nodes(run_id))
            log = RunLog(run_id)
            for event in history:
                log.append(event)
        driver = self._drivers.get(run_id)
        if driver is not None:
            return driver
        resume = functools.partial(self.context.resume, run_id, flow=flow, wait=False)
        return self._spawn(run_id, flow, resume, log)

    async def _started(self, driver: _Driver) -> RunRecord:
        """The run's record once its driver has made it (or the reason it could not)."""
        await driver.started.wait()
        record: RunRecord | None = await self.store.get_run(driver.run_id)
        if record is None:
            failure = driver.failure or RuntimeError("the run ended before it began")
            raise as_service_error(failure) from failure
        return record

    def _on_event(self, event: Any) -> None:
        run_id = event.run_id
        driver = self._drivers.get(run_id)
        if driver is not None:
            if driver.handing_back and isinstance(event, ev.RunFailed):
                return  # the run is not over: the next service goes on with it
            if driver.pending is not None:
                # The drive took the lease: its log is the run's log from now on.
                driver.pending.reopen()
                self._logs.add(driver.pending)
                driver.pending = None
            if isinstance(event, ev.RunStarted) and not driver.started.is_set():
                driver.fresh = not event.resumed
                driver.started.set()
        log = self._logs.get(run_id) or self._logs.add(RunLog(run_id, open=True))
        log.append(event)
        if not log.open:
            self._logs.settled(log)

    # --- reading --------------------------------------------------------------------------

    async def _record(self, run_id: str) -> RunRecord:
        record: RunRecord | None = await self.store.get_run(run_id)
        if record is None:
            raise ServiceError(
                f"no run {run_id!r} in {self.store.url}",
                code="NOT_FOUND",
                hint="Check the run id (ListRuns lists the runs)",
            )
        return record

    async def _stored_log(self, run_id: str) -> RunLog:
        """The log of a run not driven here, from the store, once the run has ended."""
        record = await self._record(run_id)
        while record.status in _UNFINISHED:
            # Another process drives it: its journal is not final, so neither would be
            # the numbering; wait for the end (or for this service to take it up).
            await anyio.sleep(self.poll)
            log = self._logs.get(run_id)
            if log is not None:
                return log
            record = await self._record(run_id)
        log = self._logs.get(run_id)
        if log is not None:
            return log
        journal = await self.store.load_nodes(run_id)
        log = self._logs.get(run_id) or RunLog(run_id)
        if not log.entries:
            for event in history_of(record, journal):
                log.append(event)
            log.close()
            self._logs.add(log)
        return log

    def _check_accepting(self) -> None:
        if not self._accepting:
            raise ServiceError(
                "the service is stopping",
                code="UNAVAILABLE",
                hint="Retry against a service that is running",
            )


def as_service_error(exc: BaseException) -> ServiceError:
    """*exc* as the :class:`ServiceError` a call reports."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, FlowError):
        if isinstance(exc, CodecError | ConfigError):
            code = "INVALID_ARGUMENT"
        elif isinstance(exc, CheckpointError):
            code = "FAILED_PRECONDITION"
        else:
            code = "INTERNAL"
        return ServiceError(exc.problem, code=code, flow=exc.flow, node=exc.node, hint=exc.hint)
    return ServiceError(f"{type(exc).__name__}: {exc}", code="INTERNAL")


def _check_same_flow(run_id: str, ref: str, flow: Flow[..., Any]) -> None:
    if ref != flow.ref:
        raise ServiceError(
            f"run {run_id!r} exists and is a run of {ref}",
            code="ALREADY_EXISTS",
            flow=flow.name,
            hint="Choose another run id",
        )


def _checked_run_id(run_id: str) -> str:
    if len(run_id) > MAX_RUN_ID or not run_id.isprintable() or run_id != run_id.strip():
        raise ServiceError(
            f"run_id {run_id[:40]!r} is not a usable id",
            code="INVALID_ARGUMENT",
            hint=f"Use up to {MAX_RUN_ID} printable characters, no leading or trailing spaces",
        )
    return run_id


def _now() -> float:
    return time.time()
