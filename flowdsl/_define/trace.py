"""The tracer: runs a flow body once with symbolic values and records a :class:`Graph`.

A flow body is an ordinary ``async def``.  While it is traced, calling a step returns a
pending call; awaiting that call records a node and hands back a :class:`Symbol`, a
stand-in for the step's future result.  Nothing suspends: the tracer drives the body's
coroutine with a single ``send(None)``, so a body that awaits anything real (a sleep, a
socket) is caught as an error instead of being run.

Symbols and pending calls live in :mod:`.symbols`; the labels a branch's cases are known
by, in :mod:`.graph`.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import re
from collections.abc import Awaitable, Callable
from typing import Any

import sniffio

from .. import _codec
from .._errors import CodecError, TracingError
from .graph import (
    Expr,
    Graph,
    Guard,
    Input,
    ListOf,
    Literal,
    MapOf,
    Node,
    NodeKind,
    Ref,
    TupleOf,
    allowed_labels,
    case_label,
)
from .symbols import REAL_AWAIT_HINT as _REAL_AWAIT_HINT
from .symbols import CasesCall, FlowBody, FlowCall, Pending, StepCall, Symbol
from .units import current

_TRACER: contextvars.ContextVar[Tracer | None] = contextvars.ContextVar(
    "flowdsl_tracer", default=None
)

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def current_tracer() -> Tracer | None:
    return _TRACER.get()


def check_name(name: str, what: str) -> str:
    if not _NAME.match(name):
        raise TracingError(
            f"{what} name {name!r} is not a valid name",
            hint="Use letters, digits and underscores, starting with a letter or underscore",
        )
    return name


# --- the tracer ---------------------------------------------------------------------------


class Tracer:
    """Collects the nodes of one flow; sub-flows and cases trace into it under a prefix."""

    def __init__(self, flow: FlowBody) -> None:
        self.flow_name = flow.name
        self.nodes: dict[str, Node] = {}
        self.taken: set[str] = set()  # node ids and sub-flow namespaces
        self.counts: dict[str, int] = {}  # per id base, the last suffix handed out
        self.pending: list[Pending] = []
        self.prefix = ""
        self.guard: Guard = ()
        self.stack: list[str] = [flow.name]  # flows being traced, to refuse recursion

    # ids

    def _new_id(self, name: str) -> str:
        base = node_id = self.prefix + name
        # Resume the count where this name left off: a loop of a thousand calls to one
        # step would otherwise search from -2 upwards every time.
        n = self.counts.get(base, 1)
        if n > 1:
            node_id = f"{base}-{n}"
        while node_id in self.taken:
            n += 1
            node_id = f"{base}-{n}"
        self.counts[base] = n
        self.taken.add(node_id)
        return node_id

    # values

    def to_expr(self, value: Any, *, node: str, what: str) -> Expr:
        """Turn a value written in the flow body into an argument expression."""
        if isinstance(value, Symbol):
            self._check_visible(value, node=node, what=what)
            return value._fd_expr
        if isinstance(value, Pending):
            raise TracingError(
                f"{what} is {value.describe()}, a call that was never awaited",
                flow=self.flow_name,
                node=node,
                hint=f"Write `x = await {value.describe().strip('`')}` and pass `x`",
            )
        if inspect.iscoroutine(value):
            value.close()
            raise TracingError(
                f"{what} is a coroutine, not a value",
                flow=self.flow_name,
                node=node,
                hint="Await it first, or make the coroutine function a @fd.step",
            )
        if isinstance(value, list | tuple) and _contains_symbol(value):
            items = tuple(self.to_expr(v, node=node, what=what) for v in value)
            return ListOf(items) if isinstance(value, list) else TupleOf(items)
        if isinstance(value, dict) and _contains_symbol(value):
            for key in value:
                if isinstance(key, Symbol):
                    raise TracingError(
                        f"{what} is a dict keyed by a step's result",
                        flow=self.flow_name,
                        node=node,
                        hint="Build the dict inside a step",
                    )
            return MapOf(
                tuple(value),
                tuple(self.to_expr(v, node=node, what=what) for v in value.values()),
            )
        try:
            data = _codec.to_data(value, what=what)
        except CodecError as exc:
            raise TracingError(
                f"{what} is a constant of type {type(value).__name__} that cannot be recorded "
                "in the graph",
                flow=self.flow_name,
                node=node,
                hint="Constants passed to steps must be values the codec carries "
                "(builtins, attrs classes, dataclasses, enums, datetimes, bytes); "
                "create other objects inside the step",
            ) from exc
        return Literal(value, data)

    def from_expr(self, expr: Expr, guard: Guard) -> Any:
        """The value a flow body sees for *expr*: plain Python where it can be."""
        if isinstance(expr, Literal):
            return expr.value
        if isinstance(expr, Ref | Input):
            return Symbol(expr, guard, self)
        if isinstance(expr, ListOf):
            return [self.from_expr(e, guard) for e in expr.items]
        if isinstance(expr, TupleOf):
            return tuple(self.from_expr(e, guard) for e in expr.items)
        return {k: self.from_expr(v, guard) for k, v in zip(expr.keys, expr.values, strict=True)}

    def _check_visible(self, sym: Symbol, *, node: str, what: str) -> None:
        produced = sym._fd_guard
        if self.guard[: len(produced)] != produced:
            branch, case = produced[len(_common_prefix(produced, self.guard))]
            raise TracingError(
                f"{what} is {sym._fd_describe()}, which was produced inside case {case!r} of "
                f"branch {branch!r} and is used outside it",
                flow=self.flow_name,
                node=node,
                hint="A case's values exist only when that case runs: return the value from "
                "the case and use what `await branch(...).cases(...)` gives",
            )

    # nodes

    def _bind(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], *, name: str
    ) -> inspect.BoundArguments:
        try:
            return inspect.signature(fn).bind(*args, **kwargs)
        except TypeError as exc:
            raise TracingError(
                f"`{name}` called with arguments that do not fit its signature: {exc}",
                flow=self.flow_name,
                node=name,
                hint=f"`{name}{inspect.signature(fn)}`",
            ) from None

    def _args(
        self,
        node_id: str,
        fn: Callable[..., Any],
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[tuple[Expr, ...], tuple[tuple[str, Expr], ...]]:
        self._bind(fn, args, kwargs, name=name)
        a = tuple(
            self.to_expr(v, node=node_id, what=f"argument {i + 1}") for i, v in enumerate(args)
        )
        kw = tuple(
            (k, self.to_expr(v, node=node_id, what=f"argument {k!r}")) for k, v in kwargs.items()
        )
        return a, kw

    def add_step(self, call: StepCall) -> Symbol:
        step = current(call.step)  # by module:qualname: what a batch worker would run
        node_id = self._new_id(step.name)
        args, kwargs = self._args(node_id, step.fn, step.name, call.args, call.kwargs)
        self.nodes[node_id] = Node(
            node_id, NodeKind.STEP, step.name, args, kwargs, self.guard, fn=step
        )
        return Symbol(Ref(node_id), self.guard, self)

    def add_branch(self, call: CasesCall) -> Any:
        branch = current(call.call.branch)
        node_id = self._new_id(branch.name)
        args, kwargs = self._args(node_id, branch.fn, branch.name, call.call.args, call.call.kwargs)
        if not call.table:
            raise TracingError(
                "`.cases()` was given no cases",
                flow=self.flow_name,
                node=node_id,
                hint="Give at least one case: `.cases(name=lambda: step(...))`",
            )
        labels: dict[str, Callable[[], Any]] = {}
        for key, thunk in call.table.items():
            try:
                label = case_label(key)
            except TypeError as exc:
                raise TracingError(str(exc), flow=self.flow_name, node=node_id) from None
            if "/" in label or not label:
                raise TracingError(
                    f"case label {label!r} cannot be used",
                    flow=self.flow_name,
                    node=node_id,
                    hint="Case labels must be non-empty and contain no '/'",
                )
            if label in labels:
                raise TracingError(
                    f"two cases are both known as {label!r}", flow=self.flow_name, node=node_id
                )
            if not callable(thunk):
                raise TracingError(
                    f"case {label!r} is a {type(thunk).__name__}, not a zero-argument callable",
                    flow=self.flow_name,
                    node=node_id,
                    hint=f"Write `{label}=lambda: step(...)` so that only the chosen case runs",
                )
            labels[label] = thunk
        allowed = allowed_labels(branch)
        if allowed is not None:
            unknown = sorted(set(labels) - allowed)
            if unknown:
                raise TracingError(
                    f"unknown case key(s) {', '.join(map(repr, unknown))}",
                    flow=self.flow_name,
                    node=node_id,
                    hint=f"`{branch.name}` can only return one of {sorted(allowed)}",
                )
        self.nodes[node_id] = Node(
            node_id,
            NodeKind.BRANCH,
            branch.name,
            args,
            kwargs,
            self.guard,
            labels=tuple(labels),
            fn=branch,
        )
        outer_prefix, outer_guard = self.prefix, self.guard
        results: list[tuple[str, Expr]] = []
        try:
            for label, thunk in labels.items():
                self.prefix = f"{node_id}.{label}/"
                self.guard = (*outer_guard, (node_id, label))
                value = thunk()
                # A Symbol is awaitable only to refuse `await x`; a case may hand one on.
                if inspect.isawaitable(value) and not isinstance(value, Symbol):
                    value = drive(value, self, what=f"case {label!r} of {node_id!r}")
                results.append(
                    (label, self.to_expr(value, node=node_id, what=f"the result of case {label!r}"))
                )
        finally:
            self.prefix, self.guard = outer_prefix, outer_guard
        join_id = f"{node_id}.join"
        self.nodes[join_id] = Node(
            join_id, NodeKind.JOIN, node_id, guard=self.guard, cases=tuple(results)
        )
        return Symbol(Ref(join_id), self.guard, self)

    def add_subflow(self, call: FlowCall) -> Any:
        flow = call.flow
        if flow.name in self.stack:
            raise TracingError(
                f"flow {flow.name!r} calls itself (through {' -> '.join(self.stack)})",
                flow=self.flow_name,
                hint="A flow is a finite graph; recursion has no end at definition time. "
                "For work that repeats until a result says stop, write "
                "`await fd.loop(body, state, max_iterations=N)`",
            )
        bound = self._bind(flow.fn, call.args, call.kwargs, name=flow.name)
        bound.apply_defaults()
        namespace = self._new_id(flow.name)
        outer_prefix = self.prefix
        self.prefix = namespace + "/"
        self.stack.append(flow.name)
        try:
            for key, value in bound.arguments.items():
                self.to_expr(value, node=namespace, what=f"argument {key!r}")  # validate early
            result = drive(flow.fn(*bound.args, **bound.kwargs), self, what=f"flow {flow.name!r}")
            expr = self.to_expr(result, node=namespace, what="the sub-flow's result")
        finally:
            self.prefix = outer_prefix
            self.stack.pop()
        return self.from_expr(expr, self.guard)


def _contains_symbol(value: Any) -> bool:
    if isinstance(value, Symbol | Pending):
        return True
    if isinstance(value, list | tuple):
        return any(_contains_symbol(v) for v in value)
    if isinstance(value, dict):
        return any(_contains_symbol(v) for v in value.values()) or any(
            isinstance(k, Symbol) for k in value
        )
    return False


def _common_prefix(a: Guard, b: Guard) -> Guard:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return a[:n]


def drive(awaitable: Awaitable[Any], tracer: Tracer, *, what: str) -> Any:
    """Run *awaitable* to completion without an event loop; it must never suspend."""
    gen = awaitable.__await__()
    try:
        yielded = gen.send(None)
    except StopIteration as stop:
        return stop.value
    except (RuntimeError, DeprecationWarning) as exc:
        # Traced outside an event loop, `await anyio.sleep(0)` or `await asyncio.sleep(1)`
        # fails looking for the loop before it can suspend: the same mistake.
        if not _wants_event_loop(exc):
            raise
        raise TracingError(
            f"{what} awaited something that is not a step, branch or flow "
            f"(it needs a running event loop: {exc})",
            flow=tracer.flow_name,
            hint=_REAL_AWAIT_HINT,
        ) from exc
    # A body that misbehaves on close must not hide the real error.
    with contextlib.suppress(Exception):
        gen.close()
    raise TracingError(
        f"{what} awaited something that is not a step, branch or flow "
        f"(it tried to suspend with {type(yielded).__name__})",
        flow=tracer.flow_name,
        hint=_REAL_AWAIT_HINT,
    )


def _wants_event_loop(exc: RuntimeError | DeprecationWarning) -> bool:
    if isinstance(exc, sniffio.AsyncLibraryNotFoundError):  # anyio, and sniffio users
        return True
    text = str(exc)
    if isinstance(exc, DeprecationWarning):
        # Python 3.12 and 3.13 warn before creating a loop for asyncio.gather(coroutine);
        # where warnings are errors (pytest -W error) the warning is what reaches us.
        return text.startswith("There is no current event loop")
    return "event loop" in text or "async context" in text  # asyncio; trio


def trace(flow: FlowBody) -> Graph:
    """Trace *flow*'s body into a :class:`Graph`."""
    fn = flow.fn
    sig = inspect.signature(fn)
    tracer = Tracer(flow)
    inputs: list[str] = []
    symbols: dict[str, Symbol] = {}
    for param in sig.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TracingError(
                f"parameter {param.name!r} is variadic (*args or **kwargs)",
                flow=flow.name,
                hint="Give every flow input a name; pass a list or dict for many values",
            )
        inputs.append(param.name)
        symbols[param.name] = Symbol(Input(param.name), (), tracer)
    token = _TRACER.set(tracer)
    try:
        coro = fn(**symbols)
        if not inspect.isawaitable(coro):
            raise TracingError(
                "a flow must be an `async def` function", flow=flow.name, hint="Write `async def`"
            )
        result = drive(coro, tracer, what="the flow body")
        output = tracer.to_expr(result, node="<result>", what="the flow's result")
    finally:
        _TRACER.reset(token)
    for pending in tracer.pending:
        if not pending.awaited:
            name = pending.describe().strip("`").split("(")[0]
            raise TracingError(
                f"{pending.describe()} is called but never awaited",
                flow=flow.name,
                node=name,
                hint=f"`{name}` is a step; inside a flow write `x = await {name}(...)`, "
                f"not `{name}(...)`",
            )
    return Graph(
        flow=flow.name,
        nodes_by_id=dict(tracer.nodes),
        inputs=tuple(inputs),
        output=output,
        order=tuple(tracer.nodes),
    )
