"""Ids derived from a dynamic node's, as executors and the journal see them.

An item of a map runs as ``summarize[3]``, a node of a mapped flow's item as
``review[3]/fetch``, an iteration of a loop as ``agent@2``.  An executor finds a node's code
marker in ``run.plan.markers[node.id]``: :class:`RunView` gives it a run whose markers
answer for those ids.  :func:`pieces` reads a node's items or iterations back from the
journal, and :func:`journaled_value` the value of any finished node, a map's or a loop's
put together from its pieces.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import attrs

from .. import _codec
from .._define.dynamic import Done, as_outcome, outcome_types
from .._define.graph import Node, NodeKind
from .._errors import CheckpointError, CodecError
from .._records import NodeRecord
from .scheduler import Plan

__all__ = [
    "ConstMarkers",
    "Piece",
    "PrefixMarkers",
    "RunView",
    "journaled_value",
    "pieces",
    "plan_of",
]


class ConstMarkers(Mapping[str, str]):
    """Every item of a map (every iteration of a loop) has the node's own marker."""

    __slots__ = ("marker",)

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __getitem__(self, key: str) -> str:
        return self.marker

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


class PrefixMarkers(Mapping[str, str]):
    """The markers of a sub-graph's nodes, by the ids they run under (``map[2]/node``)."""

    __slots__ = ("inner", "size")

    def __init__(self, size: int, inner: Mapping[str, str]) -> None:
        self.size = size
        self.inner = inner

    def __getitem__(self, key: str) -> str:
        return self.inner[key[self.size :]]

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


@attrs.define(eq=False)
class _MarkerPlan:
    markers: Mapping[str, str]


class RunView:
    """A run as an executor sees it while it runs an item, an iteration or a node of a
    sub-graph: the run's identity and events, with markers for the ids it runs under."""

    __slots__ = ("base", "flow_name", "observed", "plan", "run_id")

    def __init__(self, base: Any, markers: Mapping[str, str]) -> None:
        self.base = base
        self.run_id: str = base.run_id
        self.flow_name: str = base.flow_name
        self.observed: bool = base.observed
        self.plan = _MarkerPlan(markers)

    def emit(self, event: Any) -> None:
        self.base.emit(event)

    def add_usage(self, counts: dict[str, Any]) -> None:
        self.base.add_usage(counts)


def plan_of(flow: Any) -> Plan:
    plan: Plan | None = getattr(flow, "_fd_plan", None)
    if plan is None or plan.graph is not flow.graph:
        plan = Plan(flow.graph)
        flow._fd_plan = plan
    return plan


# --- journal --------------------------------------------------------------------------------


@attrs.define
class Piece:
    """What the journal holds for one item or iteration: its own record, and the records
    of its sub-graph's nodes by their ids inside it."""

    record: NodeRecord | None = None
    inner: dict[str, NodeRecord] = attrs.field(factory=dict)


def pieces(journal: Mapping[str, NodeRecord], node_id: str, sep: str) -> dict[int, Piece]:
    """The journal's records of *node_id*'s items (``sep="["``) or iterations (``"@"``)."""
    out: dict[int, Piece] = {}
    start = node_id + sep
    for key, record in journal.items():
        if not key.startswith(start):
            continue
        rest = key[len(start) :]
        if sep == "[":
            index, close, tail = rest.partition("]")
            if not close:
                continue
        else:
            index, slash, tail = rest.partition("/")
            tail = slash + tail
        if not index.isdigit():
            continue
        piece = out.setdefault(int(index), Piece())
        if not tail:
            piece.record = record
        elif tail.startswith("/"):
            piece.inner[tail[1:]] = record
    return out


def journaled_value(run: Any, node: Node, journal: Mapping[str, NodeRecord]) -> Any:
    """The value of a node the journal says finished, decoded as its type; a map's or a
    loop's put together from its items' or last iteration's records."""
    text = journal[node.id].value
    try:
        if node.kind is NodeKind.BRANCH:
            label = _codec.loads(text)
            if label not in node.labels:
                raise CodecError(f"case {label!r} is none of {list(node.labels)}")
            return label
        if node.kind is NodeKind.STEP:
            assert node.fn is not None
            return _codec.decode(text, node.fn.return_type, what=f"the result of {node.id!r}")
        data = _codec.loads(text)
        if node.kind is NodeKind.WAIT:
            return _codec.from_data(data["value"], node.spec.type, what=f"signal {node.name!r}")
        body = node.spec.body
        if node.kind is NodeKind.MAP:
            return [
                _codec.decode(
                    journal[f"{node.id}[{i}]"].value,
                    body.return_type,
                    what=f"item {i} of {node.id!r}",
                )
                for i in range(int(data["items"]))
            ]
        last = journal[f"{node.id}@{int(data['iterations']) - 1}"]
        outcome = as_outcome(_codec.loads(last.value))  # data: decoded as the result type
        if not isinstance(outcome, Done):
            raise CodecError("the last iteration did not return fd.Done")
        return _codec.from_data(outcome.result, outcome_types(body.return_type)[1])
    except (CodecError, KeyError, TypeError, ValueError) as exc:
        problem = exc.problem if isinstance(exc, CodecError) else f"missing or bad {exc}"
        raise CheckpointError(
            f"the journaled result of node {node.id!r} in run {run.run_id!r} cannot be "
            f"read: {problem}",
            flow=run.flow_name,
            node=node.id,
            hint="The store is corrupted, or the step's return type changed: bump the "
            "step's version= so that it runs again",
        ) from exc
