"""``Context.map``: one run per input, in input order, with a progress bar."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from .._define.dsl import Flow
from .._engine.dynamic import ITEM_PROGRESS
from .._errors import FlowError, first_leaf
from . import progress

if TYPE_CHECKING:
    from .context import Context

__all__ = ["map_runs"]

R = TypeVar("R")


async def map_runs(
    ctx: Context,
    flow: Flow[..., R],
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]],
    run_ids: Sequence[str] | None,
    limiter: anyio.CapacityLimiter | None,
    show: bool | None,
    return_exceptions: bool,
) -> list[R | BaseException]:
    """Run *flow* once per call in *ctx*; results in input order (see ``Context.map``)."""
    results: list[Any] = [None] * len(calls)
    with progress.progress_for(flow.name, len(calls), show) as bar:

        async def one(i: int) -> None:
            args, kwargs = calls[i]
            rid = run_ids[i] if run_ids is not None else None
            ITEM_PROGRESS.set(bar)  # this task's runs count their maps' items on the bar
            try:
                if limiter is None:
                    bar.started()
                    results[i] = await ctx.run(flow, *args, run_id=rid, inputs=kwargs)
                else:
                    async with limiter:
                        bar.started()  # waiting for a slot is not running
                        results[i] = await ctx.run(flow, *args, run_id=rid, inputs=kwargs)
            except FlowError as exc:
                bar.failed()
                if not return_exceptions:
                    raise
                results[i] = exc
            else:
                bar.done()

        try:
            async with anyio.create_task_group() as tg:
                for i in range(len(calls)):
                    tg.start_soon(one, i)
        except BaseExceptionGroup as group:
            # Surface the first flowdsl failure itself, not a group of one.
            flow_errors, rest = group.split(FlowError)
            if rest is None and flow_errors is not None:
                leaf = first_leaf(flow_errors)
                raise leaf from leaf.__cause__
            raise
    return results
