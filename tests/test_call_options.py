"""Options of ctx.run, ctx.start, fd.run and check_resume never collide with a flow's own
parameters: a keyword that could be either is refused, and ``inputs={...}`` passes any name."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import flowdsl as fd
from flowdsl.testing import CrashPoint, check_resume


@fd.step
async def echo(value: Any) -> Any:
    return value


@fd.step
async def pair(a: Any, b: Any) -> list[Any]:
    return [a, b]


@fd.flow
async def triage(ticket: str) -> Any:
    return await echo(ticket)


@fd.flow
async def tagged(text: str, run_id: str = "none") -> list[Any]:
    return await pair(text, run_id)


@fd.flow
async def on_loop(backend: str) -> Any:
    return await echo(backend)


@fd.flow
async def takes_inputs(inputs: list[int]) -> Any:
    return await echo(inputs)


@fd.flow
async def crashy(crash: str, context: str) -> list[Any]:
    return await pair(crash, context)


@fd.flow
async def two(a: int, b: int) -> list[Any]:
    return await pair(a, b)


AMBIGUOUS = r"^flow '\w+': `{}=` is ambiguous: {}\(\) takes it as an option, and the flow has a "


# --- the API contract's forms ----------------------------------------------------------------


@pytest.mark.anyio
async def test_the_documented_forms_still_work() -> None:
    async with fd.Context() as ctx:
        assert await ctx.run(triage, "T-1") == "T-1"
        run = await ctx.start(triage, "T-2", run_id="t-42")
        assert run.run_id == "t-42"
        assert await run.result() == "T-2"
        assert await ctx.run(two, a=1, b=2) == [1, 2]  # keywords still go to the flow
        assert await ctx.run(two, 1, b=2, run_id="kw") == [1, 2]
        assert await triage("T-3") == "T-3"


def test_fd_run_still_takes_the_flow_s_keywords_and_a_backend() -> None:
    assert fd.run(triage, "T-1") == "T-1"
    assert fd.run(two, a=3, b=4, backend="trio") == [3, 4]


# --- a flow with a parameter named like an option ------------------------------------------


@pytest.mark.anyio
async def test_run_id_that_could_be_the_flow_s_is_refused() -> None:
    async with fd.Context() as ctx:
        with pytest.raises(fd.ConfigError, match=AMBIGUOUS.format("run_id", r"ctx\.run")):
            await ctx.run(tagged, "x", run_id="r1")
        with pytest.raises(fd.ConfigError, match=AMBIGUOUS.format("run_id", r"ctx\.start")):
            await ctx.start(tagged, "x", run_id="r1")
        assert await ctx.store.get_run("r1") is None  # refused before any run was made


@pytest.mark.anyio
async def test_inputs_holds_a_parameter_named_run_id_beside_the_run_s_id() -> None:
    async with fd.Context() as ctx:
        assert await ctx.run(tagged, run_id="r1", inputs={"text": "x", "run_id": "mine"}) == [
            "x",
            "mine",
        ]
        run = await ctx.start(tagged, "y", run_id="r2", inputs={"run_id": "also mine"})
        assert await run.result() == ["y", "also mine"]
        assert {r.run_id for r in await ctx.store.list_runs()} == {"r1", "r2"}
        # Positionally, the flow's run_id is unambiguous: the keyword is the option.
        assert await ctx.run(tagged, "z", "positional", run_id="r3") == ["z", "positional"]
        assert (await ctx.store.get_run("r3")) is not None
        # Called like a function, every keyword is the flow's.
        assert await tagged("w", run_id="the flow's") == ["w", "the flow's"]


def test_fd_run_refuses_a_backend_that_could_be_the_flow_s() -> None:
    with pytest.raises(fd.ConfigError, match=AMBIGUOUS.format("backend", r"fd\.run")):
        fd.run(on_loop, backend="trio")
    assert fd.run(on_loop, inputs={"backend": "mine"}) == "mine"
    assert fd.run(on_loop, backend="trio", inputs={"backend": "mine"}) == "mine"
    assert fd.run(on_loop, "positional", backend="trio") == "positional"


@pytest.mark.anyio
async def test_a_parameter_named_inputs_goes_in_the_mapping() -> None:
    async with fd.Context() as ctx:
        assert await ctx.run(takes_inputs, inputs={"inputs": [1, 2]}) == [1, 2]
        assert await ctx.run(takes_inputs, [3]) == [3]
        with pytest.raises(fd.ConfigError, match=AMBIGUOUS.format("inputs", r"ctx\.run")):
            await ctx.run(takes_inputs, inputs={"a": 1})
        with pytest.raises(fd.ConfigError, match=r"inputs= must map the flow's parameter names"):
            await ctx.run(takes_inputs, inputs=[1, 2])  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_keywords_and_inputs_together_are_refused() -> None:
    async with fd.Context() as ctx:
        with pytest.raises(fd.ConfigError, match=r"keyword arguments are given twice: as keyw"):
            await ctx.run(two, a=1, inputs={"b": 2})


@pytest.mark.anyio
async def test_check_resume_options_do_not_collide_either() -> None:
    crash = CrashPoint("pair")
    with pytest.raises(fd.ConfigError, match=AMBIGUOUS.format("crash", "check_resume")):
        await check_resume(crashy, context="c", crash=crash)
    report = await check_resume(crashy, crash=crash, inputs={"crash": "a", "context": "b"})
    assert report.ok, report.explain()
    assert report.result == ["a", "b"]


# --- any option name, any flow -------------------------------------------------------------

NAMES = st.sampled_from(["run_id", "inputs", "text", "value"])


@pytest.mark.anyio
@given(param=NAMES, value=st.integers())
async def test_inputs_reaches_any_parameter_name(param: str, value: int) -> None:
    # The flow is made per example: its one parameter has the drawn name.
    source = f"async def body({param}):\n    return await echo({param})\n"
    namespace: dict[str, Any] = {"echo": echo, "__name__": __name__}
    exec(source, namespace)  # noqa: S102 - a test building a flow of a drawn signature
    flow = fd.flow(namespace["body"])
    async with fd.Context() as ctx:
        assert await ctx.run(flow, run_id=f"r-{param}", inputs={param: value}) == value
        assert await ctx.run(flow, value) == value
