"""Provider batch APIs (``batch_api=``): OpenAI Batch and Anthropic Message Batches.

The real SDKs talk to the local test server (``_llm_server`` and its ``batches``), whose
jobs stay in progress until a test ends them: completed, expired with some lines done,
with errored lines, in any order.  Runs are batch runs with in-process workers on a SQLite
store; every test runs for both providers on both event loops.  The crash tests, across
processes, are in ``test_llm_batch_crash.py``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

import flowdsl as fd
import flowdsl.llm
from flowdsl import events as ev
from flowdsl._records import RunStatus
from flowdsl.llm._batch import running_collector
from flowdsl.llm._batch_journal import JOURNAL_PREFIX, custom_id

from _llm_batch_server import Job
from _llm_server import LLMServer

pytestmark = pytest.mark.anyio

MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-3-5-haiku-latest"}
PRICES = {"openai": (0.15, 0.60), "anthropic": (0.80, 4.00)}  # $ per M tokens, standard


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def _shared_server() -> Iterator[LLMServer]:
    with LLMServer() as server:
        yield server


@pytest.fixture
def server(_shared_server: LLMServer) -> LLMServer:
    _shared_server.reset()
    return _shared_server


@pytest.fixture(params=["openai", "anthropic"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


Make = Callable[..., flowdsl.llm.BaseProvider]


@pytest.fixture
def make(kind: str, server: LLMServer) -> Make:
    """``make(flush_after=..., poll_every=..., max_requests=...)``: a provider on the
    server with those batch options (``batch_api=`` given whole overrides them)."""

    def provider(*, batch_api: Any = None, **options: Any) -> flowdsl.llm.BaseProvider:
        options.setdefault("poll_every", 0.02)
        options.setdefault("flush_after", 60.0)
        if batch_api is None:
            batch_api = fd.llm.BatchAPI(**options)
        if kind == "openai":
            return fd.llm.OpenAI(
                api_key="k", base_url=server.openai_url, model=MODELS[kind], batch_api=batch_api
            )
        return fd.llm.Anthropic(
            api_key="k", base_url=server.anthropic_url, model=MODELS[kind], batch_api=batch_api
        )

    return provider


async def jobs(server: LLMServer, n: int) -> list[Job]:
    """The server's jobs once there are *n* (waited for in a thread)."""
    return await anyio.to_thread.run_sync(server.batches.wait_for_jobs, n, abandon_on_cancel=True)


def cid(run_id: str, node: str = "ask") -> str:
    return custom_id(run_id, node, None, 0)


def processed(ctx: fd.Context) -> int:
    """Tasks the context's in-process workers have finished (with a result or not)."""
    return sum(worker.processed for worker in ctx._workers)


async def until(condition: Callable[[], Any]) -> None:
    """Poll *condition* (state in the server's thread and the workers has no event)."""
    with anyio.fail_after(20):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.01)


# --- steps and flows ------------------------------------------------------------------------


@fd.step(retries=2, backoff=0.0)
async def ask(question: str) -> str:
    return (await fd.llm.chat(question, max_tokens=20)).text


@fd.flow
async def ask_flow(question: str) -> str:
    return await ask(question)


@fd.step
async def ask_model(question: str, model: str) -> str:
    reply = await fd.llm.chat(question, model=model)
    return f"{reply.model}: {reply.text}"


@fd.flow
async def ask_model_flow(question: str, model: str) -> str:
    return await ask_model(question, model)


@fd.step
async def streamed(question: str) -> str:
    return (await fd.llm.chat(question, on_token=lambda text: None)).text


@fd.flow
async def streamed_flow(question: str) -> str:
    return await streamed(question)


@fd.step
async def streamed_asked(question: str) -> str:
    return (await fd.llm.chat(question, stream=True)).text


@fd.flow
async def streamed_asked_flow(question: str) -> str:
    return await streamed_asked(question)


# --- many runs, one job ---------------------------------------------------------------------


async def test_many_runs_share_one_job_joined_by_custom_id(
    make: Make, server: LLMServer, sqlite_url: str, kind: str
) -> None:
    questions = [f"q{i}" for i in range(20)]
    run_ids = [f"run{i}" for i in range(20)]
    llm = make(max_requests=20)
    async with fd.Context(batch=True, store=sqlite_url, llm=llm) as ctx:

        async def provider_side() -> None:
            (job,) = await jobs(server, 1)
            # Journaled once the provider accepted it, before any result.
            key = JOURNAL_PREFIX + cid("run7")
            with anyio.fail_after(20):
                while (entry := await ctx.store.get_cached(key)) is None:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            assert job.id in entry
            server.batches.finish(job.id, order="shuffled")

        async with anyio.create_task_group() as tg:
            tg.start_soon(provider_side)
            results = await ctx.map(ask_flow, questions, run_ids=run_ids)
        assert results == [f"echo: {q}" for q in questions]
        (job,) = server.batches.jobs
        assert sorted(job.custom_ids) == sorted(cid(r) for r in run_ids)
        # The results came back in another order than the requests went.
        assert [line["custom_id"] for line in job.lines] != job.custom_ids
        record = (await ctx.store.load_nodes("run7"))["ask"]
    assert server.count() == 0  # nothing went to the live API
    usage = record.usage
    assert usage is not None
    assert usage["batch_job"] == job.id
    assert usage["batch_calls"] == usage["calls"] == 1
    price_in, price_out = PRICES[kind]
    standard = (usage["input_tokens"] * price_in + usage["output_tokens"] * price_out) / 1e6
    assert usage["cost"] == pytest.approx(standard / 2)


async def test_steps_waiting_for_a_job_leave_their_worker_slots_to_others(
    make: Make, server: LLMServer, sqlite_url: str
) -> None:
    # One worker of two slots, and a job of six: the six steps can join one job only if
    # those waiting lend their slots to the next ones.
    llm = make(max_requests=6)
    questions = [f"q{i}" for i in range(6)]
    async with fd.Context(
        batch=True, store=sqlite_url, llm=llm, workers=1, worker_concurrency=2
    ) as ctx:

        async def provider_side() -> None:
            (job,) = await jobs(server, 1)
            server.batches.finish(job.id)

        async with anyio.create_task_group() as tg:
            tg.start_soon(provider_side)
            results = await ctx.map(ask_flow, questions)
    assert results == [f"echo: {q}" for q in questions]
    (job,) = server.batches.jobs
    assert len(job.custom_ids) == 6


async def test_a_job_is_sent_after_flush_after_however_few_requests(
    make: Make, server: LLMServer, sqlite_url: str
) -> None:
    server.batches.auto = True
    llm = make(max_requests=1000, flush_after=0.05)
    async with fd.Context(batch=True, store=sqlite_url, llm=llm) as ctx:
        assert await ctx.map(ask_flow, ["a", "b", "c"]) == ["echo: a", "echo: b", "echo: c"]
    (job,) = server.batches.jobs
    assert len(job.requests) == 3


async def test_one_model_per_job(make: Make, server: LLMServer, sqlite_url: str, kind: str) -> None:
    server.batches.auto = True
    other = f"{MODELS[kind]}-2"
    inputs = [("a", MODELS[kind]), ("b", other), ("c", MODELS[kind]), ("d", other)]
    llm = make(max_requests=2)
    async with fd.Context(batch=True, store=sqlite_url, llm=llm) as ctx:
        results = await ctx.map(ask_model_flow, inputs)
    assert results == [f"{model}: echo: {q}" for q, model in inputs]
    assert len(server.batches.jobs) == 2
    for job in server.batches.jobs:
        assert len({body["model"] for _, body in job.requests}) == 1


# --- map items and loop iterations ---------------------------------------------------------


@fd.flow
async def ask_each(questions: list[str]) -> list[str]:
    return await ask.map(questions)


async def test_two_map_items_making_the_same_call_get_distinct_custom_ids(
    make: Make, server: LLMServer, sqlite_url: str
) -> None:
    server.batches.auto = True
    llm = make(max_requests=3)
    async with fd.Context(batch=True, store=sqlite_url, llm=llm) as ctx:
        results = await ctx.run(ask_each, ["same", "same", "other"], run_id="m1")
    assert results == ["echo: same", "echo: same", "echo: other"]
    (job,) = server.batches.jobs
    # (run, node, item, call): readable, one per item, though two items ask the same.
    assert sorted(job.custom_ids) == ["m1-ask-0-0", "m1-ask-1-0", "m1-ask-2-0"]
    assert sorted(server.batches.submitted) == sorted(job.custom_ids)


@fd.step
async def where_am_i(
    state: list[int | None],
) -> fd.Continue[list[int | None]] | fd.Done[list[int | None]]:
    from flowdsl._engine.runner import current_scope

    scope = current_scope()
    assert scope is not None
    seen = [*state, scope.item]
    return fd.Done(seen) if len(seen) == 3 else fd.Continue(seen)


@fd.step
async def item_of(x: int) -> int | None:
    from flowdsl._engine.runner import current_scope

    scope = current_scope()
    assert scope is not None
    return scope.item


@fd.flow
async def items_and_iterations(
    xs: list[int],
) -> tuple[list[int | None], list[int | None], int | None]:
    mapped = await item_of.map(xs)
    looped = await fd.loop(where_am_i, [], max_iterations=5)
    alone = await item_of(7)
    return mapped, looped, alone


@pytest.mark.parametrize("batch", [False, True], ids=["realtime", "batch"])
async def test_a_steps_scope_knows_its_map_item_and_loop_iteration(
    batch: bool, sqlite_url: str
) -> None:
    async with fd.Context(batch=batch, store=sqlite_url) as ctx:
        mapped, looped, alone = await ctx.run(items_and_iterations, [5, 6, 7])
    assert mapped == [0, 1, 2]
    assert looped == [0, 1, 2]
    assert alone is None


# --- partial success ------------------------------------------------------------------------


async def test_an_expired_job_resubmits_only_the_requests_that_did_not_run(
    make: Make, server: LLMServer, sqlite_url: str
) -> None:
    run_ids = [f"r{i}" for i in range(6)]
    first_time = {cid(r) for r in run_ids[::2]}  # these run in the first job they are in
    llm = make(max_requests=6, flush_after=0.05)

    def lines_that_run(job: Job) -> set[str]:
        again = {c for c in job.custom_ids if server.batches.submitted.count(c) > 1}
        return (first_time & set(job.custom_ids)) | again

    async with (
        fd.Context(batch=True, store=sqlite_url, llm=llm) as ctx,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(serve_jobs, server, lambda job: {"ran": lines_that_run(job)})
        results = await ctx.map(ask_flow, run_ids, run_ids=run_ids)
        tg.cancel_scope.cancel()
    assert results == [f"echo: {r}" for r in run_ids]
    for r in run_ids:
        assert server.batches.submitted.count(cid(r)) == (1 if cid(r) in first_time else 2)


async def serve_jobs(server: LLMServer, how: Callable[[Job], dict[str, Any]]) -> None:
    """End every job as it comes: ``how(job)`` gives ``finish``'s options (the job
    expires when some of its lines do not run)."""
    n = 0
    while True:
        job = (await jobs(server, n + 1))[n]
        n += 1
        options = how(job)
        ran = options.get("ran")
        if ran is not None and set(ran) != set(job.custom_ids):
            options.setdefault("status", "expired")
        server.batches.finish(job.id, **options)


async def test_a_request_that_does_not_run_twice_fails_its_step(
    make: Make, server: LLMServer, sqlite_url: str, kind: str
) -> None:
    llm = make(max_requests=1)
    async with fd.Context(batch=True, store=sqlite_url, llm=llm) as ctx:

        async def provider_side() -> None:
            for n in (1, 2):
                job = (await jobs(server, n))[-1]
                server.batches.finish(job.id, ran=(), status="expired")

        async with anyio.create_task_group() as tg:
            tg.start_soon(provider_side)
            with pytest.raises(fd.StepFailed) as info:
                await ctx.run(ask_flow, "q", run_id="late")
    assert len(server.batches.jobs) == 2  # sent, sent again once, then given up
    provider = "OpenAI" if kind == "openai" else "Anthropic"
    second = server.batches.jobs[1].id
    status = "expired" if kind == "openai" else "ended"
    assert re.search(
        rf"{provider} did not run the request in batch job {second} \(status {status}\), "
        "nor in the job before it",
        str(info.value),
    )


async def test_an_errored_line_fails_only_its_step(
    make: Make, server: LLMServer, sqlite_url: str
) -> None:
    run_ids = ["ra", "rb", "rc"]
    llm = make(max_requests=3)
    async with fd.Context(batch=True, store=sqlite_url, llm=llm) as ctx:

        async def provider_side() -> None:
            (job,) = await jobs(server, 1)
            server.batches.finish(job.id, errored={cid("rb"): (400, "messages: bad shape")})

        async with anyio.create_task_group() as tg:
            tg.start_soon(provider_side)
            results = await ctx.map(
                ask_flow, run_ids, run_ids=run_ids, return_exceptions=True, progress=False
            )
    assert results[0] == "echo: ra"
    assert results[2] == "echo: rc"
    failure = results[1]
    assert isinstance(failure, fd.StepFailed)
    assert "answered the request with an error" in str(failure)
    assert "bad shape" in str(failure)
    assert len(server.batches.jobs) == 1  # a 400 is final: the step's retries do not apply


async def test_a_transient_line_error_is_retried_by_the_steps_policy_in_a_new_job(
    make: Make, server: LLMServer, sqlite_url: str
) -> None:
    run_ids = ["ra", "rb", "rc"]
    llm = make(max_requests=1)

    def how(job: Job) -> dict[str, Any]:
        if job.custom_ids == [cid("rb")] and server.batches.submitted.count(cid("rb")) == 1:
            return {"errored": {cid("rb"): (500, "overloaded")}}
        return {}

    async with (
        fd.Context(batch=True, store=sqlite_url, llm=llm) as ctx,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(serve_jobs, server, how)
        results = await ctx.map(ask_flow, run_ids, run_ids=run_ids)
        tg.cancel_scope.cancel()
    assert results == ["echo: ra", "echo: rb", "echo: rc"]
    assert sorted(server.batches.submitted) == sorted([cid("ra"), cid("rb"), cid("rb"), cid("rc")])


@pytest.mark.parametrize("kind", ["openai"])  # only OpenAI's batches fail as a whole
async def test_a_failed_job_fails_every_step_in_it(
    make: Make, server: LLMServer, sqlite_url: str
) -> None:
    llm = make(max_requests=2)
    async with fd.Context(batch=True, store=sqlite_url, llm=llm) as ctx:

        async def provider_side() -> None:
            (job,) = await jobs(server, 1)
            server.batches.fail(job.id, "the input file is malformed")

        async with anyio.create_task_group() as tg:
            tg.start_soon(provider_side)
            results = await ctx.map(ask_flow, ["a", "b"], return_exceptions=True, progress=False)
    for failure in results:
        assert isinstance(failure, fd.StepFailed)
        assert "the whole job failed: the input file is malformed" in str(failure)


# --- cancellation ---------------------------------------------------------------------------


async def cancel_when(ctx: fd.Context, ready: Callable[[], Any], run_id: str) -> None:
    """Run ask_flow as *run_id*, and cancel it once *ready()* holds."""
    with anyio.CancelScope() as scope:

        async def cancel() -> None:
            await until(ready)
            scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel)
            await ctx.run(ask_flow, "q", run_id=run_id)
    assert scope.cancelled_caught
    record = await ctx.store.get_run(run_id)
    assert record is not None
    assert record.status is RunStatus.CANCELLED


async def test_cancelling_a_run_cancels_the_job_that_holds_only_its_requests(
    make: Make, server: LLMServer, sqlite_url: str
) -> None:
    llm = make(max_requests=1)
    async with fd.Context(batch=True, store=sqlite_url, llm=llm) as ctx:
        await cancel_when(ctx, lambda: server.batches.jobs, "doomed")
        (job,) = server.batches.jobs
        # (The job may still have been on its way when the run was cancelled: then it is
        # cancelled as soon as the provider has accepted it.)
        await until(lambda: server.batches.cancelled)
        # The waiting step sees the job end, and fails rather than sending it again.
        await until(lambda: processed(ctx) == 1)
        assert server.batches.cancelled == [job.id]
    assert server.batches.submitted == [cid("doomed")]


async def test_cancelling_a_run_leaves_a_job_that_other_runs_share(
    make: Make, server: LLMServer, sqlite_url: str
) -> None:
    llm = make(max_requests=2)
    async with fd.Context(batch=True, store=sqlite_url, llm=llm) as ctx:
        other = await ctx.start(ask_flow, "kept", run_id="kept")
        await cancel_when(ctx, lambda: server.batches.jobs, "doomed")
        (job,) = server.batches.jobs
        assert server.batches.cancelled == []
        server.batches.finish(job.id)
        assert await other.result() == "echo: kept"


async def test_cancelling_a_run_withdraws_its_requests_not_yet_sent(
    make: Make, server: LLMServer, sqlite_url: str
) -> None:
    llm = make(max_requests=10, flush_after=3600.0)

    def collected() -> bool:
        collector = running_collector(llm)
        return collector is not None and any(g.requests for g in collector._groups.values())

    async with fd.Context(batch=True, store=sqlite_url, llm=llm) as ctx:
        await cancel_when(ctx, collected, "doomed")
        await until(lambda: processed(ctx) == 1)
    assert server.batches.jobs == []


# --- real time, streaming, options ----------------------------------------------------------


async def test_a_real_time_context_ignores_batch_api(make: Make, server: LLMServer) -> None:
    llm = make()
    async with fd.Context(llm=llm) as ctx:
        assert await ctx.run(ask_flow, "now") == "echo: now"
    assert server.count() == 1
    assert server.batches.calls == []


async def test_a_call_outside_a_step_goes_to_the_live_api(make: Make, server: LLMServer) -> None:
    async with make() as llm:
        reply = await fd.llm.chat("now", llm=llm)
    assert reply.text == "echo: now"
    assert reply.batch_job is None
    assert server.batches.calls == []


@pytest.mark.parametrize("flow", [streamed_flow, streamed_asked_flow], ids=["on_token", "stream"])
async def test_streaming_through_a_batch_job_is_a_config_error(
    make: Make, server: LLMServer, sqlite_url: str, flow: fd.Flow[..., str]
) -> None:
    async with fd.Context(batch=True, store=sqlite_url, llm=make()) as ctx:
        with pytest.raises(fd.StepFailed, match=r"a provider batch job cannot stream") as caught:
            await ctx.run(flow, "q")
    # In a batch worker, the step's error crosses as its text: a ConfigError, with its hint.
    assert "ConfigError" in str(caught.value)
    assert "Leave stream= and on_token= out of fd.llm.chat in batch mode" in str(caught.value)
    assert server.batches.calls == []
    assert server.count() == 0


async def test_a_watched_batch_run_gets_its_answer_without_token_events(
    make: Make, server: LLMServer, sqlite_url: str
) -> None:
    server.batches.auto = True
    events: list[Any] = []
    llm = make(flush_after=0.0)
    async with fd.Context(batch=True, store=sqlite_url, llm=llm, on_event=events.append) as ctx:
        assert await ctx.run(ask_flow, "q") == "echo: q"
    assert not [e for e in events if isinstance(e, ev.TokenDelta)]
    assert [e for e in events if isinstance(e, ev.StepFinished)]


def test_batch_api_options_are_checked() -> None:
    with pytest.raises(fd.ConfigError, match=r"BatchAPI\(poll_every=-1\)"):
        fd.llm.BatchAPI(poll_every=-1)
    with pytest.raises(fd.ConfigError, match=r"max_requests=0"):
        fd.llm.BatchAPI(max_requests=0)
    with pytest.raises(fd.ConfigError, match=r"batch_api= takes True, False or an fd.llm"):
        fd.llm.OpenAI(api_key="k", batch_api="yes")
    assert fd.llm.OpenAI(api_key="k", batch_api=True).batch_api == fd.llm.BatchAPI()
    assert fd.llm.OpenAI(api_key="k").batch_api is None


# --- custom ids -----------------------------------------------------------------------------

_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
parts = st.tuples(
    st.text(min_size=1, max_size=40),
    st.text(min_size=1, max_size=40),
    st.none() | st.integers(0, 10**6),
    st.integers(0, 1000),
)
plain_parts = st.tuples(
    st.from_regex(r"[a-z0-9_]{1,20}", fullmatch=True),
    st.from_regex(r"[a-z0-9_]{1,20}", fullmatch=True),
    st.none() | st.integers(0, 99),
    st.integers(0, 9),
)


@given(st.sets(parts | plain_parts, max_size=30))
def test_custom_ids_are_short_plain_and_distinct(keys: set[tuple[Any, ...]]) -> None:
    ids = {custom_id(*key) for key in keys}
    assert len(ids) == len(keys)
    for text in ids:
        assert _ID.fullmatch(text)


def test_custom_ids_are_readable_when_they_can_be() -> None:
    assert custom_id("0123abcd", "classify", None, 0) == "0123abcd-classify-0"
    assert custom_id("0123abcd", "classify", 3, 1) == "0123abcd-classify-3-1"
    hashed = custom_id("0123abcd", "sub/classify.2", None, 0)
    assert re.fullmatch(r"h-[0-9a-f]{62}", hashed)
    assert custom_id("0123abcd", "sub/classify.2", None, 0) == hashed  # deterministic


async def test_a_cancelled_run_resumed_sends_its_requests_that_did_not_run(
    make: Make, server: LLMServer, sqlite_url: str
) -> None:
    llm = make(max_requests=1)
    async with fd.Context(batch=True, store=sqlite_url, llm=llm) as ctx:
        await cancel_when(ctx, lambda: server.batches.jobs, "again")
        await until(lambda: processed(ctx) == 1)
    server.batches.auto = True
    async with fd.Context(batch=True, store=sqlite_url, llm=make(max_requests=1)) as ctx:
        assert await ctx.resume("again") == "echo: q"
    assert server.batches.submitted == [cid("again")] * 2


PROVIDER: dict[str, Any] = {}


@fd.step(name="ask")
async def ask_own(question: str) -> str:
    # The step names its provider, so the context has none to cancel jobs with.
    return (await fd.llm.chat(question, llm=PROVIDER["llm"])).text


@fd.flow
async def ask_own_flow(question: str) -> str:
    return await ask_own(question)


async def test_a_resumed_step_waits_for_the_job_its_request_is_in(
    make: Make, server: LLMServer, sqlite_url: str
) -> None:
    """The journal, in one process: the run's context goes away while the job is in
    flight; the resumed run's step finds its request in the journal and waits for that
    job (across processes, with SIGKILL, see ``test_llm_batch_crash.py``)."""
    async with make(max_requests=1) as llm:
        PROVIDER["llm"] = llm
        with anyio.CancelScope() as scope:
            async with fd.Context(batch=True, store=sqlite_url) as ctx:
                await ctx.start(ask_own_flow, "q", run_id="resumed")
                await jobs(server, 1)
                scope.cancel()
    (job,) = server.batches.jobs
    assert server.batches.cancelled == []
    looks = {("GET", f"/v1/batches/{job.id}"), ("GET", f"/v1/messages/batches/{job.id}")}

    async def provider_side() -> None:
        # The resumed step asks how the job stands before it ends.
        await until(lambda: looks & set(server.batches.calls))
        server.batches.finish(job.id)

    async with make(max_requests=1) as llm, fd.Context(batch=True, store=sqlite_url) as ctx:
        PROVIDER["llm"] = llm
        async with anyio.create_task_group() as tg:
            tg.start_soon(provider_side)
            assert await ctx.resume("resumed") == "echo: q"
    assert server.batches.submitted == [cid("resumed")]


# --- FakeLLM's batch jobs -------------------------------------------------------------------


async def test_fake_llm_collects_a_batch_runs_calls_into_jobs(sqlite_url: str) -> None:
    from flowdsl.testing import FakeLLM

    fake = FakeLLM(
        lambda prompt: prompt.upper(),
        model="gpt-4o-mini",
        batch_api=fd.llm.BatchAPI(max_requests=4, poll_every=0.0),
    )
    questions = ["a", "b", "c", "d"]
    async with fd.Context(batch=True, store=sqlite_url, llm=fake) as ctx:
        results = await ctx.map(ask_flow, questions, run_ids=questions)
        record = (await ctx.store.load_nodes("a"))["ask"]
    assert results == ["A", "B", "C", "D"]
    (job,) = fake.batch_jobs.values()
    assert sorted(job) == sorted(cid(q) for q in questions)
    usage = record.usage
    assert usage is not None
    assert usage["batch_job"] in fake.batch_jobs
    standard = (usage["input_tokens"] * 0.15 + usage["output_tokens"] * 0.60) / 1e6
    assert usage["cost"] == pytest.approx(standard / 2)


async def test_fake_llm_scripted_failures_are_errored_lines(sqlite_url: str) -> None:
    from flowdsl.testing import FakeLLM

    fake = FakeLLM("ok", failures=[400], batch_api=True)
    async with fd.Context(batch=True, store=sqlite_url, llm=fake) as ctx:
        with pytest.raises(fd.StepFailed, match=r"FakeLLM answered 400"):
            await ctx.run(ask_flow, "q")
        assert await ctx.run(ask_flow, "q2") == "ok"
    assert len(fake.batch_jobs) == 2
