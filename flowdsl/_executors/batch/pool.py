"""A worker's tasks, reused: one claimed task after another runs in the same task-group task.

A batch worker serves each claimed task in a task of its own, so that hundreds of steps
waiting on I/O wait together.  Starting an anyio task costs several times what a trivial
step costs (a handle, a wrapper coroutine, the backend's task and its bookkeeping); a
worker serving thousands of tasks a second spent a sixth of its time there.  A
:class:`TaskPool` keeps the tasks that have served one: a task done with its job takes the
next one waiting, or waits (idle) to be woken for one; a new task starts only when none
is idle.  So the pool holds as many tasks as ran at once at the peak, each idle one a
parked coroutine; :meth:`TaskPool.trim` lets the idle ones beyond a few go.

Each job runs in a copy of the context of whoever started it, as a new task would: what a
step sets in a context variable does not reach the next job the task runs.
"""

from __future__ import annotations

import contextvars
import types
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Final

import anyio
import anyio.abc

__all__ = ["KEEP_IDLE", "TaskPool"]

#: Idle tasks :meth:`TaskPool.trim` keeps.
KEEP_IDLE: Final = 16

_Job = tuple[contextvars.Context, Callable[..., Coroutine[Any, Any, Any]], tuple[Any, ...]]


class TaskPool:
    """Runs ``fn(*args)`` jobs in tasks of *task_group*, a task reused for job after job.

    An exception a job raises ends its task and, as for any task of the group, cancels
    the group.
    """

    __slots__ = ("_idle", "_retiring", "_tg", "_waiting", "started")

    def __init__(self, task_group: anyio.abc.TaskGroup) -> None:
        self._tg = task_group
        self._waiting: deque[_Job] = deque()
        self._idle: list[anyio.Event] = []  # one per idle task: set to wake it
        self._retiring = 0  # idle tasks asked to end
        #: How many tasks the pool started (for tests and benchmarks).
        self.started = 0

    @property
    def idle(self) -> int:
        """Tasks waiting for a job."""
        return len(self._idle)

    def start_soon(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        """Run ``fn(*args)`` in a task of the pool, in a copy of the current context."""
        self._waiting.append((contextvars.copy_context(), fn, args))
        if self._idle:
            self._idle.pop().set()
        else:
            self.started += 1
            self._tg.start_soon(self._serve)

    def trim(self, keep: int = KEEP_IDLE) -> None:
        """Let the idle tasks beyond *keep* end."""
        while len(self._idle) > keep:
            self._retiring += 1
            self._idle.pop(0).set()

    async def _serve(self) -> None:
        waiting, idle = self._waiting, self._idle
        while True:
            while waiting:
                context, fn, args = waiting.popleft()
                await _in_context(context, fn(*args))
            if self._retiring:
                self._retiring -= 1
                return
            wake = anyio.Event()
            idle.append(wake)
            await wake.wait()


@types.coroutine
def _in_context(
    context: contextvars.Context, coro: Coroutine[Any, Any, Any]
) -> Generator[Any, Any, Any]:
    """Await *coro* with each of its steps run in *context* (a task's context cannot be
    swapped, so the steps are driven one by one, as the event loop drives a task)."""
    send, throw = coro.send, coro.throw
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            yielded = context.run(send, value) if error is None else context.run(throw, error)
        except StopIteration as stop:
            return stop.value
        try:
            value = yield yielded
            error = None
        except BaseException as exc:  # cancellation and the like go to the job
            value, error = None, exc
