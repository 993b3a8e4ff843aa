"""Steps and flows for the OpenTelemetry tests (imported by worker processes by name)."""

from __future__ import annotations

import flowdsl as fd

_FAILED: set[str] = set()


@fd.step
async def ask(topic: str) -> str:
    reply = await fd.llm.chat(f"Tell me about {topic}", model="gpt-4o-mini")
    return reply.text


@fd.step(retries=1)
async def flaky(text: str) -> int:
    # The first attempt per process fails, so the node span records a retry.
    if text not in _FAILED:
        _FAILED.add(text)
        raise ConnectionError("the first attempt fails")
    return len(text)


@fd.step
async def double(n: int) -> int:
    return 2 * n


@fd.step
async def boom(n: int) -> int:
    raise ValueError(f"boom {n}")


@fd.flow
async def traced(topic: str) -> int:
    text = await ask(topic)
    return await double(await flaky(text))


@fd.flow
async def plain(n: int) -> int:
    return await double(await double(n))


@fd.flow
async def failing(n: int) -> int:
    return await boom(await double(n))
