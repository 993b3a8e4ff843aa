"""What the inspector shows, as JSON-ready data built from a store's records.

Nothing here knows HTTP: :func:`run_summary`, :func:`run_view` and :func:`list_view` turn
:class:`~flowdsl._records.RunRecord` and :class:`~flowdsl._records.NodeRecord` into plain
dicts, so the same code serves the JSON endpoints, the live stream and the tests.

A store journals finished nodes only.  The rest of a node's status is inferred from the
run's graph, when the run's flow is one the inspector was given (``--import MODULE``):

- ``finished`` (``cached`` when its result came from the step cache): journaled;
- ``failed``: the node the run record names as the one that failed the run (a map or a
  loop whose item or iteration it is); its error and traceback are the run record's;
- ``skipped``: inside a branch case that its branch (journaled) did not choose;
- ``running``: the run runs, and every input of the node is there: it runs now, or is
  about to (its start time is then an estimate: when its last input was ready);
  ``waiting`` for a wait (``fd.wait_for``) in that state: it waits for its signal;
- ``pending`` while the run runs, ``not run`` once it has ended.

For a run whose flow the inspector was not given, the nodes are the journal's alone (and
the failed node), without edges: a flow is never imported because a record names it.
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Mapping
from typing import Any

from .._define.dsl import Flow
from .._define.graph import (
    DYNAMIC_KINDS,
    Expr,
    Graph,
    Input,
    ListOf,
    Literal,
    MapOf,
    Node,
    NodeKind,
    Ref,
)
from .._engine.resume import derived_base
from .._records import NodeRecord, RunRecord, RunStatus, add_usage
from .dynamic import dynamic_view

__all__ = ["list_view", "node_diff", "run_summary", "run_view", "timeline"]

# Statuses whose nodes have ended (a Gantt bar of fixed length).
ENDED = frozenset({"finished", "cached", "failed"})


def _json(text: str | None) -> Any:
    """Stored JSON text as data; text that does not parse is shown as it is."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _status(record: RunRecord) -> str:
    status = record.status
    return status.value if isinstance(status, RunStatus) else str(status)


def run_summary(record: RunRecord, flows: Mapping[str, Flow[..., Any]]) -> dict[str, Any]:
    """One line of the run list."""
    ended = _status(record) not in ("running", "waiting")
    return {
        "run_id": record.run_id,
        "flow": record.flow,
        "flow_ref": record.flow_ref,
        "status": _status(record),
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "duration": (record.updated_at - record.created_at) if ended else None,
        "error": record.error,
        "failed_node": record.failed_node,
        "graph": "flow" if flow_of(record, flows) is not None else "journal",
    }


def flow_of(record: RunRecord, flows: Mapping[str, Flow[..., Any]]) -> Flow[..., Any] | None:
    """The flow of *record* among those the inspector was given (by ``module:qualname``,
    and only if the names agree), else ``None``."""
    flow = flows.get(record.flow_ref)
    if flow is None or flow.name != record.flow:
        return None
    return flow


def list_view(
    records: list[RunRecord],
    flows: Mapping[str, Flow[..., Any]],
    *,
    status: str | None = None,
    flow: str | None = None,
    search: str | None = None,
    page: int = 1,
    page_size: int = 50,
) -> dict[str, Any]:
    """A page of *records* (newest first) matching the filters, and the facets to filter by."""
    matching = [
        r
        for r in records
        if (status is None or _status(r) == status)
        and (flow is None or r.flow == flow)
        and (not search or r.run_id.startswith(search))
    ]
    start = (page - 1) * page_size
    shown = matching[start : start + page_size]
    return {
        "runs": [run_summary(r, flows) for r in shown],
        "page": page,
        "page_size": page_size,
        "total": len(matching),
        "next_page": page + 1 if start + page_size < len(matching) else None,
        "flows": sorted({r.flow for r in records}),
        "statuses": sorted({_status(r) for r in records}),
    }


# --- one run ---------------------------------------------------------------------------------


class _Unknown(Exception):
    """A value the journal does not hold (yet)."""


def _project(value: Any, path: tuple[tuple[str, Any], ...]) -> Any:
    # Encoded data: an attrs instance or dataclass is a JSON object, so an attribute is a key.
    for _kind, key in path:
        try:
            value = value[key]
        except (KeyError, IndexError, TypeError) as exc:
            raise _Unknown from exc
    return value


def _evaluate(expr: Expr, inputs: Mapping[str, Any], results: Mapping[str, Any]) -> Any:
    """An argument expression over encoded data (what the node received, as JSON)."""
    if isinstance(expr, Literal):
        return expr.data
    if isinstance(expr, Input):
        if expr.name not in inputs:
            raise _Unknown
        return _project(inputs[expr.name], expr.path)
    if isinstance(expr, Ref):
        if expr.node not in results:
            raise _Unknown
        return _project(results[expr.node], expr.path)
    if isinstance(expr, ListOf):
        return [_evaluate(e, inputs, results) for e in expr.items]
    if isinstance(expr, MapOf):
        return {
            str(k): _evaluate(v, inputs, results)
            for k, v in zip(expr.keys, expr.values, strict=True)
        }
    return [_evaluate(e, inputs, results) for e in expr.items]


def _arguments(node: Node, inputs: Mapping[str, Any], results: Mapping[str, Any]) -> Any:
    """What the node was (or will be) called with, by parameter name; ``None`` while an
    input is not journaled yet."""
    try:
        args = [_evaluate(e, inputs, results) for e in node.args]
        kwargs = {k: _evaluate(e, inputs, results) for k, e in node.kwargs}
    except _Unknown:
        return None
    names = _positional_names(node)
    if len(names) < len(args):
        return {"args": args, "kwargs": kwargs}  # a *args step: no names to give
    return {**dict(zip(names, args, strict=False)), **kwargs}


def _positional_names(node: Node) -> list[str]:
    fn = getattr(node.fn, "fn", None)
    try:
        parameters = inspect.signature(fn).parameters.values()  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return []
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in parameters if p.kind in positional]


class _Resolver:
    """Which nodes of a graph have their value, given the journal (joins are computed)."""

    def __init__(self, graph: Graph, journal: Mapping[str, NodeRecord]) -> None:
        self.graph = graph
        self.journal = journal
        self._memo: dict[str, bool] = {}

    def chosen(self, branch: str) -> Any:
        record = self.journal.get(branch)
        return None if record is None else _json(record.value)

    def resolved(self, node_id: str) -> bool:
        if node_id in self._memo:
            return self._memo[node_id]
        node = self.graph.nodes_by_id[node_id]
        if node.kind is not NodeKind.JOIN:
            done = node_id in self.journal
        else:
            case = self.chosen(node.name)
            try:
                expr = node.case_expr(case) if isinstance(case, str) else None
            except KeyError:
                expr = None
            done = expr is not None and all(self.resolved(r) for r in _refs(expr))
        self._memo[node_id] = done
        return done

    def skipped(self, node: Node) -> bool:
        for branch, case in node.guard:
            taken = self.chosen(branch)
            if branch in self.journal and taken != case:
                return True
        return False

    def ready(self, node: Node) -> bool:
        guards = all(self.chosen(b) == c for b, c in node.guard)
        return guards and all(self.resolved(d) for d in node.data_deps)


def _refs(expr: Expr) -> list[str]:
    from .._define.graph import refs_of

    return refs_of(expr)


def _depths(order: list[str], parents: Mapping[str, list[str]]) -> dict[str, int]:
    """Longest-path layer of each node (the graph is a DAG, *order* topological)."""
    depth: dict[str, int] = {}
    for node_id in order:
        depth[node_id] = max(
            (depth[p] + 1 for p in parents.get(node_id, []) if p in depth), default=0
        )
    return depth


def run_view(
    record: RunRecord,
    journal: Mapping[str, NodeRecord],
    flow: Flow[..., Any] | None,
    *,
    now: float | None = None,
    dead_letters: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Everything the run page shows: the record, the nodes with their status, arguments,
    result or error, attempts, timings and usage, the edges, the timeline and the totals."""
    now = time.time() if now is None else now
    status = _status(record)
    live = status in ("running", "waiting")
    inputs = _json(record.inputs)
    inputs = inputs if isinstance(inputs, dict) else {}
    results = {node_id: _json(r.value) for node_id, r in journal.items()}
    nodes: list[dict[str, Any]] = []
    edges: list[dict[str, Any]] = []
    if flow is not None:
        graph = flow.graph
        resolver = _Resolver(graph, journal)
        order = list(graph.order)
        parents: dict[str, list[str]] = {}
        for edge in graph.edges:
            edges.append({"src": edge.src, "dst": edge.dst, "kind": edge.kind, "case": edge.case})
            parents.setdefault(edge.dst, []).append(edge.src)
        depth = _depths(order, parents)
        dynamic = frozenset(n for n in order if graph.nodes_by_id[n].kind in DYNAMIC_KINDS)
        failed = record.failed_node
        # A map's item, a loop's iteration (or a node inside one) fails its map or loop.
        failed_base = derived_base(failed, dynamic) if failed and dynamic else None
        for node_id in order:
            node = graph.nodes_by_id[node_id]
            view = _node_view(node_id, node.name, node.kind.value, journal.get(node_id))
            view["depth"] = depth[node_id]
            view["labels"] = list(node.labels)
            view["guard"] = [list(g) for g in node.guard]
            if node.kind is NodeKind.JOIN:
                view["status"] = "finished" if resolver.resolved(node_id) else _idle(live)
                if resolver.skipped(node):
                    view["status"] = "skipped"
            elif node_id in journal:
                pass
            elif node_id in (failed, failed_base):
                view["status"] = "failed"
            elif resolver.skipped(node):
                view["status"] = "skipped"
            elif live and resolver.ready(node):
                view["status"] = "waiting" if node.kind is NodeKind.WAIT else "running"
                view["started_at"] = _ready_at(node, journal, record)
                view["estimated_start"] = True
            else:
                view["status"] = _idle(live)
            if node.kind is not NodeKind.JOIN and view["status"] != "skipped":
                view["arguments"] = _arguments(node, inputs, results)
            if node_id in dynamic:
                view["dynamic"] = dynamic_view(
                    node, view["status"], journal, view["arguments"], failed_node=failed, live=live
                )
            if view["status"] == "failed":
                view["started_at"] = _ready_at(node, journal, record)
                view["estimated_start"] = True
                view["finished_at"] = record.updated_at
                view["duration"] = max(0.0, record.updated_at - view["started_at"])
            nodes.append(view)
        # Journaled nodes the flow no longer has (it changed since the run).  The items and
        # iterations of its maps and loops (`summarize[3]`, `agent@2/tool`) are their
        # node's `dynamic` part instead: the graph keeps the flow's shape.
        for node_id in sorted(set(journal) - set(graph.nodes_by_id)):
            if dynamic and derived_base(node_id, dynamic) is not None:
                continue
            view = _node_view(node_id, node_id, "step", journal[node_id])
            view["depth"] = 0
            view["unknown_to_flow"] = True
            nodes.append(view)
    else:
        for node_id in sorted(journal, key=lambda n: journal[n].started_at):
            nodes.append(_node_view(node_id, node_id, "step", journal[node_id]))
        if record.failed_node is not None and record.failed_node not in journal:
            view = _node_view(record.failed_node, record.failed_node, "step", None)
            view["status"] = "failed"
            view["finished_at"] = record.updated_at
            nodes.append(view)
    for view in nodes:
        if view["status"] == "failed":
            view["error"] = record.error
            view["traceback"] = record.traceback
    usage: dict[str, Any] = {}
    for r in journal.values():
        if r.usage:
            add_usage(usage, r.usage)
    summary = run_summary(record, {flow.ref: flow} if flow is not None else {})
    summary.update(
        inputs=inputs,
        result=_json(record.result),
        fingerprint=record.fingerprint,
        usage=usage,
    )
    view_ = {
        "run": summary,
        "nodes": nodes,
        "edges": edges,
        "timeline": timeline(record, nodes, now=now),
        "dead_letters": dead_letters or [],
        "actions": {
            "resume": status in ("failed", "cancelled") and flow is not None,
            "cancel": live,
            "signal": status == "waiting",
        },
    }
    return view_


def _idle(live: bool) -> str:
    return "pending" if live else "not run"


def _node_view(node_id: str, name: str, kind: str, record: NodeRecord | None) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": node_id,
        "name": name,
        "kind": kind,
        "status": "pending",
        "attempts": None,
        "started_at": None,
        "finished_at": None,
        "duration": None,
        "result": None,
        "error": None,
        "traceback": None,
        "usage": None,
        "arguments": None,
    }
    if record is not None:
        view.update(
            status="cached" if record.attempts == 0 else "finished",
            attempts=record.attempts,
            started_at=record.started_at,
            finished_at=record.finished_at,
            duration=record.duration,
            result=_json(record.value),
            usage=record.usage,
        )
    return view


def _ready_at(node: Node, journal: Mapping[str, NodeRecord], record: RunRecord) -> float:
    """When a node's last journaled input finished (the run's start for a root node)."""
    times = [journal[d].finished_at for d in node.data_deps if d in journal]
    times += [journal[b].finished_at for b, _ in node.guard if b in journal]
    return max(times, default=record.created_at)


def timeline(record: RunRecord, nodes: list[dict[str, Any]], *, now: float) -> dict[str, Any]:
    """Gantt bars: one per node that started, from its start to its end (``None`` while
    it runs: the page draws it up to the present)."""
    bars = []
    for view in nodes:
        if view["started_at"] is None:
            continue
        ended = view["status"] in ENDED
        bars.append(
            {
                "id": view["id"],
                "status": view["status"],
                "start": view["started_at"],
                "end": view["finished_at"] if ended else None,
                "estimated_start": bool(view.get("estimated_start")),
            }
        )
    bars.sort(key=lambda b: (b["start"], b["id"]))
    live = _status(record) in ("running", "waiting")
    return {
        "start": record.created_at,
        "end": None if live else record.updated_at,
        "now": now,
        "bars": bars,
    }


def node_diff(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any] | None:
    """What changed from view *old* to view *new*: top-level parts that differ, and the
    nodes that changed (by id); ``None`` when nothing did.  ``timeline.now`` is left out
    of the comparison, or every poll would be a change."""
    if old is None:
        return {"full": new}
    patch: dict[str, Any] = {}
    for key in ("run", "edges", "dead_letters", "actions"):
        if old.get(key) != new.get(key):
            patch[key] = new[key]
    if _without_now(old.get("timeline")) != _without_now(new.get("timeline")):
        patch["timeline"] = new["timeline"]
    before = {n["id"]: n for n in old.get("nodes", [])}
    after = {n["id"]: n for n in new.get("nodes", [])}
    changed = [n for node_id, n in after.items() if before.get(node_id) != n]
    removed = [node_id for node_id in before if node_id not in after]
    if changed:
        patch["nodes"] = changed
    if removed:
        patch["removed"] = removed
    if [n["id"] for n in old.get("nodes", [])] != [n["id"] for n in new.get("nodes", [])]:
        patch["order"] = [n["id"] for n in new.get("nodes", [])]
    return patch or None


def _without_now(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "now"}
    return value
