"""Flows with waits for the tests that start, signal and resume them in other processes.

:func:`start` starts ``reviewed`` in a context on a store and leaves it waiting; the
process then exits (its context ends, the run stays ``waiting``).
"""

from __future__ import annotations

import attrs

import flowdsl as fd


@attrs.frozen
class Approval:
    ok: bool
    by: str = ""


@fd.step
async def draft(topic: str) -> str:
    return f"draft about {topic}"


@fd.step
async def publish(text: str, approval: Approval) -> str:
    return f"{text}: {'approved' if approval.ok else 'rejected'} by {approval.by}"


@fd.flow
async def reviewed(topic: str) -> str:
    text = await draft(topic)
    approval = await fd.wait_for("approval", Approval, timeout=600, after=text)
    return await publish(text, approval)


async def start(url: str, run_id: str) -> None:
    async with fd.Context(store=url) as ctx:
        run = await ctx.start(reviewed, "otters", run_id=run_id)
        async for event in run.events():
            if isinstance(event, fd.events.RunWaiting):
                break
    record = None
    async with fd.Context(store=url) as ctx:
        record = await ctx.store.get_run(run_id)
    assert record is not None
    print(record.status.value, flush=True)
