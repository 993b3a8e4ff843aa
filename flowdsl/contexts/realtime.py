"""The real-time executor: a ready node runs right here, in the scheduler's task group."""

from __future__ import annotations

from typing import Any

from .._graph import Node
from .._runner import run_node_cached

__all__ = ["RealtimeExecutor"]


class RealtimeExecutor:
    """Runs each node in this process and writes its record to the store before the
    scheduler may count it done."""

    def __init__(self, store: Any, llm: Any = None) -> None:
        self.store = store
        self.llm = llm

    async def execute(
        self, run: Any, node: Node, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        record, value = await run_node_cached(
            self.store, run, node, args, kwargs, marker=run.plan.markers[node.id], llm=self.llm
        )
        await self.store.commit_node(run.run_id, record)
        return value
