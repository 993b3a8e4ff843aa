"""The values an LLM call deals in, and the interface every provider implements."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import attrs

__all__ = ["Message", "Price", "Provider", "Reply", "ToolCall", "Usage"]

T = TypeVar("T")

Message = Mapping[str, Any]
"""A chat message in the OpenAI shape: ``{"role": "user", "content": "..."}``.

Roles are ``system``, ``user`` and ``assistant`` (and ``tool`` for tool results); each
provider translates them to its own wire format.
"""


@attrs.frozen
class Usage:
    """Tokens one call (or, summed, several) consumed."""

    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens, self.output_tokens + other.output_tokens
        )


@attrs.frozen
class ToolCall:
    """A tool the model asked for: its name and the (decoded JSON) arguments."""

    id: str
    name: str
    arguments: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class Price:
    """What a model costs, in US dollars per million input and output tokens."""

    input: float
    output: float

    def cost(self, usage: Usage) -> float:
        return (usage.input_tokens * self.input + usage.output_tokens * self.output) / 1e6


@attrs.frozen
class Reply(Generic[T]):
    """What an LLM call returns.

    ``text`` is the full answer (also when it was streamed); ``parsed`` is the instance of
    ``response_model`` for structured output (``None`` otherwise); ``tool_calls`` are the
    calls to tool steps the model made on the way, in order; ``usage`` and ``cost`` cover
    every request the call needed (``calls`` of them); ``cost`` is ``None`` when the price
    table does not know the model.  ``batch_job`` is the provider batch job that answered,
    when the call went through one (the last job, when tool rounds took several); its
    ``cost`` then has the batch discount.
    """

    text: str
    usage: Usage = Usage()
    model: str = ""
    parsed: T = None  # type: ignore[assignment]
    tool_calls: tuple[ToolCall, ...] = ()
    raw_finish_reason: str | None = None
    cost: float | None = None
    calls: int = 1
    batch_job: str | None = None


@runtime_checkable
class Provider(Protocol):
    """What :func:`flowdsl.llm.chat` needs from a provider.

    ``messages`` are in the :data:`Message` shape; ``tools`` are steps (or plain functions)
    the model may call; ``stream`` asks for the answer to be streamed into ``on_token``.
    :class:`flowdsl.llm.BaseProvider` implements the tool loop, structured output, limits
    and pricing on top of one method that sends one request; a provider may also
    implement this protocol from scratch.
    """

    async def chat(
        self,
        messages: Sequence[Message],
        *,
        model: str | None,
        max_tokens: int | None,
        temperature: float | None,
        response_model: Any,
        tools: Sequence[Callable[..., Any]],
        stream: bool,
        on_token: Callable[[str], None] | None,
        max_tool_rounds: int,
        options: Mapping[str, Any] | None,
    ) -> Reply[Any]: ...
