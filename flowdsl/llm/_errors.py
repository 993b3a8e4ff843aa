"""What an LLM call raises.

::

    FlowError
    └── LLMError (RuntimeError)            the provider failed, or its answer was unusable
        └── StructuredOutputError (ValueError)  an answer that does not fit response_model

An :class:`LLMError` says what the provider said (its status code and message), whether
another attempt could help (``retryable``), and keeps the SDK's exception as ``__cause__``.
Transient failures (429, 5xx, lost connections) have already been retried by the provider
with backoff by the time an ``LLMError`` with ``retryable=True`` is raised.
"""

from __future__ import annotations

from .._errors import FlowError

__all__ = ["LLMError", "StructuredOutputError"]


class LLMError(FlowError, RuntimeError):
    """A provider call that failed, or an answer flowdsl could not use.

    ``provider`` names the provider (``"OpenAI"``), ``status_code`` the HTTP status when
    there was one, and ``retryable`` whether trying again later could succeed: false for
    400, 401, 403, 404 and for answers that break the protocol.
    """

    def __init__(
        self,
        problem: str,
        *,
        flow: str | None = None,
        node: str | None = None,
        hint: str | None = None,
        provider: str | None = None,
        status_code: int | None = None,
        retryable: bool = False,
    ) -> None:
        self.provider = provider
        self.status_code = status_code
        self.retryable = retryable
        super().__init__(problem, flow=flow, node=node, hint=hint)


class StructuredOutputError(LLMError, ValueError):
    """The model's answer does not fit the ``response_model`` the call asked for.

    ``answer`` holds what came back (the text, or the tool input, as JSON text). It is not
    a :class:`~flowdsl.CodecError`: another attempt may well produce a valid answer, so a
    step's ``retries`` apply to it.
    """

    def __init__(
        self,
        problem: str,
        *,
        flow: str | None = None,
        node: str | None = None,
        hint: str | None = None,
        provider: str | None = None,
        answer: str = "",
    ) -> None:
        self.answer = answer
        super().__init__(
            problem, flow=flow, node=node, hint=hint, provider=provider, retryable=True
        )
