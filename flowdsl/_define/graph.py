"""The traced DAG: immutable data the tracer builds and the scheduler reads.

A :class:`Graph` is plain data.  Nodes refer to their step by object (for in-process
execution) and by ``module:qualname`` (for workers in other processes); what a node needs of
that object is the :class:`Unit` protocol, so this module knows nothing of the decorators
that make units (:mod:`.dsl`).  Arguments are small
expression trees (:data:`Expr`): a literal, a flow input, another node's result (optionally
projected by attribute or item), or a list, tuple or dict of these.

Ids are stable: they come from step names, call order, sub-flow and branch-case namespaces,
so the same code traced in another process gives the same ids, which is what lets a run
resume from its journal.
"""

from __future__ import annotations

import copy
import enum
import hashlib
import html
import re
import typing
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import attrs

from .. import _codec

__all__ = [
    "DYNAMIC_KINDS",
    "Edge",
    "Graph",
    "Input",
    "ListOf",
    "Literal",
    "MapOf",
    "Node",
    "NodeKind",
    "Ref",
    "TupleOf",
    "Unit",
    "split_item",
]


class Unit(Protocol):
    """What a step or branch node refers to: the code it runs and how it runs it.

    ``@fd.step`` and ``@fd.branch`` make units (:mod:`.dsl`); the engine reads only these
    members, so the graph, the scheduler and the executors never import the decorators.
    """

    @property
    def kind(self) -> str:
        """``"step"`` or ``"branch"``."""

    @property
    def name(self) -> str: ...

    @property
    def ref(self) -> str:
        """``module:qualname``: where a worker in another process imports it from."""

    @property
    def fn(self) -> Callable[..., Any]:
        """The decorated function itself."""

    @property
    def retries(self) -> int: ...

    @property
    def timeout(self) -> float | None: ...

    @property
    def retry_on(self) -> tuple[type[BaseException], ...]: ...

    @property
    def backoff(self) -> float: ...

    @property
    def version(self) -> str | None: ...

    @property
    def cache(self) -> bool: ...

    @property
    def is_async(self) -> bool: ...

    @property
    def bare(self) -> bool:
        """Whether real time may run it as a bare task: async, no timeout, no cache."""

    @property
    def code_hash(self) -> str:
        """A hash of its code, taken when it was decorated (see :mod:`flowdsl._engine.resume`)."""

    @property
    def return_type(self) -> Any:
        """The return annotation (``Any`` when there is none): how results are decoded."""

    @property
    def param_types(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The annotated parameter types, by position and by name: how arguments are decoded."""


# --- argument expressions -----------------------------------------------------------------


@attrs.frozen
class Literal:
    """A constant written in the flow body."""

    value: Any = attrs.field(eq=False)
    data: Any  # its encoded form: what fingerprints and task messages carry


@attrs.frozen
class Input:
    """A parameter of the outermost flow, optionally projected like :class:`Ref`."""

    name: str
    path: tuple[tuple[str, Any], ...] = ()


@attrs.frozen
class Ref:
    """The result of node ``node``, projected by ``path`` (``("attr", name)``/``("item", key)``)."""

    node: str
    path: tuple[tuple[str, Any], ...] = ()


@attrs.frozen
class ListOf:
    items: tuple[Expr, ...]


@attrs.frozen
class TupleOf:
    items: tuple[Expr, ...]


@attrs.frozen
class MapOf:
    keys: tuple[Any, ...]
    values: tuple[Expr, ...]


Expr = Literal | Input | Ref | ListOf | TupleOf | MapOf


def refs_of(expr: Expr) -> list[str]:
    """The node ids an expression reads, in order of first appearance."""
    out: list[str] = []
    _collect_refs(expr, out)
    return list(dict.fromkeys(out))


def _collect_refs(expr: Expr, out: list[str]) -> None:
    if isinstance(expr, Ref):
        out.append(expr.node)
    elif isinstance(expr, ListOf | TupleOf):
        for item in expr.items:
            _collect_refs(item, out)
    elif isinstance(expr, MapOf):
        for item in expr.values:
            _collect_refs(item, out)


_IMMUTABLE = frozenset({str, int, float, bool, bytes, type(None)})


def evaluate(expr: Expr, inputs: Mapping[str, Any], results: Mapping[str, Any]) -> Any:
    """The value of *expr* given the flow's inputs and the finished nodes' results."""
    cls = type(expr)
    if cls is Ref:
        value = results[expr.node]  # type: ignore[union-attr]
        for kind, key in expr.path:  # type: ignore[union-attr]
            value = getattr(value, key) if kind == "attr" else value[key]
        return value
    if cls is Literal:
        value = expr.value  # type: ignore[union-attr]
        # Each run gets its own copy: a step that mutates a literal list must not change
        # what the next run (or a sibling node) receives.
        return value if type(value) in _IMMUTABLE else copy.deepcopy(value)
    if cls is Input:
        value = inputs[expr.name]  # type: ignore[union-attr]
        for kind, key in expr.path:  # type: ignore[union-attr]
            value = getattr(value, key) if kind == "attr" else value[key]
        return value
    if cls is ListOf:
        return [evaluate(e, inputs, results) for e in expr.items]  # type: ignore[union-attr]
    if cls is TupleOf:
        return tuple(evaluate(e, inputs, results) for e in expr.items)  # type: ignore[union-attr]
    assert isinstance(expr, MapOf)
    return {k: evaluate(v, inputs, results) for k, v in zip(expr.keys, expr.values, strict=True)}


def describe(expr: Expr) -> Any:
    """A JSON-compatible description of *expr*, for fingerprints and task messages."""
    if isinstance(expr, Literal):
        return {"lit": expr.data}
    if isinstance(expr, Input):
        return {"input": expr.name, "path": [[k, _codec.to_data(v)] for k, v in expr.path]}
    if isinstance(expr, Ref):
        return {"ref": expr.node, "path": [[k, _codec.to_data(v)] for k, v in expr.path]}
    if isinstance(expr, ListOf):
        return {"list": [describe(e) for e in expr.items]}
    if isinstance(expr, TupleOf):
        return {"tuple": [describe(e) for e in expr.items]}
    return {
        "map": [
            [_codec.to_data(k), describe(v)] for k, v in zip(expr.keys, expr.values, strict=True)
        ]
    }


# --- nodes and edges ----------------------------------------------------------------------


class NodeKind(enum.Enum):
    STEP = "step"
    BRANCH = "branch"
    JOIN = "join"  # the value of ``branch(...).cases(...)``: the chosen case's result
    # Dynamic nodes: one node in the graph, expanded at run time (see _define/dynamic.py).
    MAP = "map"  # ``step.map(items)`` / ``flow.map(items)``: one item per element
    LOOP = "loop"  # ``fd.loop(body, init)``: iterations until the body says Done
    WAIT = "wait"  # ``fd.wait_for(name, type)``: a value sent from outside


DYNAMIC_KINDS = frozenset({NodeKind.MAP, NodeKind.LOOP, NodeKind.WAIT})


Guard = tuple[tuple[str, str], ...]
"""The chain of ``(branch node id, case label)`` a node sits inside, outermost first."""


@attrs.frozen
class Node:
    """One call in a flow body."""

    id: str
    kind: NodeKind
    name: str  # the step's or branch's name; for a join, its branch's id
    args: tuple[Expr, ...] = ()
    kwargs: tuple[tuple[str, Expr], ...] = ()
    guard: Guard = ()
    # For a JOIN: the case labels and each case's result expression.
    cases: tuple[tuple[str, Expr], ...] = ()
    # For a BRANCH: the labels of its cases, which its value must name.
    labels: tuple[str, ...] = ()
    fn: Unit | None = attrs.field(default=None, eq=False, repr=False)
    # For a MAP, LOOP or WAIT: what it maps or loops over, or what it waits for (a
    # MapSpec, LoopSpec or WaitSpec of _define/dynamic.py).
    spec: Any = attrs.field(default=None, eq=False, repr=False)

    @property
    def data_deps(self) -> tuple[str, ...]:
        deps: list[str] = []
        for expr in self.args:
            deps.extend(refs_of(expr))
        for _, expr in self.kwargs:
            deps.extend(refs_of(expr))
        return tuple(dict.fromkeys(deps))

    def case_expr(self, case: str) -> Expr:
        for label, expr in self.cases:
            if label == case:
                return expr
        raise KeyError(case)


@attrs.frozen
class Edge:
    """``src`` feeds ``dst``: by value (``kind="data"``) or by choosing its case (``"case"``)."""

    src: str
    dst: str
    kind: str = "data"
    case: str | None = None


def _mermaid_id(node_id: str) -> str:
    return "n_" + hashlib.blake2b(node_id.encode(), digest_size=5).hexdigest()


@attrs.frozen
class Graph:
    """The DAG a flow traced into.  Immutable; a run's state lives in the scheduler."""

    flow: str
    nodes_by_id: Mapping[str, Node] = attrs.field(repr=False)
    inputs: tuple[str, ...]
    output: Expr
    order: tuple[str, ...] = attrs.field(repr=False)  # node ids in trace order

    @property
    def nodes(self) -> tuple[str, ...]:
        """Node ids in the order the flow body called them."""
        return self.order

    def __getitem__(self, node_id: str) -> Node:
        return self.nodes_by_id[node_id]

    def __len__(self) -> int:
        return len(self.order)

    @property
    def edges(self) -> tuple[Edge, ...]:
        out: list[Edge] = []
        for node_id in self.order:
            node = self.nodes_by_id[node_id]
            for dep in node.data_deps:
                out.append(Edge(dep, node_id))
            if node.kind is NodeKind.JOIN:
                out.append(Edge(node.name, node_id, kind="control"))
                for case, expr in node.cases:
                    for dep in refs_of(expr):
                        out.append(Edge(dep, node_id, kind="data", case=case))
            if node.guard:
                branch, case = node.guard[-1]
                if not any(dep in self._case_members(branch, case) for dep in node.data_deps):
                    out.append(Edge(branch, node_id, kind="case", case=case))
        return tuple(dict.fromkeys(out))

    def _case_members(self, branch: str, case: str) -> frozenset[str]:
        return frozenset(n.id for n in self.nodes_by_id.values() if (branch, case) in n.guard)

    @property
    def fingerprint(self) -> str:
        """A hash of the graph's shape: ids, kinds, wiring, guards and literal arguments."""
        h = hashlib.sha256(self.flow.encode())
        for node_id in self.order:
            node = self.nodes_by_id[node_id]
            desc = {
                "id": node.id,
                "kind": node.kind.value,
                "name": node.name,
                "args": [describe(e) for e in node.args],
                "kwargs": [[k, describe(e)] for k, e in node.kwargs],
                "guard": [list(g) for g in node.guard],
                "cases": [[c, describe(e)] for c, e in node.cases],
                "labels": list(node.labels),
            }
            if node.spec is not None:
                # Only dynamic nodes add the key: other graphs keep their fingerprints.
                desc["spec"] = node.spec.describe()
            h.update(_codec.dumps(desc).encode())
        h.update(_codec.dumps(describe(self.output)).encode())
        return h.hexdigest()[:16]

    # --- rendering ------------------------------------------------------------------------

    def to_mermaid(self) -> str:
        """The graph as a Mermaid flowchart."""
        lines = ["flowchart TD"]
        for node_id in self.order:
            node = self.nodes_by_id[node_id]
            label = _mermaid_text(node_id)
            mid = _mermaid_id(node_id)
            if node.kind is NodeKind.BRANCH:
                lines.append(f'    {mid}{{"{label}"}}')
            elif node.kind is NodeKind.JOIN:
                lines.append(f'    {mid}(("{label}"))')
            elif node.kind is NodeKind.MAP:
                lines.append(f'    {mid}[["{label} (map)"]]')
            elif node.kind is NodeKind.LOOP:
                lines.append(f'    {mid}{{{{"{label} (loop)"}}}}')
            elif node.kind is NodeKind.WAIT:
                lines.append(f'    {mid}>"{label} (wait)"]')
            else:
                lines.append(f'    {mid}["{label}"]')
        for edge in self.edges:
            src, dst = _mermaid_id(edge.src), _mermaid_id(edge.dst)
            if edge.kind == "case" and edge.case is not None:
                case = _mermaid_text(edge.case)
                lines.append(f'    {src} -->|"{case}"| {dst}')
            elif edge.kind == "control":
                lines.append(f"    {src} -.-> {dst}")
            else:
                lines.append(f"    {src} --> {dst}")
        return "\n".join(lines) + "\n"

    def to_dot(self) -> str:
        """The graph in Graphviz DOT."""
        lines = [f"digraph {_dot_quote(self.flow)} {{", "    rankdir=TB;"]
        for node_id in self.order:
            node = self.nodes_by_id[node_id]
            extra = _DOT_LABELS.get(node.kind)
            label = f", label={_dot_quote(f'{node_id} ({extra})')}" if extra else ""
            lines.append(f"    {_dot_quote(node_id)} [shape={_DOT_SHAPES[node.kind]}{label}];")
        for edge in self.edges:
            attrs_: list[str] = []
            if edge.case is not None and edge.kind == "case":
                attrs_.append(f"label={_dot_quote(edge.case)}")
            if edge.kind == "control":
                attrs_.append("style=dashed")
            suffix = f" [{', '.join(attrs_)}]" if attrs_ else ""
            lines.append(f"    {_dot_quote(edge.src)} -> {_dot_quote(edge.dst)}{suffix};")
        lines.append("}")
        return "\n".join(lines) + "\n"

    def _repr_markdown_(self) -> str:
        # Jupyter renders mermaid code blocks in Markdown output (JupyterLab 4.1+).
        return f"```mermaid\n{self.to_mermaid()}```"

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td><code>{html.escape(n)}</code></td>"
            f"<td>{self.nodes_by_id[n].kind.value}</td>"
            f"<td>{html.escape(', '.join(self.nodes_by_id[n].data_deps))}</td></tr>"
            for n in self.order
        )
        return (
            f"<details open><summary>flow <b>{html.escape(self.flow)}</b>: "
            f"{len(self.order)} nodes</summary><table><tr><th>node</th><th>kind</th>"
            f"<th>inputs from</th></tr>{rows}</table></details>"
        )


_DOT_SHAPES = {
    NodeKind.STEP: "box",
    NodeKind.BRANCH: "diamond",
    NodeKind.JOIN: "circle",
    NodeKind.MAP: "box3d",  # a stack: one item per element
    NodeKind.LOOP: "hexagon",
    NodeKind.WAIT: "invhouse",
}
_DOT_LABELS = {NodeKind.MAP: "map", NodeKind.LOOP: "loop", NodeKind.WAIT: "wait"}

_LINE_BREAKING = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _mermaid_text(text: str) -> str:
    # Mermaid is line-oriented: a case label with a line break would end the statement.
    return _LINE_BREAKING.sub(lambda m: f"&#{ord(m[0])};", html.escape(text, quote=True))


def _dot_quote(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n").replace("\r", "\\r") + '"'


# --- case labels --------------------------------------------------------------------------


def case_label(key: Any) -> str:
    """The label a case key (or a branch's return value) is known by in the graph."""
    if isinstance(key, bool):
        return "true" if key else "false"
    if isinstance(key, enum.Enum):
        return key.name
    if isinstance(key, str | int):
        return str(key)
    raise TypeError(f"a case key must be a str, bool, int or Enum, not {type(key).__name__}")


def value_labels(value: Any) -> tuple[str, ...]:
    """Labels a branch's run-time value may match, most specific first."""
    if isinstance(value, enum.Enum):
        return (value.name, str(value.value))
    try:
        return (case_label(value),)
    except TypeError:
        return ()


def allowed_labels(branch: Unit) -> frozenset[str] | None:
    """The labels a branch can return, when its annotation says (Literal, Enum, bool)."""
    try:
        hints = typing.get_type_hints(branch.fn)
    except Exception:
        return None
    tp = hints.get("return")
    if tp is bool:
        return frozenset({"true", "false"})
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return frozenset(m.name for m in tp) | frozenset(str(m.value) for m in tp)
    if typing.get_origin(tp) is typing.Literal:
        out: set[str] = set()
        for arg in typing.get_args(tp):
            out.update(value_labels(arg))
        return frozenset(out)
    return None


_PIECE = re.compile(r"(?P<base>.+?)(?:\[(?P<item>\d+)\]|@(?P<iteration>\d+))")


def split_item(node_id: str) -> tuple[str, int | None]:
    """*node_id* as (the graph node's id, the map item or loop iteration it runs):
    ``summarize[3]`` is ``("summarize", 3)``, ``agent@2`` is ``("agent", 2)``; any other
    id (``review_one[3]/fetch``: a node of item 3's sub-graph) has no item of its own."""
    found = _PIECE.fullmatch(node_id)
    if found is None:
        return node_id, None
    return found["base"], int(found["item"] or found["iteration"])
