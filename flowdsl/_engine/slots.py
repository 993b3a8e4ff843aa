"""A worker's slots, and how a step that waits for something slow lends its slot back.

A batch worker runs at most ``concurrency`` tasks at once: each holds a :class:`Slot`
while it runs.  A step whose work is done elsewhere and may take hours (a provider batch
job: ``fd.llm`` with ``batch_api=``) lends its slot back while it waits
(:func:`lent_slot`), so that the worker takes other tasks meanwhile, and those add their
requests to the next job: waiting steps never exhaust a worker's slots.  The task is still
the worker's (its lease is renewed); it takes a slot again before it goes on.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import AsyncIterator

import anyio
import attrs

__all__ = ["Slot", "lent_slot", "occupy"]


@attrs.define(eq=False)
class Slot:
    """One of a worker's slots, held by the task running in it (or lent, while it waits)."""

    limiter: anyio.Semaphore
    held: bool = True

    def release(self) -> None:
        """The task is done: its slot, if it holds it, goes back to the worker."""
        if self.held:
            self.held = False
            self.limiter.release()


_SLOT: contextvars.ContextVar[Slot | None] = contextvars.ContextVar("flowdsl_slot", default=None)


def occupy(slot: Slot) -> None:
    """From now on, the steps that run in this context may lend *slot* (:func:`lent_slot`).
    The context is the task's own (or a pooled job's), and ends with it: nothing to reset."""
    _SLOT.set(slot)


@contextlib.asynccontextmanager
async def lent_slot() -> AsyncIterator[None]:
    """Inside the block, the running task's worker slot (if it runs in one) is free for
    other tasks; it is taken again, waiting for one to be free, at the end."""
    slot = _SLOT.get()
    if slot is None or not slot.held:
        yield
        return
    slot.release()
    try:
        yield
    finally:
        # Cancelled while waiting for it, the task ends without a slot to give back.
        await slot.limiter.acquire()
        slot.held = True
