"""``flowdsl resume``: finish a failed, cancelled or crashed run."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

import anyio
import click

from .. import _codec
from .._context.context import Context
from .._define.dsl import Flow
from .._errors import StepFailed
from .._records import RunRecord
from .live import LiveView, StepTable
from .load import TargetError, add_to_path, load_flow
from .main import (
    CommandFailed,
    backend_option,
    live_option,
    opened_store,
    path_option,
    quiet_option,
    store_option,
    unwrapped,
    write_json,
)

__all__ = ["resume"]


@click.command()
@click.argument("run_id")
@store_option(required=True)
@click.option(
    "--strict",
    is_flag=True,
    help="Refuse to resume if any step's code or the graph changed since the run.",
)
@click.option(
    "--flow",
    "target",
    metavar="TARGET",
    help="The flow to resume with, when the one the run names does not import "
    "(e.g. a run started from a script run as __main__).",
)
@path_option
@quiet_option
@live_option
@backend_option
def resume(
    run_id: str,
    store: str,
    strict: bool,
    target: str | None,
    paths: tuple[str, ...],
    quiet: bool,
    live: bool,
    backend: str,
) -> None:
    """Finish the failed, cancelled or crashed run RUN_ID and print its result as JSON.

    Finished nodes are read back from the store and never run again.  The flow is imported
    from the module the run recorded (for a run started with `flowdsl run path/to/file.py:f`,
    that is the file's module name: run from the same directory, or add it with --path).

    \b
    Example:
      flowdsl resume 3f9a0c1d2b7e4a55 --store sqlite:///runs.db
    """
    add_to_path(os.getcwd())
    for path in paths:
        add_to_path(path)
    flow = load_flow(target) if target is not None else None
    show_live = not quiet and (live or sys.stdout.isatty() or sys.stderr.isatty())
    result = anyio.run(_resume, run_id, store, strict, flow, show_live, backend=backend)
    write_json(sys.stdout, result)


async def _resume(
    run_id: str, store: str, strict: bool, flow: Flow[..., Any] | None, show_live: bool
) -> Any:
    if flow is None:
        async with opened_store(store) as opened:
            record: RunRecord | None = await opened.get_run(run_id)
        if record is None:
            raise CommandFailed(f"no run {run_id!r} in {store} (see `flowdsl runs list`)")
        flow = _flow_of(record)
    table = StepTable(flow.graph, run_id) if show_live else None
    ctx = Context(store=store, on_event=table.handle if table is not None else None)
    try:
        with LiveView(table, sys.stderr) if table is not None else contextlib.nullcontext():
            result = await unwrapped(ctx.resume(run_id, strict=strict, flow=flow))
    except StepFailed as exc:
        raise CommandFailed(
            f"{exc} (fix it, then `flowdsl resume {run_id} --store {store}` again)"
        ) from exc
    return _codec.to_data(result, what="the flow's result")


def _flow_of(record: RunRecord) -> Flow[..., Any]:
    if record.flow_ref.startswith("__main__:"):
        raise TargetError(
            f"run {record.run_id!r} was started by a script run as __main__, so its flow "
            f"{record.flow!r} cannot be imported by name",
            flow=record.flow,
            hint="Name it: `flowdsl resume RUN_ID --flow path/to/script.py:flow`",
        )
    try:
        return load_flow(record.flow_ref)
    except TargetError as exc:
        raise TargetError(
            f"cannot import the flow of run {record.run_id!r} ({record.flow_ref}): {exc.problem}",
            flow=record.flow,
            hint="Run from the directory the run was started in, add it with --path DIR, "
            "or name the flow with --flow TARGET",
        ) from exc
