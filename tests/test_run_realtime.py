"""The real-time context: concurrency, limits, retries, timeouts, events, the codec, fd.run."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.lowlevel
import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

import flowdsl as fd
from flowdsl import events as ev

pytestmark = pytest.mark.anyio


# Steps reach per-test state (events, counters) through these; each test resets them.
GATES: dict[str, anyio.Event] = {}
CALLS: Counter[str] = Counter()
RUNNING = {"now": 0, "peak": 0}


@pytest.fixture(autouse=True)
def _fresh_state() -> Iterator[None]:
    GATES.clear()
    CALLS.clear()
    RUNNING.update(now=0, peak=0)
    yield
    GATES.clear()


def kinds(events: list[Any]) -> list[tuple[str, str | None]]:
    return [(type(e).__name__, e.node_id) for e in events]


# --- concurrency --------------------------------------------------------------------------


@fd.step
async def meet(me: str, other: str) -> str:
    """Finishes only once `other` has started: proof the two ran at the same time."""
    GATES[me].set()
    await GATES[other].wait()
    return me


@fd.step
async def pair(a: str, b: str) -> str:
    return a + b


@fd.flow
async def rendezvous(x: str) -> str:
    left = await meet("left", "right")
    right = await meet("right", "left")
    return await pair(left, right)


async def test_independent_steps_run_concurrently() -> None:
    GATES.update(left=anyio.Event(), right=anyio.Event())
    events: list[Any] = []
    with anyio.fail_after(10):  # a serial scheduler would deadlock here
        async with fd.Context(on_event=events.append) as ctx:
            assert await ctx.run(rendezvous, "x") == "leftright"
    order = kinds(events)
    first_finish = min(
        order.index(("StepFinished", "meet")), order.index(("StepFinished", "meet-2"))
    )
    assert order.index(("StepStarted", "meet")) < first_finish
    assert order.index(("StepStarted", "meet-2")) < first_finish
    assert order.index(("StepStarted", "pair")) > order.index(("StepFinished", "meet-2"))


@fd.step
async def busy(i: int) -> int:
    RUNNING["now"] += 1
    RUNNING["peak"] = max(RUNNING["peak"], RUNNING["now"])
    for _ in range(5):  # let every other ready task run, if the limit allowed it
        await anyio.lowlevel.checkpoint()
    RUNNING["now"] -= 1
    return i


@fd.step
async def total(*parts: int) -> int:
    return sum(parts)


@fd.flow
async def fan(n: int) -> int:
    parts = [await busy(i) for i in range(6)]
    return await total(*parts)


@pytest.mark.parametrize(("limit", "peak"), [(1, 1), (2, 2), (None, 6)])
async def test_max_concurrency_bounds_running_steps(limit: int | None, peak: int) -> None:
    events: list[Any] = []
    async with fd.Context(max_concurrency=limit, on_event=events.append) as ctx:
        assert await ctx.run(fan, 0) == 15
    assert RUNNING["peak"] == peak
    running = observed = 0
    for event in events:
        if isinstance(event, ev.StepStarted):
            running += 1
        elif isinstance(event, ev.StepFinished | ev.StepFailed):
            running -= 1
        observed = max(observed, running)
    assert observed == peak


# --- retries and timeouts -----------------------------------------------------------------


class Flaky(Exception):
    pass


@fd.step(retries=3, backoff=0)
async def flaky(x: int, failures: int) -> int:
    CALLS["flaky"] += 1
    if CALLS["flaky"] <= failures:
        raise Flaky(f"attempt {CALLS['flaky']} failed")
    return x * 2


@fd.flow
async def retried(x: int, failures: int) -> int:
    return await flaky(x, failures)


async def test_retries_until_success() -> None:
    events: list[Any] = []
    async with fd.Context(on_event=events.append) as ctx:
        assert await ctx.run(retried, 21, 2) == 42
    steps = [e for e in events if e.node_id == "flaky"]
    assert [(type(e).__name__, e.attempt) for e in steps] == [
        ("StepStarted", 1),
        ("StepRetrying", 1),
        ("StepStarted", 2),
        ("StepRetrying", 2),
        ("StepStarted", 3),
        ("StepFinished", 3),
    ]
    retrying = [e for e in steps if isinstance(e, ev.StepRetrying)]
    assert [e.error for e in retrying] == ["Flaky: attempt 1 failed", "Flaky: attempt 2 failed"]
    assert all(e.delay == 0 for e in retrying)


async def test_retries_run_out() -> None:
    events: list[Any] = []
    async with fd.Context(on_event=events.append) as ctx:
        with pytest.raises(fd.StepFailed) as info:
            await ctx.run(retried, 1, 10)
    assert CALLS["flaky"] == 4
    assert info.value.node_id == "flaky"
    assert isinstance(info.value.__cause__, Flaky)
    assert str(info.value.__cause__) == "attempt 4 failed"
    failed = [e for e in events if isinstance(e, ev.StepFailed)]
    assert [(e.node_id, e.attempt) for e in failed] == [("flaky", 4)]
    assert isinstance(events[-1], ev.RunFailed)
    assert events[-1].node_id == "flaky"


@fd.step(retries=3, backoff=0, retry_on=(ConnectionError,))
async def picky(kind: str) -> str:
    CALLS[kind] += 1
    if CALLS[kind] == 1:
        raise ConnectionError("reset") if kind == "net" else ValueError("bad input")
    return kind


@fd.flow
async def choosy(kind: str) -> str:
    return await picky(kind)


async def test_retry_on_filters_exceptions() -> None:
    events: list[Any] = []
    async with fd.Context(on_event=events.append) as ctx:
        assert await ctx.run(choosy, "net") == "net"
        with pytest.raises(fd.StepFailed) as info:
            await ctx.run(choosy, "value")
    assert dict(CALLS) == {"net": 2, "value": 1}  # a ValueError is not retried
    assert isinstance(info.value.__cause__, ValueError)
    assert sum(isinstance(e, ev.StepRetrying) for e in events) == 1


@fd.step(timeout=0.05)
async def hang(x: int) -> int:
    CALLS["hang"] += 1
    await anyio.Event().wait()  # never set
    return x


@fd.step(timeout=0.05, retries=2, backoff=0)
async def hang_retried(x: int) -> int:
    CALLS["hang_retried"] += 1
    await anyio.Event().wait()
    return x


@fd.flow
async def stuck(x: int) -> int:
    return await hang(x)


@fd.flow
async def stuck_retried(x: int) -> int:
    return await hang_retried(x)


async def test_timeout_fails_the_step_with_timeout_error() -> None:
    events: list[Any] = []
    async with fd.Context(on_event=events.append) as ctx:
        with pytest.raises(fd.StepFailed) as info:
            await ctx.run(stuck, 1)
    assert isinstance(info.value.__cause__, TimeoutError)
    assert info.value.node_id == "hang"
    assert "0.05" in str(info.value)  # the message says which timeout ran out
    assert kinds(events) == [
        ("RunStarted", None),
        ("StepStarted", "hang"),
        ("StepFailed", "hang"),
        ("RunFailed", "hang"),
    ]


async def test_timeout_is_retried() -> None:
    events: list[Any] = []
    async with fd.Context(on_event=events.append) as ctx:
        with pytest.raises(fd.StepFailed) as info:
            await ctx.run(stuck_retried, 1)
    assert isinstance(info.value.__cause__, TimeoutError)
    assert CALLS["hang_retried"] == 3
    retrying = [e for e in events if isinstance(e, ev.StepRetrying)]
    assert [e.attempt for e in retrying] == [1, 2]
    assert all(e.error.startswith("TimeoutError") for e in retrying)


# --- where flows run ----------------------------------------------------------------------


@fd.step
async def double(x: int) -> int:
    CALLS["double"] += 1
    return x * 2


@fd.step
async def plus_one(x: int) -> int:
    return x + 1


@fd.flow
async def chain(x: int) -> int:
    return await plus_one(await double(x))


@fd.step
def blocking(x: int) -> str:
    """A plain `def` step: it runs in a worker thread."""
    return f"{x} on {threading.current_thread().name}"


@fd.flow
async def threaded(x: int) -> str:
    return await blocking(x)


def test_fd_run_from_sync_code() -> None:
    assert fd.run(chain, 20) == 41


def test_fd_run_on_trio() -> None:
    assert fd.run(chain, 3, backend="trio") == 7


async def test_fd_run_inside_a_running_event_loop() -> None:
    # A notebook cell: fd.run blocks this loop and runs the flow in a helper thread.
    assert fd.run(chain, 1) == 3


async def test_a_plain_def_step_runs_in_a_thread() -> None:
    async with fd.Context() as ctx:
        result = await ctx.run(threaded, 5)
    assert result.startswith("5 on ")
    assert result != f"5 on {threading.current_thread().name}"


async def test_awaiting_a_flow_uses_the_entered_context() -> None:
    events: list[Any] = []
    async with fd.Context(on_event=events.append) as ctx:
        assert fd.current_context() is ctx
        assert await chain(5) == 11
        runs = await ctx.store.list_runs()
    assert [r.flow for r in runs] == ["chain"]
    assert runs[0].status is fd.RunStatus.FINISHED
    assert kinds(events)[0] == ("RunStarted", None)
    assert fd.current_context() is not ctx


async def test_start_is_idempotent_by_run_id() -> None:
    async with fd.Context() as ctx:
        GATES["go"] = anyio.Event()
        first = await ctx.start(gated, 4, run_id="t-42")
        again = await ctx.start(gated, 4, run_id="t-42")
        assert again is first  # the same live run, not a second one
        GATES["go"].set()
        assert await first.result() == 8
        later = await ctx.start(gated, 4, run_id="t-42")  # finished: its stored result
        assert await later.result() == 8
        assert await ctx.run(gated, 4, run_id="t-42") == 8
    assert CALLS["gated"] == 1


@fd.step
async def wait_then_double(x: int) -> int:
    CALLS["gated"] += 1
    await GATES["go"].wait()
    return x * 2


@fd.flow
async def gated(x: int) -> int:
    return await wait_then_double(x)


async def test_run_events_are_the_run_in_order() -> None:
    seen: list[Any] = []
    async with fd.Context(on_event=seen.append) as ctx:
        run = await ctx.start(chain, 2, run_id="r-1")
        events = [e async for e in run.events()]
        assert await run.result() == 5
    assert kinds(events) == [
        ("RunStarted", None),
        ("StepStarted", "double"),
        ("StepFinished", "double"),
        ("StepStarted", "plus_one"),
        ("StepFinished", "plus_one"),
        ("RunFinished", None),
    ]
    assert {e.run_id for e in events} == {"r-1"}
    assert events[2].result == 4
    assert events[-1].result == 5
    assert [e.at for e in events] == sorted(e.at for e in events)
    assert seen == events  # on_event hears exactly the same events


async def test_a_late_subscriber_sees_the_whole_run() -> None:
    async with fd.Context() as ctx:
        run = await ctx.start(chain, 2)
        assert await run.result() == 5
        events = [e async for e in run.events()]
    assert kinds(events)[0] == ("RunStarted", None)
    assert kinds(events)[-1] == ("RunFinished", None)


@fd.step
async def maybe_fail(x: int) -> int:
    if x < 0:
        raise ValueError(f"negative: {x}")
    return x * 10


@fd.flow
async def tens(x: int) -> int:
    return await maybe_fail(x)


async def test_map_keeps_input_order() -> None:
    async with fd.Context() as ctx:
        assert await ctx.map(tens, [3, 1, 2, 0], progress=False) == [30, 10, 20, 0]
        results = await ctx.map(tens, [1, -1, 2], return_exceptions=True, progress=False)
        with pytest.raises(fd.StepFailed) as info:
            await ctx.map(tens, [1, -5], progress=False)
    assert results[0] == 10
    assert results[2] == 20
    failure = results[1]
    assert isinstance(failure, fd.StepFailed)
    assert failure.node_id == "maybe_fail"
    assert str(failure.__cause__) == "negative: -1"
    assert info.value.node_id == "maybe_fail"


async def test_map_failure_keeps_its_cause() -> None:
    async with fd.Context() as ctx:
        with pytest.raises(fd.StepFailed) as info:
            await ctx.map(tens, [1, -5], progress=False)
    assert str(info.value.__cause__) == "negative: -5"


# --- the codec in real time ---------------------------------------------------------------


class Opaque:
    pass


@fd.step
async def make_opaque(x: int) -> Any:
    return Opaque()


@fd.flow
async def opaque(x: int) -> Any:
    return await make_opaque(x)


async def test_an_unencodable_result_fails_the_step_with_a_codec_error() -> None:
    async with fd.Context() as ctx:
        with pytest.raises(fd.StepFailed) as info:
            await ctx.run(opaque, 1)
    error = info.value
    assert isinstance(error, fd.CodecError)
    assert error.node_id == "make_opaque"
    assert "make_opaque" in str(error)
    assert "test_run_realtime.Opaque" in str(error)
    assert isinstance(error.__cause__, fd.CodecError)


@attrs.frozen
class Reply:
    text: str
    tags: tuple[str, ...]
    at: dt.datetime


@dataclasses.dataclass(frozen=True)
class Score:
    value: float


class Mood(enum.Enum):
    HAPPY = "happy"
    SAD = "sad"


@fd.step
async def write(text: str) -> Reply:
    return Reply(text, ("a", "b"), dt.datetime(2024, 5, 1, 12, tzinfo=dt.UTC))


@fd.step
async def write_loose(text: str) -> Any:
    return Reply(text, ("a",), dt.datetime(2024, 5, 1, 12, tzinfo=dt.UTC))


@fd.step
async def score(text: str) -> Score:
    return Score(len(text) / 2)


@fd.step
async def mood(text: str) -> Mood:
    return Mood.HAPPY


@fd.step
async def describe(reply: Reply, loose: Any, score: Score, mood: Mood) -> list[str]:
    # Arguments are decoded as the parameters are annotated, as a batch worker would.
    return [type(v).__name__ for v in (reply, loose, score, mood)]


@fd.flow
async def typed(text: str) -> list[str]:
    return await describe(
        await write(text), await write_loose(text), await score(text), await mood(text)
    )


async def test_annotated_results_arrive_as_their_types() -> None:
    async with fd.Context() as ctx:
        assert await ctx.run(typed, "hi") == ["Reply", "dict", "Score", "Mood"]


@fd.step
async def echo_any(value: Any) -> Any:
    return value


@fd.step
async def echo_tuple(value: Any) -> tuple[int, int]:
    return value


@fd.step
async def echo_list(value: Any) -> list[int]:
    return value


@fd.step
async def inspect_value(value: Any) -> list[Any]:
    return [type(value).__name__, value]


@fd.step
async def inspect_tuple(value: tuple[int, int]) -> list[Any]:
    return [type(value).__name__, value]


@fd.step
async def inspect_list(value: list[int]) -> list[Any]:
    return [type(value).__name__, value]


@fd.flow
async def echo_flow(value: Any) -> list[Any]:
    return await inspect_value(await echo_any(value))


@fd.flow
async def shapes(value: Any) -> list[Any]:
    return [
        await inspect_tuple(await echo_tuple(value)),
        await inspect_list(await echo_list(value)),
        await inspect_value(await echo_any(value)),
    ]


async def test_tuples_and_lists_follow_the_annotations() -> None:
    async with fd.Context() as ctx:
        result = await ctx.run(shapes, (1, 2))
    # (The flow's own result is a `list[Any]`: the tuple in it became a list on the way out.)
    assert result == [["tuple", [1, 2]], ["list", [1, 2]], ["list", [1, 2]]]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)


@given(value=json_values)
async def test_a_value_reaches_the_next_step_as_after_a_json_round_trip(value: Any) -> None:
    expected = json.loads(json.dumps(value))
    async with fd.Context() as ctx:
        name, seen = await ctx.run(echo_flow, value)
    assert seen == expected
    assert name == type(expected).__name__


@fd.step
async def append_one(items: list[int]) -> int:
    items.append(1)
    return len(items)


@fd.flow
async def literal_list(x: int) -> int:
    return await append_one([0])


async def test_a_literal_argument_is_fresh_in_every_run() -> None:
    async with fd.Context() as ctx:
        assert [await ctx.run(literal_list, 0) for _ in range(3)] == [2, 2, 2]


@fd.step
async def tuple_arg(value: Any) -> str:
    return type(value).__name__


@fd.flow
async def built_tuple(x: int) -> list[str]:
    return [await tuple_arg((x, 1)), await tuple_arg((1, 2))]


async def test_arguments_arrive_as_after_a_json_round_trip() -> None:
    async with fd.Context() as ctx:
        assert await ctx.run(built_tuple, 1) == ["list", "list"]


@fd.step
async def make_list(x: int) -> list[int]:
    return [x]


@fd.step
async def mutate(items: list[int]) -> int:
    items.append(99)
    return len(items)


@fd.step
async def read_after(items: list[int], n: int) -> list[int]:
    return items


@fd.flow
async def shared(x: int) -> list[int]:
    items = await make_list(x)
    n = await mutate(items)
    return await read_after(items, n)


async def test_dependents_do_not_share_a_result_object() -> None:
    async with fd.Context() as ctx:
        assert await ctx.run(shared, 1) == [1]
