"""A flow that mixes OpenAI and Anthropic steps, fails half-way, and is resumed.

The finished LLM steps are checkpointed; the resume must take their results from the
journal and send none of their requests again (the local server counts requests).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import flowdsl as fd
import flowdsl.llm
from flowdsl import events as ev

from _llm_server import LLMServer

pytestmark = pytest.mark.anyio

KEY = "sk-resume-SECRET-9876543210"

# The providers of the running test; steps pick theirs per call (llm=).
PROVIDERS: dict[str, flowdsl.llm.BaseProvider] = {}
GATE = {"open": False}


@fd.step
async def summarize(text: str) -> str:
    reply = await fd.llm.chat(f"summarize {text}", llm=PROVIDERS["openai"])
    return reply.text


@fd.step
async def critique(text: str) -> str:
    reply = await fd.llm.chat(f"critique {text}", llm=PROVIDERS["anthropic"])
    return reply.text


@fd.step
async def publish(summary: str, review: str) -> str:
    if not GATE["open"]:
        raise ConnectionError("the publishing service is down")
    return f"{summary} | {review}"


@fd.step
async def announce(post: str) -> str:
    reply = await fd.llm.chat(f"announce {post}", llm=PROVIDERS["openai"])
    return reply.text


@fd.step
async def translate(post: str) -> str:
    reply = await fd.llm.chat(f"translate {post}", llm=PROVIDERS["anthropic"])
    return reply.text


@fd.flow
async def newsletter(text: str) -> list[str]:
    summary = await summarize(text)
    review = await critique(text)
    post = await publish(summary, review)
    return [await announce(post), await translate(post)]


@pytest.fixture
def server() -> Iterator[LLMServer]:
    with LLMServer() as server:
        yield server


@pytest.fixture
async def providers(server: LLMServer) -> Any:
    openai = fd.llm.OpenAI(api_key=KEY, base_url=server.openai_url, model="gpt-4o-mini")
    anthropic = fd.llm.Anthropic(api_key=KEY, base_url=server.anthropic_url, model="claude-x")
    PROVIDERS.update(openai=openai, anthropic=anthropic)
    GATE["open"] = False
    async with openai, anthropic:
        yield PROVIDERS
    PROVIDERS.clear()


def prompts(server: LLMServer) -> list[tuple[str, str]]:
    return [(r.protocol, r.last_user_text) for r in server.requests]


@pytest.mark.usefixtures("providers")
async def test_resume_sends_no_finished_llm_call_again(server: LLMServer) -> None:
    events: list[Any] = []
    async with fd.Context(on_event=events.append) as ctx:
        with pytest.raises(fd.StepFailed) as info:
            await ctx.run(newsletter, "the news", run_id="nl-1")
        assert info.value.node_id == "publish"
        assert sorted(prompts(server)) == [
            ("anthropic", "critique the news"),
            ("openai", "summarize the news"),
        ]
        GATE["open"] = True
        events.clear()
        result = await ctx.resume("nl-1")
        nodes = await ctx.store.load_nodes("nl-1")
    post = "echo: summarize the news | echo: critique the news"
    assert result == [f"echo: announce {post}", f"echo: translate {post}"]
    # Two requests before the failure, two after: the finished ones were not sent again.
    assert server.count("openai") == 2
    assert server.count("anthropic") == 2
    assert sorted(prompts(server)[2:]) == [
        ("anthropic", f"translate {post}"),
        ("openai", f"announce {post}"),
    ]
    reused = {e.node_id for e in events if isinstance(e, ev.StepReused)}
    assert reused == {"summarize", "critique"}
    # Usage survives in the journal, for the steps of both runs.
    for node_id in ("summarize", "critique", "announce", "translate"):
        usage = nodes[node_id].usage
        assert usage is not None
        assert usage["calls"] == 1
        assert usage["input_tokens"] == 11


@pytest.mark.usefixtures("providers")
async def test_resume_in_a_fresh_context_over_sqlite(server: LLMServer, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    async with fd.Context(store=url) as ctx:
        with pytest.raises(fd.StepFailed):
            await ctx.run(newsletter, "today", run_id="nl-2")
    before = server.count()
    assert before == 2
    GATE["open"] = True
    # A new context over the same file stands for the process that picks the run up.
    async with fd.Context(store=url) as ctx:
        result = await ctx.resume("nl-2", flow=newsletter)
        record = await ctx.store.get_run("nl-2")
        nodes = await ctx.store.load_nodes("nl-2")
    assert len(result) == 2
    assert server.count() == before + 2
    assert record is not None
    assert record.status is fd.RunStatus.FINISHED
    stored = repr(record) + repr(nodes)
    assert KEY not in stored
