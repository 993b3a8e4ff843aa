"""``flowdsl resume --all-failed``: finish every failed run of a store, a few at a time.

Each run is resumed with the flow it recorded (or the one ``--flow`` names, for runs of
that flow), in one context on the store, at most *concurrency* at once.  One JSON line per
run goes to the output, in the store's order (newest first): ``{"run_id", "flow",
"result"}``, or ``"error"`` instead of ``"result"`` for a run that failed again or could not
be resumed; the others go on.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import IO, Any

import anyio
import click

from .. import _codec
from .._context.context import Context
from .._context.progress import progress_for
from .._define.dsl import Flow
from .._errors import FlowError
from .._records import RunRecord, RunStatus
from .._urls import hide_credentials
from .hints import cli_message
from .stores import runs_with_status

__all__ = ["resume_failed"]


async def resume_failed(
    store: str,
    *,
    strict: bool,
    flow: Flow[..., Any] | None,
    flow_of: Callable[[RunRecord], Flow[..., Any]],
    concurrency: int,
    show: bool | None,
    output: IO[str],
    keys: dict[str, Any] | None = None,
) -> tuple[int, int]:
    """Resume every failed run in *store*; return (runs resumed, runs that failed again).
    *keys* are the context's signing keys (``signing_key=``, ``old_signing_keys=``)."""
    ctx = Context(store=store, **(keys or {}))
    async with ctx:
        records = await runs_with_status(ctx.store, [RunStatus.FAILED.value], None)
        if not records:
            click.echo(f"flowdsl resume: no failed runs in {hide_credentials(store)}", err=True)
            return 0, 0
        lines: list[dict[str, Any]] = [{} for _ in records]
        limiter = anyio.CapacityLimiter(concurrency)
        with progress_for("resume", len(records), show) as counts:

            async def one(i: int, record: RunRecord) -> None:
                line = lines[i] = {"run_id": record.run_id, "flow": record.flow}
                async with limiter:
                    counts.started()
                    try:
                        chosen = flow if flow is not None and flow.name == record.flow else None
                        result = await ctx.resume(
                            record.run_id, strict=strict, flow=chosen or flow_of(record)
                        )
                        line["result"] = _codec.to_data(result, what="the flow's result")
                    except* FlowError as group:
                        line["error"] = "; ".join(
                            cli_message(exc, store) if isinstance(exc, FlowError) else str(exc)
                            for exc in _leaves(group)
                        )
                if "error" in line:
                    counts.failed()
                else:
                    counts.done()

            async with anyio.create_task_group() as tg:
                for i, record in enumerate(records):
                    tg.start_soon(one, i, record)
    for line in lines:
        output.write(json.dumps(line, ensure_ascii=False) + "\n")
    output.flush()
    return len(records), sum("error" in line for line in lines)


def _leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        leaves.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return leaves


def default_show(quiet: bool, live: bool) -> bool | None:
    """The progress display: off with --quiet, forced with --live, else on a terminal."""
    if quiet:
        return False
    return True if live else (None if sys.stderr.isatty() else False)
