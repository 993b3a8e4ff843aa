"""FakeLLM, and what fd.llm.chat does around any provider: scope, streaming, usage, limits."""

from __future__ import annotations

import dataclasses
import enum
import typing
from collections.abc import Sequence
from typing import Any, Literal

import anyio
import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

import flowdsl as fd
import flowdsl.llm
from flowdsl import _codec
from flowdsl import events as ev
from flowdsl.llm import LLMError, Reply, StructuredOutputError, Usage
from flowdsl.llm._schema import answer_spec
from flowdsl.testing import FakeLLM, FakeReply

pytestmark = pytest.mark.anyio


# --- steps and flows ------------------------------------------------------------------------


@fd.step
async def reply_to(question: str) -> str:
    return (await fd.llm.chat(question)).text


@fd.flow
async def qa(question: str) -> str:
    return await reply_to(question)


@fd.step(retries=2, backoff=0.0, retry_on=(LLMError,))
async def patient(question: str) -> str:
    return (await fd.llm.chat(question)).text


@fd.flow
async def patient_flow(question: str) -> str:
    return await patient(question)


@attrs.frozen
class Label:
    kind: Literal["billing", "shipping", "other"]
    confidence: float


@fd.step
async def label(text: str) -> Label:
    reply = await fd.llm.chat(text, response_model=Label)
    parsed: Label = reply.parsed
    return parsed


@fd.flow
async def labeling(text: str) -> Label:
    return await label(text)


STOCK = {"apple": 3, "pear": 0}


@fd.step
def stock(item: str) -> int:
    """How many of an item are in stock."""
    return STOCK.get(item, 0)


@fd.step
async def shop(question: str) -> str:
    return (await fd.llm.chat(question, tools=[stock])).text


@fd.flow
async def shopping(question: str) -> str:
    return await shop(question)


# --- scripts --------------------------------------------------------------------------------


async def test_scripted_replies_come_in_order_and_calls_are_recorded() -> None:
    fake = FakeLLM(["first", FakeReply("second", output_tokens=9)])
    one = await fd.llm.chat("a", llm=fake, max_tokens=5, temperature=0.5)
    two = await fd.llm.chat([{"role": "user", "content": "b"}], llm=fake, model="big")
    assert (one.text, two.text) == ("first", "second")
    assert two.usage == Usage(1, 9)
    assert two.model == "big"
    assert fake.prompts == ["a", "b"]
    first = fake.calls[0]
    assert (first.model, first.max_tokens, first.temperature, first.stream) == (
        "fake",
        5,
        0.5,
        False,
    )
    with pytest.raises(LLMError, match=r"^FakeLLM ran out of scripted replies: request 3 came"):
        await fd.llm.chat("c", llm=fake)


async def test_a_function_of_the_prompt_and_the_echo_default() -> None:
    fake = FakeLLM(lambda prompt: "billing" if "refund" in prompt else "other")
    assert (await fd.llm.chat("a refund please", llm=fake)).text == "billing"
    assert (await fd.llm.chat("hello", llm=fake)).text == "other"
    assert (await fd.llm.chat("same words back", llm=FakeLLM())).text == "same words back"
    assert (await fd.llm.chat("x", llm=FakeLLM("always"))).text == "always"


async def test_system_prompt_is_the_first_message() -> None:
    fake = FakeLLM()
    await fd.llm.chat("q", llm=fake, system="be kind")
    assert fake.calls[0].messages == (
        {"role": "system", "content": "be kind"},
        {"role": "user", "content": "q"},
    )


# --- inside runs ----------------------------------------------------------------------------


async def test_streams_in_chunks_into_token_deltas() -> None:
    fake = FakeLLM("abcdefghij", chunk_size=4)
    events: list[Any] = []
    async with fd.Context(llm=fake, on_event=events.append) as ctx:
        assert await ctx.run(qa, "q") == "abcdefghij"
    assert [e.text for e in events if isinstance(e, ev.TokenDelta)] == ["abcd", "efgh", "ij"]
    assert fake.calls[0].stream


async def test_no_stream_when_nobody_watches() -> None:
    fake = FakeLLM("abc")
    async with fd.Context(llm=fake) as ctx:
        assert await ctx.run(qa, "q") == "abc"
    assert not fake.calls[0].stream


async def test_usage_and_cost_are_recorded_with_the_node() -> None:
    fake = FakeLLM(
        FakeReply("done", input_tokens=1000, output_tokens=500),
        prices={"fake": fd.llm.Price(input=2.0, output=10.0)},
    )
    async with fd.Context(llm=fake) as ctx:
        await ctx.run(qa, "q", run_id="u-1")
        nodes = await ctx.store.load_nodes("u-1")
    assert nodes["reply_to"].usage == {
        "input_tokens": 1000,
        "output_tokens": 500,
        "calls": 1,
        "cost": pytest.approx(0.007),
    }


async def test_injected_rate_limits_are_retried_by_the_step() -> None:
    fake = FakeLLM("made it", failures=[429, 429])
    events: list[Any] = []
    async with fd.Context(llm=fake, on_event=events.append) as ctx:
        assert await ctx.run(patient_flow, "q") == "made it"
    assert [c.failed for c in fake.calls] == [True, True, False]
    retrying = [e for e in events if isinstance(e, ev.StepRetrying)]
    assert [e.attempt for e in retrying] == [1, 2]
    assert "FakeLLM answered 429" in retrying[0].error


async def test_an_injected_401_fails_the_step() -> None:
    fake = FakeLLM("never", failures=[401])
    async with fd.Context(llm=fake) as ctx:
        with pytest.raises(fd.StepFailed) as info:
            await ctx.run(qa, "q")
    cause = info.value.__cause__
    assert isinstance(cause, LLMError)
    assert (cause.status_code, cause.retryable) == (401, False)
    assert len(fake.calls) == 1


async def test_injected_exceptions_are_raised_as_given() -> None:
    fake = FakeLLM("x", failures=[TimeoutError("slow")])
    with pytest.raises(TimeoutError, match=r"^slow$"):
        await fd.llm.chat("q", llm=fake)
    assert (await fd.llm.chat("q", llm=fake)).text == "x"


async def test_structured_output_from_an_instance_or_json_text() -> None:
    fake = FakeLLM([Label("billing", 0.9), '{"kind": "other", "confidence": 0.1}'])
    async with fd.Context(llm=fake) as ctx:
        assert await ctx.run(labeling, "refund") == Label("billing", 0.9)
        assert await ctx.run(labeling, "hi") == Label("other", 0.1)
    assert fake.calls[0].response_model is Label


async def test_structured_output_that_does_not_fit() -> None:
    fake = FakeLLM(['{"kind": "spam", "confidence": 1}', "not json at all"])
    with pytest.raises(StructuredOutputError, match=r"^the model's answer does not fit Label"):
        await fd.llm.chat("x", llm=fake, response_model=Label)
    with pytest.raises(StructuredOutputError, match=r"answer is not JSON.*'not json at all'"):
        await fd.llm.chat("x", llm=fake, response_model=Label)


async def test_tool_calls_run_steps_and_feed_results_back() -> None:
    fake = FakeLLM(
        [
            FakeReply(tool_calls=[("stock", {"item": "apple"}), ("stock", {"item": "pear"})]),
            "3 apples, no pears",
        ]
    )
    async with fd.Context(llm=fake) as ctx:
        assert await ctx.run(shopping, "apples? pears?") == "3 apples, no pears"
    assert fake.calls[0].tools == ("stock",)
    results = [m for m in fake.calls[1].messages if m["role"] == "tool"]
    assert [(m["name"], m["content"]) for m in results] == [("stock", "3"), ("stock", "0")]


# --- where the provider comes from ----------------------------------------------------------


async def test_outside_a_step_without_llm_is_a_config_error() -> None:
    with pytest.raises(fd.ConfigError, match=r"^fd\.llm\.chat was called outside a step"):
        await fd.llm.chat("q")


async def test_a_context_without_a_provider_names_the_node() -> None:
    async with fd.Context() as ctx:
        with pytest.raises(fd.StepFailed) as info:
            await ctx.run(qa, "q")
    assert isinstance(info.value.__cause__, fd.ConfigError)
    assert str(info.value.__cause__).startswith(
        "flow 'qa', node 'reply_to': no LLM provider: the context running this step has none"
    )


async def test_per_call_llm_wins_over_the_context() -> None:
    @fd.step
    async def pick(q: str) -> str:
        return (await fd.llm.chat(q, llm=FakeLLM("per call"))).text

    @fd.flow
    async def picked(q: str) -> str:
        return await pick(q)

    async with fd.Context(llm=FakeLLM("context")) as ctx:
        assert await ctx.run(picked, "q") == "per call"
        assert await ctx.run(qa, "q") == "context"


async def test_a_provider_written_from_scratch() -> None:
    class Shouty:
        async def chat(self, messages: Sequence[Any], **options: Any) -> Reply[Any]:
            return Reply(str(messages[-1]["content"]).upper(), Usage(1, 1), "shouty")

    assert isinstance(FakeLLM(), fd.llm.Provider)
    async with fd.Context(llm=Shouty()) as ctx:
        assert await ctx.run(qa, "hey") == "HEY"


# --- limits ---------------------------------------------------------------------------------


async def test_tokens_per_minute_make_the_next_call_wait() -> None:
    # 6000 tokens a minute is 100 a second; the first call spends the minute's budget.
    fake = FakeLLM(
        [FakeReply("big", input_tokens=6000, output_tokens=0), "small"],
        tokens_per_minute=6000,
    )
    await fd.llm.chat("x" * 40, llm=fake)
    started = anyio.current_time()
    await fd.llm.chat("y" * 40, llm=fake)  # an estimate of 10 tokens: a tenth of a second
    assert anyio.current_time() - started >= 0.09


async def test_max_concurrency_bounds_fake_calls_too() -> None:
    # Each call streams "a", then "b" a moment later: between the two it is in flight.
    fake = FakeLLM("ab", chunk_size=1, delay=0.01, max_concurrency=2)
    active = peak = 0

    def on_token(text: str) -> None:
        nonlocal active, peak
        active += 1 if text == "a" else -1
        peak = max(peak, active)

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(lambda: fd.llm.chat("q", llm=fake, on_token=on_token))
    assert peak == 2
    assert len(fake.calls) == 5


# --- properties -----------------------------------------------------------------------------


@given(text=st.text(max_size=60), chunk=st.integers(1, 8))
async def test_chunks_join_to_the_text(text: str, chunk: int) -> None:
    pieces: list[str] = []
    reply = await fd.llm.chat("q", llm=FakeLLM(text, chunk_size=chunk), on_token=pieces.append)
    assert "".join(pieces) == reply.text == text
    assert all(0 < len(p) <= chunk for p in pieces)


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


Strategy = st.SearchStrategy[Any]
TypeAndValues = tuple[Any, Strategy]

_json_floats = st.floats(allow_nan=False, allow_infinity=False, width=32)
_LEAVES: list[TypeAndValues] = [
    (str, st.text(max_size=5)),
    (int, st.integers(-(2**31), 2**31)),
    (float, _json_floats),
    (bool, st.booleans()),
    (Color, st.sampled_from(Color)),
    (Literal["a", "b"], st.sampled_from(["a", "b"])),
]
_names = iter(range(10**9))


def _record(fields: list[TypeAndValues], use_dataclass: bool) -> TypeAndValues:
    names = [f"f{i}" for i in range(len(fields))]
    if use_dataclass:
        cls = dataclasses.make_dataclass(
            f"D{next(_names)}", [(n, tp) for n, (tp, _) in zip(names, fields, strict=True)]
        )
    else:
        cls = attrs.make_class(
            f"A{next(_names)}",
            {n: attrs.field(type=tp) for n, (tp, _) in zip(names, fields, strict=True)},
            frozen=True,
        )
    values = st.builds(cls, *[values for _, values in fields])
    return cls, values


def _extend(inner: st.SearchStrategy[TypeAndValues]) -> st.SearchStrategy[TypeAndValues]:
    def as_list(pair: TypeAndValues) -> TypeAndValues:
        return list[pair[0]], st.lists(pair[1], max_size=3)

    def as_optional(pair: TypeAndValues) -> TypeAndValues:
        return typing.Optional[pair[0]], st.none() | pair[1]  # noqa: UP045

    return (
        inner.map(as_list)
        | inner.map(as_optional)
        | st.tuples(st.lists(inner, min_size=1, max_size=3), st.booleans()).map(
            lambda args: _record(*args)
        )
    )


types_and_values = st.recursive(st.sampled_from(_LEAVES), _extend, max_leaves=6)


# The value is drawn with its type, not inside the test: an interactive draw that
# overruns raises hypothesis' StopTest through the event loop's runner task.
typed_values = types_and_values.flatmap(lambda pair: st.tuples(st.just(pair[0]), pair[1]))


@given(typed=typed_values)
async def test_any_value_of_any_described_type_comes_back_from_the_model(
    typed: tuple[Any, Any],
) -> None:
    tp, value = typed
    encoded = _codec.to_data(value)
    spec = answer_spec(tp)
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate({"value": encoded} if spec.wrapped else encoded, spec.schema)
    fake = FakeLLM(FakeReply(data={"value": encoded} if spec.wrapped else encoded))
    reply = await fd.llm.chat("q", llm=fake, response_model=tp)
    assert reply.parsed == value
