"""One driver per run, from a context's side.

Before a context drives a run (starts it, or resumes it) it takes the run's lease (see
``_engine/lease.py``).  When another live process holds it, the context executes nothing:

- by default it *observes*: it waits for the run to end, reading its status in the store,
  and gives the driver's result (or failure) as its own; when the driver dies meanwhile
  (its process gone, on this machine; its lease run out, from another), the observer takes
  the lease and drives the run on from its journal;
- with ``wait=False`` it raises :class:`~flowdsl.RunBusy`, naming the driver.

A driver that loses its lease (it stalled for longer than the lease and another took the
run over) stops driving without writing anything and observes in turn.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal

import anyio

from .._engine.lease import describe_owner, process_gone
from .._errors import CheckpointError, RunBusy, first_leaf
from .._records import Lease, RunRecord, RunStatus
from .run import Run
from .stored import decode_inputs, settle_from_record

if TYPE_CHECKING:
    from .context import Context

__all__ = ["claim", "keeping", "observe", "took_over"]

#: Seconds between an observer's reads of the run's status, at most (it starts faster).
OBSERVE_EVERY = 0.5

Claim = Literal["drive", "done", "observe"]


async def claim(ctx: Context, run: Run, record: RunRecord, *, wait: bool) -> Claim:
    """Take *run*'s lease: ``"drive"`` when this context drives it now; ``"done"`` when it
    ended meanwhile (*run* is settled); ``"observe"`` when another process drives it
    (:func:`observe` waits for it).  *record* is the run's record as the caller read it.
    """
    held = await take(ctx, run)
    if held is not None:
        if not wait:
            raise busy(run, held)
        run.holder = held
        return "observe"
    # Read again under the lease: a driver that held it may have ended the run.  That is
    # so even of a run this context has just made: another process that found the record
    # may have taken the lease first and driven the run (its drive marks the record before
    # running anything, see ``replay``), and then it must be resumed, not begun again.  (The
    # memory store, the process-local one, answers both calls without suspending: nobody
    # comes in between, and a real-time run is spared the read.)
    if run.resuming or not ctx._leases.local:
        now = await ctx.store.get_run(run.run_id)
        if now is not None and ended_since(now, record):
            await ctx._leases.release(run.run_id)
            settle_from_record(run, now)
            return "done"
        if now is not None and now.updated_at != record.updated_at:
            run.resuming = True
    ctx._active[run.run_id] = run
    return "drive"


async def take(ctx: Context, run: Run) -> Lease | None:
    if ctx._leases.local:
        return await ctx._leases.take(run.run_id)  # never lost: nothing to tell
    run.lease_lost = False
    return await ctx._leases.take(run.run_id, on_lost=lambda: _lost(run))


def _lost(run: Run) -> None:
    run.lease_lost = True
    if run.lease_scope is not None:
        run.lease_scope.cancel()


def ended_since(record: RunRecord, before: RunRecord | None) -> bool:
    """Whether *record* shows the run ended by a drive after *before* was read: finished,
    or failed or cancelled anew (not the failure a resume was asked to mend)."""
    if record.status is RunStatus.FINISHED:
        return True
    if not record.status.ended:
        return False
    return before is None or (record.status, record.updated_at, record.error) != (
        before.status,
        before.updated_at,
        before.error,
    )


async def observe(ctx: Context, run: Run, baseline: RunRecord | None, *, strict: bool) -> Any:
    """Wait for the run another process drives to end; its result.  Takes the run over
    when that driver is gone (see the module docstring)."""
    delay = 0.01
    while True:
        record = await ctx.store.get_run(run.run_id)
        if record is None:
            raise CheckpointError(
                f"run {run.run_id!r} vanished from {ctx.store.url} while it was waited for",
                flow=run.flow_name,
                hint="Start it again",
            )
        if ended_since(record, baseline):
            settle_from_record(run, record)
            return await run.result()
        held = run.holder
        if held is None or held.expires_at <= time.time() or process_gone(held.owner):
            run.holder = await take(ctx, run)
            if run.holder is None:
                return await took_over(ctx, run, baseline, strict=strict)
        await anyio.sleep(delay)
        delay = min(delay * 2, OBSERVE_EVERY)


async def took_over(ctx: Context, run: Run, baseline: RunRecord | None, *, strict: bool) -> Any:
    """Drive *run*, whose lease this context has just taken from a driver that is gone."""
    record = await ctx.store.get_run(run.run_id)
    if record is not None and ended_since(record, baseline):
        await ctx._leases.release(run.run_id)
        settle_from_record(run, record)
        return await run.result()
    if record is not None and not run.inputs:
        run.inputs = decode_inputs(record, run.flow)
    run.resuming = True
    ctx._active[run.run_id] = run
    return await ctx._execute(run, strict=strict)


@contextlib.asynccontextmanager
async def keeping(ctx: Context, run: Run) -> AsyncIterator[anyio.CancelScope]:
    """Around one drive on a store other processes see: a scope that losing the lease
    cancels, the renewal of the lease (an entered context renews all its leases in one
    task; a call made without ``async with ctx`` renews in one beside the drive), and the
    lease given up after.  (A process-local store needs none of it: see
    ``Context._execute``.)"""
    try:
        with anyio.CancelScope() as scope:
            run.lease_scope = scope
            if run.lease_lost:
                scope.cancel()
            if ctx._entered:
                yield scope
            else:
                try:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(ctx._leases.keep)
                        try:
                            yield scope
                        finally:
                            tg.cancel_scope.cancel()
                except BaseExceptionGroup as group:
                    # The drive's own error, not a group of one: the renewal task only
                    # ever ends cancelled.
                    leaf = first_leaf(group)
                    raise leaf from leaf.__cause__
    finally:
        run.lease_scope = None
        with anyio.CancelScope(shield=True):
            await ctx._leases.release(run.run_id)


def busy(run: Run, held: Lease) -> RunBusy:
    until = time.strftime("%H:%M:%S", time.localtime(held.expires_at))
    lasts = "" if held.expires_at > time.time() + 3600 else f", its lease runs until {until}"
    return RunBusy(
        f"run {run.run_id!r} is being driven by {describe_owner(held.owner)}{lasts}; "
        "nothing was run here",
        flow=run.flow_name,
        hint="Wait for its result: call again without wait=False (this process then "
        "takes over if that one dies), or follow it with `flowdsl runs show "
        f"{run.run_id}`",
        run_id=run.run_id,
        owner=held.owner,
        expires_at=held.expires_at,
    )
