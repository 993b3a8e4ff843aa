"""What ``flowdsl runs show`` says of map, loop and wait nodes: items and iterations
journaled so far, and which waits a waiting run waits on."""

from __future__ import annotations

from typing import Any

from .. import _codec
from .._define.graph import Graph, NodeKind
from .._errors import CodecError
from .._records import NodeRecord, RunRecord, RunStatus

__all__ = ["dynamic_progress"]


def dynamic_progress(
    record: RunRecord, journal: dict[str, NodeRecord], graph: Graph | None
) -> dict[str, str]:
    """Per map, loop and wait node of the graph: its progress in words."""
    out: dict[str, str] = {}
    if graph is None:
        return out
    for node_id in graph.order:
        node = graph[node_id]
        if node.kind is NodeKind.MAP:
            done = _count(journal, node_id + "[", "]")
            total = _total(journal.get(node_id), "items")
            out[node_id] = f"{done}/{total} items" if total is not None else f"{done} items done"
        elif node.kind is NodeKind.LOOP:
            done = _count(journal, node_id + "@", "")
            out[node_id] = f"{done} iterations"
        elif (
            node.kind is NodeKind.WAIT
            and node_id not in journal
            and record.status is RunStatus.WAITING
        ):
            out[node_id] = f"waiting for signal {node.name!r}"
    return out


def _count(journal: dict[str, NodeRecord], start: str, end: str) -> int:
    n = 0
    for key in journal:
        if not key.startswith(start):
            continue
        rest = key[len(start) :]
        index = rest[: -len(end)] if end and rest.endswith(end) else rest
        if index.isdigit():
            n += 1
    return n


def _total(record: NodeRecord | None, key: str) -> int | None:
    if record is None:
        return None
    try:
        data: Any = _codec.loads(record.value)
    except CodecError:
        return None
    value = data.get(key) if isinstance(data, dict) else None
    return value if isinstance(value, int) else None
