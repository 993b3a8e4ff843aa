"""Anthropic's Message Batches, for the collector in ``_batch``, through the SDK.

A job is ``messages.batches.create(requests=[{custom_id, params}])``; its
``processing_status`` goes from in_progress (through canceling) to ended.  An ended job's
results stream as JSONL, in no particular order, one ``{custom_id, result}`` per request,
where ``result.type`` is succeeded (with the message), errored, canceled or expired.
"""

from __future__ import annotations

import json
from contextlib import aclosing
from typing import Any, Final

from ._base import Exchange
from ._batch import JobState, Line
from ._batch_journal import counts
from ._errors import LLMError
from ._sdk import SDKJobs

__all__ = ["AnthropicJobs"]

# Errors of a line that a later attempt may not meet.
_TRANSIENT: Final = frozenset({"api_error", "overloaded_error", "rate_limit_error"})


class AnthropicJobs(SDKJobs):
    """Jobs of :class:`~flowdsl.llm.Anthropic` requests to ``/v1/messages``."""

    endpoint = "/v1/messages"
    max_requests = 100_000
    max_bytes = 250 * 1024 * 1024  # the limit is 256 MB a job

    def line(self, custom_id: str, exchange: Exchange) -> tuple[dict[str, Any], str]:
        return {"custom_id": custom_id, "params": self.provider._body(exchange)}, exchange.model

    async def create(self, lines: list[dict[str, Any]], model: str) -> str:
        client = self.provider._client.get()
        try:
            # The SDK's generic request: its typed create() would walk every request of a
            # job (up to 100,000) to transform what we already built as the wire wants it.
            raw = await client.post("/v1/messages/batches", cast_to=bytes, body={"requests": lines})
        except Exception as exc:
            raise self._error(exc, model) from exc
        data = json.loads(raw)
        if not isinstance(data, dict) or not isinstance(data.get("id"), str):
            raise LLMError(
                f"{self.provider.name} accepted the batch job but sent no id: {raw[:200]!r}",
                provider=self.provider.name,
            )
        return str(data["id"])

    async def state(self, job_id: str) -> JobState:
        client = self.provider._client.get()
        try:
            job = await client.messages.batches.retrieve(job_id)
        except Exception as exc:
            raise self._error(exc, "") from exc
        status = str(job.processing_status)
        return JobState(status == "ended", status, counts=counts(job.request_counts))

    async def results(self, job_id: str, state: JobState, wanted: set[str]) -> dict[str, Line]:
        client = self.provider._client.get()
        lines: dict[str, Line] = {}
        try:
            stream = client.messages.batches.with_streaming_response.results(job_id)
            async with stream as response, aclosing(response.iter_lines()) as texts:
                async for text in texts:
                    line = _line(text, wanted)
                    if line is not None:
                        lines[line.custom_id] = line
        except LLMError:
            raise
        except Exception as exc:
            raise self._error(exc, "") from exc
        return lines

    async def cancel(self, job_id: str) -> None:
        client = self.provider._client.get()
        try:
            await client.messages.batches.cancel(job_id)
        except Exception as exc:
            raise self._error(exc, "") from exc


def _line(text: str, wanted: set[str]) -> Line | None:
    """One line of the results, if it is one of *wanted*."""
    if not text.strip():
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None  # a line we cannot read is a line that did not run
    if not isinstance(data, dict):
        return None
    cid = data.get("custom_id")
    result = data.get("result")
    if not isinstance(cid, str) or cid not in wanted or not isinstance(result, dict):
        return None
    kind = result.get("type")
    if kind == "succeeded" and isinstance(result.get("message"), dict):
        return Line(cid, body=result["message"])
    if kind == "errored":
        error = result.get("error")
        inner = error.get("error", error) if isinstance(error, dict) else {}
        if not isinstance(inner, dict):
            inner = {}
        what = inner.get("type", "error")
        return Line(
            cid,
            error=f"{what}: {inner.get('message', '')}",
            retryable=what in _TRANSIENT,
        )
    return Line(cid)  # canceled or expired: it did not run
