"""What the inspector shows of map, loop and wait nodes (``.map``, ``fd.loop``,
``fd.wait_for``).

Each is ONE node of the graph; its items, iterations and signal are journaled under ids
derived from the node's (``summarize[3]``, ``summarize[3]/fetch`` for a mapped flow,
``agent@2``, ``approval#deadline``; see ``flowdsl._engine.dynamic``).  The run page draws
the node with its counts (``map 7/10``, ``loop @3``, ``waiting for signal 'approval'``)
and lists its items or iterations in the node's panel, so that the graph keeps the shape
the flow has however many items a run maps over.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from .._define.graph import Node, NodeKind
from .._engine.derived import Piece, pieces
from .._records import NodeRecord

__all__ = ["MAX_ITEMS", "dynamic_view"]

#: Items (iterations) listed per node; the rest are counted.
MAX_ITEMS = 200
_PREVIEW = 160  # characters of an item's result in the list


def _preview(text: str) -> str:
    return text if len(text) <= _PREVIEW else text[: _PREVIEW - 1] + "…"


def _failed_piece(failed_node: str | None, node_id: str, sep: str) -> int | None:
    """The index of the item (iteration) of *node_id* that *failed_node* names, if any."""
    if failed_node is None or not failed_node.startswith(node_id + sep):
        return None
    rest = failed_node[len(node_id) + 1 :]
    index = rest.partition("]")[0] if sep == "[" else rest.partition("/")[0]
    return int(index) if index.isdigit() else None


def _piece_view(
    node_id: str, sep: str, index: int, piece: Piece | None, failed: bool, live: bool
) -> dict[str, Any]:
    piece_id = f"{node_id}[{index}]" if sep == "[" else f"{node_id}@{index}"
    item: dict[str, Any] = {"index": index, "id": piece_id, "status": "pending"}
    record = piece.record if piece is not None else None
    if record is not None:
        item.update(
            status="cached" if record.attempts == 0 else "finished",
            attempts=record.attempts,
            started_at=record.started_at,
            finished_at=record.finished_at,
            duration=record.duration,
            result=_preview(record.value),
        )
    elif failed:
        item["status"] = "failed"
    elif piece is not None and piece.inner:
        item["status"] = "running" if live else "not run"
    else:
        item["status"] = "pending" if live else "not run"
    if piece is not None and piece.inner:
        item["inner_done"] = len(piece.inner)  # nodes of the item's sub-flow journaled
    return item


def dynamic_view(
    node: Node,
    status: str,
    journal: Mapping[str, NodeRecord],
    arguments: Any,
    *,
    failed_node: str | None,
    live: bool,
) -> dict[str, Any]:
    """The ``dynamic`` part of a map, loop or wait node's view: its kind, a short label
    for the graph, its counts, and its items or iterations (at most :data:`MAX_ITEMS`)."""
    if node.kind is NodeKind.WAIT:
        return _wait_view(node, status, journal)
    sep = "[" if node.kind is NodeKind.MAP else "@"
    found = pieces(journal, node.id, sep)
    done = sum(1 for p in found.values() if p.record is not None)
    failed = _failed_piece(failed_node, node.id, sep)
    total: int | None = None
    if node.kind is NodeKind.MAP:
        items = _first_argument(node, arguments)
        total = len(items) if isinstance(items, list) else None
        indices = range(total) if total is not None else sorted(found)
        label = f"map {done}/{total if total is not None else '?'}"
    else:
        # The iteration running (or that failed) is the first without a record: they run
        # one after another.
        if status in ("running", "failed"):
            indices = range(done + 1)
            label = f"loop @{done}"
        elif done:
            indices = range(done)
            label = f"loop: {done} iteration{'' if done == 1 else 's'}"
        else:
            indices = range(0)
            label = f"loop (max {node.spec.max_iterations})"
    shown = [
        _piece_view(node.id, sep, i, found.get(i), i == failed, live and status == "running")
        for i in list(indices)[:MAX_ITEMS]
    ]
    view: dict[str, Any] = {
        "kind": node.kind.value,
        "label": label,
        "done": done,
        "total": total,
        "items": shown,
        "more": max(0, len(indices) - len(shown)),
        "failed_item": failed,
        "body": getattr(node.spec.body, "ref", None),
    }
    if node.kind is NodeKind.LOOP:
        view["max_iterations"] = node.spec.max_iterations
    return view


def _first_argument(node: Node, arguments: Any) -> Any:
    # `_arguments` names what it evaluated by parameter name when it can: the items are
    # the first positional argument either way.
    if not isinstance(arguments, dict):
        return None
    if "args" in arguments and "kwargs" in arguments and isinstance(arguments["args"], list):
        return arguments["args"][0] if arguments["args"] else None
    return next(iter(arguments.values()), None)


def _wait_view(node: Node, status: str, journal: Mapping[str, NodeRecord]) -> dict[str, Any]:
    name = node.spec.name
    if status in ("finished", "cached"):
        label = f"signal {name!r} received"
    elif status == "waiting":
        label = f"waiting for signal {name!r}"
    elif status == "failed":
        label = f"no signal {name!r}"
    else:
        label = f"waits for signal {name!r}"
    view: dict[str, Any] = {
        "kind": "wait",
        "label": label,
        "signal": name,
        "timeout": node.spec.timeout,
        "items": [],
        "more": 0,
    }
    deadline = journal.get(f"{node.id}#deadline")
    if deadline is not None:
        with contextlib.suppress(ValueError):
            view["deadline"] = float(deadline.value)
    return view
