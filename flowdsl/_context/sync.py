"""Reaching a context from anywhere: the current context, and ``fd.run`` from plain code."""

from __future__ import annotations

import concurrent.futures
import functools
import sys
from collections.abc import Mapping
from typing import Any, TypeVar

import anyio

from .._define.dsl import Flow
from .calls import check_flow, flow_arguments, given_options
from .context import CURRENT, Context

__all__ = ["current_context", "run"]

R = TypeVar("R")

_DEFAULT: Context | None = None


def current_context() -> Context:
    """The context entered with ``async with``, or a process-wide real-time default."""
    ctx = CURRENT.get()
    if ctx is not None:
        return ctx
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Context()
    return _DEFAULT


def run(
    flow: Flow[..., R],
    /,
    *args: Any,
    backend: str | None = None,
    inputs: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> R:
    """Run *flow* from synchronous code and return its result.

    The flow's arguments are given as to :meth:`Context.run`; *backend* is the event loop
    to run on, ``"asyncio"`` (the default) or ``"trio"``.  Inside a running event loop (a
    notebook cell), it runs the flow on a fresh loop in a helper thread; there,
    ``await flow(...)`` is the better spelling.
    """
    check_flow(flow)
    given = given_options(backend=backend, inputs=inputs)
    args, kwargs = flow_arguments(flow, args, kwargs, inputs, given=given, call="fd.run")
    backend = backend or "asyncio"
    call = functools.partial(current_context().run, flow, *args, inputs=kwargs)
    if not _in_event_loop():
        return anyio.run(call, backend=backend)

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="flowdsl-run") as pool:
        return pool.submit(anyio.run, call, backend=backend).result()


def _in_event_loop() -> bool:
    import asyncio

    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        pass
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_task()
            return True
        except RuntimeError:
            pass
    return False
