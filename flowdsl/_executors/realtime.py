"""The real-time executor: a ready node runs right here, in the scheduler's task group."""

from __future__ import annotations

from collections.abc import Awaitable, Coroutine
from typing import Any

from .. import _otel
from .._define.graph import Node
from .._engine.runner import FastJob, fast_job, fresh_arguments, run_node, run_node_cached
from .._engine.scheduler import Executor
from .._records import NodeRecord
from ..backends.base import Store

__all__ = ["RealtimeExecutor"]


class RealtimeExecutor(Executor):
    """Runs each node in this process and writes its record to the store before the
    scheduler may count it done."""

    def __init__(self, store: Store, llm: Any = None) -> None:
        self.store = store
        self.llm = llm
        self._sync_commit = store.commits_nowait

    def execute(
        self, run: Any, node: Node, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Awaitable[tuple[NodeRecord, Any]]:
        # Not a coroutine itself: returning run_node's coroutine spares every in-flight
        # node one frame, and memory per in-flight run is a target.
        marker = run.plan.markers[node.id]
        args, kwargs = fresh_arguments(run, node, args, kwargs)
        if node.fn is not None and node.fn.cache:
            work = run_node_cached(self.store, run, node, args, kwargs, marker=marker, llm=self.llm)
        else:
            work = run_node(run, node, args, kwargs, marker=marker, llm=self.llm, store=self.store)
        return _otel.node_span(run, node, work) if _otel.tracing else work

    def job(
        self, run: Any, node: Node, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[FastJob, Coroutine[Any, Any, Any], Any] | None:
        """A node that can run as a bare task (see :class:`~flowdsl._engine.runner.FastJob`)."""
        if not self._sync_commit:
            return None
        return fast_job(run, node, args, kwargs, run.plan.markers[node.id], self.llm, self.store)
