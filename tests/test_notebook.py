"""The notebook loop in a real Jupyter kernel (nbclient, ipykernel): re-running a step's cell
is enough for every mode to run the new code.

- Redefine a step: real time and batch (in-process workers) give the same, new output.
- Fail a step, fix its cell (only that cell), resume: the fix runs, and the steps that had
  finished do not, in real time and in batch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

CELLS = [
    """
    import json
    import flowdsl as fd

    RAN = []
    URL = "sqlite:///runs.db"  # the notebook's own directory
    """,
    """
    @fd.step
    async def shout(text: str) -> str:
        RAN.append("shout v1")
        return text.upper() + " v1"
    """,
    """
    @fd.step
    async def exclaim(text: str) -> str:
        RAN.append("exclaim")
        return text + "!"

    @fd.flow
    async def pipeline(text: str) -> str:
        return await exclaim(await shout(text))

    async def both(flow, *args):
        async with fd.Context() as ctx:
            real_time = await ctx.run(flow, *args)
        async with fd.Context(batch=True, store=URL, workers=1) as ctx:
            batch = await ctx.run(flow, *args)
        return [real_time, batch]

    before = await both(pipeline, "hi")
    """,
    # The step's cell again, edited: only this cell runs again.
    """
    @fd.step
    async def shout(text: str) -> str:
        RAN.append("shout v2")
        return text.upper() + " v2"
    """,
    """
    after = await both(pipeline, "hi")
    """,
    """
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

    failed = []
    for mode, ctx in [("rt", fd.Context(store=URL)), ("batch", fd.Context(batch=True, store=URL))]:
        try:
            async with ctx:
                await ctx.run(checked, 4, run_id=f"nb-{mode}")
        except fd.StepFailed as exc:
            failed.append(exc.node_id)
    """,
    # The fix, in check's own cell; the flow's cell is not run again.
    """
    @fd.step
    async def check(x: int) -> int:
        RAN.append(f"check fixed {x}")
        return x + 1
    """,
    """
    RAN.clear()
    resumed = []
    for mode, ctx in [("rt", fd.Context(store=URL)), ("batch", fd.Context(batch=True, store=URL))]:
        async with ctx:
            resumed.append(await ctx.resume(f"nb-{mode}"))
    print(json.dumps({"before": before, "after": after, "failed": failed,
                      "resumed": resumed, "ran": RAN}))
    """,
]


def _run_notebook(directory: Path) -> dict[str, Any]:
    import textwrap

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(textwrap.dedent(src).strip()) for src in CELLS]
    client = nbclient.NotebookClient(
        nb,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(directory)}},
    )
    # The kernel imports flowdsl from where this test does.
    env = dict(os.environ)
    client.execute(env=env)
    outputs = nb.cells[-1].outputs
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    result: dict[str, Any] = json.loads(text.strip().splitlines()[-1])
    return result


@pytest.mark.slow
def test_the_notebook_loop_runs_the_new_code_in_every_mode(tmp_path: Path) -> None:
    got = _run_notebook(tmp_path)
    assert got["before"] == ["HI v1!", "HI v1!"]
    assert got["after"] == ["HI v2!", "HI v2!"]  # real time and batch: the same new code
    assert got["failed"] == ["check", "check"]
    assert got["resumed"] == [9, 9]
    # The fix ran in both resumes; double, finished before the failure, ran in neither.
    assert got["ran"] == ["check fixed 8", "check fixed 8"]
