"""Mistakes the annotations make certain are refused when the flow is defined.

A step parameter without an annotation that receives an attrs class (a set, bytes, an
enum...) would get its JSON form; a return annotation the codec cannot decode would fail
every run.  And a step defined again (a notebook cell run again) is what the flows that use
it run from then on, as if their cells had been run again too.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import sys
import textwrap
import types
from collections.abc import Iterator
from typing import Any

import attrs
import pytest

import flowdsl as fd


@attrs.frozen
class Ticket:
    id: str
    text: str


@dataclasses.dataclass
class Point:
    x: int


class Label(enum.Enum):
    BUG = "bug"


class Matrix:
    """A class the codec knows nothing about (a numpy array, say)."""


@fd.step
async def ticket_of(text: str) -> Ticket:
    return Ticket("T-1", text)


@fd.step
async def unannotated(value):  # type: ignore[no-untyped-def]
    return 1


@fd.step
async def annotated(value: Ticket) -> int:
    return 1


@fd.step
async def takes_any(value: Any) -> int:
    return 1


def _produces(tp: Any, name: str) -> fd.Step[..., Any]:
    async def produce(text: str) -> Any:
        return None

    produce.__annotations__["return"] = tp
    produce.__name__ = name
    produce.__qualname__ = f"_produces.<locals>.{name}"
    return fd.step(produce)


@pytest.mark.parametrize(
    ("tp", "shown", "becomes"),
    [
        (Ticket, "Ticket", "Ticket becomes a dict"),
        (Point, "Point", "Point becomes a dict"),
        (set[int], "set[int]", "a set becomes a list"),
        (frozenset[str], "frozenset[str]", "a frozenset becomes a list"),
        (bytes, "bytes", "bytes becomes a str"),
        (Label, "Label", "Label becomes its member's value"),
        (datetime.datetime, "datetime", "datetime becomes a str"),
        (list[Ticket], "list[Ticket]", "Ticket becomes a dict"),
        (dict[str, Ticket], "dict[str, Ticket]", "Ticket becomes a dict"),
        (Ticket | None, "Ticket | None", "Ticket becomes a dict"),
    ],
)
def test_an_unannotated_parameter_cannot_take_a_value_json_changes(
    tp: Any, shown: str, becomes: str
) -> None:
    produce = _produces(tp, "produce")
    with pytest.raises(fd.TracingError) as info:

        @fd.flow
        async def pipeline(text: str) -> int:
            return await unannotated(await produce(text))

    assert str(info.value) == (
        f"flow 'pipeline', node 'unannotated': parameter 'value' of step 'unannotated' has "
        f"no annotation and receives the result of 'produce', a {shown}: it would get the "
        f"JSON form ({becomes}), not a {shown}. Annotate the parameter: `value: {shown}`"
    )


def test_a_flow_input_or_an_item_of_a_list_counts_too() -> None:
    with pytest.raises(fd.TracingError, match=r"receives the flow's input 'ticket', a Ticket"):

        @fd.flow
        async def direct(ticket: Ticket) -> int:
            return await unannotated(ticket)

    with pytest.raises(fd.TracingError) as info:

        @fd.flow
        async def listed(ticket: Ticket) -> int:
            return await unannotated([ticket, 1])

    assert "receives a list holding the flow's input 'ticket', a Ticket" in str(info.value)
    hint = "Annotate the parameter with the type it takes (a container of Ticket)"
    assert info.value.hint == hint


def test_what_arrives_as_itself_needs_no_annotation() -> None:
    @fd.step
    async def words(text: str) -> list[str]:
        return text.split()

    @fd.flow
    async def fine(text: str, ticket: Ticket) -> int:
        await unannotated(await words(text))  # a list of str is its own JSON form
        await annotated(await ticket_of(text))  # annotated: decoded as a Ticket
        await takes_any(ticket)  # `Any` says: the JSON form is what I want
        return await unannotated(ticket.text)  # a projection: its type is not known here

    assert len(fine.graph.nodes) == 6


def test_a_return_annotation_the_codec_cannot_decode_is_refused() -> None:
    produce = _produces(Matrix, "invert")
    with pytest.raises(fd.TracingError) as info:

        @fd.flow
        async def algebra(text: str) -> None:
            await takes_any(await produce(text))

    assert str(info.value).startswith(
        "flow 'algebra', node 'invert': the return annotation of step 'invert' is Matrix, "
        "which the codec cannot decode: every run would fail there. Annotate a type the "
        "codec carries"
    )
    with pytest.raises(fd.TracingError, match="the flow's result is list"):

        @fd.flow
        async def returns(text: str) -> list[Matrix]:
            return await takes_any(text)  # type: ignore[return-value]

    with pytest.raises(fd.TracingError, match="parameter 'm' is Matrix"):

        @fd.flow
        async def takes(m: Matrix) -> int:
            return await takes_any(1)


def test_an_annotation_that_does_not_resolve_yet_is_left_to_run_time() -> None:
    module = _module(
        "late_types",
        """
        from __future__ import annotations
        import attrs
        import flowdsl as fd

        @fd.step
        async def make(text: str) -> Later:
            return Later(text)

        @fd.step
        async def use(value) -> int:
            return 1

        @fd.flow
        async def pipeline(text: str) -> int:
            return await use(await make(text))

        @attrs.frozen
        class Later:
            text: str
        """,
    )
    assert module.pipeline.graph.nodes == ("make", "use")


# --- a step defined again ---------------------------------------------------------------------

CELL_STEP = """
import flowdsl as fd

@fd.step
async def check(x: int) -> int:
    if x > {limit}:
        raise ValueError(f"check refuses {{x}}")
    return x
"""
CELL_FLOW = """
@fd.step
async def double(x: int) -> int:
    return 2 * x

@fd.flow
async def pipeline(x: int) -> int:
    return await check(await double(x))
"""


@pytest.fixture
def notebook() -> Iterator[types.ModuleType]:
    """A module whose cells run in its namespace, as a notebook's run in ``__main__``."""
    module = types.ModuleType("notebook_cells")
    sys.modules[module.__name__] = module
    yield module
    del sys.modules[module.__name__]


def _run_cell(module: types.ModuleType, source: str) -> None:
    # What a notebook does with a cell: the test's own source, not data from outside.
    code = compile(textwrap.dedent(source), f"<{module.__name__}>", "exec")
    exec(code, module.__dict__)  # noqa: S102


def _module(name: str, source: str) -> types.ModuleType:
    module = types.ModuleType(name)
    _run_cell(module, source)
    return module


@pytest.mark.anyio
async def test_a_step_fixed_in_its_own_cell_is_what_resume_runs(
    notebook: types.ModuleType, tmp_path: Any
) -> None:
    _run_cell(notebook, CELL_STEP.format(limit=4))
    _run_cell(notebook, CELL_FLOW)
    pipeline = notebook.pipeline
    url = f"sqlite:///{tmp_path}/runs.db"
    async with fd.Context(store=url) as ctx:
        with pytest.raises(fd.StepFailed, match="check refuses 6"):
            await ctx.run(pipeline, 3, run_id="r-1")
    _run_cell(notebook, CELL_STEP.format(limit=10))  # only the step's cell, fixed
    events: list[Any] = []
    async with fd.Context(store=url, on_event=events.append) as ctx:
        assert await ctx.resume("r-1", flow=pipeline) == 6
    assert [(type(e).__name__, e.node_id) for e in events if e.node_id is not None] == [
        ("StepReused", "double"),
        ("StepStarted", "check"),
        ("StepFinished", "check"),
    ]
    assert pipeline.graph["check"].fn is notebook.check


def test_a_step_defined_again_unchanged_keeps_the_graph(notebook: types.ModuleType) -> None:
    _run_cell(notebook, CELL_STEP.format(limit=4))
    _run_cell(notebook, CELL_FLOW)
    before = notebook.pipeline.graph
    _run_cell(notebook, "x = 1")
    assert notebook.pipeline.graph is before  # nothing was defined again
    _run_cell(notebook, CELL_STEP.format(limit=4))
    after = notebook.pipeline.graph
    assert after["check"].fn is notebook.check
    assert after.fingerprint == before.fingerprint
    assert notebook.pipeline.graph is after


def test_steps_made_inside_a_function_are_not_definitions_again() -> None:
    def make() -> fd.Step[..., int]:
        @fd.step
        async def inner(x: int) -> int:
            return x

        return inner

    first = make()

    @fd.flow
    async def uses_first(x: int) -> int:
        return await first(x)

    graph = uses_first.graph
    make()  # the same module:qualname, but a factory's product, not a redefinition
    assert uses_first.graph is graph
