"""What every provider shares: the tool loop, structured output, limits, pricing and errors.

A provider subclasses :class:`BaseProvider` and implements :meth:`BaseProvider._send`, which
sends one request (an :class:`Exchange`) and returns what came back (a :class:`Turn`).
:meth:`BaseProvider.chat` drives the exchanges: it holds a request slot and a token budget
around each one, runs the tool steps the model asks for and sends their results back, and
decodes the structured answer into ``response_model`` through flowdsl's codec.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Final, TypedDict

import anyio
import attrs
import cattrs

from .. import _codec
from .._engine.runner import current_scope
from .._errors import CodecError, ConfigError
from ._errors import LLMError, StructuredOutputError
from ._limits import Limits
from ._prices import BATCH_DISCOUNT, PriceTable
from ._schema import AnswerSpec, ToolSpec, answer_spec, tool_specs
from ._types import Message, Reply, ToolCall, Usage

__all__ = ["INVALID_JSON", "NO_DATA", "BaseProvider", "Exchange", "Turn", "where"]

INVALID_JSON: Final = "$invalid_json"
"""The one key of a tool call's arguments when the model sent text that is not JSON."""

DEFAULT_MAX_TOOL_ROUNDS: Final = 8


@attrs.frozen
class Exchange:
    """One request to send: the conversation so far and what to ask for."""

    model: str
    messages: Sequence[Message]
    max_tokens: int | None
    temperature: float | None
    tools: tuple[ToolSpec, ...]
    answer: AnswerSpec | None
    stream: bool
    on_token: Callable[[str], None] | None
    options: Mapping[str, Any] | None


NO_DATA: Final[Any] = object()
"""A turn's ``data`` when the structured answer, if any, is in its text."""


@attrs.frozen
class Turn:
    """What one request returned.

    ``data`` is the structured answer when the provider delivers it apart from the text
    (Anthropic's forced tool); otherwise a structured answer is read from ``text``.
    """

    text: str
    usage: Usage
    model: str
    finish_reason: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    data: Any = NO_DATA
    refusal: str | None = None


class Where(TypedDict):
    flow: str | None
    node: str | None


def where() -> Where:
    """The flow and node of the step calling the model, for error messages."""
    scope = current_scope()
    if scope is None:
        return {"flow": None, "node": None}
    return {"flow": getattr(scope.sink, "flow_name", None), "node": scope.node_id}


class BaseProvider:
    """The machinery behind every provider; subclasses implement :meth:`_send`."""

    name: ClassVar[str] = "LLM"

    def __init__(
        self,
        *,
        model: str | None = None,
        max_concurrency: int | None = None,
        tokens_per_minute: int | None = None,
        prices: Mapping[str, Any] | None = None,
        batch_api: Any = None,
    ) -> None:
        from ._batch import batch_option

        self.model = model
        self.limits = Limits(max_concurrency, tokens_per_minute)
        self.prices = PriceTable(prices)
        self.batch_api = batch_option(batch_api, type(self).__name__)
        self._secrets: tuple[str, ...] = ()

    def __repr__(self) -> str:
        parts = [f"model={self.model!r}"] if self.model else []
        parts += [f"{k}={v!r}" for k, v in self._repr_fields().items()]
        return f"<flowdsl.llm.{type(self).__name__} {' '.join(parts)}>".replace(" >", ">")

    def _repr_fields(self) -> dict[str, Any]:
        return {}

    # --- what subclasses implement ---------------------------------------------------------

    async def _send(self, exchange: Exchange) -> Turn:
        raise NotImplementedError

    def _batch_jobs(self) -> Any:
        """The provider's batch API (see ``_batch.Jobs``), or ``None`` when it has none."""
        return None

    # --- provider batch APIs ---------------------------------------------------------------

    def batching(self) -> bool:
        """Whether calls made here go through provider batch jobs: ``batch_api`` is set and
        the calling step runs in batch mode (a real-time run calls the live API)."""
        if self.batch_api is None:
            return False
        scope = current_scope()
        return scope is not None and scope.batch_store is not None

    async def cancel_batches(self, run_id: str, store: Any = None) -> list[str]:
        """Withdraw the requests of run *run_id* not yet in a job and cancel the batch jobs
        that hold only its requests; the ids cancelled.

        The jobs this event loop knows (its steps submitted them or wait for them), and,
        with *store* (the run's store), those other processes submitted, which the store
        lists for the run: a context calls this when one of its runs is cancelled, and
        ``ctx.cancel`` does for a run driven anywhere.
        """
        from ._batch import running_collector
        from ._batch_runs import cancel_stored_jobs

        collector = running_collector(self)
        cancelled = [] if collector is None else await collector.cancel_run(run_id, store)
        if store is not None:
            seen = cancelled if collector is None else [*cancelled, *collector.known_jobs()]
            cancelled += await cancel_stored_jobs(self, store, run_id, skip=set(seen))
        return cancelled

    async def aclose(self) -> None:
        """Close the connections this provider holds in the current event loop."""

    async def __aenter__(self) -> BaseProvider:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    def _redact(self, text: str) -> str:
        """*text* with every secret this provider knows replaced by ``***``."""
        for secret in self._secrets:
            if secret:
                text = text.replace(secret, "***")
        return text

    # --- the driver ------------------------------------------------------------------------

    async def chat(
        self,
        messages: Sequence[Message],
        *,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        response_model: Any = None,
        tools: Sequence[Callable[..., Any]] = (),
        stream: bool = False,
        on_token: Callable[[str], None] | None = None,
        max_tool_rounds: int = DEFAULT_MAX_TOOL_ROUNDS,
        options: Mapping[str, Any] | None = None,
    ) -> Reply[Any]:
        """Send *messages*; run tool calls until the model answers; return the answer."""
        model = model or self.model
        if not model:
            raise ConfigError(
                f"no model named for this {self.name} call",
                **where(),
                hint=f"Pass model=... to fd.llm.chat, or a default: fd.llm.{type(self).__name__}"
                "(model=...)",
            )
        specs = tool_specs(tools) if tools else {}
        answer = answer_spec(response_model) if response_model is not None else None
        if answer is not None and answer.name in specs:
            raise ConfigError(
                f"a tool is named {answer.name!r} like the response_model",
                **where(),
                hint="Rename the tool step: @fd.step(name=...)",
            )
        route = None
        if self.batching():
            from ._batch import collector_for

            if stream or on_token is not None:
                raise ConfigError(
                    "a provider batch job cannot stream its answer (TokenDelta events, on_token=)",
                    **where(),
                    hint="Leave stream= and on_token= out of fd.llm.chat in batch mode, or "
                    "pass llm= a provider without batch_api= for this call",
                )
            route = collector_for(self)
        history: Sequence[Message] = messages
        usage = Usage()
        calls = rounds = 0
        made: list[ToolCall] = []
        job: str | None = None
        while True:
            exchange = Exchange(
                model,
                history,
                max_tokens,
                temperature,
                tuple(specs.values()),
                answer,
                stream,
                on_token,
                options,
            )
            if route is not None:
                # No request slot nor token budget: those limit the live API, and a
                # request waiting in a job for hours must not hold one.
                turn, job = await route.send(exchange)
            else:
                async with self.limits.slot(_estimate(history, max_tokens)) as budget:
                    turn = await self._send(exchange)
                    budget.used(turn.usage.total_tokens)
            calls += 1
            usage += turn.usage
            if turn.tool_calls and turn.data is NO_DATA:
                if rounds >= max_tool_rounds:
                    raise self._too_many_rounds(max_tool_rounds, turn)
                rounds += 1
                results = await _run_tools(specs, turn.tool_calls)
                history = [
                    *history,
                    {"role": "assistant", "content": turn.text, "tool_calls": turn.tool_calls},
                    *results,
                ]
                made.extend(turn.tool_calls)
                continue
            parsed = None if answer is None else self._parse(answer, turn)
            price = self.prices.lookup(turn.model or model) or self.prices.lookup(model)
            cost = None if price is None else price.cost(usage)
            if cost is not None and route is not None:
                cost *= BATCH_DISCOUNT
            return Reply(
                text=turn.text if turn.data is NO_DATA else _codec.dumps(turn.data),
                usage=usage,
                model=turn.model or model,
                parsed=parsed,
                tool_calls=tuple(made),
                raw_finish_reason=turn.finish_reason,
                cost=cost,
                calls=calls,
                batch_job=job,
            )

    def _too_many_rounds(self, rounds: int, turn: Turn) -> LLMError:
        names = ", ".join(sorted({c.name for c in turn.tool_calls}))
        return LLMError(
            f"the model still asks for tools ({names}) after {rounds} rounds of tool calls",
            **where(),
            provider=self.name,
            hint="Pass a larger max_tool_rounds= to fd.llm.chat, or tell the model in the "
            "prompt when to stop calling tools",
        )

    def _parse(self, answer: AnswerSpec, turn: Turn) -> Any:
        if turn.refusal:
            raise StructuredOutputError(
                f"the model refused to answer as {answer.name}: {turn.refusal}",
                **where(),
                provider=self.name,
                answer=turn.refusal,
                hint="Rephrase the prompt",
            )
        if turn.data is not NO_DATA:
            data, shown = turn.data, _codec.dumps(turn.data)
        else:
            shown = turn.text
            try:
                data = json.loads(turn.text)
            except ValueError:
                raise StructuredOutputError(
                    f"the model's answer is not JSON, but {answer.name} was asked for; it "
                    f"answered {_clip(turn.text)!r}",
                    **where(),
                    provider=self.name,
                    answer=turn.text,
                    hint=_finish_hint(turn) or "Ask for JSON in the prompt too, or retry the step",
                ) from None
        try:
            return _codec.from_data(answer.unwrap(data), answer.tp, what="the model's answer")
        except CodecError as exc:
            cause = exc.__cause__
            detail = (
                "; ".join(cattrs.transform_error(cause))
                if isinstance(cause, cattrs.BaseValidationError)
                else exc.problem
            )
            raise StructuredOutputError(
                f"the model's answer does not fit {answer.name} ({detail}); it answered "
                f"{_clip(shown)}, and the schema asked for "
                f"{_clip(_codec.dumps(answer.schema), 1000)}",
                **where(),
                provider=self.name,
                answer=shown,
                hint=_finish_hint(turn) or "Retry the step (retries=), or simplify the class",
            ) from exc


def _finish_hint(turn: Turn) -> str | None:
    if turn.finish_reason in ("length", "max_tokens"):
        return "The answer was cut off at max_tokens; pass a larger max_tokens="
    return None


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else f"{text[:limit]}..."


def _estimate(messages: Sequence[Message], max_tokens: int | None) -> int:
    """A cheap guess at a request's tokens: four characters per token, plus its output."""
    chars = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(str(block.get("text", ""))) for block in content)
    return chars // 4 + (max_tokens or 0)


async def _run_tools(specs: Mapping[str, ToolSpec], calls: Sequence[ToolCall]) -> list[Message]:
    """Run the tool calls of one turn (concurrently when there are several)."""
    results: list[Message] = [{} for _ in calls]

    async def one(i: int, call: ToolCall) -> None:
        results[i] = await _run_tool(specs, call)

    if len(calls) == 1:
        await one(0, calls[0])
    else:
        async with anyio.create_task_group() as tg:
            for i, call in enumerate(calls):
                tg.start_soon(one, i, call)
    return results


async def _run_tool(specs: Mapping[str, ToolSpec], call: ToolCall) -> Message:
    """One tool call's result message.  Arguments the model got wrong go back to it as an
    error it can correct; an exception the tool itself raises fails the step."""
    spec = specs.get(call.name)
    if spec is None:
        return _tool_result(call, f"there is no tool named {call.name!r}", error=True)
    kwargs, problem = _arguments(spec, call.arguments)
    if problem is not None:
        return _tool_result(call, problem, error=True)
    if spec.is_async:
        value = await spec.fn(**kwargs)
    else:
        value = await anyio.to_thread.run_sync(functools.partial(spec.fn, **kwargs))
    if isinstance(value, str):
        return _tool_result(call, value)
    return _tool_result(call, _codec.encode(value, what=f"the result of tool {spec.name!r}"))


def _arguments(spec: ToolSpec, arguments: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    if INVALID_JSON in arguments:
        return {}, f"the arguments are not valid JSON: {arguments[INVALID_JSON]!r}"
    unknown = sorted(set(arguments) - set(spec.types))
    missing = sorted(spec.required - set(arguments))
    if unknown or missing:
        parts = [f"unknown parameters {unknown}"] if unknown else []
        parts += [f"missing parameters {missing}"] if missing else []
        return {}, f"invalid arguments for {spec.name}: {'; '.join(parts)}"
    kwargs: dict[str, Any] = {}
    for name, data in arguments.items():
        try:
            kwargs[name] = _codec.from_data(data, spec.types[name], what=f"parameter {name!r}")
        except CodecError as exc:
            return {}, f"invalid arguments for {spec.name}: {exc.problem}"
    return kwargs, None


def _tool_result(call: ToolCall, content: str, *, error: bool = False) -> Message:
    return {
        "role": "tool",
        "tool_call_id": call.id,
        "name": call.name,
        "content": f"Error: {content}" if error else content,
        "is_error": error,
    }
