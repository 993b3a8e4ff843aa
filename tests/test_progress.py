"""The progress display of ``ctx.map``: what it counts, and what a notebook shows.

In a Jupyter kernel the display is one output replaced in place through IPython's display
handles, so it needs no ipywidgets; the test runs a real kernel (nbclient + ipykernel).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import flowdsl as fd
from flowdsl._context import progress

ROOT = Path(__file__).resolve().parent.parent

GATE: dict[str, Any] = {}


@fd.step
async def wait_for_gate(n: int) -> int:
    GATE["entered"].set()
    await GATE["open"].wait()
    return n


@fd.flow
async def gated(n: int) -> int:
    return await wait_for_gate(n)


@pytest.mark.anyio
async def test_runs_waiting_for_a_slot_are_not_counted_as_running(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shown: list[Any] = []
    real = progress.progress_for

    @contextlib.contextmanager
    def keep(name: str, total: int, show: bool | None) -> Iterator[Any]:
        with real(name, total, False) as counts:
            shown.append(counts)
            yield counts

    monkeypatch.setattr(progress, "progress_for", keep)
    GATE.update(entered=anyio.Event(), open=anyio.Event())
    async with fd.Context() as ctx, anyio.create_task_group() as tg:
        results: list[Any] = []

        async def run_map() -> None:
            results.extend(await ctx.map(gated, [1, 2, 3], concurrency=1))

        tg.start_soon(run_map)
        await GATE["entered"].wait()
        (counts,) = shown
        assert (counts.running, counts.waiting, counts.done_count) == (1, 2, 0)
        GATE["open"].set()
    assert results == [1, 2, 3]
    assert (counts.running, counts.waiting, counts.done_count) == (0, 0, 3)


def test_no_display_is_made_off_a_terminal() -> None:
    with progress.progress_for("flow", 2, None) as counts:
        counts.started()
        counts.done()
    assert type(counts) is progress._Counts


NOTEBOOK_CELL = """
import flowdsl as fd

@fd.step
async def square(n: int) -> int:
    return n * n

@fd.flow
async def squares(n: int) -> int:
    return await square(n)

async with fd.Context() as ctx:
    print(await ctx.map(squares, [1, 2, 3]))
"""


@pytest.mark.slow
def test_a_notebook_shows_the_progress_without_ipywidgets(tmp_path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(NOTEBOOK_CELL)
    notebook.cells.append(cell)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    # A kernel without ipywidgets, whether or not this environment has it.
    (tmp_path / "ipywidgets.py").write_text("raise ImportError('no widgets here')\n")
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{env['PYTHONPATH']}"
    client = nbclient.NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    with client.setup_kernel(env=env, cwd=str(tmp_path)):
        client.execute_cell(cell, 0)
    displays = [out for out in cell.outputs if out["output_type"] == "display_data"]
    streams = "".join(out.get("text", "") for out in cell.outputs if out["output_type"] == "stream")
    assert len(displays) == 1  # one line, updated in place
    (line,) = displays
    assert line["data"]["text/plain"].startswith("squares [" + "#" * 30 + "] 3/3 · 3 done")
    assert '<progress value="3" max="3"' in line["data"]["text/html"]
    assert "[1, 4, 9]" in streams
    assert "ipywidgets" not in streams
