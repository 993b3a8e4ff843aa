"""The inspector's actions: resume a failed run, cancel a running one, signal a waiting one.

A resume runs here, in the inspector's process, in a :class:`~flowdsl.Context` over the
inspector's store (in batch mode through ``--broker``'s workers when one is given: the
context starts no workers of its own).  The context is entered on the first action, not
at start-up, so an inspector that only looks polls nothing but the store.

A signal to a waiting run that no process drives (the context that ran it has ended) is
followed by a resume here, when the inspector knows the run's flow, so that the run takes
the signal and goes on; a run a live process drives takes it there.

Cancelling a run this process drives (one it resumed) cancels it for real.  A run driven
by another process, or left ``running`` by one that died, is marked cancelled in the
store; a live driver elsewhere is not interrupted by that (the store has no channel to
it), which the reply says.  Either way, with the inspector's ``llm=`` provider, the
provider batch jobs that hold only the run's requests are cancelled (``cancel_run``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import anyio
import anyio.abc

from .._context.cancel import cancel_run
from .._context.context import Context
from .._define.dsl import Flow
from .._errors import FlowError, RunBusy
from .._records import RunStatus
from ..backends.base import Store
from .views import flow_of

__all__ = ["ActionError", "Driver"]

log = logging.getLogger("flowdsl.ui")


class ActionError(Exception):
    """An action that cannot be done: an HTTP status, a short code and a message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class Driver:
    """Actions on runs, and the runs this process drives because of them."""

    def __init__(
        self,
        store: Store,
        broker: str | None,
        flows: Mapping[str, Flow[..., Any]],
        keys: Mapping[str, Any] | None = None,
        llm: Any = None,
    ) -> None:
        self.store = store
        self.llm = llm  # the provider whose batch jobs a cancelled run's are
        self.keys = dict(keys or {})  # the context's signing_key= and old_signing_keys=
        self.broker = broker
        self.flows = flows
        self.tg: anyio.abc.TaskGroup | None = None
        self._ctx: Context | None = None
        self._entering: anyio.Event | None = None
        self._driving: dict[str, anyio.CancelScope] = {}
        self.errors: dict[str, str] = {}  # run id -> why the last action on it failed here

    queue: Any = None  # the broker, for dead letters (None without one, or if it is away)

    async def open_queue(self) -> None:
        if self.broker is None:
            return
        from ..backends import open_broker

        queue = open_broker(self.broker)
        try:
            await queue.open()
        except (FlowError, OSError) as exc:
            log.warning("the broker is away, no dead letters shown: %s", exc)
            return
        self.queue = queue

    async def close_queue(self) -> None:
        queue, self.queue = self.queue, None
        if queue is not None:
            await queue.close()

    def state(self, run_id: str) -> dict[str, Any]:
        """What the run page shows of this process's part in a run."""
        return {"driving": run_id in self._driving, "error": self.errors.get(run_id)}

    async def _context(self) -> Context:
        if self._ctx is not None:
            return self._ctx
        if self._entering is not None:
            await self._entering.wait()
            assert self._ctx is not None
            return self._ctx
        if self.tg is None:
            raise ActionError(503, "not_ready", "the inspector is starting or stopping")
        self._entering = anyio.Event()
        batch = self.broker is not None
        # workers=0: a resumed batch run's steps go to the broker's own workers.
        reading = self.store.seal
        ctx = Context(
            store=self.store,
            batch=batch,
            broker=self.broker,
            workers=0 if batch else None,
            llm=self.llm,
            **self.keys,
        )
        if self.keys.get("signing_key") is None:
            # The context sets the store's seal to its own (no key): keep showing records
            # signed by others, as the inspector did before its first action.
            self.store.seal = reading
        try:
            await self.tg.start(_hold, ctx)
        except BaseException:
            self._entering.set()
            self._entering = None
            raise
        self._ctx = ctx
        self._entering.set()
        return ctx

    async def _record(self, run_id: str) -> Any:
        record = await self.store.get_run(run_id)
        if record is None:
            raise ActionError(404, "unknown_run", f"no run {run_id!r} in this store")
        return record

    async def resume(self, run_id: str) -> dict[str, Any]:
        record = await self._record(run_id)
        if run_id in self._driving:
            raise ActionError(409, "driving", f"run {run_id!r} is already being resumed here")
        if record.status not in (RunStatus.FAILED, RunStatus.CANCELLED):
            raise ActionError(
                409,
                "not_resumable",
                f"run {run_id!r} is {record.status.value}; only a failed or cancelled run "
                "can be resumed from the inspector",
            )
        flow = flow_of(record, self.flows)
        if flow is None:
            raise ActionError(
                409,
                "unknown_flow",
                f"the inspector does not know flow {record.flow_ref!r}: start it with "
                f"`--import {record.flow_ref.partition(':')[0]}` to resume its runs",
            )
        ctx = await self._context()
        self._start(ctx, run_id, flow, wait=True)
        return {"run_id": run_id, "resuming": True}

    def _start(self, ctx: Context, run_id: str, flow: Flow[..., Any], *, wait: bool) -> None:
        assert self.tg is not None
        scope = anyio.CancelScope()
        self._driving[run_id] = scope
        self.errors.pop(run_id, None)
        self.tg.start_soon(self._resume, ctx, run_id, flow, scope, wait)

    async def _resume(
        self,
        ctx: Context,
        run_id: str,
        flow: Flow[..., Any],
        scope: anyio.CancelScope,
        wait: bool,
    ) -> None:
        try:
            with scope:
                await ctx.resume(run_id, flow=flow, wait=wait)
        except RunBusy:
            pass  # a live process drives the run (and takes the signal): nothing to do here
        except FlowError as exc:
            # A run that fails again says so in its record; this keeps what the record
            # cannot say (a flow that changed beyond what resume allows, say).
            self.errors[run_id] = str(exc)
        except Exception as exc:
            log.exception("resuming run %s failed", run_id)
            self.errors[run_id] = f"{type(exc).__name__}: {exc}"
        finally:
            self._driving.pop(run_id, None)

    async def cancel(self, run_id: str) -> dict[str, Any]:
        record = await self._record(run_id)
        scope = self._driving.get(run_id)
        if scope is not None:
            scope.cancel()
            return {"run_id": run_id, "cancelled": True, "driven_here": True}
        if record.status.ended and record.status.value != "waiting":
            raise ActionError(
                409, "ended", f"run {run_id!r} has ended ({record.status.value}): nothing to cancel"
            )
        jobs = await cancel_run(self.store, self.llm, run_id, error="cancelled from the inspector")
        return {
            "run_id": run_id,
            "cancelled": True,
            "driven_here": False,
            "batch_jobs_cancelled": jobs,
            "note": "marked cancelled in the store; a process that still drives this run "
            "elsewhere is not interrupted by it",
        }

    async def signal(self, run_id: str, name: str, value: Any) -> dict[str, Any]:
        """Send the signal; then, if the run is waiting with no process driving it (its
        context ended) and its flow is known here, drive it here so that it takes it."""
        record = await self._record(run_id)
        ctx = await self._context()
        try:
            await ctx.signal(run_id, name, value)
        except FlowError as exc:
            raise ActionError(409, "signal_refused", str(exc)) from exc
        reply: dict[str, Any] = {"run_id": run_id, "signalled": name}
        flow = flow_of(record, self.flows)
        if record.status is RunStatus.WAITING and flow is not None and run_id not in self._driving:
            # wait=False: a live driver elsewhere keeps the run (RunBusy), and takes the
            # signal at its wait's next poll.
            self._start(ctx, run_id, flow, wait=False)
            reply["resuming"] = True
        return reply


async def _hold(
    ctx: Context, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Keep *ctx* entered until the inspector stops."""
    async with ctx:
        task_status.started()
        await anyio.sleep_forever()
