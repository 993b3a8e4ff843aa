"""The OpenAI and Anthropic providers at the wire: the real SDKs against a local server.

Every test runs for both providers on both anyio backends.  The server (``_llm_server``)
speaks each protocol, records what the SDK sent, and answers from a per-test script.
"""

from __future__ import annotations

import enum
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import attrs
import pytest

import flowdsl as fd
import flowdsl.llm
from flowdsl import events as ev
from flowdsl.llm import LLMError, StructuredOutputError

from _llm_server import Answer, LLMServer, Request

pytestmark = pytest.mark.anyio

KEY = "sk-test-SECRET-0123456789abcdef"
MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-3-5-haiku-latest"}


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


def make_provider(kind: str, server: LLMServer, **options: Any) -> flowdsl.llm.BaseProvider:
    options.setdefault("model", MODELS[kind])
    if kind == "openai":
        return fd.llm.OpenAI(api_key=KEY, base_url=server.openai_url, **options)
    return fd.llm.Anthropic(api_key=KEY, base_url=server.anthropic_url, **options)


@pytest.fixture
async def llm(kind: str, server: LLMServer) -> AsyncIterator[flowdsl.llm.BaseProvider]:
    provider = make_provider(kind, server, max_retries=2)
    async with provider:
        yield provider


def sent_text(request: Request) -> list[Any]:
    """The (role, content) pairs of a request, system prompt first, in either protocol."""
    body = request.body
    pairs: list[Any] = []
    if request.protocol == "anthropic" and "system" in body:
        pairs.append(("system", body["system"]))
    pairs += [(m["role"], m["content"]) for m in body["messages"]]
    return pairs


# --- steps and flows ------------------------------------------------------------------------


@fd.step
async def answer(question: str) -> str:
    reply = await fd.llm.chat(question, system="Be brief.", max_tokens=50)
    return reply.text


@fd.flow
async def ask(question: str) -> str:
    return await answer(question)


class Severity(enum.Enum):
    LOW = "low"
    HIGH = "high"


@attrs.frozen
class Customer:
    name: str
    vip: bool


@attrs.frozen
class Ticket:
    """A support ticket, classified."""

    topic: str
    severity: Severity
    tags: list[str]
    customer: Customer
    order: int | None = None


TICKET_DATA = {
    "topic": "billing",
    "severity": "high",
    "tags": ["refund", "urgent"],
    "customer": {"name": "Ada", "vip": True},
    "order": 42,
}


@fd.step
async def classify(text: str) -> Ticket:
    reply = await fd.llm.chat(f"Classify: {text}", response_model=Ticket)
    ticket: Ticket = reply.parsed
    return ticket


@fd.flow
async def triage(text: str) -> Ticket:
    return await classify(text)


LOOKED_UP: list[int] = []


@fd.step
async def lookup_order(order: int, verbose: bool = False) -> dict[str, Any]:
    """Find an order by its number."""
    LOOKED_UP.append(order)
    return {"order": order, "status": "shipped"}


# --- the requests the SDKs send -------------------------------------------------------------


async def test_request_carries_model_messages_and_limits(
    llm: flowdsl.llm.BaseProvider, server: LLMServer, kind: str
) -> None:
    reply = await fd.llm.chat(
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Tell me"},
        ],
        llm=llm,
        system="Be brief.",
        max_tokens=77,
        temperature=0.25,
    )
    assert reply.text == "echo: Tell me"
    assert reply.usage == fd.llm.Usage(11, 3)
    (request,) = server.requests
    assert request.body["model"] == MODELS[kind]
    assert sent_text(request) == [
        ("system", "Be brief."),
        ("user", "Hi"),
        ("assistant", "Hello"),
        ("user", "Tell me"),
    ]
    assert request.body["temperature"] == 0.25
    assert "stream" not in request.body  # nobody watches: no streaming
    if kind == "openai":
        assert request.path == "/v1/chat/completions"
        assert request.body["max_tokens"] == 77  # base_url given: the compatible field
    else:
        assert request.path == "/v1/messages"
        assert request.body["max_tokens"] == 77
    assert KEY in request.headers.get("authorization", "") + request.headers.get("x-api-key", "")


async def test_model_per_call_overrides_the_default(
    llm: flowdsl.llm.BaseProvider, server: LLMServer
) -> None:
    reply = await fd.llm.chat("x", llm=llm, model="other-model")
    assert server.requests[0].body["model"] == "other-model"
    assert reply.model == "other-model"


async def test_anthropic_gets_a_default_max_tokens(server: LLMServer) -> None:
    async with make_provider("anthropic", server, max_tokens=123) as llm:
        await fd.llm.chat("x", llm=llm)
    assert server.requests[0].body["max_tokens"] == 123


async def test_openai_sends_max_completion_tokens_when_asked(server: LLMServer) -> None:
    async with make_provider("openai", server, max_tokens_field="max_completion_tokens") as llm:
        await fd.llm.chat("x", llm=llm, max_tokens=9)
    body = server.requests[0].body
    assert body["max_completion_tokens"] == 9
    assert "max_tokens" not in body


# --- streaming ------------------------------------------------------------------------------


async def test_streaming_reaches_token_deltas_in_a_real_run(
    llm: flowdsl.llm.BaseProvider, server: LLMServer, kind: str
) -> None:
    events: list[Any] = []
    server.script(Answer("The parcel left on Monday.", chunk=4, output_tokens=5))
    async with fd.Context(llm=llm, on_event=events.append) as ctx:
        result = await ctx.run(ask, "Where is it?", run_id="stream-1")
        nodes = await ctx.store.load_nodes("stream-1")
    assert result == "The parcel left on Monday."
    deltas = [e for e in events if isinstance(e, ev.TokenDelta)]
    assert len(deltas) == 7
    assert "".join(d.text for d in deltas) == result
    assert {(d.run_id, d.node_id, d.attempt) for d in deltas} == {("stream-1", "answer", 1)}
    # The deltas come between the step's start and its end.
    kinds = [type(e) for e in events if e.node_id == "answer"]
    assert kinds[0] is ev.StepStarted
    assert kinds[-1] is ev.StepFinished
    (request,) = server.requests
    assert request.body["stream"] is True
    if kind == "openai":
        assert request.body["stream_options"] == {"include_usage": True}
    usage = nodes["answer"].usage
    assert usage is not None
    assert (usage["input_tokens"], usage["output_tokens"], usage["calls"]) == (11, 5, 1)
    price = llm.prices.lookup(MODELS[kind])
    assert price is not None
    assert usage["cost"] == pytest.approx(price.cost(fd.llm.Usage(11, 5)))


async def test_events_from_run_events_include_the_stream(
    llm: flowdsl.llm.BaseProvider, server: LLMServer
) -> None:
    server.script(Answer("one two three", chunk=2))
    async with fd.Context(llm=llm) as ctx:
        run = await ctx.start(ask, "go")
        seen = [e async for e in run.events()]
        assert await run.result() == "one two three"
    assert "".join(e.text for e in seen if isinstance(e, ev.TokenDelta)) == "one two three"


async def test_on_token_streams_outside_a_flow(
    llm: flowdsl.llm.BaseProvider, server: LLMServer
) -> None:
    pieces: list[str] = []
    server.script(Answer("abcdefgh", chunk=3))
    reply = await fd.llm.chat("x", llm=llm, on_token=pieces.append)
    assert pieces == ["abc", "def", "gh"]
    assert reply.text == "abcdefgh"
    assert server.requests[0].streamed


# --- structured output ----------------------------------------------------------------------


async def test_structured_output_is_parsed_into_the_class(
    llm: flowdsl.llm.BaseProvider, server: LLMServer, kind: str
) -> None:
    server.script(Answer(data=TICKET_DATA))
    async with fd.Context(llm=llm) as ctx:
        ticket = await ctx.run(triage, "I was charged twice")
    assert ticket == Ticket(
        "billing", Severity.HIGH, ["refund", "urgent"], Customer("Ada", True), 42
    )
    body = server.requests[0].body
    if kind == "openai":
        fmt = body["response_format"]
        assert fmt["type"] == "json_schema"
        assert fmt["json_schema"]["name"] == "Ticket"
        assert fmt["json_schema"]["strict"] is True
        schema = fmt["json_schema"]["schema"]
    else:
        assert body["tool_choice"] == {"type": "tool", "name": "Ticket"}
        (tool,) = body["tools"]
        assert tool["name"] == "Ticket"
        schema = tool["input_schema"]
    assert schema["required"] == ["topic", "severity", "tags", "customer", "order"]
    assert schema["additionalProperties"] is False
    assert schema["properties"]["severity"] == {"type": "string", "enum": ["low", "high"]}
    assert schema["properties"]["order"] == {"anyOf": [{"type": "integer"}, {"type": "null"}]}
    assert schema["description"] == "A support ticket, classified."


async def test_structured_output_in_a_stream(
    llm: flowdsl.llm.BaseProvider, server: LLMServer
) -> None:
    server.script(Answer(data=TICKET_DATA))
    async with fd.Context(llm=llm, on_event=lambda e: None) as ctx:
        ticket = await ctx.run(triage, "x")
    assert ticket.customer == Customer("Ada", True)
    assert server.requests[0].streamed


async def test_an_answer_that_does_not_fit_says_what_came_back(
    llm: flowdsl.llm.BaseProvider, server: LLMServer
) -> None:
    server.script(Answer(data={"topic": "billing", "severity": "extreme"}))
    fits = r"^the model's answer does not fit Ticket "
    with pytest.raises(StructuredOutputError, match=fits) as info:
        await fd.llm.chat("x", llm=llm, response_model=Ticket)
    message = str(info.value)
    assert "expected Severity @ $.severity; required field missing @ $.tags" in message
    assert '"extreme"' in message  # what came back
    assert '"enum":["low","high"]' in message  # what was expected
    assert info.value.retryable


async def test_a_failing_structured_step_names_the_node(
    llm: flowdsl.llm.BaseProvider, server: LLMServer
) -> None:
    server.script(Answer(data={"topic": 3}))
    async with fd.Context(llm=llm) as ctx:
        with pytest.raises(fd.StepFailed) as info:
            await ctx.run(triage, "x")
    assert info.value.node_id == "classify"
    cause = info.value.__cause__
    assert isinstance(cause, StructuredOutputError)
    assert str(cause).startswith("flow 'triage', node 'classify': the model's answer does not fit")
    assert "required field missing @ $.severity" in str(cause)


async def test_openai_plain_text_instead_of_json(server: LLMServer) -> None:
    server.script(Answer("Sorry, I cannot do JSON."))
    async with make_provider("openai", server) as llm:
        with pytest.raises(StructuredOutputError, match=r"answer is not JSON.*'Sorry, I cannot"):
            await fd.llm.chat("x", llm=llm, response_model=Ticket)


# --- tools ----------------------------------------------------------------------------------


async def test_tool_steps_are_described_run_and_answered(
    llm: flowdsl.llm.BaseProvider, server: LLMServer, kind: str
) -> None:
    LOOKED_UP.clear()
    server.script(
        Answer(tool_calls=(("lookup_order", {"order": 7}), ("lookup_order", {"order": 8}))),
        Answer("Both shipped."),
    )
    reply = await fd.llm.chat("Where are 7 and 8?", llm=llm, tools=[lookup_order])
    assert reply.text == "Both shipped."
    assert sorted(LOOKED_UP) == [7, 8]
    assert [c.arguments for c in reply.tool_calls] == [{"order": 7}, {"order": 8}]
    assert reply.calls == 2
    assert reply.usage.input_tokens == 22
    first, second = server.requests
    tools = first.body["tools"]
    assert len(tools) == 1
    described = tools[0]["function"] if kind == "openai" else tools[0]
    params = described["parameters"] if kind == "openai" else described["input_schema"]
    assert described["name"] == "lookup_order"
    assert described["description"] == "Find an order by its number."
    assert params == {
        "type": "object",
        "properties": {"order": {"type": "integer"}, "verbose": {"type": "boolean"}},
        "required": ["order"],
    }
    results = _tool_results(second)
    assert [r["content"] for r in results] == [
        '{"order":7,"status":"shipped"}',
        '{"order":8,"status":"shipped"}',
    ]


def _tool_results(request: Request) -> list[dict[str, Any]]:
    messages = request.body["messages"]
    if request.protocol == "openai":
        return [m for m in messages if m["role"] == "tool"]
    blocks = [b for m in messages if isinstance(m["content"], list) for b in m["content"]]
    return [b for b in blocks if b["type"] == "tool_result"]


async def test_bad_tool_arguments_go_back_to_the_model(
    llm: flowdsl.llm.BaseProvider, server: LLMServer
) -> None:
    LOOKED_UP.clear()
    server.script(
        Answer(tool_calls=(("lookup_order", {"number": 7}),)),
        Answer(tool_calls=(("lookup_order", {"order": 7}),)),
        Answer("Found it."),
    )
    reply = await fd.llm.chat("x", llm=llm, tools=[lookup_order], stream=True)
    assert reply.text == "Found it."
    assert LOOKED_UP == [7]
    (error,) = _tool_results(server.requests[1])
    assert "unknown parameters ['number']" in error["content"]
    assert "missing parameters ['order']" in error["content"]


async def test_tool_rounds_are_bounded(llm: flowdsl.llm.BaseProvider, server: LLMServer) -> None:
    server.default = lambda request: Answer(tool_calls=(("lookup_order", {"order": 1}),))
    with pytest.raises(LLMError, match=r"still asks for tools \(lookup_order\) after 2 rounds"):
        await fd.llm.chat("x", llm=llm, tools=[lookup_order], max_tool_rounds=2)
    assert server.count() == 3


# --- retries and failures -------------------------------------------------------------------


async def test_429_is_retried_after_retry_after(
    llm: flowdsl.llm.BaseProvider, server: LLMServer
) -> None:
    server.script(
        Answer(status=429, error="slow down", headers={"retry-after": "0.1"}),
        Answer(status=429, error="slow down", headers={"retry-after": "0.1"}),
        Answer("finally"),
    )
    started = anyio.current_time()
    reply = await fd.llm.chat("x", llm=llm)
    assert reply.text == "finally"
    assert server.count() == 3
    assert anyio.current_time() - started >= 0.19  # two waits of Retry-After


async def test_500_and_a_dropped_connection_are_retried(
    llm: flowdsl.llm.BaseProvider, server: LLMServer
) -> None:
    server.script(
        Answer(status=500, error="boom", headers={"retry-after": "0.01"}),
        Answer(drop=True),
        Answer("ok now"),
    )
    reply = await fd.llm.chat("x", llm=llm)
    assert reply.text == "ok now"
    assert server.count() == 3


async def test_retries_run_out_on_429(server: LLMServer, kind: str) -> None:
    server.default = lambda r: Answer(status=429, error="quota", headers={"retry-after": "0.01"})
    async with make_provider(kind, server, max_retries=1) as llm:
        with pytest.raises(LLMError, match=r"answered 429 .*: quota.*Still rate limited") as info:
            await fd.llm.chat("x", llm=llm)
    assert server.count() == 2
    assert info.value.status_code == 429
    assert info.value.retryable


@fd.step(retries=3, backoff=0.0, retry_on=(TimeoutError,))
async def guarded(question: str) -> str:
    return (await fd.llm.chat(question)).text


@fd.flow
async def guarded_flow(question: str) -> str:
    return await guarded(question)


async def test_401_fails_at_once_with_what_the_provider_said(
    llm: flowdsl.llm.BaseProvider, server: LLMServer, kind: str
) -> None:
    server.default = lambda r: Answer(status=401, error="invalid x-api-key")
    events: list[Any] = []
    async with fd.Context(llm=llm, on_event=events.append) as ctx:
        with pytest.raises(fd.StepFailed) as info:
            await ctx.run(guarded_flow, "x")
    assert server.count() == 1  # neither the SDK nor the step retried
    assert info.value.node_id == "guarded"
    cause = info.value.__cause__
    assert isinstance(cause, LLMError)
    assert cause.status_code == 401
    assert not cause.retryable
    provider = "OpenAI" if kind == "openai" else "Anthropic"
    assert str(cause) == (
        f"flow 'guarded_flow', node 'guarded': {provider} answered 401 for model "
        f"{MODELS[kind]!r}: invalid x-api-key. Check the API key: "
        f"{provider.upper()}_API_KEY, or fd.llm.{provider}(api_key=...)"
    )
    assert "invalid x-api-key" in str(info.value)
    # The SDK's own exception is kept underneath.
    sdk_error = cause.__cause__
    assert sdk_error is not None
    assert type(sdk_error).__name__ == "AuthenticationError"
    assert not [e for e in events if isinstance(e, ev.StepRetrying)]


@pytest.mark.parametrize("status", [400, 403, 404])
async def test_other_client_errors_are_not_retried(
    llm: flowdsl.llm.BaseProvider, server: LLMServer, status: int
) -> None:
    server.default = lambda r: Answer(status=status, error=f"no ({status})")
    with pytest.raises(LLMError, match=rf"answered {status} .*: no \({status}\)"):
        await fd.llm.chat("x", llm=llm)
    assert server.count() == 1


async def test_unreachable_server_is_a_retryable_llm_error(kind: str) -> None:
    with socket.socket() as sock:  # a port that nothing listens on once it is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}" + ("/v1" if kind == "openai" else "")
    provider: flowdsl.llm.BaseProvider
    if kind == "openai":
        provider = fd.llm.OpenAI(api_key=KEY, base_url=url, model="m", max_retries=0)
    else:
        provider = fd.llm.Anthropic(api_key=KEY, base_url=url, model="m", max_retries=0)
    async with provider:
        with pytest.raises(LLMError, match=r"^cannot reach .* at http://127\.0\.0\.1") as info:
            await fd.llm.chat("x", llm=provider)
    assert info.value.retryable
    assert info.value.status_code is None


# --- keys -----------------------------------------------------------------------------------


async def test_the_key_reaches_no_event_record_or_message(
    llm: flowdsl.llm.BaseProvider, server: LLMServer
) -> None:
    events: list[Any] = []
    # The provider echoes the key in its error, as some do; flowdsl must not repeat it.
    server.script(Answer("fine", chunk=2), Answer(status=401, error=f"bad key {KEY}"))
    async with fd.Context(llm=llm, on_event=events.append) as ctx:
        assert await ctx.run(ask, "a", run_id="keys-ok") == "fine"
        with pytest.raises(fd.StepFailed) as info:
            await ctx.run(ask, "b", run_id="keys-bad")
        records = [await ctx.store.get_run("keys-ok"), await ctx.store.get_run("keys-bad")]
        nodes = [await ctx.store.load_nodes("keys-ok"), await ctx.store.load_nodes("keys-bad")]
    assert events
    assert any(isinstance(e, ev.TokenDelta) for e in events)
    text = " ".join(map(repr, [*events, *records, *nodes, llm, info.value, info.value.__cause__]))
    text += str(info.value) + str(info.value.__cause__)
    assert KEY not in text
    assert "bad key ***" in str(info.value.__cause__)


# --- limits ---------------------------------------------------------------------------------


async def test_requests_in_flight_are_bounded(server: LLMServer, kind: str) -> None:
    async with make_provider(kind, server, max_concurrency=2) as llm:
        server.hold()
        results: list[str] = []

        async def one(i: int) -> None:
            results.append((await fd.llm.chat(f"q{i}", llm=llm)).text)

        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(one, i)
            await anyio.to_thread.run_sync(server.wait_for, lambda s: s.in_flight == 2)
            await anyio.wait_all_tasks_blocked()
            assert llm.limits.statistics() == (2, 3)
            server.release()
    assert sorted(results) == [f"echo: q{i}" for i in range(5)]
    assert server.max_in_flight == 2
    assert server.count() == 5


async def test_the_limit_is_shared_by_concurrent_runs(server: LLMServer, kind: str) -> None:
    server.default = lambda r: Answer(f"echo: {r.last_user_text}", delay=0.05)
    llm = make_provider(kind, server, max_concurrency=1)
    async with llm, fd.Context(llm=llm) as ctx:
        results = await ctx.map(ask, [f"q{i}" for i in range(4)])
    assert results == [f"echo: q{i}" for i in range(4)]
    assert server.max_in_flight == 1
