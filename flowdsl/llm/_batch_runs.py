"""A run's provider batch jobs, as any process finds them in the store: to cancel them with
the run (``ctx.cancel``, ``flowdsl runs cancel``), and to show them (``flowdsl runs show``).

The process that submitted a job, or one whose steps wait for it, knows it already (the
collector in ``_batch``); this is for every other process, which has nothing but the run's
id: the store lists the run's jobs (:meth:`~flowdsl.backends.base.Store.batch_jobs`), and
each job's record (``_batch_journal``) says which runs it serves and how it last stood.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any, Final

import attrs

from ._batch_journal import note_job_state, read_job
from ._errors import LLMError

__all__ = ["RunJob", "cancel_stored_jobs", "run_jobs"]

log = logging.getLogger("flowdsl.llm.batch")

# Statuses of a job on its way to an end (OpenAI's, Anthropic's): cancelling it again
# changes nothing.
_ENDING: Final = frozenset({"cancelling", "canceling", "finalizing"})


@attrs.frozen
class RunJob:
    """One provider batch job holding requests of a run, as the store last saw it."""

    job_id: str
    provider: str = "?"
    status: str = "unknown"  # as the provider says it; "submitted" until someone looked
    ended: bool = False
    requests: int = 0  # the job's, of every run
    run_requests: int = 0  # the run's own
    counts: dict[str, int] = attrs.field(factory=dict)  # the provider's request counts
    shared: bool = False  # other runs have requests in it too


async def run_jobs(store: Any, run_id: str) -> list[RunJob]:
    """The provider batch jobs that hold requests of *run_id*, oldest first."""
    jobs: list[RunJob] = []
    for job_id in await store.batch_jobs(run_id):
        about = await read_job(store, job_id)
        if about is None:
            jobs.append(RunJob(job_id))
            continue
        jobs.append(
            RunJob(
                job_id,
                about["provider"] or "?",
                about["status"] or "unknown",
                about["ended"],
                about["requests"],
                about["runs"].get(run_id, 0),
                about["counts"],
                shared=set(about["runs"]) != {run_id},
            )
        )
    return jobs


async def cancel_stored_jobs(
    provider: Any, store: Any, run_id: str, skip: Collection[str] = ()
) -> list[str]:
    """Cancel, at *provider*, the jobs the store lists for *run_id* that hold only its
    requests and have not ended (but those in *skip*: the caller saw to them); their ids.

    A job of another provider, one shared with other runs, and one whose record cannot be
    read are left alone: a job is cancelled only on the word of a record that says it
    serves this run alone.
    """
    jobs = provider._batch_jobs()
    if jobs is None:
        return []
    cancelled: list[str] = []
    for job in await run_jobs(store, run_id):
        if job.job_id in skip or job.ended or job.shared or job.status in _ENDING:
            continue
        if job.provider != provider.name:
            log.warning(
                "batch job %s of run %s is a job of %s, not of %s: not cancelled",
                job.job_id,
                run_id,
                job.provider,
                provider.name,
            )
            continue
        try:
            await jobs.cancel(job.job_id)
        except LLMError as exc:
            log.warning("cannot cancel %s batch job %s: %s", provider.name, job.job_id, exc)
            continue
        log.info(
            "%s batch job %s cancelled: run %s was cancelled", provider.name, job.job_id, run_id
        )
        await note_job_state(store, job.job_id, "cancelling", False, job.counts)
        cancelled.append(job.job_id)
    return cancelled
