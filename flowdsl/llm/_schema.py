"""JSON schemas derived from Python types: for structured output and for tool parameters.

The schema says what the codec (:mod:`flowdsl._codec`) will accept back, so an answer that
fits the schema also structures into the class.  Schemas are *strict* (OpenAI's strict
structured outputs: every property required, no extra properties) whenever the type
allows it; ``dict`` and ``Any`` make a schema non-strict, since strict mode cannot say
"any keys".
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import inspect
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from .._errors import ConfigError

__all__ = ["AnswerSpec", "ToolSpec", "answer_spec", "json_schema", "tool_specs"]

_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_PRIMITIVES: Mapping[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}
_SEQUENCES = (list, tuple, set, frozenset, Sequence, typing.Sequence, typing.List)  # noqa: UP006


@attrs.frozen
class AnswerSpec:
    """Structured output asked for: the type, and the schema the provider is given.

    A type that is not a class with fields (``list[str]``, an enum) is *wrapped* as the
    one property ``value`` of an object, since both providers want an object at the root.
    """

    tp: Any
    name: str
    description: str
    schema: dict[str, Any]
    strict: bool
    wrapped: bool

    def unwrap(self, data: Any) -> Any:
        if self.wrapped and isinstance(data, dict) and set(data) == {"value"}:
            return data["value"]
        return data


@attrs.frozen
class ToolSpec:
    """A tool the model may call: a step's (or a function's) name, doc and parameters."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any] = attrs.field(repr=False)
    is_async: bool
    types: dict[str, Any] = attrs.field(repr=False)
    required: frozenset[str]


def json_schema(tp: Any, *, what: str = "response_model") -> tuple[dict[str, Any], bool]:
    """The JSON schema of *tp*, and whether it is valid in strict mode."""
    builder = _Builder(what)
    return builder.schema(tp), builder.strict


def answer_spec(tp: Any) -> AnswerSpec:
    """What to ask a provider for when a call passes ``response_model=tp``."""
    schema, strict = json_schema(tp)
    name = _safe_name(getattr(tp, "__name__", "") or "answer")
    wrapped = schema.get("type") != "object" or "properties" not in schema
    if wrapped:
        schema = {
            "type": "object",
            "properties": {"value": schema},
            "required": ["value"],
            "additionalProperties": False,
        }
    description = _doc(tp) or f"The answer, as a {name}."
    return AnswerSpec(tp, name, description, schema, strict, wrapped)


def tool_specs(tools: Sequence[Callable[..., Any]]) -> dict[str, ToolSpec]:
    """Describe each tool (a step, or a plain function) by name; names must be unique."""
    specs: dict[str, ToolSpec] = {}
    for tool in tools:
        spec = _tool_spec(tool)
        if spec.name in specs:
            raise ConfigError(
                f"two tools are named {spec.name!r}",
                hint="Give each tool step its own name: @fd.step(name=...)",
            )
        specs[spec.name] = spec
    return specs


def _tool_spec(tool: Any) -> ToolSpec:
    from .._define.dsl import Branch, Flow, Step

    if isinstance(tool, Flow | Branch):
        raise ConfigError(
            f"{tool.name!r} is a {type(tool).__name__.lower()}, not a step; a tool must be a "
            "step or a function",
            hint="Pass the steps the model may call: tools=[lookup_order, ...]",
        )
    if isinstance(tool, Step):
        name, fn = tool.name, tool.fn
    elif callable(tool):
        name, fn = getattr(tool, "__name__", ""), tool
    else:
        raise ConfigError(
            f"tools must be steps or functions, not {type(tool).__name__}",
            hint="Pass the steps the model may call: tools=[lookup_order, ...]",
        )
    if not _NAME.match(name):
        raise ConfigError(
            f"{name!r} cannot be a tool name: providers accept letters, digits, _ and -",
            hint="Define the tool with `def` (not a lambda), or name it: @fd.step(name=...)",
        )
    parameters, types_, required = _parameters(name, fn)
    return ToolSpec(
        name=name,
        description=_doc(fn) or f"Call {name}.",
        parameters=parameters,
        fn=fn,
        is_async=inspect.iscoroutinefunction(fn),
        types=types_,
        required=required,
    )


def _parameters(
    name: str, fn: Callable[..., Any]
) -> tuple[dict[str, Any], dict[str, Any], frozenset[str]]:
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:
        raise ConfigError(
            f"cannot resolve the annotations of tool {name!r}: {exc}",
            hint="Import the annotated types at module level",
        ) from exc
    properties: dict[str, Any] = {}
    types_: dict[str, Any] = {}
    required: list[str] = []
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
            raise ConfigError(
                f"tool {name!r} has parameter {param.name!r} of kind {param.kind.description}; "
                "a model passes named arguments only",
                hint="Give the tool plain named parameters",
            )
        tp = hints.get(param.name, Any)
        schema, _ = json_schema(tp, what=f"parameter {param.name!r} of tool {name!r}")
        properties[param.name] = schema
        types_[param.name] = tp
        if param.default is param.empty:
            required.append(param.name)
    parameters = {"type": "object", "properties": properties, "required": required}
    return parameters, types_, frozenset(required)


def _doc(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    # dataclasses invent a docstring from the signature: it tells the model nothing.
    if dataclasses.is_dataclass(obj) and doc.startswith(f"{getattr(obj, '__name__', '')}("):
        return ""
    return doc


def _safe_name(name: str) -> str:
    cleaned = re.sub(r"[^a-zA-Z0-9_-]", "_", name)[:64]
    return cleaned or "answer"


class _Builder:
    """Walks a type once; remembers whether anything in it rules out strict mode."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.strict = True
        self._stack: list[Any] = []

    def schema(self, tp: Any) -> dict[str, Any]:
        if tp is Any or tp is object:
            self.strict = False
            return {}
        if tp is type(None) or tp is None:
            return {"type": "null"}
        if tp in _PRIMITIVES:
            return {"type": _PRIMITIVES[tp]}
        if tp is datetime.datetime:
            return {"type": "string", "description": "an ISO 8601 date and time"}
        if tp is datetime.date:
            return {"type": "string", "description": "an ISO 8601 date"}
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return _enum_schema([member.value for member in tp])
        origin = typing.get_origin(tp)
        if origin is typing.Literal:
            return _enum_schema(list(typing.get_args(tp)))
        if origin is typing.Union or origin is types.UnionType:
            return self._union(typing.get_args(tp))
        if origin is typing.Annotated:
            return self.schema(typing.get_args(tp)[0])
        if origin in _SEQUENCES or tp in _SEQUENCES:
            return self._array(tp, origin)
        if origin in (dict, Mapping) or tp in (dict, Mapping):
            return self._mapping(tp)
        if isinstance(tp, type) and (attrs.has(tp) or dataclasses.is_dataclass(tp)):
            return self._record(tp)
        raise self._unsupported(tp)

    def _union(self, args: tuple[Any, ...]) -> dict[str, Any]:
        return {"anyOf": [self.schema(arg) for arg in args]}

    def _array(self, tp: Any, origin: Any) -> dict[str, Any]:
        args = typing.get_args(tp)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            self.strict = False  # fixed-length tuples need prefixItems, outside strict mode
            return {
                "type": "array",
                "prefixItems": [self.schema(arg) for arg in args],
                "minItems": len(args),
                "maxItems": len(args),
            }
        item = args[0] if args else Any
        return {"type": "array", "items": self.schema(item)}

    def _mapping(self, tp: Any) -> dict[str, Any]:
        args = typing.get_args(tp)
        if args and args[0] is not str:
            raise self._unsupported(tp, "mapping keys must be str in JSON")
        self.strict = False
        return {"type": "object", "additionalProperties": self.schema(args[1] if args else Any)}

    def _record(self, cls: type[Any]) -> dict[str, Any]:
        if cls in self._stack:
            raise ConfigError(
                f"{self.what}: {cls.__qualname__} refers to itself, which a JSON schema for "
                "structured output cannot express",
                hint="Use a non-recursive class (a list of children of another class)",
            )
        self._stack.append(cls)
        try:
            hints = typing.get_type_hints(cls)
        except Exception as exc:
            raise ConfigError(
                f"{self.what}: cannot resolve the annotations of {cls.__qualname__}: {exc}",
                hint="Import the annotated types at module level",
            ) from exc
        properties: dict[str, Any] = {}
        for name, description in _fields(cls):
            schema = self.schema(hints.get(name, Any))
            if description:
                schema = {**schema, "description": description}
            properties[name] = schema
        self._stack.pop()
        result: dict[str, Any] = {
            "type": "object",
            "properties": properties,
            "required": list(properties),
            "additionalProperties": False,
        }
        doc = _doc(cls)
        if doc:
            result["description"] = doc
        return result

    def _unsupported(self, tp: Any, why: str = "") -> ConfigError:
        detail = f" ({why})" if why else ""
        return ConfigError(
            f"{self.what}: cannot describe {tp!r} as JSON for the model{detail}",
            hint="Use str, int, float, bool, enums, Literal, lists, optionals, dict[str, ...] "
            "and attrs classes or dataclasses of these",
        )


def _fields(cls: type[Any]) -> list[tuple[str, str]]:
    """Field names and their ``metadata={"description": ...}``, in definition order."""
    if attrs.has(cls):
        return [(f.name, str(f.metadata.get("description", ""))) for f in attrs.fields(cls)]
    return [
        (f.name, str(f.metadata.get("description", ""))) for f in dataclasses.fields(cls) if f.init
    ]


def _enum_schema(values: list[Any]) -> dict[str, Any]:
    kinds = {_PRIMITIVES.get(type(v)) for v in values}
    schema: dict[str, Any] = {"enum": values}
    if len(kinds) == 1 and None not in kinds:
        schema = {"type": kinds.pop(), "enum": values}
    return schema
