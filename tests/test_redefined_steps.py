"""The same code in every mode: a step defined again (its notebook cell run again, its
module reloaded) is what every flow using it runs from then on, in real time, in batch
(in-process workers find steps by ``module:qualname``) and on resume, where the code-hash
check then sees the change and runs what depends on it again.

Cells run here in a module of their own, as a notebook's run in ``__main__``;
tests/test_notebook.py does the same in a real Jupyter kernel.
"""

from __future__ import annotations

import sys
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import flowdsl as fd

pytestmark = pytest.mark.anyio

STEP = """
import flowdsl as fd

@fd.step
async def shout(text: str) -> str:
    RAN.append("shout {version}")
    return text.upper() + " {version}"
"""
FLOW = """
@fd.step
async def exclaim(text: str) -> str:
    RAN.append("exclaim")
    return text + "!"

@fd.flow
async def pipeline(text: str) -> str:
    return await exclaim(await shout(text))
"""


def module(name: str) -> types.ModuleType:
    made = types.ModuleType(name)
    made.RAN = []  # type: ignore[attr-defined]
    sys.modules[name] = made
    return made


@pytest.fixture
def cells() -> Iterator[types.ModuleType]:
    yield module("flowdsl_test_cells")
    del sys.modules["flowdsl_test_cells"]


def run_cell(target: types.ModuleType, source: str) -> None:
    # What a notebook does with a cell: the test's own source, not data from outside.
    code = compile(textwrap.dedent(source), f"<{target.__name__}>", "exec")
    exec(code, target.__dict__)  # noqa: S102


def contexts(tmp_path: Path) -> dict[str, fd.Context]:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    return {
        "real time": fd.Context(store=url),
        "batch": fd.Context(batch=True, store=url, workers=1),
    }


async def test_a_step_defined_again_is_what_real_time_and_batch_run(
    cells: types.ModuleType, tmp_path: Path
) -> None:
    run_cell(cells, STEP.format(version="v1"))
    run_cell(cells, FLOW)
    flow = cells.pipeline
    for mode, ctx in contexts(tmp_path).items():
        async with ctx:
            assert await ctx.run(flow, "hi") == "HI v1!", mode
    run_cell(cells, STEP.format(version="v2"))  # only the step's cell, run again
    assert cells.pipeline is flow  # the flow's cell was not
    for mode, ctx in contexts(tmp_path).items():
        async with ctx:
            assert await ctx.run(flow, "hi") == "HI v2!", mode
    assert flow.graph["shout"].fn is cells.shout
    assert cells.RAN.count("shout v2") == 2


async def test_a_fixed_step_is_what_a_resume_runs_in_either_mode(
    cells: types.ModuleType, tmp_path: Path
) -> None:
    run_cell(
        cells,
        """
        import flowdsl as fd

        @fd.step
        async def check(x: int) -> int:
            RAN.append(f"check {x}")
            raise ValueError(f"check refuses {x}")

        @fd.step
        async def double(x: int) -> int:
            RAN.append(f"double {x}")
            return 2 * x

        @fd.flow
        async def checked(x: int) -> int:
            return await check(await double(x))
        """,
    )
    for mode, ctx in contexts(tmp_path).items():
        async with ctx:
            with pytest.raises(fd.StepFailed, match="check refuses 8"):
                await ctx.run(cells.checked, 4, run_id=f"fix-{mode}")
    run_cell(
        cells,
        """
        @fd.step
        async def check(x: int) -> int:
            RAN.append(f"check fixed {x}")
            return x + 1
        """,
    )
    cells.RAN.clear()
    events: list[Any] = []
    for mode, ctx in contexts(tmp_path).items():
        ctx.on_event = events.append
        async with ctx:
            assert await ctx.resume(f"fix-{mode}", flow=cells.checked) == 9, mode
    assert cells.RAN == ["check fixed 8", "check fixed 8"]  # double ran in neither resume
    reused = [e.node_id for e in events if isinstance(e, fd.events.StepReused)]
    assert reused == ["double", "double"]


async def test_a_step_reloaded_in_its_own_module_is_what_a_flow_elsewhere_runs(
    tmp_path: Path,
) -> None:
    """The flow's module holds the step it imported; the step's module is run again
    (reloaded): the flow runs the step by its module:qualname, the new one, in either
    mode, though its own module still names the old object."""
    steps = module("flowdsl_test_steps")
    flows = module("flowdsl_test_flows")
    try:
        run_cell(steps, STEP.format(version="v1"))
        flows.shout = steps.shout  # type: ignore[attr-defined]  # from steps import shout
        flows.RAN = steps.RAN  # type: ignore[attr-defined]
        run_cell(flows, "import flowdsl as fd\n" + FLOW)
        old = steps.shout
        run_cell(steps, STEP.format(version="v2"))
        assert flows.shout is old  # type: ignore[attr-defined]
        for mode, ctx in contexts(tmp_path).items():
            async with ctx:
                assert await ctx.run(flows.pipeline, "hi") == "HI v2!", mode
    finally:
        del sys.modules["flowdsl_test_steps"], sys.modules["flowdsl_test_flows"]


def test_a_flow_is_traced_again_only_when_a_step_it_uses_was_defined_again(
    cells: types.ModuleType,
) -> None:
    run_cell(cells, STEP.format(version="v1"))
    run_cell(cells, FLOW)
    first = cells.pipeline.graph
    run_cell(cells, "@fd.step\nasync def unrelated(x: int) -> int:\n    return x\n")
    run_cell(cells, "@fd.step\nasync def unrelated(x: int) -> int:\n    return x + 1\n")
    assert cells.pipeline.graph is first  # defined again, but not a step it uses
    run_cell(cells, STEP.format(version="v1"))  # the same code, defined again
    again = cells.pipeline.graph
    assert again is not first
    assert again.fingerprint == first.fingerprint  # same code: nothing to run again
    assert cells.pipeline.graph is again


def test_steps_made_inside_a_function_are_not_taken_by_name() -> None:
    def make(factor: int) -> fd.Step[..., int]:
        @fd.step
        async def scaled(x: int) -> int:
            return factor * x

        return scaled

    double = make(2)

    @fd.flow
    async def uses(x: int) -> int:
        return await double(x)

    graph = uses.graph
    make(3)  # the same module:qualname, a factory's other product: no redefinition
    assert uses.graph is graph
    assert graph["scaled"].fn is double
