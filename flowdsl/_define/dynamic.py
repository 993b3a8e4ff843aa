"""Dynamic work, as the tracer records it: ``.map``, ``fd.loop`` and ``fd.wait_for``.

Each is ONE node of the graph (``NodeKind.MAP``, ``LOOP`` or ``WAIT``) whose ``spec`` says
what it maps or loops over, or what it waits for.  How many items or iterations it has is
known only at run time; the scheduler expands the node then (see ``_engine/dynamic.py``)
and journals every item, iteration and signal under an id derived from the node's:
``summarize[3]``, ``review_one[2]/fetch``, ``agent_turn@4``, ``approval#deadline``.

:class:`Continue` and :class:`Done` are what a loop's body returns; they cross the codec
as ``{"continue": state}`` and ``{"done": result}`` so that a journal can tell them apart.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

import attrs

from .. import _codec
from .._errors import TracingError
from .graph import Expr, Literal, Node, NodeKind, Ref
from .symbols import Pending, Symbol
from .trace import Tracer, check_name, current_tracer
from .units import current

if TYPE_CHECKING:
    from .dsl import Flow, Step

__all__ = [
    "Continue",
    "Done",
    "LoopSpec",
    "MapSpec",
    "WaitSpec",
    "loop",
    "map_call",
    "wait_for",
]

S = TypeVar("S")
T = TypeVar("T")


# --- what a loop body returns ---------------------------------------------------------------


@attrs.frozen
class Continue(Generic[S]):
    """Returned by a loop's body: run another iteration with ``state``."""

    state: S


@attrs.frozen
class Done(Generic[T]):
    """Returned by a loop's body: the loop ends and its value is ``result``."""

    result: T


def _is_outcome_type(tp: Any) -> bool:
    return tp in (Continue, Done) or typing.get_origin(tp) in (Continue, Done)


def _is_outcome_union(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is not typing.Union and origin is not types.UnionType:
        return False
    return all(_is_outcome_type(a) for a in typing.get_args(tp))


def outcome_types(tp: Any) -> tuple[Any, Any]:
    """The state and result types a body's return annotation names (``Any`` if it does not)."""
    state: Any = Any
    result: Any = Any
    options = typing.get_args(tp) if _is_outcome_union(tp) else (tp,)
    for option in options:
        origin = typing.get_origin(option) or option
        args = typing.get_args(option)
        if origin is Continue and args:
            state = args[0]
        elif origin is Done and args:
            result = args[0]
    return state, result


def _structure_outcome(data: Any, tp: Any) -> Any:
    if not isinstance(data, dict) or len(data) != 1:
        raise TypeError('expected {"continue": ...} or {"done": ...}')
    ((tag, inner),) = data.items()
    state, result = outcome_types(tp)
    allowed = {typing.get_origin(o) or o for o in (typing.get_args(tp) or (tp,))}
    if tag == "continue" and Continue in allowed:
        return Continue(_codec.from_data(inner, state, what="the loop's state"))
    if tag == "done" and Done in allowed:
        return Done(_codec.from_data(inner, result, what="the loop's result"))
    raise TypeError(f"unexpected {tag!r}")


_codec.converter.register_unstructure_hook(
    Continue, lambda c: {"continue": _codec.converter.unstructure(c.state)}
)
_codec.converter.register_unstructure_hook(
    Done, lambda d: {"done": _codec.converter.unstructure(d.result)}
)
_codec.converter.register_structure_hook_func(
    lambda t: _is_outcome_type(t) or _is_outcome_union(t), _structure_outcome
)


def as_outcome(value: Any) -> Continue[Any] | Done[Any] | None:
    """*value* as a Continue or Done (a body annotated ``-> Any`` gives the tagged data)."""
    if isinstance(value, Continue | Done):
        return value
    if isinstance(value, dict) and len(value) == 1:
        if "continue" in value:
            return Continue(value["continue"])
        if "done" in value:
            return Done(value["done"])
    return None


# --- what the graph keeps -----------------------------------------------------------------


@attrs.frozen
class MapSpec:
    """A MAP node: *body* (a step or a flow) runs once per element of its first argument."""

    body: Any = attrs.field(eq=False)

    @property
    def is_flow(self) -> bool:
        return not hasattr(self.body, "is_async")

    def describe(self) -> Any:
        return {"map": self.body.ref, "flow": self.is_flow}


@attrs.frozen
class LoopSpec:
    """A LOOP node: *body* runs with the state until it returns :class:`Done`."""

    body: Any = attrs.field(eq=False)
    max_iterations: int

    @property
    def is_flow(self) -> bool:
        return not hasattr(self.body, "is_async")

    def describe(self) -> Any:
        return {"loop": self.body.ref, "flow": self.is_flow, "max": self.max_iterations}


@attrs.frozen
class WaitSpec:
    """A WAIT node: the run waits for signal *name*, decoded as *type*."""

    name: str
    type: Any = attrs.field(eq=False)
    timeout: float | None

    def describe(self) -> Any:
        return {"wait": self.name, "type": _type_name(self.type), "timeout": self.timeout}


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return f"{tp.__module__}.{tp.__qualname__}"
    return repr(tp)


# --- pending calls while tracing ------------------------------------------------------------


class _Item:
    """Stands in for one element while a call's signature is checked."""

    def __repr__(self) -> str:
        return "<item>"


class MapCall(Pending):
    __slots__ = ("body", "items", "shared")

    def __init__(self, tracer: Tracer, body: Any, items: Any, shared: dict[str, Any]) -> None:
        super().__init__(tracer)
        self.body = body
        self.items = items
        self.shared = shared

    def describe(self) -> str:
        return f"`{self.body.name}.map(...)`"

    def __await__(self) -> Generator[Any, None, Any]:
        self.awaited = True
        return _add_map(cast(Tracer, self.tracer), self)
        yield  # pragma: no cover


class LoopCall(Pending):
    __slots__ = ("body", "init", "max_iterations", "shared")

    def __init__(
        self, tracer: Tracer, body: Any, init: Any, max_iterations: int, shared: dict[str, Any]
    ) -> None:
        super().__init__(tracer)
        self.body = body
        self.init = init
        self.max_iterations = max_iterations
        self.shared = shared

    def describe(self) -> str:
        return f"`fd.loop({self.body.name}, ...)`"

    def __await__(self) -> Generator[Any, None, Any]:
        self.awaited = True
        return _add_loop(cast(Tracer, self.tracer), self)
        yield  # pragma: no cover


class WaitCall(Pending):
    __slots__ = ("after", "name", "timeout", "type")

    def __init__(
        self, tracer: Tracer, name: str, tp: Any, timeout: float | None, after: Any
    ) -> None:
        super().__init__(tracer)
        self.name = name
        self.type = tp
        self.timeout = timeout
        self.after = after

    def describe(self) -> str:
        return f"`fd.wait_for({self.name!r}, ...)`"

    def __await__(self) -> Generator[Any, None, Any]:
        self.awaited = True
        return _add_wait(cast(Tracer, self.tracer), self)
        yield  # pragma: no cover


def _check_body(tracer: Tracer, body: Any, shared: dict[str, Any], what: str, verb: str) -> None:
    from .dsl import Branch, Flow, Step

    if isinstance(body, Branch) or not isinstance(body, Step | Flow):
        raise TracingError(
            f"{what} needs a step or a flow, not {getattr(body, 'name', type(body).__name__)!r}",
            flow=tracer.flow_name,
            hint="Pass a function decorated with @fd.step or @fd.flow",
        )
    if isinstance(body, Flow) and body.name in tracer.stack:
        raise TracingError(
            f"flow {body.name!r} {verb} itself (through {' -> '.join(tracer.stack)})",
            flow=tracer.flow_name,
            hint="A flow is a finite graph; for work that repeats, loop over a step or "
            "another flow with `fd.loop(body, state, max_iterations=N)`",
        )
    # The element (or the state) is the first argument, the shared ones are keywords.
    tracer._bind(body.fn, (_Item(),), shared, name=body.name)


def _current(body: Any) -> Any:
    """A step body by its module:qualname (see units.current); a flow as it is."""
    return current(body) if hasattr(body, "is_async") else body


def _kwargs(tracer: Tracer, node_id: str, shared: dict[str, Any]) -> tuple[tuple[str, Expr], ...]:
    return tuple(
        (k, tracer.to_expr(v, node=node_id, what=f"argument {k!r}")) for k, v in shared.items()
    )


def _add_map(tracer: Tracer, call: MapCall) -> Symbol:
    body = _current(call.body)
    _check_body(tracer, body, call.shared, f"`{body.name}.map`", "maps")
    node_id = tracer._new_id(body.name)
    items = tracer.to_expr(call.items, node=node_id, what="the list to map over")
    if isinstance(items, Literal) and not isinstance(items.value, list | tuple):
        raise TracingError(
            f"`{body.name}.map` was given a {type(items.value).__name__}, not a list",
            flow=tracer.flow_name,
            node=node_id,
            hint=f"Map over a list: `await {body.name}.map(values)`",
        )
    tracer.nodes[node_id] = Node(
        node_id,
        NodeKind.MAP,
        body.name,
        (items,),
        _kwargs(tracer, node_id, call.shared),
        tracer.guard,
        spec=MapSpec(body),
    )
    return Symbol(Ref(node_id), tracer.guard, tracer)


def _add_loop(tracer: Tracer, call: LoopCall) -> Symbol:
    body = _current(call.body)
    _check_body(tracer, body, call.shared, "`fd.loop`", "loops over")
    node_id = tracer._new_id(body.name)
    init = tracer.to_expr(call.init, node=node_id, what="the loop's first state")
    tracer.nodes[node_id] = Node(
        node_id,
        NodeKind.LOOP,
        body.name,
        (init,),
        _kwargs(tracer, node_id, call.shared),
        tracer.guard,
        spec=LoopSpec(body, call.max_iterations),
    )
    return Symbol(Ref(node_id), tracer.guard, tracer)


def _add_wait(tracer: Tracer, call: WaitCall) -> Symbol:
    node_id = tracer._new_id(call.name)
    args: tuple[Expr, ...] = ()
    if call.after is not None:
        after = tracer.to_expr(call.after, node=node_id, what="`after=`")
        if not isinstance(after, Literal):
            args = (after,)
    tracer.nodes[node_id] = Node(
        node_id,
        NodeKind.WAIT,
        call.name,
        args,
        (),
        tracer.guard,
        spec=WaitSpec(call.name, call.type, call.timeout),
    )
    return Symbol(Ref(node_id), tracer.guard, tracer)


# --- the public calls -----------------------------------------------------------------------


def map_call(body: Step[..., Any] | Flow[..., Any], items: Any, shared: dict[str, Any]) -> Any:
    """``body.map(items, **shared)``: a node while tracing, the plain calls outside a flow."""
    tracer = current_tracer()
    if tracer is not None:
        return MapCall(tracer, body, items, shared)
    return _map_plain(body.fn, items, shared)  # a flow's map runs in a context: see dsl.py


async def _map_plain(fn: Callable[..., Awaitable[Any]], items: Any, shared: dict[str, Any]) -> Any:
    import anyio

    values = list(items)
    results: list[Any] = [None] * len(values)

    async def one(i: int) -> None:
        results[i] = await fn(values[i], **shared)

    async with anyio.create_task_group() as tg:
        for i in range(len(values)):
            tg.start_soon(one, i)
    return results


def map_inputs(flow: Flow[..., Any], items: Any, shared: dict[str, Any]) -> list[Any]:
    """``flow.map(items, **shared)`` outside a flow, as inputs of ``ctx.map``: one run each."""
    first = next(iter(flow.signature.parameters))
    return [{first: item, **shared} for item in items] if shared else list(items)


def loop(
    body: Step[..., Any] | Flow[..., Any],
    init: Any,
    /,
    *,
    max_iterations: int,
    **shared: Any,
) -> Coroutine[Any, Any, Any]:
    """Run *body* with *init*, then with each :class:`Continue`'s state, until it returns
    :class:`Done` (whose result is the value); at most *max_iterations* times.

    Inside a flow this is ONE node whose iterations are journaled one by one; outside a
    flow it is the plain loop, so a body stays unit-testable.
    """
    if not isinstance(max_iterations, int) or max_iterations < 1:
        raise TracingError(
            f"max_iterations must be a positive int, not {max_iterations!r}",
            hint="Bound every loop: `fd.loop(body, state, max_iterations=8)`",
        )
    tracer = current_tracer()
    if tracer is not None:
        return LoopCall(tracer, body, init, max_iterations, shared)  # type: ignore[return-value]
    return _loop_plain(body, init, max_iterations, shared)


async def _loop_plain(body: Any, state: Any, max_iterations: int, shared: dict[str, Any]) -> Any:
    for _ in range(max_iterations):
        outcome = as_outcome(await body(state, **shared))
        if outcome is None:
            raise TypeError(f"{body.name!r} must return fd.Continue(state) or fd.Done(result)")
        if isinstance(outcome, Done):
            return outcome.result
        state = outcome.state
    raise RuntimeError(f"fd.loop({body.name}): max_iterations={max_iterations} exhausted")


def wait_for(
    name: str, tp: type[T] | Any = Any, /, *, timeout: float | None = None, after: Any = None
) -> Coroutine[Any, Any, T]:
    """Inside a flow: wait for the value sent as signal *name* to this run, decoded as *tp*.

    ``ctx.signal(run_id, name, value)`` (or ``flowdsl signal``) sends it, from any process;
    a signal sent before the run gets here is kept.  *timeout* (seconds, journaled) fails
    the run if no signal came in time.  *after* (any value of the flow body) makes the wait
    start only once that value exists, as a step taking it would.
    """
    check_name(name, "signal")
    if timeout is not None and timeout <= 0:
        raise TracingError(f"timeout must be positive seconds, not {timeout}", node=name)
    tracer = current_tracer()
    if tracer is None:
        raise TracingError(
            f"fd.wait_for({name!r}) was called outside a flow",
            hint="A wait is a node of a flow: `value = await fd.wait_for(...)` in a @fd.flow body",
        )
    return WaitCall(tracer, name, tp, timeout, after)  # type: ignore[return-value]
