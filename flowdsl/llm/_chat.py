"""``fd.llm.chat``: one LLM call from inside a step, on the step's provider."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .. import _otel
from .._engine.runner import current_scope
from .._errors import ConfigError
from ._base import DEFAULT_MAX_TOOL_ROUNDS
from ._types import Message, Reply

__all__ = ["chat"]


async def chat(
    prompt: str | Sequence[Message],
    /,
    *,
    model: str | None = None,
    llm: Any = None,
    system: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    response_model: Any = None,
    tools: Sequence[Callable[..., Any]] = (),
    stream: bool | None = None,
    on_token: Callable[[str], None] | None = None,
    max_tool_rounds: int = DEFAULT_MAX_TOOL_ROUNDS,
    options: Mapping[str, Any] | None = None,
) -> Reply[Any]:
    """Ask a model; return its :class:`~flowdsl.llm.Reply` (``.text``, ``.usage``, ``.parsed``).

    *prompt* is one user message, or a list of messages (``{"role": ..., "content":
    ...}``); *system* is prepended as a system message.  The provider is *llm*, else the
    one the running step's context was given (``fd.Context(llm=...)``); *model* defaults
    to the provider's ``model=``.

    - *response_model*: an attrs class or dataclass (or a list, an enum, ...): the model
      is asked for JSON of that shape and ``reply.parsed`` is the instance;
      :class:`~flowdsl.llm.StructuredOutputError` when the answer does not fit.
    - *tools*: steps (or plain functions) the model may call; each call runs the step's
      function and its result goes back to the model, for at most *max_tool_rounds* rounds.
    - *stream*: by default the answer streams when someone watches the run (an
      ``on_event`` callback, ``run.events()``), as ``TokenDelta`` events, or when
      *on_token* is given; the reply holds the full text either way.  A call through a
      provider batch job (``batch_api=``, in batch mode) does not stream, and asking it to
      is a :class:`~flowdsl.ConfigError`.
    - *options*: more fields for the request's JSON body, sent as they are (``top_p``,
      ``stop``, ``seed``, ...); they override what flowdsl would send.

    Inside a step the call's tokens, cost and count are added to the node's record.
    """
    scope = current_scope()
    provider = llm if llm is not None else (scope.llm if scope is not None else None)
    if provider is None:
        raise _no_provider(scope)
    messages: Sequence[Message] = (
        [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    )
    if system is not None:
        messages = [{"role": "system", "content": system}, *messages]
    observed = scope is not None and scope.sink.observed
    if stream is None:
        # A provider batch job cannot stream: watchers then see the answer at the end.
        batching = getattr(provider, "batching", None)
        stream = on_token is not None or (observed and not (batching and batching()))
    sink = _token_sink(scope.token if observed and scope is not None else None, on_token)
    call = provider.chat(
        messages,
        model=model,
        max_tokens=max_tokens,
        temperature=temperature,
        response_model=response_model,
        tools=tools,
        stream=stream,
        on_token=sink if stream else None,
        max_tool_rounds=max_tool_rounds,
        options=options,
    )
    if _otel.tracing:  # OpenTelemetry: a GenAI client span around the call
        options_ = {"max_tokens": max_tokens, "temperature": temperature}
        call = _otel.llm_call(provider, model, options_, call)
    reply: Reply[Any] = await call
    if scope is not None:
        usage = reply.usage
        counts: dict[str, Any] = {
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "calls": reply.calls,
        }
        if reply.cost is not None:
            counts["cost"] = reply.cost
        batch_job = getattr(reply, "batch_job", None)
        if batch_job is not None:
            counts["batch_calls"] = reply.calls
            counts["batch_job"] = batch_job
        scope.add_usage(**counts)
    return reply


def _token_sink(
    first: Callable[[str], None] | None, second: Callable[[str], None] | None
) -> Callable[[str], None] | None:
    if first is None or second is None:
        return first or second

    def both(text: str) -> None:
        first(text)
        second(text)

    return both


def _no_provider(scope: Any) -> ConfigError:
    if scope is None:
        return ConfigError(
            "fd.llm.chat was called outside a step, and without llm=",
            hint="Pass a provider: `await fd.llm.chat(prompt, llm=fd.llm.OpenAI())`, or call "
            "it from a step of a flow run in `fd.Context(llm=...)`",
        )
    return ConfigError(
        "no LLM provider: the context running this step has none, and the call gave no llm=",
        flow=getattr(scope.sink, "flow_name", None),
        node=scope.node_id,
        hint="Give the context one: fd.Context(llm=fd.llm.OpenAI()), or pass llm= to fd.llm.chat",
    )
