"""``flowdsl resume``: finish a failed, cancelled or crashed run."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from typing import Any

import anyio
import click

from .. import _codec
from .._context.context import Context
from .._define.dsl import Flow
from .._define.units import find_ref
from .._errors import ConfigError, StepFailed
from .._records import RunRecord, RunStatus
from .._urls import hide_credentials
from .hints import cli_message
from .live import LiveView, StepTable
from .load import TargetError, add_to_path, load_flow
from .main import (
    EXIT_FAILED,
    CommandFailed,
    backend_option,
    import_modules,
    import_option,
    live_option,
    opened_store,
    path_option,
    quiet_option,
    seal_of,
    signing_keys,
    signing_options,
    store_option,
    unwrapped,
    usage_error,
    write_json,
)
from .render import json_or_text
from .resume_many import default_show, resume_failed
from .stores import store_or_default

__all__ = ["resume"]


@click.command()
@click.argument("run_id", required=False)
@store_option(required=True)
@click.option(
    "--all-failed",
    is_flag=True,
    help="Resume every failed run in the store instead of RUN_ID (one JSON line each).",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    metavar="N",
    help="With --all-failed: at most N runs at once.",
)
@click.option(
    "--strict",
    is_flag=True,
    help="Refuse to resume if any step's code or the graph changed since the run.",
)
@click.option(
    "--no-wait",
    is_flag=True,
    help="Fail at once (RunBusy) if another process drives the run, instead of waiting "
    "for its result (and taking it over should that process die).",
)
@click.option(
    "--flow",
    "target",
    metavar="TARGET",
    help="The flow to resume with, when the one the run names does not import "
    "(e.g. a run started from a script run as __main__).",
)
@path_option
@import_option
@quiet_option
@live_option
@backend_option
@signing_options
def resume(
    run_id: str | None,
    store: str | None,
    all_failed: bool,
    concurrency: int,
    strict: bool,
    no_wait: bool,
    target: str | None,
    paths: tuple[str, ...],
    imports: tuple[str, ...],
    quiet: bool,
    live: bool,
    backend: str,
    signing_key_env: str | None,
    old_signing_key_envs: tuple[str, ...],
) -> None:
    """Finish the failed, cancelled or crashed run RUN_ID and print its result as JSON.

    Finished nodes are read back from the store and never run again.  A run that another
    process drives is not driven twice: this waits for its result (--no-wait: fails at
    once), and takes the run over if that process dies.  The flow is the one the run
    recorded, found in a module given with --import (for a run started with `flowdsl run
    path/to/file.py:f`, --import path/to/file.py), or the one --flow names: nothing a
    store holds is imported because the store names it.

    With --all-failed, every run of the store whose status is failed is resumed (a few at a
    time, --concurrency), and each prints one JSON line: {"run_id": ..., "flow": ...,
    "result": ...}, or "error" instead of "result" for a run that fails again.

    \b
    Examples:
      flowdsl resume 3f9a0c1d2b7e4a55 --store sqlite:///runs.db --import app.flows
      flowdsl resume --all-failed --store sqlite:///runs.db --import app.flows
    """
    if run_id is None and not all_failed:
        usage_error("give the RUN_ID to resume, or --all-failed to resume every failed run")
    if run_id is not None and all_failed:
        usage_error("give a RUN_ID or --all-failed, not both")
    store = store_or_default(store)
    add_to_path(os.getcwd())
    for path in paths:
        add_to_path(path)
    import_modules(imports)
    flow = load_flow(target) if target is not None else None
    keys = signing_keys(signing_key_env, old_signing_key_envs)
    seal = seal_of(signing_key_env, old_signing_key_envs)
    if run_id is None:
        many = functools.partial(
            resume_failed,
            store,
            strict=strict,
            flow=flow,
            flow_of=_flow_of,
            concurrency=concurrency,
            show=default_show(quiet, live),
            output=sys.stdout,
            keys=keys,
        )
        count, failed = anyio.run(many, backend=backend)
        if failed:
            raise CommandFailed(f"{failed} of {count} runs failed again", EXIT_FAILED)
        return
    show_live = not quiet and (live or sys.stdout.isatty() or sys.stderr.isatty())
    options = (strict, flow, show_live, keys, seal, not no_wait)
    result = anyio.run(_resume, run_id, store, options, backend=backend)
    write_json(sys.stdout, result)


async def _resume(run_id: str, store: str, options: tuple[Any, ...]) -> Any:
    strict, flow, show_live, keys, seal, wait = options
    shown = hide_credentials(store)
    if flow is None:
        async with opened_store(store, seal) as opened:
            record: RunRecord | None = await opened.get_run(run_id)
        if record is None:
            raise CommandFailed(f"no run {run_id!r} in {shown} (see `flowdsl runs list`)")
        if record.status is RunStatus.FINISHED:
            return json_or_text(record.result or "null")  # nothing runs: no flow needed
        flow = _flow_of(record)
    table = StepTable(flow.graph, run_id) if show_live else None
    ctx = Context(store=store, on_event=table.handle if table is not None else None, **keys)
    try:
        with LiveView(table, sys.stderr) if table is not None else contextlib.nullcontext():
            result = await unwrapped(ctx.resume(run_id, strict=strict, flow=flow, wait=wait))
    except StepFailed as exc:
        raise CommandFailed(
            f"{cli_message(exc, resume=False)} (fix it, then "
            f"`flowdsl resume {run_id} --store {shown} --import {flow.ref.partition(':')[0]}` "
            "again)"
        ) from exc
    return _codec.to_data(result, what="the flow's result")


def _flow_of(record: RunRecord) -> Flow[..., Any]:
    """The run's flow among the modules imported with --import (never imported here)."""
    if record.flow_ref.startswith("__main__:"):
        raise TargetError(
            f"run {record.run_id!r} was started by a script run as __main__, so its flow "
            f"{record.flow!r} cannot be found by name",
            flow=record.flow,
            hint="Name it: `flowdsl resume RUN_ID --flow path/to/script.py:flow`",
        )
    try:
        flow = find_ref(
            record.flow_ref,
            what=f"the flow of run {record.run_id!r}",
            flow=record.flow,
            otherwise="import its module with `--import MODULE` (or `--import "
            "path/to/file.py`), or name the flow with `--flow TARGET`",
        )
    except ConfigError as exc:
        raise TargetError(exc.problem, flow=record.flow, hint=exc.hint) from exc
    if not isinstance(flow, Flow):
        raise TargetError(f"{record.flow_ref!r} is not a flow", flow=record.flow)
    return flow
