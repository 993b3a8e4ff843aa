"""Hypothesis strategies for random flows, in one place.

A :class:`DagSpec` describes a flow as plain data: a list of operations, each a step call
(:class:`Call`) taking any earlier visible values, a branch (:class:`Switch`) whose 2-3
cases are blocks of further operations (nested branches included), a call of a
sub-flow (:class:`SubCall`), and with ``dynamic=True`` a map (:class:`MapOp`: a step makes
a list of 0-4 elements, then a step or an item flow runs once per element) or a bounded
loop (:class:`LoopOp`: a step, or a flow, runs until its value says done).  From one spec:

- :func:`build_flow` makes a real ``@fd.flow``: its body loops over the spec and awaits
  the generic steps below, and the tracer unrolls that loop into the DAG;
- :func:`reference` computes what the flow must return by calling the same steps directly,
  as the plain coroutine functions they are outside a flow, and says which step labels run
  and which are skipped.

Every step takes a literal ``label`` first (unique within a run: sub-flow calls prefix it
with their own label) and records it when it runs, so a test can check that each node ran
exactly once and that skipped cases never ran.  Results are deterministic functions of the
label and the inputs (SHA-256 of their JSON), identical in every process.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import attrs
from hypothesis import strategies as st

import flowdsl as fd
from flowdsl._define.graph import Graph, Literal, NodeKind

__all__ = [
    "Call",
    "DagSpec",
    "Expected",
    "LoopOp",
    "MapOp",
    "Recorder",
    "Signalling",
    "SubCall",
    "SubFlowSpec",
    "Switch",
    "WaitOp",
    "build_flow",
    "dag_specs",
    "flat_label",
    "flow_inputs",
    "labels_by_node",
    "mix_int",
    "mix_str",
    "pick",
    "recording",
    "reference",
    "run_sync",
    "signal_value",
    "wait_names",
]


# --- recording ----------------------------------------------------------------------------


@attrs.define
class Recorder:
    """The labels of the steps (and branches) that ran, in the order they ran."""

    labels: list[str] = attrs.field(factory=list)

    @property
    def counts(self) -> Counter[str]:
        return Counter(self.labels)


_RECORDER: contextvars.ContextVar[Recorder | None] = contextvars.ContextVar(
    "flowdsl_test_recorder", default=None
)


@contextlib.contextmanager
def recording() -> Iterator[Recorder]:
    """Record the steps that run in this context (and the tasks it starts)."""
    recorder = Recorder()
    token = _RECORDER.set(recorder)
    try:
        yield recorder
    finally:
        _RECORDER.reset(token)


def _record(label: str) -> None:
    recorder = _RECORDER.get()
    if recorder is not None:
        recorder.labels.append(label)


# --- the generic steps --------------------------------------------------------------------


def flat_label(label: Any) -> str:
    """A step's label argument as text: inside sub-flows it is ``[tag, label]``, nested;
    inside an item flow the item is part of it."""
    if isinstance(label, str):
        return label
    if not isinstance(label, list | tuple):
        return str(label)
    return "/".join(flat_label(part) for part in label)


def _digest(label: str, values: Sequence[Any]) -> str:
    text = json.dumps([label, list(values)], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@fd.step
async def mix_int(label: Any, *values: Any) -> int:
    """An int that depends on the label and every input."""
    name = flat_label(label)
    _record(name)
    return int(_digest(name, values)[:8], 16)


@fd.step
async def mix_str(label: Any, *values: Any) -> str:
    """A str that depends on the label and every input."""
    name = flat_label(label)
    _record(name)
    return _digest(name, values)[:10]


@fd.branch
async def pick(label: Any, value: Any, n: int) -> str:
    """Chooses case ``c0`` .. ``c{n-1}`` by the value."""
    name = flat_label(label)
    _record(name)
    return f"c{int(_digest(name, [value])[:8], 16) % n}"


@fd.step
async def make_list(label: Any, n: int, *values: Any) -> list[int]:
    """*n* ints that depend on the label and every input: what a map maps over."""
    name = flat_label(label)
    _record(name)
    return [int(_digest(name, [*values, i])[:8], 16) for i in range(n)]


@fd.step(retries=1, backoff=0)
async def map_item(item: int, label: Any) -> int:
    """One item of a map; its label is the map's and the item's."""
    name = flat_label([label, item])
    _record(name)
    return int(_digest(name, [item])[:8], 16)


@fd.step
async def loop_init(label: Any, value: Any) -> list[Any]:
    """A loop's first state ``[0, stop, acc]``: it runs ``stop + 1`` (1-4) iterations."""
    name = flat_label(label)
    _record(name)
    digest = int(_digest(name, [value])[:8], 16)
    return [0, digest % 4, digest]


@fd.step
async def loop_step(state: list[Any], label: Any) -> fd.Continue[list[Any]] | fd.Done[int]:
    """A loop's body: ``state = [count, stop, acc]``; done when count reaches stop."""
    count, stop, acc = state
    name = flat_label(label)
    _record(f"{name}@{count}")
    acc = int(_digest(name, [count, acc])[:8], 16)
    if count >= stop:
        return fd.Done(acc)
    return fd.Continue([count + 1, stop, acc])


@fd.flow
async def loop_flow(state: list[Any], label: Any) -> Any:
    """A loop's body that is a flow: the same as loop_step, as one node of a sub-graph."""
    return await loop_step(state, label)


STEPS: dict[str, fd.Step[..., Any]] = {"int": mix_int, "str": mix_str}


# --- specs --------------------------------------------------------------------------------


@attrs.frozen
class Call:
    """``await mix_<kind>(label, *values[args])``."""

    label: str
    kind: str  # "int" or "str"
    args: tuple[int, ...]  # indices into the values visible where the call is made


@attrs.frozen
class Block:
    """A case's body: its operations, then the index of the value the case returns."""

    ops: tuple[Op, ...]
    result: int  # index into the values visible at the end of the block


@attrs.frozen
class Switch:
    """``await pick(label, values[selector], len(cases)).cases(c0=..., c1=...)``."""

    label: str
    selector: int
    cases: tuple[Block, ...]


@attrs.frozen
class SubCall:
    """``await subflows[sub](label, [values[i] for i in args])``."""

    label: str
    sub: int
    args: tuple[int, ...]


@attrs.frozen
class MapOp:
    """``xs = await make_list([label, "list"], n, *values[args])``, then
    ``await map_item.map(xs, label=label)`` or ``await item_flows[sub].map(xs, tag=label)``."""

    label: str
    n: int
    args: tuple[int, ...]
    sub: int | None = None  # an item flow, or the map_item step


@attrs.frozen
class LoopOp:
    """``await fd.loop(loop_step or loop_flow, [0, stop, values[arg]], max_iterations=5,
    label=label)``; ``stop`` (0-3) comes from the label and the value."""

    label: str
    arg: int
    flow: bool = False


@attrs.frozen
class WaitOp:
    """``await fd.wait_for(f"w_{label}", int, after=values[arg])``: its value is the signal
    a test sends, :func:`signal_value` of the name."""

    label: str
    arg: int

    @property
    def name(self) -> str:
        return f"w_{self.label}"


def signal_value(name: str) -> int:
    return int(_digest(name, [])[:8], 16)


def wait_names(spec: DagSpec) -> list[str]:
    """The signal names a run of *spec* may wait for (top level and branch cases)."""
    names: list[str] = []

    def walk(ops: Sequence[Op]) -> None:
        for op in ops:
            if isinstance(op, WaitOp):
                names.append(op.name)
            elif isinstance(op, Switch):
                for case in op.cases:
                    walk(case.ops)

    walk(spec.ops)
    return names


Op = Call | Switch | SubCall | MapOp | LoopOp | WaitOp


@attrs.frozen
class SubFlowSpec:
    """A sub-flow ``sub<i>(tag, xs)``: *arity* values in, the value at ``result`` out."""

    name: str
    arity: int
    ops: tuple[Op, ...]
    result: int


@attrs.frozen
class DagSpec:
    """A whole flow ``random_dag(x: int, s: str) -> list``: it returns every top-level value
    its operations produce, in order."""

    ops: tuple[Op, ...]
    subflows: tuple[SubFlowSpec, ...] = ()
    # Flows ``item<i>(x, tag)`` that maps run once per element: their ops see ``[x]``.
    item_flows: tuple[SubFlowSpec, ...] = ()

    @property
    def size(self) -> int:
        return (
            _count(self.ops)
            + sum(_count(s.ops) for s in self.subflows)
            + sum(_count(s.ops) for s in self.item_flows)
        )


def _count(ops: Sequence[Op]) -> int:
    n = 0
    for op in ops:
        n += 1
        if isinstance(op, Switch):
            n += sum(_count(case.ops) for case in op.cases)
    return n


# --- strategies ---------------------------------------------------------------------------


def flow_inputs() -> st.SearchStrategy[tuple[int, str]]:
    """Arguments for a :func:`build_flow` flow: ``(x, s)``."""
    return st.tuples(st.integers(-(2**31), 2**31), st.text(max_size=8))


class _Labels:
    def __init__(self) -> None:
        self.n = 0

    def next(self) -> str:
        self.n += 1
        return f"n{self.n}"


def _draw_block(
    draw: st.DrawFn,
    *,
    visible: int,
    labels: _Labels,
    depth: int,
    max_depth: int,
    subflows: Sequence[SubFlowSpec],
    min_ops: int,
    max_ops: int,
    dynamic: bool = False,
    item_flows: int = 0,
    waits: bool = False,
) -> tuple[Op, ...]:
    ops: list[Op] = []
    n_ops = draw(st.integers(min_ops, max_ops))
    for _ in range(n_ops):
        kinds = ["call", "call", "call"]
        if depth < max_depth:
            kinds.append("switch")
        if subflows:
            kinds.append("sub")
        if dynamic:
            kinds += ["map", "loop"]
        if waits:
            kinds.append("wait")
        kind = draw(st.sampled_from(kinds))
        if kind == "wait":
            ops.append(WaitOp(labels.next(), draw(st.integers(0, visible - 1))))
            visible += 1
            continue
        if kind == "map":
            args = draw(st.lists(st.integers(0, visible - 1), max_size=2))
            sub = draw(st.sampled_from([None, *range(item_flows)]))
            ops.append(MapOp(labels.next(), draw(st.integers(0, 4)), tuple(args), sub))
            visible += 1
            continue
        if kind == "loop":
            arg = draw(st.integers(0, visible - 1))
            ops.append(LoopOp(labels.next(), arg, draw(st.booleans())))
            visible += 1
            continue
        if kind == "call":
            args = draw(st.lists(st.integers(0, visible - 1), max_size=3))
            ops.append(Call(labels.next(), draw(st.sampled_from(["int", "str"])), tuple(args)))
        elif kind == "switch":
            label = labels.next()
            selector = draw(st.integers(0, visible - 1))
            cases: list[Block] = []
            for _case in range(draw(st.integers(2, 3))):
                # Mostly a sub-chain; sometimes a case that just passes an outer value on.
                body = _draw_block(
                    draw,
                    visible=visible,
                    labels=labels,
                    depth=depth + 1,
                    max_depth=max_depth,
                    subflows=subflows,
                    min_ops=draw(st.sampled_from([0, 1, 1, 1])),
                    max_ops=3,
                    dynamic=dynamic,
                    item_flows=item_flows,
                    waits=waits,
                )
                end = visible + len(body)
                result = draw(st.sampled_from([end - 1, end - 1, end - 1, *range(end)]))
                cases.append(Block(body, result))
            ops.append(Switch(label, selector, tuple(cases)))
        else:
            index = draw(st.integers(0, len(subflows) - 1))
            arity = subflows[index].arity
            args = draw(st.lists(st.integers(0, visible - 1), min_size=arity, max_size=arity))
            ops.append(SubCall(labels.next(), index, tuple(args)))
        visible += 1
    return tuple(ops)


@st.composite
def dag_specs(
    draw: st.DrawFn,
    *,
    max_ops: int = 8,
    max_depth: int = 2,
    max_subflows: int = 2,
    dynamic: bool = False,
    waits: bool = False,
) -> DagSpec:
    """Random flows: fan-in from any earlier value, fan-out, branches of 2-3 cases holding
    sub-chains (nested up to *max_depth*), and sub-flows called once or several times;
    with *dynamic*, maps (of 0-4 items, over a step or an item flow that may map steps
    itself) and loops (over a step or a flow)."""
    item_flows: list[SubFlowSpec] = []
    if dynamic:
        for i in range(draw(st.integers(0, 2))):
            ops = _draw_block(
                draw,
                visible=1,
                labels=_Labels(),
                depth=1,
                max_depth=max_depth,
                subflows=(),
                min_ops=1,
                max_ops=3,
                dynamic=True,  # maps nest: an item flow maps map_item (not item flows)
            )
            end = 1 + len(ops)
            result = draw(st.sampled_from([end - 1, end - 1, *range(end)]))
            item_flows.append(SubFlowSpec(f"item{i}", 1, ops, result))
    subflows: list[SubFlowSpec] = []
    for i in range(draw(st.integers(0, max_subflows))):
        arity = draw(st.integers(1, 2))
        # Labels inside a sub-flow are prefixed by the calling op's label at run time.
        ops = _draw_block(
            draw,
            visible=arity,
            labels=_Labels(),
            depth=1,
            max_depth=max_depth,
            subflows=tuple(subflows),  # a sub-flow may call the ones defined before it
            min_ops=1,
            max_ops=3,
        )
        end = arity + len(ops)
        result = draw(st.sampled_from([end - 1, end - 1, *range(end)]))
        subflows.append(SubFlowSpec(f"sub{i}", arity, ops, result))
    ops = _draw_block(
        draw,
        visible=2,
        labels=_Labels(),
        depth=0,
        max_depth=max_depth,
        subflows=tuple(subflows),
        min_ops=1,
        max_ops=max_ops,
        dynamic=dynamic,
        item_flows=len(item_flows),
        waits=waits,  # at the top level and in its cases: one signal per name will do
    )
    return DagSpec(ops, tuple(subflows), tuple(item_flows))


# --- building a real flow -----------------------------------------------------------------


def _label(prefix: Any, label: str) -> Any:
    # A list, not an f-string: traced on its own, a sub-flow's tag is a symbol.
    return label if prefix is None else [prefix, label]


_ITEM_FLOWS: contextvars.ContextVar[Sequence[fd.Flow[..., Any]]] = contextvars.ContextVar(
    "flowdsl_test_item_flows", default=()
)


async def _trace_block(
    ops: Sequence[Op], values: list[Any], prefix: Any, flows: Sequence[fd.Flow[..., Any]]
) -> list[Any]:
    """The flow body's loop: one awaited call per op (unrolled by the tracer)."""
    values = list(values)
    for op in ops:
        label = _label(prefix, op.label)
        if isinstance(op, WaitOp):
            value = await fd.wait_for(op.name, int, after=values[op.arg])
        elif isinstance(op, MapOp):
            xs = await make_list(
                _label(prefix, [op.label, "list"]), op.n, *[values[i] for i in op.args]
            )
            if op.sub is None:
                value = await map_item.map(xs, label=label)
            else:
                value = await _ITEM_FLOWS.get()[op.sub].map(xs, tag=label)
        elif isinstance(op, LoopOp):
            body = loop_flow if op.flow else loop_step
            init = await loop_init(_label(prefix, [op.label, "init"]), values[op.arg])
            value = await fd.loop(body, init, max_iterations=5, label=label)
        elif isinstance(op, Call):
            value = await STEPS[op.kind](label, *[values[i] for i in op.args])
        elif isinstance(op, SubCall):
            value = await flows[op.sub](label, [values[i] for i in op.args])
        else:
            thunks = {
                f"c{i}": _case_thunk(case, values, prefix, flows) for i, case in enumerate(op.cases)
            }
            value = await pick(label, values[op.selector], len(op.cases)).cases(thunks)
        values.append(value)
    return values


def _case_thunk(
    case: Block, values: list[Any], prefix: Any, flows: Sequence[fd.Flow[..., Any]]
) -> Callable[[], Any]:
    snapshot = list(values)
    only = case.ops[0] if len(case.ops) == 1 else None
    if isinstance(only, Call) and case.result == len(values):
        # The short form: `c0=lambda: step(...)`.
        label = _label(prefix, only.label)
        return lambda: STEPS[only.kind](label, *[snapshot[i] for i in only.args])
    if isinstance(only, SubCall) and case.result == len(values):
        label = _label(prefix, only.label)
        return lambda: flows[only.sub](label, [snapshot[i] for i in only.args])
    if not case.ops:
        # A case that hands on a value from outside it: `c1=lambda: x`.
        return lambda: snapshot[case.result]

    async def block() -> Any:
        out = await _trace_block(case.ops, snapshot, prefix, flows)
        return out[case.result]

    return block


def build_flow(spec: DagSpec, *, name: str = "random_dag") -> fd.Flow[..., list[Any]]:
    """A real ``@fd.flow`` for *spec*: ``flow(x: int, s: str) -> list`` of its values."""
    item_flows = tuple(_build_item_flow(sub) for sub in spec.item_flows)
    token = _ITEM_FLOWS.set(item_flows)
    try:
        flows: list[fd.Flow[..., Any]] = []
        for sub in spec.subflows:
            flows.append(_build_subflow(sub, tuple(flows)))
        callable_flows = tuple(flows)

        async def random_dag(x: int, s: str) -> list[Any]:
            values = await _trace_block(spec.ops, [x, s], None, callable_flows)
            return values[2:]

        built: fd.Flow[..., list[Any]] = fd.flow(name=name)(random_dag)
        built.graph  # noqa: B018 - traced now, while the item flows are in reach
    finally:
        _ITEM_FLOWS.reset(token)
    return built


def _build_item_flow(sub: SubFlowSpec) -> fd.Flow[..., Any]:
    async def body(x: int, tag: Any) -> Any:
        # The item is part of every label inside: each item's steps record their own.
        values = await _trace_block(sub.ops, [x], [tag, x], ())
        return values[sub.result]

    built: fd.Flow[..., Any] = fd.flow(name=sub.name)(body)
    built.graph  # noqa: B018
    return built


def _build_subflow(sub: SubFlowSpec, flows: tuple[fd.Flow[..., Any], ...]) -> fd.Flow[..., Any]:
    async def body(tag: Any, xs: list[Any]) -> Any:
        # Index rather than iterate: traced on its own, `xs` is a symbol, not a list.
        values = await _trace_block(sub.ops, [xs[i] for i in range(sub.arity)], tag, flows)
        return values[sub.result]

    built: fd.Flow[..., Any] = fd.flow(name=sub.name)(body)
    return built


# --- the reference evaluator --------------------------------------------------------------


@attrs.frozen
class Expected:
    """What a run of the flow must give."""

    result: list[Any]
    ran: Counter[str]  # step and branch labels that run, each exactly once
    skipped: frozenset[str]  # labels inside cases that were not chosen
    chosen: dict[str, str]  # branch label -> case label


async def reference(spec: DagSpec, x: int, s: str) -> Expected:
    """Evaluate *spec* in plain Python, calling the same steps outside any flow."""
    ev = _Evaluator(spec)
    with recording() as rec:
        values = await ev.block(spec.ops, [x, s], None)
    return Expected(values[2:], rec.counts, frozenset(ev.skipped), ev.chosen)


class _Evaluator:
    def __init__(self, spec: DagSpec) -> None:
        self.spec = spec
        self.skipped: set[str] = set()
        self.chosen: dict[str, str] = {}

    async def block(self, ops: Sequence[Op], values: list[Any], prefix: Any) -> list[Any]:
        values = list(values)
        for op in ops:
            label = _label(prefix, op.label)
            if isinstance(op, WaitOp):
                value = signal_value(op.name)
            elif isinstance(op, MapOp):
                xs = await make_list(
                    _label(prefix, [op.label, "list"]), op.n, *[values[i] for i in op.args]
                )
                if op.sub is None:
                    value = [await map_item(x, label) for x in xs]
                else:
                    item = self.spec.item_flows[op.sub]
                    value = []
                    for x in xs:
                        out = await self.block(item.ops, [x], [label, x])
                        value.append(out[item.result])
            elif isinstance(op, LoopOp):
                init = await loop_init(_label(prefix, [op.label, "init"]), values[op.arg])
                value = await fd.loop(loop_step, init, max_iterations=5, label=label)
            elif isinstance(op, Call):
                value = await STEPS[op.kind](label, *[values[i] for i in op.args])
            elif isinstance(op, SubCall):
                sub = self.spec.subflows[op.sub]
                out = await self.block(sub.ops, [values[i] for i in op.args], label)
                value = out[sub.result]
            else:
                case = await pick(label, values[op.selector], len(op.cases))
                self.chosen[flat_label(label)] = case
                index = int(case[1:])
                for i, other in enumerate(op.cases):
                    if i != index:
                        self._skip(other.ops, prefix)
                chosen = op.cases[index]
                out = await self.block(chosen.ops, values, prefix)
                value = out[chosen.result]
            values.append(value)
        return values

    def _skip(self, ops: Sequence[Op], prefix: Any) -> None:
        for op in ops:
            label = _label(prefix, op.label)
            if isinstance(op, MapOp):
                self.skipped.add(flat_label(_label(prefix, [op.label, "list"])))
            if isinstance(op, LoopOp):
                self.skipped.add(flat_label(_label(prefix, [op.label, "init"])))
            if isinstance(op, WaitOp):
                continue  # a wait has no label argument (its name says which)
            if not isinstance(op, SubCall):  # a sub-flow call is a namespace, not a node
                self.skipped.add(flat_label(label))
            if isinstance(op, Switch):
                for case in op.cases:
                    self._skip(case.ops, prefix)
            elif isinstance(op, SubCall):
                self._skip(self.spec.subflows[op.sub].ops, label)


# --- helpers for tests --------------------------------------------------------------------


def labels_by_node(graph: Graph) -> dict[str, str]:
    """Step, branch, map and loop node id -> the literal label it was called with."""
    out: dict[str, str] = {}
    for node_id in graph.nodes:
        node = graph[node_id]
        if node.kind is NodeKind.JOIN or node.kind is NodeKind.WAIT:
            continue
        if node.kind in (NodeKind.MAP, NodeKind.LOOP):
            shared = dict(node.kwargs)
            label = shared.get("label", shared.get("tag"))
            assert isinstance(label, Literal), node
            out[node_id] = flat_label(label.value)
            continue
        first = node.args[0]
        assert isinstance(first, Literal), node
        out[node_id] = flat_label(first.value)
    return out


class Signalling(fd.Context):
    """A context that sends every run it makes the signals its waits expect, right after
    creating the run (signals sent before a wait are kept for it)."""

    def __init__(self, names: list[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.names = names

    async def _prepare(self, *args: Any, **kwargs: Any) -> Any:
        run, how, record = await super()._prepare(*args, **kwargs)
        if how == "drive" and not run.resuming:
            for name in dict.fromkeys(self.names):
                await self.signal(run.run_id, name, signal_value(name))
        return run, how, record


def run_sync(awaitable: Awaitable[Any]) -> Any:
    """Run a coroutine that never suspends (the generic steps) without an event loop."""
    gen = awaitable.__await__()
    try:
        gen.send(None)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("the coroutine suspended")
