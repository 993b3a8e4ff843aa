"""Anthropic's Messages API through the ``anthropic`` SDK.

Structured output uses the tool mechanism: the answer's schema becomes one tool that the
request forces the model to call, and the tool's input is the answer.  With tool steps
beside it, the model must call some tool each round (``tool_choice: any``) and finishes
by calling the answer tool.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from contextlib import aclosing
from typing import Any

from .._errors import ConfigError
from ._base import INVALID_JSON, NO_DATA, Exchange, Turn, where
from ._batch import BatchAPI
from ._errors import LLMError
from ._sdk import SDKProvider, SSEParser, create_args, import_sdk
from ._translate import translate
from ._types import Message, ToolCall, Usage

__all__ = ["Anthropic"]

DEFAULT_MAX_TOKENS = 4096


class Anthropic(SDKProvider):
    """A provider on Anthropic's Messages API.

    *api_key* defaults to ``ANTHROPIC_API_KEY``.  The Messages API requires a maximum
    answer length: calls without ``max_tokens=`` use *max_tokens* (4096).  *batch_api*
    sends the calls of batch runs through Message Batches.  The other options mean what
    they mean for :class:`~flowdsl.llm.OpenAI`.
    """

    _path = "/v1/messages"

    name = "Anthropic"

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
        max_tokens: int = DEFAULT_MAX_TOKENS,
        default_headers: Mapping[str, str] | None = None,
        batch_api: bool | BatchAPI = False,
    ) -> None:
        super().__init__(
            model=model,
            max_concurrency=max_concurrency,
            tokens_per_minute=tokens_per_minute,
            prices=prices,
            batch_api=batch_api,
        )
        self._sdk = import_sdk("anthropic", "Anthropic")
        key = api_key or os.environ.get("ANTHROPIC_API_KEY")
        if not key:
            raise ConfigError(
                "no Anthropic API key",
                hint="Set ANTHROPIC_API_KEY, or pass fd.llm.Anthropic(api_key=...)",
            )
        self._secrets = (key,)
        self.max_tokens = max_tokens
        sdk = self._sdk
        headers = dict(default_headers or {})

        def make() -> Any:
            return sdk.AsyncAnthropic(
                api_key=key,
                base_url=base_url,
                max_retries=max_retries,
                timeout=timeout,
                default_headers=headers or None,
            )

        self._connect(make, base_url=base_url, max_retries=max_retries)

    # --- one request -----------------------------------------------------------------------

    def _turn_of(self, reply: Any, exchange: Exchange) -> Turn:
        return message_turn(reply, exchange)

    def _translate(self, exc: BaseException, model: str) -> LLMError | None:
        return translate(
            self._sdk,
            exc,
            provider=self.name,
            model=model,
            url=self.base_url or "https://api.anthropic.com",
            key_help="ANTHROPIC_API_KEY, or fd.llm.Anthropic(api_key=...)",
            retries=self.max_retries,
            redact=self._redact,
        )

    def _batch_jobs(self) -> Any:
        from ._batch_anthropic import AnthropicJobs

        return AnthropicJobs(self)

    def _body(self, exchange: Exchange) -> dict[str, Any]:
        system, messages = _wire_messages(exchange.messages)
        params: dict[str, Any] = {
            "model": exchange.model,
            "max_tokens": exchange.max_tokens or self.max_tokens,
            "messages": messages,
        }
        if system:
            params["system"] = system
        if exchange.temperature is not None:
            params["temperature"] = exchange.temperature
        tools = [
            {"name": spec.name, "description": spec.description, "input_schema": spec.parameters}
            for spec in exchange.tools
        ]
        answer = exchange.answer
        if answer is not None:
            tools.append(
                {
                    "name": answer.name,
                    "description": answer.description,
                    "input_schema": answer.schema,
                }
            )
            only = len(tools) == 1
            params["tool_choice"] = (
                {"type": "tool", "name": answer.name} if only else {"type": "any"}
            )
        if tools:
            params["tools"] = tools
        if exchange.stream:
            params["stream"] = True
        if exchange.options:
            params.update(exchange.options)
        return params

    async def _stream(self, client: Any, body: dict[str, Any], exchange: Exchange) -> Turn:
        on_token = exchange.on_token
        blocks: dict[int, dict[str, Any]] = {}
        inputs: dict[int, list[str]] = {}
        input_tokens = output_tokens = 0
        model = exchange.model
        stop: str | None = None
        parser = SSEParser()
        create = client.messages.with_streaming_response.create
        named = ("model", "max_tokens", "messages", "stream")
        async with (
            create(**create_args(body, named)) as response,
            aclosing(response.iter_lines()) as lines,
        ):
            async for line in lines:
                event = parser.feed(line)
                if event is None:
                    continue
                data = json.loads(event[1])
                kind = data.get("type")
                if kind == "content_block_delta":
                    delta = data["delta"]
                    if delta.get("type") == "text_delta":
                        blocks[data["index"]]["text"] += delta["text"]
                        if on_token is not None:
                            on_token(delta["text"])
                    elif delta.get("type") == "input_json_delta":
                        inputs[data["index"]].append(delta["partial_json"])
                elif kind == "content_block_start":
                    block = data["content_block"]
                    index = data["index"]
                    if block["type"] == "text":
                        blocks[index] = {"type": "text", "text": block.get("text") or ""}
                        if block.get("text") and on_token is not None:
                            on_token(block["text"])
                    elif block["type"] == "tool_use":
                        blocks[index] = {
                            "type": "tool_use",
                            "id": block["id"],
                            "name": block["name"],
                            "input": None,
                        }
                        inputs[index] = []
                elif kind == "message_start":
                    message = data["message"]
                    model = message.get("model") or model
                    counts = message.get("usage") or {}
                    input_tokens = counts.get("input_tokens") or 0
                    output_tokens = counts.get("output_tokens") or 0
                elif kind == "message_delta":
                    stop = data.get("delta", {}).get("stop_reason") or stop
                    counts = data.get("usage") or {}
                    output_tokens = counts.get("output_tokens") or output_tokens
                    input_tokens = counts.get("input_tokens") or input_tokens
                elif kind == "error":
                    raise self._stream_error(data.get("error") or {}, exchange.model)
        for index, parts in inputs.items():
            blocks[index]["input"] = _decode_input("".join(parts))
        ordered = [blocks[i] for i in sorted(blocks)]
        return _turn(ordered, Usage(input_tokens, output_tokens), model, stop, exchange)

    def _stream_error(self, error: dict[str, Any], model: str) -> LLMError:
        kind = error.get("type", "error")
        return LLMError(
            f"{self.name} reported {kind} in the middle of the answer for model {model!r}: "
            f"{self._redact(str(error.get('message', '')))}",
            **where(),
            hint="Try again later (a step's retries= can)",
            provider=self.name,
            retryable=kind in ("overloaded_error", "api_error", "rate_limit_error"),
        )


def message_turn(data: Mapping[str, Any], exchange: Exchange) -> Turn:
    """A Messages API answer (a ``message`` object) as a :class:`Turn`."""
    usage = data.get("usage") or {}
    return _turn(
        data.get("content") or [],
        Usage(usage.get("input_tokens") or 0, usage.get("output_tokens") or 0),
        data.get("model") or exchange.model,
        data.get("stop_reason"),
        exchange,
    )


def _decode_input(text: str) -> Any:
    if not text:
        return {}
    try:
        return json.loads(text)
    except ValueError:
        return {INVALID_JSON: text}


def _turn(
    blocks: list[dict[str, Any]], usage: Usage, model: str, stop: str | None, exchange: Exchange
) -> Turn:
    answer_name = exchange.answer.name if exchange.answer is not None else None
    texts: list[str] = []
    calls: list[ToolCall] = []
    data: Any = None
    answered = False
    for block in blocks:
        if block["type"] == "text":
            texts.append(block["text"])
        elif block["type"] == "tool_use":
            arguments = block["input"]
            if block["name"] == answer_name:
                data, answered = arguments, True
            else:
                if not isinstance(arguments, dict):
                    arguments = {INVALID_JSON: json.dumps(arguments)}
                calls.append(ToolCall(block["id"], block["name"], arguments))
    return Turn(
        "".join(texts), usage, model, stop, tuple(calls), data=data if answered else NO_DATA
    )


def _wire_messages(messages: Sequence[Message]) -> tuple[str, list[Any]]:
    """``(system, messages)`` as the Messages API wants them.

    System messages become the ``system`` parameter; tool results (ours, or the user's in
    the OpenAI shape) become ``tool_result`` blocks of one user message; an assistant
    turn with tool calls becomes ``tool_use`` blocks.
    """
    system: list[str] = []
    wire: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        content = message.get("content")
        if role == "system":
            system.append(content if isinstance(content, str) else json.dumps(content))
        elif role == "tool":
            block: dict[str, Any] = {
                "type": "tool_result",
                "tool_use_id": message["tool_call_id"],
                "content": content,
            }
            if message.get("is_error"):
                block["is_error"] = True
            if wire and wire[-1]["role"] == "user" and _is_tool_results(wire[-1]):
                wire[-1]["content"].append(block)
            else:
                wire.append({"role": "user", "content": [block]})
        elif role == "assistant" and message.get("tool_calls"):
            blocks: list[dict[str, Any]] = []
            if content:
                blocks.append({"type": "text", "text": content})
            for call in message["tool_calls"]:
                if isinstance(call, ToolCall):
                    blocks.append(
                        {
                            "type": "tool_use",
                            "id": call.id,
                            "name": call.name,
                            "input": call.arguments,
                        }
                    )
            wire.append({"role": "assistant", "content": blocks})
        else:
            wire.append({"role": role, "content": content})
    return "\n\n".join(system), wire


def _is_tool_results(message: dict[str, Any]) -> bool:
    content = message["content"]
    return isinstance(content, list) and all(b.get("type") == "tool_result" for b in content)
