"""Checks of a traced graph's types, made when the flow is defined instead of when it runs.

Two mistakes are certain from the annotations alone, so they are refused at definition time
with a :class:`~flowdsl.TracingError` rather than found by the first run (or worse, never):

- a return annotation (of a step, or a flow's parameter or result) that the codec cannot
  decode, such as a numpy array: every run would fail at that node;
- a step parameter without an annotation that receives a value whose type does not survive
  the trip through JSON as itself (an attrs class or dataclass, a set, bytes, an enum, a
  datetime, or a container of these): the step would silently get the JSON form (a dict, a
  list, a str), in real time and in batch alike.

Annotations that do not resolve yet (a type defined further down the module) are skipped:
what cannot be known now is left to run time, as before.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import inspect
import types
import typing
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import attrs
import cattrs

from .. import _codec
from .._errors import TracingError
from .graph import Expr, Graph, Input, ListOf, MapOf, NodeKind, Ref, TupleOf

if TYPE_CHECKING:
    from .dsl import Flow

__all__ = ["check_types"]

_CARRIED = "builtins, attrs classes, dataclasses, enums, datetimes, bytes or containers of these"
_UNRESOLVED: Any = object()


def check_types(flow: Flow[..., Any], graph: Graph) -> None:
    """Refuse, with a :class:`TracingError`, annotations that make every run go wrong."""
    hints = _Hints()
    flow_hints = hints.of(flow.fn)
    if flow_hints is not None:
        for name in flow.signature.parameters:
            if name in flow_hints:
                _check_decodable(flow_hints[name], flow.name, None, f"parameter {name!r}")
        if "return" in flow_hints:
            _check_decodable(flow_hints["return"], flow.name, None, "the flow's result")
    for node in graph.nodes_by_id.values():
        unit = node.fn
        if node.kind is not NodeKind.STEP or unit is None:
            continue
        unit_hints = hints.of(unit.fn)
        if unit_hints is None:
            continue
        if "return" in unit_hints:
            _check_decodable(
                unit_hints["return"],
                flow.name,
                node.id,
                f"the return annotation of step {unit.name!r}",
            )
        signature = inspect.signature(unit.fn)
        bound = signature.bind(*node.args, **dict(node.kwargs))
        for name, given in bound.arguments.items():
            param = signature.parameters[name]
            if param.annotation is not param.empty:
                continue
            if param.kind is param.VAR_POSITIONAL:
                exprs: tuple[Expr, ...] = given
            elif param.kind is param.VAR_KEYWORD:
                exprs = tuple(given.values())
            else:
                exprs = (given,)
            for expr in exprs:
                for source, tp in _sources(expr, graph, hints, flow_hints):
                    lost = _json_form(tp)
                    if lost is None:
                        continue
                    whole = source.startswith("the ")  # not an item of a list or dict
                    raise TracingError(
                        f"parameter {name!r} of step {unit.name!r} has no annotation and "
                        f"receives {source}, a {_type_text(tp)}: it would get the JSON "
                        f"form ({lost}), not a {_type_text(tp)}",
                        flow=flow.name,
                        node=node.id,
                        hint=f"Annotate the parameter: `{name}: {_type_text(tp)}`"
                        if whole
                        else "Annotate the parameter with the type it takes "
                        f"(a container of {_type_text(tp)})",
                    )


class _Hints:
    """Resolved annotations per function, computed once per check."""

    def __init__(self) -> None:
        self._cache: dict[int, dict[str, Any] | None] = {}

    def of(self, fn: Callable[..., Any]) -> dict[str, Any] | None:
        key = id(fn)
        if key not in self._cache:
            try:
                self._cache[key] = typing.get_type_hints(fn)
            except Exception:
                self._cache[key] = None  # not resolvable yet: nothing can be said now
        return self._cache[key]


def _check_decodable(tp: Any, flow: str, node: str | None, what: str) -> None:
    if tp is Any or tp is object or tp is type(None) or tp in (str, int, float, bool):
        return  # the codec's own fast paths (see _codec.from_data)
    try:
        _codec.converter.get_structure_hook(tp)
    except cattrs.errors.StructureHandlerNotFoundError:
        raise TracingError(
            f"{what} is {_type_text(tp)}, which the codec cannot decode: every run would "
            "fail there",
            flow=flow,
            node=node,
            hint=f"Annotate a type the codec carries, {_CARRIED} (list[float] for an array, "
            "say), and convert inside the step",
        ) from None
    except Exception:
        return  # a type cattrs trips over for another reason: left to run time


def _sources(
    expr: Expr, graph: Graph, hints: _Hints, flow_hints: dict[str, Any] | None
) -> Iterator[tuple[str, Any]]:
    """(description, annotated type) of each value *expr* hands on whole."""
    if isinstance(expr, Ref) and not expr.path:
        producer = graph.nodes_by_id.get(expr.node)
        if producer is None or producer.kind is not NodeKind.STEP or producer.fn is None:
            return  # a join's value is whichever case ran: no one annotation says it
        found = hints.of(producer.fn.fn)
        if found is not None and "return" in found:
            yield f"the result of {expr.node!r}", found["return"]
    elif isinstance(expr, Input) and not expr.path:
        if flow_hints is not None and expr.name in flow_hints:
            yield f"the flow's input {expr.name!r}", flow_hints[expr.name]
    elif isinstance(expr, ListOf | TupleOf | MapOf):
        kind = "a dict" if isinstance(expr, MapOf) else "a list"
        for item in expr.values if isinstance(expr, MapOf) else expr.items:
            for source, tp in _sources(item, graph, hints, flow_hints):
                inner = source.removeprefix("a list holding ").removeprefix("a dict holding ")
                yield f"{kind} holding {inner}", tp


_AS_STRING = (datetime.datetime, datetime.date, datetime.time, datetime.timedelta, bytes)


def _json_form(tp: Any) -> str | None:
    """What a value of type *tp* becomes as JSON data when nothing says to decode it, if
    that is not the value itself; ``None`` when it arrives as what it was."""
    origin = typing.get_origin(tp)
    if origin is None:
        if not isinstance(tp, type):
            return None
        if attrs.has(tp) or dataclasses.is_dataclass(tp):
            return f"{tp.__qualname__} becomes a dict"
        if issubclass(tp, enum.Enum):
            return f"{tp.__qualname__} becomes its member's value"
        if issubclass(tp, set | frozenset):
            return f"a {tp.__name__} becomes a list"
        if issubclass(tp, _AS_STRING):
            return f"{tp.__name__} becomes a str"
        return None
    if origin in (set, frozenset):
        return f"a {origin.__name__} becomes a list"
    if origin is typing.Literal or origin is typing.Annotated:
        return None
    if origin is typing.Union or origin is types.UnionType or origin in (list, tuple, dict):
        for arg in typing.get_args(tp):
            if arg is not Ellipsis:
                found = _json_form(arg)
                if found is not None:
                    return found
    return None


def _type_text(tp: Any) -> str:
    """A type as it is written in an annotation (``list[Ticket]``, not ``list[app.Ticket]``)."""
    if tp is type(None):
        return "None"
    origin = typing.get_origin(tp)
    if origin is None:
        return tp.__qualname__ if isinstance(tp, type) else repr(tp).replace("typing.", "")
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        return " | ".join(_type_text(a) for a in args)
    name = getattr(origin, "__name__", repr(origin).replace("typing.", ""))
    inner = ", ".join("..." if a is Ellipsis else _type_text(a) for a in args)
    return f"{name}[{inner}]"
