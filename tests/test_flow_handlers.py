"""A try/except (or ``contextlib.suppress``) around step calls in a flow body is refused when
the flow is defined: the body runs once, at definition time, so the handler could never
catch a step's failure.  The error says so, and what to do instead."""

from __future__ import annotations

import contextlib
from contextlib import suppress

import pytest

import flowdsl as fd

REFUSED = (
    r"^flow '{flow}': {what} around step calls in the flow body \(line \d+\) would never "
    r"catch a step's failure: the body runs once, when the flow is defined, to wire its "
    r"steps into a graph, and the steps run later, outside it\. Give the step retries "
    r"\(`@fd\.step\(retries=3, retry_on=\(TimeoutError,\)\)`\), or handle the error inside "
    r"a step"
)


@fd.step
async def fetch(x: int) -> int:
    return x + 1


@fd.branch
async def sign(x: int) -> str:
    return "pos" if x >= 0 else "neg"


def test_a_try_except_around_a_step_call_is_refused() -> None:
    with pytest.raises(fd.TracingError, match=REFUSED.format(flow="guarded", what="a try block")):

        @fd.flow
        async def guarded(x: int) -> int:
            try:
                return await fetch(x)
            except ValueError:
                return 0


def test_the_line_of_the_step_call_is_named() -> None:
    with pytest.raises(fd.TracingError) as info:

        @fd.flow
        async def guarded(x: int) -> int:
            y = await fetch(x)
            try:
                y = await fetch(y)
            finally:
                pass
            return y

    line = test_the_line_of_the_step_call_is_named.__code__.co_firstlineno + 7
    assert f"(line {line})" in str(info.value)


SUPPRESSED = REFUSED.format(flow="quiet", what=r"a `with contextlib\.suppress\(\.\.\.\)`")


def test_suppress_around_a_step_call_is_refused() -> None:
    with pytest.raises(fd.TracingError, match=SUPPRESSED):

        @fd.flow
        async def quiet(x: int) -> int:
            with suppress(KeyError):
                await fetch(x)
            return x


def test_contextlib_suppress_around_a_step_call_is_refused() -> None:
    with pytest.raises(fd.TracingError, match=SUPPRESSED):

        @fd.flow
        async def quiet(x: int) -> int:
            with contextlib.suppress(KeyError) as _:
                await fetch(x)
            return x


def test_a_handler_in_a_case_block_is_refused_too() -> None:
    with pytest.raises(fd.TracingError, match=REFUSED.format(flow="cased", what="a try block")):

        @fd.flow
        async def cased(x: int) -> int:
            async def careful() -> int:
                try:
                    return await fetch(x)
                except* ValueError:
                    pass
                return 0

            return await sign(x).cases(pos=careful, neg=lambda: fetch(-x))


def test_handlers_that_wrap_no_step_call_and_other_context_managers_are_fine() -> None:
    @fd.flow
    async def tidy(x: int) -> int:
        try:
            limit = int("3")  # plain Python at definition time: harmless
        except ValueError:
            limit = 0
        with contextlib.nullcontext():
            y = await fetch(x)
        return await fetch(y) if limit else y  # type: ignore[no-any-return]

    assert tidy.graph.nodes == ("fetch", "fetch-2")


def test_a_step_handles_its_own_errors_as_the_hint_says() -> None:
    @fd.step
    async def safe_fetch(x: int) -> int:
        try:
            return await fetch.fn(x)
        except ValueError:
            return 0

    @fd.flow
    async def handled(x: int) -> int:
        return await safe_fetch(x)

    assert fd.run(handled, 1) == 2
