"""Steps and flows for the provider batch API tests, importable by worker processes."""

from __future__ import annotations

import flowdsl as fd

__all__ = ["ask", "ask_each", "ask_flow"]


@fd.step(retries=2, backoff=0.0)
async def ask(question: str) -> str:
    """One LLM call; a worker that dies running it hands it to another (retries=2)."""
    return (await fd.llm.chat(question, max_tokens=20)).text


@fd.flow
async def ask_flow(question: str) -> str:
    return await ask(question)


@fd.flow
async def ask_each(questions: list[str]) -> list[str]:
    """One request per item: a job of one run's requests only."""
    return await ask.map(questions)
