"""Cancelling a run with provider batch jobs through each entry point: the run handle
(``run.cancel()``), the service's ``CancelRun`` and the inspector's cancel.

Each cancels, at the local test server, the job that holds only the cancelled run's
requests, and leaves a job another run shares; all go through ``cancel_run`` and the
provider's ``cancel_batches`` (``ctx.cancel`` and ``flowdsl runs cancel`` are tested in
``test_llm_batch_api.py`` and ``test_llm_batch_crash.py``).
"""

from __future__ import annotations

import anyio
import pytest

import flowdsl as fd
from flowdsl._records import RunStatus

from _llm_server import LLMServer
from test_llm_batch_api import (  # noqa: F401 - the fixtures
    Make,
    _shared_server,
    ask_flow,
    jobs,
    kind,
    make,
    server,
    until,
)

pytestmark = pytest.mark.anyio


async def stored_status(ctx: fd.Context, run_id: str) -> RunStatus:
    record = await ctx.store.get_run(run_id)
    assert record is not None
    return record.status


# --- run.cancel() ---------------------------------------------------------------------------


async def test_run_cancel_cancels_the_job_that_holds_only_its_requests(
    make: Make, server: LLMServer, sqlite_url: str
) -> None:
    llm = make(max_requests=1)
    async with fd.Context(batch=True, store=sqlite_url, llm=llm) as ctx:
        run = await ctx.start(ask_flow, "q", run_id="doomed")
        (job,) = await jobs(server, 1)
        await until(lambda: running_jobs(ctx) == [job.id])
        assert await run.cancel() == [job.id]
        assert server.batches.cancelled == [job.id]
        # Its step sees the job end, and fails rather than sending it again.
        with anyio.fail_after(20), pytest.raises(fd.StepFailed, match="cancelled"):
            await run.result()
        assert await stored_status(ctx, "doomed") is RunStatus.CANCELLED
    assert server.batches.submitted == [job.custom_ids[0]]


async def test_run_cancel_leaves_a_job_that_other_runs_share(
    make: Make, server: LLMServer, sqlite_url: str
) -> None:
    llm = make(max_requests=2)
    async with fd.Context(batch=True, store=sqlite_url, llm=llm) as ctx:
        kept = await ctx.start(ask_flow, "kept", run_id="kept")
        doomed = await ctx.start(ask_flow, "q", run_id="doomed")
        (job,) = await jobs(server, 1)
        await until(lambda: running_jobs(ctx) == [job.id])
        assert await doomed.cancel() == []
        assert server.batches.cancelled == []
        assert await stored_status(ctx, "doomed") is RunStatus.CANCELLED
        server.batches.finish(job.id)
        with anyio.fail_after(20):
            assert await kept.result() == "echo: kept"


def running_jobs(ctx: fd.Context) -> list[str]:
    """The jobs the context's provider follows in this event loop (submitted, accepted)."""
    from flowdsl.llm._batch import running_collector

    collector = running_collector(ctx.llm)
    return [] if collector is None else collector.known_jobs()
