"""The task group that node tasks run in.

Semantically an anyio task group: it owns every task it starts, the first error cancels
the rest, and it exits only when all are done, re-raising what failed as a
``BaseExceptionGroup``.  It is built on the event loop's own primitives because the hot
path is where flowdsl's overhead lives: anyio 4.16 wraps each spawned task in a
``TaskHandle`` with its own cancel scope and event (~30 µs and ~3 KiB a task, more than a
trivial step), and a wrapper coroutine per node costs another frame for as long as the node
is in flight.

So on asyncio a node's coroutine *is* the task (and a node that is already a future, as
batch mode's are, needs none), and what follows it (recording the result, making
dependents ready) runs as the done-callback; on trio a node runs in a nursery
under a two-line wrapper.  Both honour anyio cancel scopes around them: cancelling the
caller cancels every node task, and the group waits for them before it exits.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Protocol

import sniffio

__all__ = ["NodeGroup", "open_node_group"]

Then = Callable[[Any, Any], None]


class NodeGroup(Protocol):
    supports_jobs: bool

    def spawn(self, awaitable: Awaitable[Any], key: Any) -> None:
        """Run *awaitable* as a task (an asyncio future: as it is); when it succeeds,
        call the group's ``then(key, result)``."""

    def spawn_job(self, job: Any, coro: Coroutine[Any, Any, Any], context: Any) -> None:
        """Run *coro* as a task in *context*; on success call
        ``then(job.key, job.finish(result))``, on failure continue with
        ``job.retry(exc)`` (which raises when the failure is final)."""

    def fail(self, exc: BaseException) -> None:
        """Fail the group from outside with *exc*, as a node's failure would: every node
        still in flight is cancelled, and *exc* is raised when the group exits."""


class _AsyncioGroup:
    __slots__ = (
        "_closed",
        "_errors",
        "_future",
        "_host",
        "_host_cancelled",
        "_joining",
        "_loop",
        "_tasks",
        "_then",
        "_waiter",
    )
    supports_jobs = True

    def __init__(self, then: Then) -> None:
        import asyncio

        self._loop = asyncio.get_running_loop()
        self._future = asyncio.Future
        # The task that opened the group runs the first chain inline; a failure elsewhere
        # must interrupt it too.
        self._host: Any = asyncio.current_task()
        self._host_cancelled = False
        self._joining = False
        self._then = then
        # task -> key: one dict entry per task, no per-task closure
        self._tasks: dict[Any, Any] = {}
        self._errors: list[BaseException] = []
        self._waiter: Any = None
        self._closed = False

    def spawn(self, awaitable: Awaitable[Any], key: Any) -> None:
        if self._closed:
            # The group is failing: what would have started never runs.
            close = getattr(awaitable, "close", None) or getattr(awaitable, "cancel", None)
            if close is not None:
                close()
            return
        task: Any
        if isinstance(awaitable, self._future):
            # A future (batch mode's node waiting for its completion) needs no task: the
            # group holds it, and cancels it, as it would the task.
            task = awaitable
        else:
            task = self._loop.create_task(awaitable)  # type: ignore[arg-type]
        self._tasks[task] = key
        task.add_done_callback(self._done)

    def spawn_job(self, job: Any, coro: Coroutine[Any, Any, Any], context: Any) -> None:
        if self._closed:
            coro.close()
            return
        task = self._loop.create_task(coro, context=context)
        self._tasks[task] = job
        task.add_done_callback(self._job_done)

    def fail(self, exc: BaseException) -> None:
        self._fail(exc)

    def _job_done(self, task: Any) -> None:
        job = self._tasks.pop(task)
        if not task.cancelled():
            exc = task.exception()
            try:
                if exc is None:
                    self._then(job.key, job.finish(task.result()))
                elif isinstance(exc, Exception):
                    self.spawn(job.retry(exc), job.key)
                else:
                    self._fail(exc)
            except BaseException as error:
                self._fail(error)
        if not self._tasks and self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _done(self, task: Any) -> None:
        key = self._tasks.pop(task)
        if not task.cancelled():
            exc = task.exception()
            if exc is None:
                try:
                    self._then(key, task.result())
                except BaseException as error:
                    self._fail(error)
            else:
                self._fail(exc)
        if not self._tasks and self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self._errors.append(exc)
        self._cancel_all()
        if not self._joining and not self._host_cancelled and self._host is not None:
            self._host_cancelled = True
            self._host.cancel()

    def _cancel_all(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()

    async def _join(self, host_exc: BaseException | None) -> None:
        import asyncio

        self._joining = True
        cancelled: BaseException | None = None
        if host_exc is None and self._host_cancelled:
            # A node failed and cancelled the host, but no cancellation came out of the
            # host's inline chain: it is either still pending (the chain ended without
            # awaiting), to be taken now lest it interrupt the caller's next await, or it
            # was delivered and handled on the way (a commit seen through), and only its
            # count is left, which would make anyio take any later cancel scope's
            # cancellation for one from outside.
            try:
                await asyncio.sleep(0)
            except asyncio.CancelledError as exc:
                host_exc = exc
            else:
                self._host.uncancel()
        if host_exc is not None:
            if isinstance(host_exc, asyncio.CancelledError):
                # Our own cancellation of the host (a node failed) is no cancellation of
                # the caller, unless someone else asked for one too.
                if not (self._host_cancelled and self._host.uncancel() == 0):
                    cancelled = host_exc
            else:
                self._errors.insert(0, host_exc)
            self._cancel_all()
        while self._tasks:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            except asyncio.CancelledError as exc:
                # The caller is cancelled: cancel the nodes, but wait for them to finish.
                cancelled = exc
                self._cancel_all()
        if cancelled is not None:
            raise cancelled
        if self._errors:
            raise BaseExceptionGroup("flowdsl node tasks failed", self._errors)


async def _then(awaitable: Awaitable[Any], then: Then, key: Any) -> None:
    then(key, await awaitable)


class _NurseryGroup:
    """trio's nursery, or anyio's task group for any other backend."""

    __slots__ = ("_nursery", "_then", "failure")
    supports_jobs = False

    def __init__(self, nursery: Any, then: Then) -> None:
        self._nursery = nursery
        self._then = then
        self.failure: BaseException | None = None

    def fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
            self._nursery.cancel_scope.cancel()

    def spawn(self, awaitable: Awaitable[Any], key: Any) -> None:
        self._nursery.start_soon(_then, awaitable, self._then, key)

    def spawn_job(  # pragma: no cover - never asked: supports_jobs is False
        self, job: Any, coro: Coroutine[Any, Any, Any], context: Any
    ) -> None:
        raise NotImplementedError


@contextlib.asynccontextmanager
async def open_node_group(then: Then) -> AsyncIterator[NodeGroup]:
    """A group for node tasks that calls ``then(key, result)`` as each succeeds;
    failures surface as a ``BaseExceptionGroup``."""
    library = sniffio.current_async_library()
    if library == "asyncio":
        group = _AsyncioGroup(then)
        try:
            yield group
        except BaseException as exc:
            await group._join(exc)
            raise  # pragma: no cover - _join always raises when given an exception
        await group._join(None)
        return
    nodes: _NurseryGroup
    if library == "trio":
        import trio

        async with trio.open_nursery() as nursery:
            nodes = _NurseryGroup(nursery, then)
            yield nodes
    else:  # pragma: no cover - another anyio backend
        import anyio

        async with anyio.create_task_group() as tg:
            nodes = _NurseryGroup(tg, then)
            yield nodes
    if nodes.failure is not None:
        # Its nursery took the cancellation that fail() asked for as its own.
        raise BaseExceptionGroup("flowdsl node tasks failed", [nodes.failure])
