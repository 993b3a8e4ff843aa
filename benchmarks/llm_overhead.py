"""The engine's cost around an LLM call: a flowdsl step calling ``fd.llm.chat`` beside the SDK.

    python benchmarks/llm_overhead.py [--rounds 11] [--calls 30] [--backend asyncio|trio]

A local server (the one the tests use, ``tests/_llm_server.py``) answers every Chat
Completions request at once, so what is measured is the client side.  In each round,
three systems make *calls* requests one after another, in an order that alternates from
round to round:

- ``sdk``: ``await AsyncOpenAI(...).chat.completions.create(...)``, the bare SDK call;
- ``sdk_post``: the SDK's generic ``client.post("/chat/completions", cast_to=bytes, ...)``
  and ``json.loads``: the route the provider takes (no request transform, no response
  models), as a floor;
- ``chat``: ``await fd.llm.chat(prompt, llm=OpenAI(...))`` outside any flow: the provider;
- ``flow``: ``await ctx.run(flow, prompt)`` of a one-step flow whose step calls
  ``fd.llm.chat``: a whole run (run record, scheduling, the step's journal record, usage).

Prints the median µs per call of each, the median over rounds of each round's ratio to
``sdk``, and the engine's own share: ``flow`` over ``chat``.  Target (issue 7): ``flow``
at most 10% above ``sdk``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio

import flowdsl as fd
import flowdsl.llm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _llm_server import Answer, LLMServer

MODEL = "gpt-4o-mini"
TARGET = 1.10


@fd.step
async def answer(question: str) -> str:
    reply = await fd.llm.chat(question, max_tokens=50)
    return reply.text


@fd.flow
async def ask(question: str) -> str:
    return await answer(question)


async def _per_call(calls: int, one: Callable[[int], Awaitable[Any]]) -> float:
    """Mean seconds per call over *calls* calls made one after another."""
    start = time.perf_counter()
    for i in range(calls):
        await one(i)
    return (time.perf_counter() - start) / calls


async def measure(rounds: int, calls: int, server: LLMServer) -> dict[str, list[float]]:
    import openai

    client = openai.AsyncOpenAI(api_key="sk-bench", base_url=server.openai_url, max_retries=0)
    llm = fd.llm.OpenAI(api_key="sk-bench", base_url=server.openai_url, model=MODEL)

    async def sdk(i: int) -> str:
        response = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"q{i}"}], max_tokens=50
        )
        return response.choices[0].message.content or ""

    async def sdk_post(i: int) -> str:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"q{i}"}],
            "max_tokens": 50,
        }
        raw = await client.post("/chat/completions", cast_to=bytes, body=body)
        return str(json.loads(raw)["choices"][0]["message"]["content"])

    async def chat(i: int) -> str:
        return (await fd.llm.chat(f"q{i}", llm=llm, max_tokens=50)).text

    systems: dict[str, Callable[[int], Awaitable[Any]]] = {
        "sdk": sdk,
        "sdk_post": sdk_post,
        "chat": chat,
    }
    times: dict[str, list[float]] = {name: [] for name in [*systems, "flow"]}
    async with client, llm, fd.Context(llm=llm) as ctx:

        async def flow(i: int) -> str:
            result: str = await ctx.run(ask, f"q{i}")
            return result

        systems["flow"] = flow
        # One untimed round: connections, imports and the tracer are not the steady state.
        for one in systems.values():
            await _per_call(3, one)
        names = list(systems)
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                times[name].append(await _per_call(calls, systems[name]))
    return times


def report(times: dict[str, list[float]], backend: str) -> dict[str, float]:
    figures: dict[str, float] = {}
    sdk = times["sdk"]
    print(f"LLM call overhead ({backend}, {len(sdk)} rounds):")
    for name, values in times.items():
        median_us = statistics.median(values) * 1e6
        ratio = statistics.median([v / s for v, s in zip(values, sdk, strict=True)])
        figures[f"{name}_us"] = median_us
        figures[f"{name}_ratio"] = ratio
        print(f"  {name:8} {median_us:7.0f} µs per call   x{ratio:.3f} of the bare SDK call")
    engine = statistics.median([f / c for f, c in zip(times["flow"], times["chat"], strict=True)])
    figures["engine_ratio"] = engine
    engine_us = figures["flow_us"] - figures["chat_us"]
    print(f"  the engine around the call (flow over chat): x{engine:.3f}, {engine_us:.0f} µs")
    verdict = "met" if figures["flow_ratio"] <= TARGET else "MISSED"
    print(f"  target: flow <= x{TARGET:.2f} of sdk: {verdict}")
    return figures


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description="flowdsl's cost around an LLM call")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--calls", type=int, default=30, help="calls per system per round")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args, _ = parser.parse_known_args(argv)
    with LLMServer() as server:
        server.default = lambda request: Answer("A short answer.", output_tokens=4)
        times = anyio.run(measure, args.rounds, args.calls, server, backend=args.backend)
    return report(times, args.backend)


if __name__ == "__main__":
    main()
