"""Turning an SDK's exception into an :class:`~flowdsl.llm.LLMError`, at the edge.

Both SDKs raise the same family (``APIStatusError`` with a status code and the decoded
error body, ``APITimeoutError``, ``APIConnectionError``, ``APIError``).  By the time one
reaches us the SDK has already retried what was worth retrying (429, 408, 409, 5xx,
lost connections, honouring ``Retry-After``); what is left is final for this call.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from ._base import where
from ._errors import LLMError

__all__ = ["retryable_status", "translate"]


def retryable_status(status: int) -> bool:
    """Whether a later attempt could succeed after this HTTP status."""
    return status in (408, 409, 429) or status >= 500


def translate(
    sdk: ModuleType,
    exc: BaseException,
    *,
    provider: str,
    model: str,
    url: str,
    key_help: str,
    retries: int,
    redact: Any,
) -> LLMError | None:
    """The :class:`LLMError` for *exc*, or ``None`` when it is not an SDK error."""
    if isinstance(exc, sdk.APIStatusError):
        status = int(exc.status_code)
        said = redact(_what_it_said(exc))
        request_id = getattr(exc, "request_id", None)
        suffix = f" (request id {request_id})" if request_id else ""
        return LLMError(
            f"{provider} answered {status} for model {model!r}: {said}{suffix}",
            **where(),
            hint=_status_hint(status, provider, key_help, retries),
            provider=provider,
            status_code=status,
            retryable=retryable_status(status),
        )
    if isinstance(exc, sdk.APITimeoutError):
        return LLMError(
            f"{provider} did not answer in time for model {model!r} (tried {retries + 1} times)",
            **where(),
            hint=f"Pass a larger timeout= to fd.llm.{provider}(...), or a smaller max_tokens=",
            provider=provider,
            retryable=True,
        )
    if isinstance(exc, sdk.APIConnectionError):
        cause = redact(str(exc.__cause__ or exc))
        return LLMError(
            f"cannot reach {provider} at {url}: {cause} (tried {retries + 1} times)",
            **where(),
            hint="Check the network and base_url=; the step's retries= can try again later",
            provider=provider,
            retryable=True,
        )
    if isinstance(exc, sdk.APIError):
        return LLMError(
            f"{provider} sent an answer that cannot be used: {redact(str(exc))}",
            **where(),
            provider=provider,
            retryable=False,
        )
    return None


def _what_it_said(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return str(inner["message"])
        if isinstance(inner, str):
            return inner
    elif isinstance(body, str) and body:
        return body
    return str(getattr(exc, "message", "") or exc)


def _status_hint(status: int, provider: str, key_help: str, retries: int) -> str:
    if status == 401:
        return f"Check the API key: {key_help}"
    if status == 403:
        return "The key is valid but may not use this model or resource; check its permissions"
    if status == 404:
        return "Check the model name and the base_url"
    if status == 429:
        return (
            f"Still rate limited after {retries} retries; lower max_concurrency= or "
            f"tokens_per_minute= on fd.llm.{provider}(...), or raise max_retries="
        )
    if retryable_status(status):
        return (
            f"The provider failed after {retries} retries; try again later (a step's retries= can)"
        )
    return "The provider refused the request; check the messages, model and options"
