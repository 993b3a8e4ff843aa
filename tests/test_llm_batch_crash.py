"""Provider batch jobs survive the death of the process that submitted them.

A process is SIGKILLed while its job is in flight on the test LLM server (a worker process,
or a client with in-process workers); another process takes the steps up, finds their
requests in the journal, and waits for the same job.  The server sees every request once.
Processes are ``_batch_llm_proc.py``; the steps are ``batch_llm_steps``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import flowdsl as fd
from flowdsl.llm._batch_journal import custom_id

from _llm_server import LLMServer
from batch_llm_steps import ask_each, ask_flow

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

TESTS = Path(__file__).resolve().parent
LEASE = 1.0  # seconds: how soon a dead process's tasks go to another


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the processes are the point here, not the event loop


@pytest.fixture
def server() -> Iterator[LLMServer]:
    with LLMServer() as server:
        yield server


class Procs:
    """This test's processes; those still alive are killed at teardown."""

    def __init__(self, directory: Path, store: str, kind: str, base_url: str) -> None:
        self.dir, self.store, self.kind, self.base_url = directory, store, kind, base_url
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, command: str, *args: str) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
        n = len(self.procs)
        with open(self.dir / f"p{n}.out", "wb") as out, open(self.dir / f"p{n}.err", "wb") as err:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    str(TESTS / "_batch_llm_proc.py"),
                    command,
                    self.store,
                    self.kind,
                    self.base_url,
                    *args,
                    "--lease",
                    str(LEASE),
                ],
                env=env,
                cwd=self.dir,
                stdout=out,
                stderr=err,
            )
        self.procs.append(proc)
        return proc

    def errors(self) -> str:
        return "\n".join((self.dir / f"p{n}.err").read_text() for n in range(len(self.procs)))

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def procs_for(tmp_path: Path, server: LLMServer) -> Iterator[object]:
    made: list[Procs] = []

    def make(kind: str) -> Procs:
        url = server.openai_url if kind == "openai" else server.anthropic_url
        procs = Procs(tmp_path, f"sqlite:///{tmp_path / 'runs.db'}", kind, url)
        made.append(procs)
        return procs

    yield make
    for procs in made:
        procs.close()


async def jobs(server: LLMServer, n: int) -> list[object]:
    return await anyio.to_thread.run_sync(server.batches.wait_for_jobs, n, 60.0)


async def looked_at(server: LLMServer, job_id: str, after: int) -> None:
    """Wait until someone asks how job *job_id* stands, after the first *after* calls."""
    with anyio.fail_after(60):
        while not [c for c in server.batches.calls[after:] if c[1].endswith(f"/{job_id}")]:  # noqa: ASYNC110
            await anyio.sleep(0.02)


async def test_a_worker_killed_while_its_job_is_in_flight_submits_nothing_twice(
    procs_for: object, server: LLMServer
) -> None:
    procs = procs_for("openai")  # type: ignore[operator]
    run_ids = [f"w{i}" for i in range(4)]
    async with fd.Context(batch=True, store=procs.store, workers=0, lease=LEASE) as ctx:
        runs = [await ctx.start(ask_flow, rid, run_id=rid) for rid in run_ids]
        # The first worker submits one job of the four requests, and never looks at it.
        first = procs.spawn("serve", "--max-requests", "4", "--poll-every", "3600")
        (job,) = await jobs(server, 1)  # type: ignore[misc]
        assert sorted(job.custom_ids) == sorted(custom_id(r, "ask", None, 0) for r in run_ids)
        await wait_journaled(ctx, job.custom_ids)
        first.kill()
        first.wait()
        # The second finds the job in the journal and waits for it.
        calls = len(server.batches.calls)
        procs.spawn("serve", "--max-requests", "4", "--poll-every", "0.05")
        await looked_at(server, job.id, calls)
        server.batches.finish(job.id)
        with anyio.fail_after(60):
            results = [await run.result() for run in runs]
    assert results == [f"echo: {r}" for r in run_ids], procs.errors()
    assert len(server.batches.jobs) == 1
    assert sorted(server.batches.submitted) == sorted(job.custom_ids)


async def test_a_client_killed_while_its_job_is_in_flight_resumes_from_another_process(
    procs_for: object, server: LLMServer
) -> None:
    procs = procs_for("anthropic")  # type: ignore[operator]
    run_ids = [f"c{i}" for i in range(3)]
    client = procs.spawn("start", *run_ids, "--max-requests", "3", "--poll-every", "3600")
    (job,) = await jobs(server, 1)  # type: ignore[misc]
    async with fd.Context(batch=True, store=procs.store, workers=0) as reader:
        await wait_journaled(reader, job.custom_ids)
    client.kill()
    client.wait()
    calls = len(server.batches.calls)
    llm = fd.llm.Anthropic(
        api_key="k",
        base_url=procs.base_url,
        model="claude-3-5-haiku-latest",
        batch_api=fd.llm.BatchAPI(poll_every=0.05, max_requests=3),
    )
    async with (
        fd.Context(batch=True, store=procs.store, workers=1, lease=LEASE, llm=llm) as ctx,
        anyio.create_task_group() as tg,
    ):
        results: dict[str, str] = {}

        async def resume(rid: str) -> None:
            results[rid] = await ctx.resume(rid)

        for rid in run_ids:
            tg.start_soon(resume, rid)
        await looked_at(server, job.id, calls)
        server.batches.finish(job.id, order="reversed")
    assert results == {r: f"echo: {r}" for r in run_ids}, procs.errors()
    assert len(server.batches.jobs) == 1
    assert sorted(server.batches.submitted) == sorted(job.custom_ids)


async def wait_journaled(ctx: fd.Context, custom_ids: list[str]) -> None:
    """Wait until the journal holds every request of the job (the submitting process
    writes it right after the provider accepts the job)."""
    with anyio.fail_after(60):
        for cid in custom_ids:
            while await ctx.store.get_cached(f"llm-batch:{cid}") is None:  # noqa: ASYNC110
                await anyio.sleep(0.02)


# --- flowdsl worker --llm, and cancelling from another process --------------------------------


def provider(kind: str, base_url: str) -> fd.llm.BaseProvider:
    if kind == "openai":
        return fd.llm.OpenAI(api_key="k", base_url=base_url, model="gpt-4o-mini")
    return fd.llm.Anthropic(api_key="k", base_url=base_url, model="claude-3-5-haiku-latest")


def spawn_worker(
    procs: Procs, server: LLMServer, kind: str, **options: str
) -> subprocess.Popen[bytes]:
    """``flowdsl worker --llm batch_llm_provider:KIND``, a real worker process; *options*
    are ``batch_llm_provider``'s (``BATCH_LLM_POLL_EVERY="3600"``, say)."""
    env = dict(os.environ, **options)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    env.update(BATCH_LLM_OPENAI_URL=server.openai_url, BATCH_LLM_ANTHROPIC_URL=server.anthropic_url)
    n = len(procs.procs)
    with open(procs.dir / f"p{n}.out", "wb") as out, open(procs.dir / f"p{n}.err", "wb") as err:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "flowdsl", "worker", "--broker", procs.store),
                *("--import", "batch_llm_steps", "--import", "batch_llm_provider"),
                *("--llm", f"batch_llm_provider:{kind}", "--lease", str(LEASE)),
            ],
            env=env,
            cwd=procs.dir,
            stdout=out,
            stderr=err,
        )
    procs.procs.append(proc)
    return proc


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_a_run_is_cancelled_from_another_process_with_the_jobs_only_it_holds(
    procs_for: object, server: LLMServer, kind: str
) -> None:
    from click.testing import CliRunner

    from flowdsl._records import RunStatus
    from flowdsl.cli.main import cli

    procs = procs_for(kind)  # type: ignore[operator]
    async with fd.Context(batch=True, store=procs.store, workers=0, lease=LEASE) as ctx:
        spawn_worker(procs, server, kind)  # two requests a job, never flushed early
        shared = [await ctx.start(ask_flow, rid, run_id=rid) for rid in ("s1", "s2")]
        (job_a,) = await jobs(server, 1)  # type: ignore[misc]
        doomed = await ctx.start(ask_each, ["x", "y"], run_id="doomed")
        job_a, job_b = await jobs(server, 2)  # type: ignore[misc]
        assert sorted(job_b.custom_ids) == ["doomed-ask-0-0", "doomed-ask-1-0"]
        await wait_journaled(ctx, job_a.custom_ids + job_b.custom_ids)
        with anyio.fail_after(60):
            while await ctx.store.batch_jobs("doomed") != [job_b.id]:  # noqa: ASYNC110
                await anyio.sleep(0.02)

        # This process submitted nothing and follows no job: the store says which to cancel.
        llm = provider(kind, procs.base_url)
        async with fd.Context(store=procs.store, llm=llm) as other:
            assert await other.cancel("doomed") == [job_b.id]
        # The command line, for a run whose job other runs share: the job is left alone.
        result = await anyio.to_thread.run_sync(
            lambda: CliRunner().invoke(cli, ["runs", "cancel", "s1", "--store", procs.store])
        )
        assert result.exit_code == 0, result.output
        assert f"provider batch jobs still running: {job_a.id}" in result.output
        assert server.batches.cancelled == [job_b.id]

        # The worker's steps see their job end cancelled, and do not send it again.
        with anyio.fail_after(60), pytest.raises(fd.StepFailed, match="cancelled"):
            await doomed.result()
        record = await ctx.store.get_run("doomed")
        assert record is not None
        assert record.status is RunStatus.CANCELLED
        server.batches.finish(job_a.id)
        with anyio.fail_after(60):
            assert await shared[1].result() == "echo: s2"
    assert len(server.batches.jobs) == 2, procs.errors()
    assert sorted(server.batches.submitted) == sorted(job_a.custom_ids + job_b.custom_ids)

    # flowdsl runs show lists the run's jobs as the worker last saw them.
    shown = await anyio.to_thread.run_sync(
        lambda: CliRunner().invoke(
            cli, ["runs", "show", "doomed", "--store", procs.store, "--json"]
        )
    )
    assert shown.exit_code == 0, shown.output
    import json

    (job,) = json.loads(shown.stdout)["batch_jobs"]
    assert job["job_id"] == job_b.id
    assert job["provider"] == ("OpenAI" if kind == "openai" else "Anthropic")
    assert job["ended"]
    assert job["status"] in ("cancelled", "ended")
    assert (job["requests"], job["run_requests"], job["shared"]) == (2, 2, False)


async def test_a_client_and_a_worker_killed_at_once_while_the_job_is_in_flight(
    procs_for: object, server: LLMServer
) -> None:
    procs = procs_for("openai")  # type: ignore[operator]
    run_ids = [f"k{i}" for i in range(3)]
    # The worker submits one job of the three runs' requests and never looks at it.
    spawn_worker(procs, server, "openai", BATCH_LLM_MAX_REQUESTS="3", BATCH_LLM_POLL_EVERY="3600")
    client = procs.spawn("start", *run_ids, "--workers", "0")
    (job,) = await jobs(server, 1)  # type: ignore[misc]
    async with fd.Context(batch=True, store=procs.store, workers=0) as reader:
        await wait_journaled(reader, job.custom_ids)
    for proc in procs.procs:
        proc.kill()
        proc.wait()
    calls = len(server.batches.calls)
    llm = fd.llm.OpenAI(
        api_key="k",
        base_url=procs.base_url,
        model="gpt-4o-mini",
        batch_api=fd.llm.BatchAPI(poll_every=0.05, max_requests=3),
    )
    async with (
        fd.Context(batch=True, store=procs.store, workers=1, lease=LEASE, llm=llm) as ctx,
        anyio.create_task_group() as tg,
    ):
        results: dict[str, str] = {}

        async def resume(rid: str) -> None:
            results[rid] = await ctx.resume(rid)

        for rid in run_ids:
            tg.start_soon(resume, rid)
        await looked_at(server, job.id, calls)
        server.batches.finish(job.id, order="reversed")
    assert client.returncode is not None
    assert results == {r: f"echo: {r}" for r in run_ids}, procs.errors()
    assert len(server.batches.jobs) == 1
    assert sorted(server.batches.submitted) == sorted(job.custom_ids)
