"""Deciding, on resume, which journaled results may be reused, and reading them back.

A finished node is reused (never run again) when all of these hold:

- the node still exists in the flow as traced now;
- its *marker* is unchanged: the step's code hash (or its ``version=``) and the node's own
  wiring (kind, arguments, guard, case labels) are what they were when it ran;
- every node it takes a value from, and the branch whose case it sits in, is reused too.

Anything else runs again, and so does everything downstream of it.  In strict mode any
change is refused instead.  A journaled node that no longer exists is always refused:
its result went somewhere the new graph cannot say, so reuse would be a guess.

The rule for nodes that were *in flight* when a run stopped is at-least-once: they have no
record, so they run again.  Finished nodes are exactly-once: their record is the result.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import attrs

from .. import _codec
from .._define.graph import DYNAMIC_KINDS, Node, NodeKind, describe, refs_of
from .._errors import CheckpointError, CodecError
from .._records import NodeRecord

__all__ = ["ReusePlan", "decode_node_result", "node_marker", "plan_reuse"]


def decode_node_result(node: Node, text: str) -> Any:
    """A node's result as the JSON text of its record holds it, read back as a value.

    A branch's value is its case label, which must be one of its cases; a step's result
    is decoded as its return annotation says.  :class:`CodecError` when the text does not
    fit: the caller says whose data it was (a journal, a worker's completion).
    """
    if node.kind is NodeKind.BRANCH:
        label = _codec.loads(text)
        if label not in node.labels:
            raise CodecError(f"case {label!r} is none of {list(node.labels)}")
        return label
    assert node.fn is not None
    return _codec.decode(text, node.fn.return_type, what=f"the result of {node.id!r}")


def node_wiring(node: Node) -> str:
    """A short hash of what a node is wired to: kind, name, arguments, guard, labels."""
    desc = {
        "kind": node.kind.value,
        "name": node.name,
        "args": [describe(e) for e in node.args],
        "kwargs": [[k, describe(e)] for k, e in node.kwargs],
        "guard": [list(g) for g in node.guard],
        "labels": list(node.labels),
    }
    if node.spec is not None:
        desc["spec"] = node.spec.describe()
    return hashlib.sha256(_codec.dumps(desc).encode()).hexdigest()[:12]


def node_marker(node: Node) -> str:
    """What a journal record must match to be reused: code and wiring."""
    if node.kind in DYNAMIC_KINDS:
        return dynamic_marker(node, frozenset())
    unit = node.fn
    assert unit is not None
    return f"{unit_code(unit)}/{node_wiring(node)}"


def unit_code(unit: Any) -> str:
    return f"version:{unit.version}" if unit.version is not None else str(unit.code_hash)


def dynamic_marker(node: Node, seen: frozenset[str]) -> str:
    """A map's or loop's marker covers the code of its body (every node of a flow body,
    so that changing one step of a mapped flow invalidates the items' results); a wait's
    starts with ``wait:``, which is how a resume finds the signals already consumed."""
    spec = node.spec
    if node.kind is NodeKind.WAIT:
        return f"wait:{node_wiring(node)}"
    body = spec.body
    if not spec.is_flow:
        return f"{unit_code(body)}/{node_wiring(node)}"
    return f"flow:{flow_code(body, seen)}/{node_wiring(node)}"


def flow_code(flow: Any, seen: frozenset[str] = frozenset()) -> str:
    """A hash of a flow's shape and the code of every node in it (maps inside included)."""
    if flow.ref in seen:  # a flow that maps itself, through others: its name is enough
        return str(flow.ref)
    seen = seen | {flow.ref}
    graph = flow.graph
    parts = [graph.fingerprint]
    for node_id in graph.order:
        node = graph[node_id]
        if node.kind is NodeKind.JOIN:
            continue
        if node.kind in DYNAMIC_KINDS:
            parts.append(dynamic_marker(node, seen))
        else:
            assert node.fn is not None
            parts.append(unit_code(node.fn))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


DERIVED = "[@#"  # what follows a dynamic node's id in the ids of its items, iterations, ...


def derived_base(node_id: str, dynamic: frozenset[str]) -> str | None:
    """The dynamic node whose item, iteration or deadline *node_id* records, if any."""
    for base in dynamic:
        if node_id.startswith(base) and len(node_id) > len(base) and node_id[len(base)] in DERIVED:
            return base
    return None


@attrs.frozen
class ReusePlan:
    reused: frozenset[str]
    stale: tuple[str, ...]  # journaled, but changed (or downstream of a change): run again
    changed: tuple[str, ...]  # the nodes whose own code or wiring changed


def plan_reuse(
    *,
    flow: str,
    run_id: str,
    nodes: Mapping[str, Node],
    order: tuple[str, ...],
    markers: Mapping[str, str],
    journal: Mapping[str, NodeRecord],
    strict: bool,
) -> ReusePlan:
    """Which journaled nodes a resume may reuse.

    A dynamic node (map, loop, wait) is reused whole when its own record is there (it ended)
    and everything upstream is reused.  Otherwise its items' and iterations' records stay
    in the journal for the node to judge one by one when it runs again, unless what it
    takes changed: then they are stale with it.
    """
    dynamic = frozenset(n for n, node in nodes.items() if node.kind in DYNAMIC_KINDS)
    derived: dict[str, list[str]] = {}
    for node_id in journal:
        if node_id not in nodes:
            base = derived_base(node_id, dynamic) if dynamic else None
            if base is not None:
                derived.setdefault(base, []).append(node_id)
    missing = sorted(set(journal) - set(nodes) - {d for ids in derived.values() for d in ids})
    if missing:
        raise CheckpointError(
            f"run {run_id!r} has results for node(s) {', '.join(map(repr, missing[:5]))} "
            "that no longer exist in the flow",
            flow=flow,
            node=missing[0],
            hint="The flow changed shape since the run started; resuming could attach "
            "results to the wrong calls. Start a new run, or restore the old flow code to "
            "finish this one",
        )
    reused: set[str] = set()
    stale: list[str] = []
    changed: list[str] = []
    for node_id in order:
        node = nodes[node_id]
        if node.kind is NodeKind.JOIN:
            continue  # joins are recomputed, never journaled
        record = journal.get(node_id)
        upstream = list(node.data_deps)
        if node.guard:
            upstream.append(node.guard[-1][0])
        if record is None:
            if node_id in derived and not all(
                _resolved(dep, nodes, reused, journal) for dep in upstream
            ):
                stale.extend(derived[node_id])
            continue
        own_change = record.code != markers[node_id]
        upstream_ok = all(_resolved(dep, nodes, reused, journal) for dep in upstream)
        if node_id in derived and not upstream_ok:
            stale.extend(derived[node_id])
        if own_change:
            changed.append(node_id)
        if own_change or not upstream_ok:
            stale.append(node_id)
        else:
            reused.add(node_id)
    if strict and changed:
        raise CheckpointError(
            f"the code or wiring of node(s) {', '.join(map(repr, changed[:5]))} changed since "
            f"run {run_id!r} ran them",
            flow=flow,
            node=changed[0],
            hint="Resume without strict=True to run the changed nodes (and what depends on "
            "them) again, or restore the code",
        )
    return ReusePlan(frozenset(reused), tuple(stale), tuple(changed))


def _resolved(
    dep: str, nodes: Mapping[str, Node], reused: set[str], journal: Mapping[str, NodeRecord]
) -> bool:
    node = nodes[dep]
    if node.kind is not NodeKind.JOIN:
        return dep in reused
    # A join is recomputed, never journaled: it is as good as its branch and the inputs
    # of the case that branch chose.
    if node.name not in reused:
        return False
    try:
        case = _codec.loads(journal[node.name].value)
        expr = node.case_expr(case)
    except (KeyError, TypeError, CodecError):
        return False
    return all(_resolved(ref, nodes, reused, journal) for ref in refs_of(expr))
