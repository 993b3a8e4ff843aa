"""JSON schemas for structured output, and tool descriptions from steps."""

from __future__ import annotations

import dataclasses
import datetime
import enum
from typing import Any, Literal, Optional

import attrs
import pytest

import flowdsl as fd
from flowdsl.llm._schema import answer_spec, json_schema, tool_specs


class Mood(enum.Enum):
    GOOD = "good"
    BAD = "bad"


class Level(enum.IntEnum):
    ONE = 1
    TWO = 2


@attrs.frozen
class Inner:
    x: int


@attrs.frozen
class Outer:
    """The outer record."""

    name: str = attrs.field(metadata={"description": "who it is"})
    inner: Inner = Inner(0)
    inners: list[Inner] = attrs.field(factory=list)
    maybe: Optional[Inner] = None  # noqa: UP045


@dataclasses.dataclass
class Point:
    x: float
    y: float


@pytest.mark.parametrize(
    ("tp", "schema"),
    [
        (str, {"type": "string"}),
        (int, {"type": "integer"}),
        (float, {"type": "number"}),
        (bool, {"type": "boolean"}),
        (list[str], {"type": "array", "items": {"type": "string"}}),
        (tuple[int, ...], {"type": "array", "items": {"type": "integer"}}),
        (int | None, {"anyOf": [{"type": "integer"}, {"type": "null"}]}),
        (str | int, {"anyOf": [{"type": "string"}, {"type": "integer"}]}),
        (Mood, {"type": "string", "enum": ["good", "bad"]}),
        (Level, {"type": "integer", "enum": [1, 2]}),
        (Literal["a", "b"], {"type": "string", "enum": ["a", "b"]}),
        (Literal["a", 1], {"enum": ["a", 1]}),
        (datetime.date, {"type": "string", "description": "an ISO 8601 date"}),
    ],
)
def test_leaf_and_container_schemas_are_strict(tp: Any, schema: dict[str, Any]) -> None:
    assert json_schema(tp) == (schema, True)


def test_records_list_every_field_as_required_and_close_the_object() -> None:
    schema, strict = json_schema(Outer)
    inner = {
        "type": "object",
        "properties": {"x": {"type": "integer"}},
        "required": ["x"],
        "additionalProperties": False,
    }
    assert strict
    assert schema == {
        "type": "object",
        "description": "The outer record.",
        "properties": {
            "name": {"type": "string", "description": "who it is"},
            "inner": inner,
            "inners": {"type": "array", "items": inner},
            "maybe": {"anyOf": [inner, {"type": "null"}]},
        },
        "required": ["name", "inner", "inners", "maybe"],
        "additionalProperties": False,
    }


def test_dataclasses_without_their_invented_docstring() -> None:
    schema, strict = json_schema(Point)
    assert strict
    assert "description" not in schema
    assert schema["properties"] == {"x": {"type": "number"}, "y": {"type": "number"}}


@pytest.mark.parametrize("tp", [dict[str, int], Any, tuple[int, str]])
def test_open_shapes_are_not_strict(tp: Any) -> None:
    _, strict = json_schema(tp)
    assert not strict


def test_a_dict_nested_in_a_record_makes_the_whole_schema_non_strict() -> None:
    @attrs.frozen
    class Tags:
        counts: dict[str, int]

    schema, strict = json_schema(Tags)
    assert not strict
    assert schema["properties"]["counts"] == {
        "type": "object",
        "additionalProperties": {"type": "integer"},
    }


@attrs.frozen
class Tree:
    children: list[Tree]


@pytest.mark.parametrize(
    ("tp", "message"),
    [
        (Tree, r"^response_model: .*Tree refers to itself"),
        (bytes, r"^response_model: cannot describe <class 'bytes'> as JSON for the model"),
        (dict[int, str], r"mapping keys must be str in JSON"),
    ],
)
def test_types_that_cannot_be_described(tp: Any, message: str) -> None:
    with pytest.raises(fd.ConfigError, match=message):
        json_schema(tp)


def test_non_record_answers_are_wrapped_in_an_object() -> None:
    spec = answer_spec(list[Mood])
    assert spec.wrapped
    assert spec.schema == {
        "type": "object",
        "properties": {
            "value": {"type": "array", "items": {"type": "string", "enum": ["good", "bad"]}}
        },
        "required": ["value"],
        "additionalProperties": False,
    }
    assert spec.unwrap({"value": ["good"]}) == ["good"]
    record = answer_spec(Outer)
    assert not record.wrapped
    assert (record.name, record.description) == ("Outer", "The outer record.")


@fd.step(name="find_user")
async def find(user_id: int, *, active: bool = True, note: str | None = None) -> str:
    """Find a user.

    Returns their name.
    """
    return str(user_id)


def plain_tool(query: str) -> list[str]:
    return [query]


def test_tools_are_described_from_the_step() -> None:
    specs = tool_specs([find, plain_tool])
    step = specs["find_user"]
    assert step.description == "Find a user.\n\nReturns their name."
    assert step.parameters == {
        "type": "object",
        "properties": {
            "user_id": {"type": "integer"},
            "active": {"type": "boolean"},
            "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        },
        "required": ["user_id"],
    }
    assert step.is_async
    assert step.fn is find.fn
    plain = specs["plain_tool"]
    assert plain.description == "Call plain_tool."
    assert not plain.is_async


@fd.flow
async def a_flow(x: int) -> str:
    return await find(x)


def varargs(*items: str) -> str:
    return ""


@pytest.mark.parametrize(
    ("tools", "message"),
    [
        ([lambda q: q], r"^'<lambda>' cannot be a tool name"),
        ([find, find], r"^two tools are named 'find_user'"),
        ([a_flow], r"^'a_flow' is a flow, not a step"),
        (["find"], r"^tools must be steps or functions, not str"),
        ([varargs], r"^tool 'varargs' has parameter 'items' of kind variadic positional"),
    ],
)
def test_tools_that_cannot_be_offered(tools: list[Any], message: str) -> None:
    with pytest.raises(fd.ConfigError, match=message):
        tool_specs(tools)
