"""The provider batch API of :class:`~flowdsl.testing.FakeLLM`: jobs kept in memory.

A job ends as soon as it is submitted; its lines are the script's answers (a scripted
failure becomes an errored line).  It goes through the same collector, journal and
accounting as OpenAI's and Anthropic's jobs, so a test of a batch flow with
``FakeLLM(batch_api=True)`` sees requests collected into jobs, the batch discount and the
``batch_job`` in the usage; what it cannot see is a job that outlives its process.
"""

from __future__ import annotations

import itertools
from typing import Any

from ..llm._base import Exchange, Turn
from ..llm._batch import JobState, Line
from ..llm._errors import LLMError

__all__ = ["FakeJobs"]


class FakeJobs:
    """Jobs of :class:`~flowdsl.testing.FakeLLM` requests, answered from its script."""

    endpoint = "fake"
    max_requests = 100_000
    max_bytes = 1 << 40

    def __init__(self, provider: Any) -> None:
        self.provider = provider
        self._ids = itertools.count(1)
        self._exchanges: dict[str, Exchange] = {}  # custom id -> the request, until it ran
        self._lines: dict[str, dict[str, Line]] = {}

    def line(self, custom_id: str, exchange: Exchange) -> tuple[dict[str, Any], str]:
        self._exchanges[custom_id] = exchange
        # What the journal compares between two attempts: the conversation, as text.
        asked = [[str(m.get("role")), str(m.get("content"))] for m in exchange.messages]
        return {"custom_id": custom_id, "model": exchange.model, "messages": asked}, exchange.model

    async def create(self, lines: list[dict[str, Any]], model: str) -> str:
        job_id = f"fakebatch_{next(self._ids)}"
        ids = [line["custom_id"] for line in lines]
        self.provider.batch_jobs[job_id] = ids
        results: dict[str, Line] = {}
        for cid in ids:
            exchange = self._exchanges.pop(cid)
            try:
                results[cid] = Line(cid, body=await self.provider._send(exchange))
            except LLMError as exc:
                results[cid] = Line(
                    cid, error=exc.problem, status_code=exc.status_code, retryable=exc.retryable
                )
        self._lines[job_id] = results
        return job_id

    async def state(self, job_id: str) -> JobState:
        return JobState(True, "completed")

    async def results(self, job_id: str, state: JobState, wanted: set[str]) -> dict[str, Line]:
        lines = self._lines.get(job_id, {})
        return {cid: line for cid, line in lines.items() if cid in wanted}

    async def cancel(self, job_id: str) -> None:
        pass  # its jobs end as they are submitted

    def turn(self, body: Any, exchange: Exchange) -> Turn:
        assert isinstance(body, Turn)
        return body
