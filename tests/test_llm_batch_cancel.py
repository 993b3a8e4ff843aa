"""Cancelling a run with provider batch jobs through each entry point: the run handle
(``ctx.cancel``), the service's ``CancelRun`` and the inspector's cancel.

Each cancels, at the local test server, the job that holds only the cancelled run's
requests, and leaves a job another run shares; all go through ``cancel_run`` and the
provider's ``cancel_batches`` (``ctx.cancel`` and ``flowdsl runs cancel`` are tested in
``test_llm_batch_api.py`` and ``test_llm_batch_crash.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
import test_llm_batch_api as api
from test_llm_batch_api import Make, ask_flow, jobs, until

import flowdsl as fd
from flowdsl._records import RunStatus
from flowdsl.llm._batch import running_collector

from _llm_server import LLMServer

# Its fixtures: the local server, each provider kind, a provider on the server.
_shared_server, server, kind, make = api._shared_server, api.server, api.kind, api.make

pytestmark = pytest.mark.anyio

# The service and the inspector's server run on asyncio only.
asyncio_only = pytest.mark.parametrize("anyio_backend", ["asyncio"])
REF = f"{ask_flow.__module__}:ask_flow"


async def stored_status(ctx: fd.Context, run_id: str) -> RunStatus:
    record = await ctx.store.get_run(run_id)
    assert record is not None
    return record.status


# --- ctx.cancel() ---------------------------------------------------------------------------


async def test_ctx_cancel_of_a_run_it_started_cancels_the_job_that_holds_only_its_requests(
    make: Make, server: LLMServer, sqlite_url: str
) -> None:
    llm = make(max_requests=1)
    async with fd.Context(batch=True, store=sqlite_url, llm=llm) as ctx:
        run = await ctx.start(ask_flow, "q", run_id="doomed")
        (job,) = await jobs(server, 1)
        await until(lambda: running_jobs(ctx) == [job.id])
        assert await ctx.cancel(run.run_id) == [job.id]
        assert server.batches.cancelled == [job.id]
        # Its step sees the job end, and fails rather than sending it again.
        with anyio.fail_after(20), pytest.raises(fd.StepFailed, match="cancelled"):
            await run.result()
        assert await stored_status(ctx, "doomed") is RunStatus.CANCELLED
    assert server.batches.submitted == [job.custom_ids[0]]


async def test_ctx_cancel_of_a_run_it_started_leaves_a_job_that_other_runs_share(
    make: Make, server: LLMServer, sqlite_url: str
) -> None:
    llm = make(max_requests=2)
    async with fd.Context(batch=True, store=sqlite_url, llm=llm) as ctx:
        kept = await ctx.start(ask_flow, "kept", run_id="kept")
        doomed = await ctx.start(ask_flow, "q", run_id="doomed")
        (job,) = await jobs(server, 1)
        await until(lambda: running_jobs(ctx) == [job.id])
        assert await ctx.cancel(doomed.run_id) == []
        assert server.batches.cancelled == []
        assert await stored_status(ctx, "doomed") is RunStatus.CANCELLED
        server.batches.finish(job.id)
        with anyio.fail_after(20):
            assert await kept.result() == "echo: kept"


def running_jobs(ctx: fd.Context) -> list[str]:
    """The jobs the context's provider follows in this event loop (submitted, accepted)."""
    return known_jobs(ctx.llm)


def known_jobs(llm: Any) -> list[str]:
    collector = running_collector(llm)
    return [] if collector is None else collector.known_jobs()


# --- the service's CancelRun ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def service(llm: Any, sqlite_url: str) -> AsyncIterator[fd.Client]:
    """A service of ask_flow whose batch runs' steps call *llm*, and a client of it."""
    from flowdsl.service.server import open_service

    async with (
        open_service(
            [ask_flow], store=sqlite_url, broker=sqlite_url, listen="127.0.0.1:0", llm=llm
        ) as serving,
        fd.Client(serving.url) as client,
    ):
        yield client


@asyncio_only
async def test_cancel_run_through_the_service_cancels_the_job_that_holds_only_its_requests(
    make: Make, server: LLMServer, sqlite_url: str
) -> None:
    llm = make(max_requests=1)
    async with service(llm, sqlite_url) as client:
        await client.start(REF, {"question": "q"}, run_id="doomed")
        (job,) = await jobs(server, 1)
        await until(lambda: known_jobs(llm) == [job.id])
        assert (await client.cancel("doomed")).status == "cancelled"
        await until(lambda: server.batches.cancelled)
        assert server.batches.cancelled == [job.id]
    assert server.batches.submitted == [job.custom_ids[0]]


@asyncio_only
async def test_cancel_run_through_the_service_leaves_a_job_that_other_runs_share(
    make: Make, server: LLMServer, sqlite_url: str
) -> None:
    llm = make(max_requests=2)
    async with service(llm, sqlite_url) as client:
        await client.start(REF, {"question": "kept"}, run_id="kept")
        await client.start(REF, {"question": "q"}, run_id="doomed")
        (job,) = await jobs(server, 1)
        await until(lambda: known_jobs(llm) == [job.id])
        assert (await client.cancel("doomed")).status == "cancelled"
        assert server.batches.cancelled == []
        server.batches.finish(job.id)
        with anyio.fail_after(20):
            async for _ in client.watch("kept"):
                pass
        kept = await client.get("kept")
        assert (kept.status, kept.result) == ("finished", "echo: kept")


# --- the inspector's cancel -----------------------------------------------------------------


def inspector_cancel(llm: Any, store_url: str, run_id: str) -> dict[str, Any]:
    """POST the inspector's cancel of *run_id* (a run another context drives)."""
    from starlette.testclient import TestClient

    from flowdsl.ui import create_app
    from flowdsl.ui.security import CSRF_HEADER

    with TestClient(create_app(store_url, llm=llm)) as page:
        response = page.post(f"/api/runs/{run_id}/cancel", headers={CSRF_HEADER: "1"})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@asyncio_only
async def test_the_inspector_cancel_cancels_the_job_that_holds_only_the_runs_requests(
    make: Make, server: LLMServer, sqlite_url: str
) -> None:
    llm = make(max_requests=1)
    async with fd.Context(batch=True, store=sqlite_url, llm=make(max_requests=1)) as ctx:
        run = await ctx.start(ask_flow, "q", run_id="doomed")
        (job,) = await jobs(server, 1)
        await until_stored(ctx, "doomed", [job.id])
        body = await anyio.to_thread.run_sync(inspector_cancel, llm, sqlite_url, "doomed")
        assert (body["driven_here"], body["batch_jobs_cancelled"]) == (False, [job.id])
        assert server.batches.cancelled == [job.id]
        # The context that drives it sees its job end: its step fails, the run stays
        # cancelled.
        with anyio.fail_after(20), pytest.raises(fd.StepFailed, match="cancelled"):
            await run.result()
        assert await stored_status(ctx, "doomed") is RunStatus.CANCELLED


@asyncio_only
async def test_the_inspector_cancel_leaves_a_job_that_other_runs_share(
    make: Make, server: LLMServer, sqlite_url: str
) -> None:
    async with fd.Context(batch=True, store=sqlite_url, llm=make(max_requests=2)) as ctx:
        kept = await ctx.start(ask_flow, "kept", run_id="kept")
        await ctx.start(ask_flow, "q", run_id="doomed")
        (job,) = await jobs(server, 1)
        await until_stored(ctx, "doomed", [job.id])
        llm = make(max_requests=2)
        body = await anyio.to_thread.run_sync(inspector_cancel, llm, sqlite_url, "doomed")
        assert (body["driven_here"], body["batch_jobs_cancelled"]) == (False, [])
        assert server.batches.cancelled == []
        server.batches.finish(job.id)
        with anyio.fail_after(20):
            assert await kept.result() == "echo: kept"


async def until_stored(ctx: fd.Context, run_id: str, job_ids: list[str]) -> None:
    """Wait until the store lists *job_ids* as *run_id*'s jobs (what another process sees)."""
    with anyio.fail_after(20):
        while await ctx.store.batch_jobs(run_id) != job_ids:  # noqa: ASYNC110
            await anyio.sleep(0.02)
