"""Cancelling a run from any process (``ctx.cancel``, ``flowdsl runs
cancel``, the service's ``CancelRun`` and the inspector's cancel for runs they do not drive).

The canceller needs nothing but the store and, for the run's provider batch jobs, the
provider: the run is marked cancelled, so that nothing resumes it unasked, and the jobs
that hold only its requests are cancelled at the provider, whichever process submitted
them (the store lists a run's jobs, see ``llm/_batch_runs.py``).  A run the cancelling
context drives itself stops at once (:func:`stop_drive`: its node group fails, at no cost
to runs nobody cancels).  Another process that still drives the run is not interrupted;
its steps waiting on those jobs fail, and the run stays cancelled
(:func:`status_after_failure`).
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

import anyio

from .. import events as ev
from .._errors import FlowError
from .._records import RunStatus
from .run import cancelled

if TYPE_CHECKING:
    from ..backends import Store
    from .run import Run

__all__ = ["cancel_run", "record_cancelled", "status_after_failure", "stop_drive"]


async def cancel_run(store: Any, llm: Any, run_id: str, *, error: str = "cancelled") -> list[str]:
    """Mark run *run_id* cancelled (with *error*) and cancel its provider batch jobs (those
    *llm*, a provider, can: its own, that no other run shares); the ids of the jobs
    cancelled."""
    record = await store.get_run(run_id)
    if record is None:
        raise FlowError(
            f"no run {run_id!r} in store {store.url}",
            hint="Check the run id (`flowdsl runs list`) and the store URL",
        )
    if record.status is RunStatus.FINISHED:
        raise FlowError(
            f"run {run_id!r} has finished; there is nothing to cancel",
            flow=record.flow,
            hint="`flowdsl runs show` shows how it ended",
        )
    if record.status is not RunStatus.CANCELLED:
        await store.update_run(run_id, status=RunStatus.CANCELLED, error=error)
    cancel_batches = getattr(llm, "cancel_batches", None)
    if cancel_batches is None:
        return []
    cancelled: list[str] = await cancel_batches(run_id, store)
    return cancelled


async def status_after_failure(store: Any, run_id: str) -> RunStatus:
    """How a run that failed here ends: cancelled if it was cancelled from outside while
    it ran (its failure is that cancellation's doing), else failed."""
    record = await store.get_run(run_id)
    cancelled = record is not None and record.status is RunStatus.CANCELLED
    return RunStatus.CANCELLED if cancelled else RunStatus.FAILED


async def stop_drive(run: Run | None) -> None:
    """Stop this context's drive of *run*, if it drives it, and wait until the drive has
    recorded the run as cancelled (even one waiting for a signal)."""
    if run is None or run.node_group is None:
        return
    run.cancelling = True
    run.node_group.fail(cancelled(run))
    with contextlib.suppress(FlowError):  # its cancellation, or how it ended just before
        await run.result()


async def record_cancelled(store: Store, run: Run) -> None:
    """A drive of *run* cancelled here: say so in the store and to the run's watchers."""
    with anyio.CancelScope(shield=True):
        await store.update_run(run.run_id, status=RunStatus.CANCELLED, error="cancelled")
    if run.observed:
        run.emit(ev.RunFailed(run.run_id, time.time(), "cancelled", cancelled=True))
    run._settle(RunStatus.CANCELLED, error=cancelled(run))
