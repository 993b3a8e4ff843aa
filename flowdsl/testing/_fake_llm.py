"""A deterministic LLM provider for tests and examples: no network, no key, no cost.

``FakeLLM`` goes through the same machinery as the real providers (:class:`BaseProvider`):
the tool loop, structured output, the limits and usage accounting behave as they will in
production; only the request is answered from a script instead of a server.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Union

import anyio
import anyio.lowlevel
import attrs

from .. import _codec
from ..llm._base import NO_DATA, BaseProvider, Exchange, Turn
from ..llm._batch import BatchAPI
from ..llm._errors import LLMError
from ..llm._translate import retryable_status
from ..llm._types import Message, ToolCall, Usage

__all__ = ["FakeCall", "FakeLLM", "FakeReply"]

FAKE_BATCH_API = BatchAPI(flush_after=0.01, poll_every=0.0)


@attrs.frozen
class FakeReply:
    """One scripted answer.

    ``tool_calls`` are ``(name, arguments)`` pairs (or :class:`~flowdsl.llm.ToolCall`) the
    model asks for; ``data`` is a structured answer (JSON-compatible data, or an instance
    of the response model), given apart from the text as Anthropic's tool mechanism does.
    Token counts default to the number of words.
    """

    text: str = ""
    tool_calls: Sequence[Any] = ()
    data: Any = NO_DATA
    finish_reason: str = "stop"
    input_tokens: int | None = None
    output_tokens: int | None = None


@attrs.frozen
class FakeCall:
    """One request a :class:`FakeLLM` received (a chat with tools makes several)."""

    messages: tuple[Message, ...]
    model: str
    max_tokens: int | None
    temperature: float | None
    response_model: Any
    tools: tuple[str, ...]
    stream: bool
    failed: bool = False

    @property
    def prompt(self) -> str:
        """The text of the last user message."""
        return _last_user_text(self.messages)


Script = Union[  # noqa: UP007 (a runtime alias)
    None, str, FakeReply, Callable[[str], Any], Sequence[Any]
]


class FakeLLM(BaseProvider):
    """A provider that answers from a script.

    *script* is one of:

    - ``None``: echo the prompt (the last user message);
    - a string or a :class:`FakeReply`: the answer to every request;
    - a function of the prompt returning a string, a :class:`FakeReply` or an instance of
      the response model;
    - a list of those, one per request, in order (a chat that calls tools makes one
      request per round); running out is an :class:`~flowdsl.llm.LLMError`.

    *failures*: the first requests fail, one per item: an HTTP status (``429`` is an
    :class:`~flowdsl.llm.LLMError` with ``retryable=True``, ``401`` one with
    ``retryable=False``) or an exception to raise.  Streams arrive in pieces of
    *chunk_size* characters, *delay* seconds apart; *latency* seconds pass before any
    answer, as they would with a real model.  :attr:`calls` records every request.

    *batch_api* (``True`` or an :class:`~flowdsl.llm.BatchAPI`) sends the calls of batch
    runs through fake provider batch jobs, kept in memory and ended as they are submitted;
    :attr:`batch_jobs` maps each job's id to its requests' custom ids.  ``True`` means
    ``BatchAPI(flush_after=0.01, poll_every=0.0)``, so that a test does not wait.
    """

    name = "FakeLLM"

    def __init__(
        self,
        script: Script = None,
        *,
        model: str = "fake",
        failures: Iterable[int | BaseException] = (),
        chunk_size: int = 4,
        delay: float = 0.0,
        latency: float = 0.0,
        max_concurrency: int | None = None,
        tokens_per_minute: int | None = None,
        prices: Mapping[str, Any] | None = None,
        batch_api: Any = False,
    ) -> None:
        super().__init__(
            model=model,
            max_concurrency=max_concurrency,
            tokens_per_minute=tokens_per_minute,
            prices=prices,
            batch_api=FAKE_BATCH_API if batch_api is True else batch_api,
        )
        self.batch_jobs: dict[str, list[str]] = {}
        self.script = script
        self.failures = list(failures)
        self.chunk_size = max(1, chunk_size)
        self.delay = delay
        self.latency = latency
        self.calls: list[FakeCall] = []
        self._next = 0

    def _repr_fields(self) -> dict[str, Any]:
        return {"calls": len(self.calls)}

    def _batch_jobs(self) -> Any:
        from ._fake_batch import FakeJobs

        return FakeJobs(self)

    @property
    def prompts(self) -> list[str]:
        """The prompt of every request so far."""
        return [call.prompt for call in self.calls]

    async def _send(self, exchange: Exchange) -> Turn:
        if self.latency:
            await anyio.sleep(self.latency)
        else:
            await anyio.lowlevel.checkpoint()
        call = FakeCall(
            messages=tuple(exchange.messages),
            model=exchange.model,
            max_tokens=exchange.max_tokens,
            temperature=exchange.temperature,
            response_model=exchange.answer.tp if exchange.answer is not None else None,
            tools=tuple(spec.name for spec in exchange.tools),
            stream=exchange.stream,
        )
        if self.failures:
            self.calls.append(attrs.evolve(call, failed=True))
            raise self._failure(self.failures.pop(0), exchange.model)
        self.calls.append(call)
        reply = self._reply(call)
        text = reply.text
        if exchange.stream and exchange.on_token is not None and text:
            for i in range(0, len(text), self.chunk_size):
                if self.delay:
                    await anyio.sleep(self.delay)
                exchange.on_token(text[i : i + self.chunk_size])
        data = reply.data
        if data is not NO_DATA and not _is_plain(data):
            data = _codec.to_data(data, what="FakeReply.data")
        usage = Usage(
            reply.input_tokens if reply.input_tokens is not None else _words(exchange.messages),
            reply.output_tokens if reply.output_tokens is not None else len(text.split()),
        )
        calls = tuple(_tool_call(i, len(self.calls), c) for i, c in enumerate(reply.tool_calls))
        return Turn(text, usage, exchange.model, reply.finish_reason, calls, data=data)

    def _reply(self, call: FakeCall) -> FakeReply:
        script = self.script
        if script is None:
            return FakeReply(call.prompt)
        if isinstance(script, str | FakeReply):
            return _as_reply(script)
        if callable(script):
            return _as_reply(script(call.prompt))
        if self._next >= len(script):
            raise LLMError(
                f"FakeLLM ran out of scripted replies: request {self._next + 1} came, the "
                f"script has {len(script)}",
                provider=self.name,
                hint="Script one reply per request; a chat that calls tools makes one request "
                "per round",
            )
        item = script[self._next]
        self._next += 1
        return _as_reply(item)

    def _failure(self, failure: int | BaseException, model: str) -> BaseException:
        if isinstance(failure, BaseException):
            return failure
        return LLMError(
            f"FakeLLM answered {failure} for model {model!r} (an injected failure)",
            provider=self.name,
            status_code=failure,
            retryable=retryable_status(failure),
        )


def _as_reply(item: Any) -> FakeReply:
    if isinstance(item, FakeReply):
        return item
    if isinstance(item, str):
        return FakeReply(item)
    if attrs.has(type(item)) or dataclasses.is_dataclass(item):
        data = _codec.to_data(item, what="a scripted reply")
        return FakeReply(_codec.dumps(data), data=data)
    raise TypeError(f"a FakeLLM script gives str, FakeReply or an answer instance, not {item!r}")


def _tool_call(i: int, n: int, item: Any) -> ToolCall:
    if isinstance(item, ToolCall):
        return item
    name, arguments = item
    return ToolCall(f"fake_{n}_{i}", name, dict(arguments))


def _is_plain(data: Any) -> bool:
    return data is None or isinstance(data, str | int | float | bool | list | dict)


def _words(messages: Sequence[Message]) -> int:
    total = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            total += len(content.split())
    return total


def _last_user_text(messages: Sequence[Message]) -> str:
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return " ".join(str(b.get("text", "")) for b in content if b.get("type") == "text")
    return ""
