"""OpenAI's Batch API, for the collector in ``_batch``: Files + Batches through the SDK.

A job is a JSONL file of ``{custom_id, method, url, body}`` lines uploaded with
``files.create(purpose="batch")``, then ``batches.create(input_file_id, endpoint,
completion_window="24h")``; ``batches.retrieve`` says how it stands (validating,
in_progress, finalizing, then completed, expired, cancelled or failed).  An ended job's
answers are in its output file and its failed lines in its error file, in no particular
order; lines that never ran (the job expired or was cancelled first) are in the error file
as ``batch_expired`` / ``batch_cancelled``, or in neither file.
"""

from __future__ import annotations

import json
from contextlib import aclosing
from typing import Any, Final

from ._base import Exchange
from ._batch import JobState, Line
from ._batch_journal import counts, encode_lines
from ._errors import LLMError
from ._sdk import SDKJobs
from ._translate import retryable_status

__all__ = ["OpenAIJobs"]

_ENDED: Final = frozenset({"completed", "expired", "cancelled", "failed"})
_NOT_RUN: Final = frozenset({"batch_expired", "batch_cancelled"})


class OpenAIJobs(SDKJobs):
    """Jobs of :class:`~flowdsl.llm.OpenAI` requests to ``/v1/chat/completions``."""

    endpoint = "/v1/chat/completions"
    max_requests = 50_000
    max_bytes = 190 * 1024 * 1024  # the limit is 200 MB a file; room for the multipart

    def line(self, custom_id: str, exchange: Exchange) -> tuple[dict[str, Any], str]:
        body = self.provider._body(exchange)
        line = {"custom_id": custom_id, "method": "POST", "url": self.endpoint, "body": body}
        return line, exchange.model

    async def create(self, lines: list[dict[str, Any]], model: str) -> str:
        client = self.provider._client.get()
        data = encode_lines(lines)
        try:
            uploaded = await client.files.create(
                file=("flowdsl-batch.jsonl", data, "application/jsonl"), purpose="batch"
            )
            job = await client.batches.create(
                input_file_id=uploaded.id,
                endpoint=self.endpoint,
                completion_window="24h",
                metadata={"created_by": "flowdsl"},
            )
        except Exception as exc:
            raise self._error(exc, model) from exc
        return str(job.id)

    async def state(self, job_id: str) -> JobState:
        client = self.provider._client.get()
        try:
            job = await client.batches.retrieve(job_id)
        except Exception as exc:
            raise self._error(exc, "") from exc
        status = str(job.status)
        failed = None
        if status == "failed":
            errors = job.errors.data if job.errors is not None and job.errors.data else []
            failed = "; ".join(str(e.message) for e in errors) or "no reason given"
        files = tuple(f for f in (job.output_file_id, job.error_file_id) if f)
        return JobState(status in _ENDED, status, failed, files, counts(job.request_counts))

    async def results(self, job_id: str, state: JobState, wanted: set[str]) -> dict[str, Line]:
        client = self.provider._client.get()
        lines: dict[str, Line] = {}
        try:
            for file_id in state.files:
                content = client.files.with_streaming_response.content(file_id)
                async with content as response, aclosing(response.iter_lines()) as texts:
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
            await client.batches.cancel(job_id)
        except Exception as exc:
            raise self._error(exc, "") from exc


def _line(text: str, wanted: set[str]) -> Line | None:
    """One line of an output or error file, if it is one of *wanted*."""
    if not text.strip():
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None  # not ours to judge: a line we cannot read is a line that did not run
    if not isinstance(data, dict):
        return None
    cid = data.get("custom_id")
    if not isinstance(cid, str) or cid not in wanted:
        return None
    error = data.get("error")
    if isinstance(error, dict):
        if error.get("code") in _NOT_RUN:
            return Line(cid)
        return Line(cid, error=f"{error.get('code')}: {error.get('message')}")
    response = data.get("response")
    if not isinstance(response, dict):
        return Line(cid)
    status = response.get("status_code")
    body = response.get("body")
    if status == 200 and isinstance(body, dict) and body.get("choices"):
        return Line(cid, body=body)
    said = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(said, dict):
        said = said.get("message", said)
    code = status if isinstance(status, int) else None
    return Line(
        cid,
        error=f"{status}: {said}",
        status_code=code,
        retryable=code is not None and retryable_status(code),
    )
