"""OpenTelemetry spans for runs, nodes and LLM calls, at no cost when nobody traces.

flowdsl never imports OpenTelemetry itself.  An application that wants traces installs
``flowdsl[otel]`` and sets a tracer provider (``trace.set_tracer_provider(...)``, or the
``opentelemetry-instrument`` launcher); doing so imports ``opentelemetry.trace``, which
is how this module knows: it looks the module up in ``sys.modules`` and asks it whether a
provider other than the API's default proxy is set.  Until a run finds one, every hook
below is a global flag test (:data:`tracing`), so the engine's hot path pays nothing.

What is traced:

- a run: one span, ``flowdsl.run <flow>``, around the whole drive (a resume is a new span);
- a node: one span, ``flowdsl.node <node id>``, around all of its attempts, a child of its
  run's span; a retried attempt is an event on it, ``flowdsl.attempt`` says the last one;
- an LLM call made with ``fd.llm.chat``: a client span, ``chat <model>``, with the GenAI
  semantic-convention attributes, a child of its node's span.

In batch mode the run's span context travels in each task message (W3C ``traceparent``,
in :attr:`~flowdsl.backends.messages.TaskMessage.trace`), so the node span a worker makes
in another process joins the client's trace.  The carrier is data from a queue, so it is
size-checked and handed to the W3C propagator, which parses it strictly.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar

from ._version import __version__

__all__ = ["carrier", "configured", "llm_call", "node_span", "run_span", "tracing"]

T = TypeVar("T")

tracing = False
"""True once a run in this process found a tracer provider; node hooks test only this."""

_MAX_CARRIER = 1024  # characters of a task's trace carrier: a traceparent is 55


def configured() -> Any:
    """The ``opentelemetry.trace`` module when the application set a tracer provider,
    else ``None`` (without importing anything)."""
    api = sys.modules.get("opentelemetry.trace")
    if api is None:
        return None
    try:
        provider = api.get_tracer_provider()
    except Exception:  # a broken provider configuration must not break runs
        return None
    if isinstance(provider, api.ProxyTracerProvider):
        return None
    global tracing
    tracing = True
    return api


def _tracer(api: Any) -> Any:
    return api.get_tracer("flowdsl", __version__)


def _error(api: Any, span: Any, exc: BaseException, status: str) -> None:
    span.set_attribute("flowdsl.status", status)
    if status == "cancelled":
        span.set_status(api.Status(api.StatusCode.ERROR, "cancelled"))
        return
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    span.record_exception(cause)
    span.set_status(api.Status(api.StatusCode.ERROR, str(exc)[:500]))


def _status_of(exc: BaseException) -> str:
    import anyio

    try:
        cancelled = anyio.get_cancelled_exc_class()
    except Exception:  # no async library is running (a synchronous caller)
        return "failed"
    return "cancelled" if isinstance(exc, cancelled) else "failed"


@contextlib.contextmanager
def run_span(run: Any) -> Iterator[None]:
    """A span around one drive of *run* (its attempt at finishing), made current so that
    the node tasks the scheduler spawns inherit it."""
    api = configured()
    if api is None:
        yield
        return
    attributes = {
        "flowdsl.run_id": run.run_id,
        "flowdsl.flow": run.flow_name,
        "flowdsl.resumed": bool(getattr(run, "resuming", False)),
    }
    with _tracer(api).start_as_current_span(
        f"flowdsl.run {run.flow_name}",
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield
        except BaseException as exc:
            _error(api, span, exc, _status_of(exc))
            raise
        span.set_attribute("flowdsl.status", "finished")
        usage = getattr(run, "usage", None) or {}
        _usage_attributes(span, usage)


async def node_span(
    sink: Any, node: Any, work: Awaitable[T], *, parent: dict[str, str] | None = None
) -> T:
    """Await *work* (a node's attempts) inside a span for the node.

    *parent* is the carrier a task message brought (batch workers); without it the span
    is a child of the current one (the run's, in real time).
    """
    api = configured()
    if api is None:
        return await work
    context = _extract(parent) if parent else None
    attributes = {
        "flowdsl.run_id": sink.run_id,
        "flowdsl.flow": sink.flow_name,
        "flowdsl.node_id": node.id,
        "flowdsl.step": node.name,
        "flowdsl.kind": node.kind.value,
        "flowdsl.attempt": 1,
    }
    with _tracer(api).start_as_current_span(
        f"flowdsl.node {node.id}",
        context=context,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            result: Any = await work
        except BaseException as exc:
            _error(api, span, exc, _status_of(exc))
            raise
        record = result[0] if isinstance(result, tuple) and result else None
        attempts = getattr(record, "attempts", None)
        if isinstance(attempts, int):
            span.set_attribute("flowdsl.attempt", max(attempts, 1))
            span.set_attribute("flowdsl.status", "cached" if attempts == 0 else "finished")
        usage = getattr(record, "usage", None) or {}
        _usage_attributes(span, usage)
        return result  # type: ignore[no-any-return]


def attempt_started(attempt: int) -> None:
    """A node's attempt begins: the node span says which one (after a retry, the last)."""
    api = configured()
    if api is not None:
        api.get_current_span().set_attribute("flowdsl.attempt", attempt)


def attempt_failed(exc: BaseException, attempt: int, delay: float) -> None:
    """An attempt failed and another follows: an event on the node span."""
    api = configured()
    if api is not None:
        api.get_current_span().add_event(
            "flowdsl.retry",
            {
                "flowdsl.attempt": attempt,
                "flowdsl.delay": delay,
                "exception.type": type(exc).__name__,
                "exception.message": str(exc)[:500],
            },
        )


async def llm_call(
    provider: Any, model: str | None, options: dict[str, Any], call: Awaitable[T]
) -> T:
    """Await an LLM *call* inside a client span with the GenAI semantic-convention
    attributes (system, request and response model, input and output tokens)."""
    api = configured()
    if api is None:
        return await call
    system = str(getattr(provider, "name", type(provider).__name__)).lower()
    requested = model or getattr(provider, "model", None) or ""
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.system": system,
        "gen_ai.provider.name": system,
        "gen_ai.request.model": requested,
    }
    for key, value in options.items():
        if value is not None:
            attributes[f"gen_ai.request.{key}"] = value
    with _tracer(api).start_as_current_span(
        f"chat {requested}".rstrip(),
        kind=api.SpanKind.CLIENT,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            reply: Any = await call
        except BaseException as exc:
            _error(api, span, exc, _status_of(exc))
            raise
        usage = getattr(reply, "usage", None)
        if getattr(reply, "model", None):
            span.set_attribute("gen_ai.response.model", reply.model)
        if usage is not None:
            span.set_attribute("gen_ai.usage.input_tokens", usage.input_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", usage.output_tokens)
        return reply  # type: ignore[no-any-return]


def carrier() -> dict[str, str]:
    """The current span context as W3C headers, for a task message (empty when nobody
    traces)."""
    if not tracing:
        return {}
    api = configured()
    if api is None:
        return {}
    from opentelemetry.propagate import inject

    headers: dict[str, str] = {}
    inject(headers)
    return headers


def _extract(headers: dict[str, str]) -> Any:
    # Data from a queue: only short text values reach the propagator.
    if sum(len(k) + len(v) for k, v in headers.items()) > _MAX_CARRIER:
        return None
    from opentelemetry.propagate import extract

    return extract({k: v for k, v in headers.items() if isinstance(v, str)})


def _usage_attributes(span: Any, usage: dict[str, Any]) -> None:
    for key in ("input_tokens", "output_tokens", "cost", "calls"):
        value = usage.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            span.set_attribute(f"flowdsl.usage.{key}", value)
