"""OpenAI's Chat Completions API (and every server that speaks it) through the ``openai`` SDK."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from contextlib import aclosing
from typing import Any

from .._errors import ConfigError
from ._base import INVALID_JSON, Exchange, Turn, where
from ._batch import BatchAPI
from ._errors import LLMError
from ._sdk import SDKProvider, SSEParser, create_args, import_sdk
from ._translate import translate
from ._types import Message, ToolCall, Usage

__all__ = ["OpenAI"]


class OpenAI(SDKProvider):
    """A provider on OpenAI's Chat Completions API, or any compatible server.

    *api_key* defaults to ``OPENAI_API_KEY``; with a *base_url* (vLLM, Ollama, a gateway)
    a key may be left out.  *max_retries* is how often the SDK retries 408, 409, 429, 5xx
    and lost connections, with exponential backoff that honours ``Retry-After``; other
    4xx fail at once.  *max_concurrency* bounds the requests in flight and
    *tokens_per_minute* the tokens spent, across every run sharing this provider.
    *prices* adds to or overrides the price table (dollars per million tokens).
    *max_tokens_field* is the request field ``max_tokens=`` is sent as: OpenAI's own API
    wants ``max_completion_tokens``, many compatible servers only ``max_tokens`` (the
    default when *base_url* is given).  *stream_usage* asks streams to report usage
    (``stream_options.include_usage``), which some compatible servers refuse.
    *batch_api* (``True``, or an :class:`~flowdsl.llm.BatchAPI`) sends the calls of batch
    runs through OpenAI's Batch API, at half the price; real-time runs ignore it.
    """

    _path = "/chat/completions"

    name = "OpenAI"

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        *,
        model: str | None = None,
        max_concurrency: int | None = 32,
        tokens_per_minute: int | None = None,
        max_retries: int = 3,
        timeout: float = 600.0,
        prices: Mapping[str, Any] | None = None,
        organization: str | None = None,
        default_headers: Mapping[str, str] | None = None,
        max_tokens_field: str | None = None,
        stream_usage: bool = True,
        batch_api: bool | BatchAPI = False,
    ) -> None:
        super().__init__(
            model=model,
            max_concurrency=max_concurrency,
            tokens_per_minute=tokens_per_minute,
            prices=prices,
            batch_api=batch_api,
        )
        self._sdk = import_sdk("openai", "OpenAI")
        key = api_key or os.environ.get("OPENAI_API_KEY")
        if not key:
            if base_url is None:
                raise ConfigError(
                    "no OpenAI API key",
                    hint="Set OPENAI_API_KEY, or pass fd.llm.OpenAI(api_key=...)",
                )
            key = "unused"  # a local compatible server usually wants none, the SDK wants one
        self._secrets = (key,)
        self.max_tokens_field = max_tokens_field or (
            "max_tokens" if base_url is not None else "max_completion_tokens"
        )
        self.stream_usage = stream_usage
        sdk = self._sdk
        headers = dict(default_headers or {})

        def make() -> Any:
            return sdk.AsyncOpenAI(
                api_key=key,
                base_url=base_url,
                organization=organization,
                max_retries=max_retries,
                timeout=timeout,
                default_headers=headers or None,
            )

        self._connect(make, base_url=base_url, max_retries=max_retries)

    # --- one request -----------------------------------------------------------------------

    def _turn_of(self, reply: Any, exchange: Exchange) -> Turn:
        return _turn(reply, exchange)

    def _batch_jobs(self) -> Any:
        from ._batch_openai import OpenAIJobs

        return OpenAIJobs(self)

    def _translate(self, exc: BaseException, model: str) -> LLMError | None:
        return translate(
            self._sdk,
            exc,
            provider=self.name,
            model=model,
            url=self.base_url or "https://api.openai.com/v1",
            key_help="OPENAI_API_KEY, or fd.llm.OpenAI(api_key=...)",
            retries=self.max_retries,
            redact=self._redact,
        )

    def _body(self, exchange: Exchange) -> dict[str, Any]:
        params: dict[str, Any] = {
            "model": exchange.model,
            "messages": _wire_messages(exchange.messages),
        }
        if exchange.max_tokens is not None:
            params[self.max_tokens_field] = exchange.max_tokens
        if exchange.temperature is not None:
            params["temperature"] = exchange.temperature
        if exchange.tools:
            params["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": spec.name,
                        "description": spec.description,
                        "parameters": spec.parameters,
                    },
                }
                for spec in exchange.tools
            ]
        answer = exchange.answer
        if answer is not None:
            params["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": answer.name,
                    "description": answer.description,
                    "schema": answer.schema,
                    "strict": answer.strict,
                },
            }
        if exchange.stream:
            params["stream"] = True
            if self.stream_usage:
                params["stream_options"] = {"include_usage": True}
        if exchange.options:
            params.update(exchange.options)
        return params

    async def _stream(self, client: Any, body: dict[str, Any], exchange: Exchange) -> Turn:
        on_token = exchange.on_token
        texts: list[str] = []
        refusal: list[str] = []
        calls: dict[int, dict[str, Any]] = {}
        usage = Usage()
        model = exchange.model
        finish: str | None = None
        parser = SSEParser()
        # The streaming-response form hands us the body's lines; the SDK's stream object
        # would leave generators unfinished after [DONE] (a ResourceWarning under trio).
        create = client.chat.completions.with_streaming_response.create
        response_cm = create(**create_args(body, ("model", "messages", "stream")))
        async with response_cm as response, aclosing(response.iter_lines()) as lines:
            async for line in lines:
                event = parser.feed(line)
                if event is None or event[1] == "[DONE]":
                    continue  # read on to the end of the body: the connection is reused
                chunk = json.loads(event[1])
                if "error" in chunk:
                    raise self._stream_error(chunk["error"], exchange.model)
                model = chunk.get("model") or model
                if chunk.get("usage"):
                    counts = chunk["usage"]
                    usage = Usage(
                        counts.get("prompt_tokens") or 0, counts.get("completion_tokens") or 0
                    )
                for choice in chunk.get("choices") or ():
                    delta = choice.get("delta") or {}
                    content = delta.get("content")
                    if content:
                        texts.append(content)
                        if on_token is not None:
                            on_token(content)
                    if delta.get("refusal"):
                        refusal.append(delta["refusal"])
                    for part in delta.get("tool_calls") or ():
                        _merge_call(calls.setdefault(part.get("index", 0), {}), part)
                    finish = choice.get("finish_reason") or finish
        tool_calls = tuple(
            _tool_call(c.get("id", ""), c.get("name", ""), "".join(c.get("arguments", [])))
            for _, c in sorted(calls.items())
        )
        return Turn(
            text="".join(texts),
            usage=usage,
            model=model,
            finish_reason=finish,
            tool_calls=tool_calls,
            refusal="".join(refusal) or None,
        )

    def _stream_error(self, error: Any, model: str) -> LLMError:
        said = error.get("message") if isinstance(error, dict) else str(error)
        return LLMError(
            f"{self.name} reported an error in the middle of the answer for model {model!r}: "
            f"{self._redact(str(said))}",
            **where(),
            hint="Try again later (a step's retries= can)",
            provider=self.name,
            retryable=True,
        )


def _turn(data: Mapping[str, Any], exchange: Exchange) -> Turn:
    choice = data["choices"][0]
    message = choice.get("message") or {}
    usage = data.get("usage") or {}
    return Turn(
        text=message.get("content") or "",
        usage=Usage(usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0),
        model=data.get("model") or exchange.model,
        finish_reason=choice.get("finish_reason"),
        tool_calls=tuple(
            _tool_call(call.get("id", ""), call["function"]["name"], call["function"]["arguments"])
            for call in message.get("tool_calls") or ()
        ),
        refusal=message.get("refusal"),
    )


def _merge_call(acc: dict[str, Any], part: Mapping[str, Any]) -> None:
    if part.get("id"):
        acc["id"] = part["id"]
    function = part.get("function") or {}
    if function.get("name"):
        acc["name"] = function["name"]
    if function.get("arguments"):
        acc.setdefault("arguments", []).append(function["arguments"])


def _tool_call(call_id: str, name: str, arguments: str) -> ToolCall:
    try:
        decoded = json.loads(arguments) if arguments else {}
    except ValueError:
        decoded = None
    if not isinstance(decoded, dict):
        decoded = {INVALID_JSON: arguments}
    return ToolCall(call_id, name, decoded)


def _wire_messages(messages: Sequence[Message]) -> list[Any]:
    """The messages as Chat Completions wants them; the user's own dicts pass unchanged."""
    wire: list[Any] = []
    for message in messages:
        role = message.get("role")
        if role == "tool" and "is_error" in message:
            wire.append(
                {
                    "role": "tool",
                    "tool_call_id": message["tool_call_id"],
                    "content": message["content"],
                }
            )
        elif (
            role == "assistant"
            and message.get("tool_calls")
            and isinstance(message["tool_calls"][0], ToolCall)
        ):
            wire.append(
                {
                    "role": "assistant",
                    "content": message.get("content") or None,
                    "tool_calls": [
                        {
                            "id": call.id,
                            "type": "function",
                            "function": {
                                "name": call.name,
                                "arguments": json.dumps(call.arguments),
                            },
                        }
                        for call in message["tool_calls"]
                    ],
                }
            )
        else:
            wire.append(message)
    return wire
