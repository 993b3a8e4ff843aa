"""The node task group on asyncio (flowdsl/_engine/spawn.py): a failing node cancels the
host task to interrupt the chain it runs inline; that cancellation never outlives the
group, whether it reached the host or not, so that no later cancel scope of the caller
(a context's task group, say) mistakes it for a cancellation from outside."""

from __future__ import annotations

import asyncio
import contextlib

import anyio
import anyio.lowlevel
import pytest

from flowdsl._engine.spawn import open_node_group

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # trio's nursery needs none of this


async def fail() -> None:
    raise ValueError("a node failed")


async def chain(swallow: bool) -> None:
    """What the host runs inline while a node fails beside it."""
    async with open_node_group(lambda key, value: None) as group:
        group.spawn(fail(), "failing")
        await asyncio.sleep(0)  # the failing node runs and cancels this task
        if swallow:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0)  # what a commit that is seen through does


@pytest.mark.parametrize("swallow", [False, True])
async def test_the_hosts_cancellation_does_not_outlive_the_group(swallow: bool) -> None:
    task = asyncio.current_task()
    assert task is not None
    with pytest.raises(BaseExceptionGroup):
        await chain(swallow)
    assert task.cancelling() == 0
    # A task group's own cancellation is absorbed as usual, not taken for one from outside.
    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.sleep_forever)
        await anyio.lowlevel.checkpoint()
        tg.cancel_scope.cancel()
    await anyio.lowlevel.checkpoint()
