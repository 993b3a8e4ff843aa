"""A research agent: sources mapped in parallel, an agent loop with tools, a human approval.

The flow::

    find_sources ──> summarize.map(sources) ──> plan ──> fd.loop(agent_turn)
                     (one node; one item per             (one node; one iteration
                      source, concurrently)               per turn, at most 8)
        ──> fd.wait_for("approval") ──> publish
            (one node: the run waits, durably)

- ``summarize.map(sources, question=...)`` is ONE node of the graph; at run time it has one
  item per source, each journaled on its own (``summarize[0]``, ``summarize[1]``, ...) and, in
  batch mode, each a task of its own for the workers.
- ``fd.loop(agent_turn, state, max_iterations=8)``: each turn asks the model, which may call a
  tool (``lookup``, ``calculate``) through ``fd.llm.chat(tools=...)``; the turn returns
  ``fd.Continue(next_state)`` to go on or ``fd.Done(answer)`` to stop.  Every turn is
  journaled (``agent_turn@0``, ``agent_turn@1``, ...): a resume continues after the last one.
- ``fd.wait_for("approval", Approval)`` waits for a person: the run's status is ``waiting``
  and it holds no worker until ``ctx.signal(run_id, "approval", Approval(...))`` (or
  ``flowdsl signal RUN_ID approval --value '{"approved": true, "by": "me"}'``) sends one.

The model is :class:`flowdsl.testing.FakeLLM`, scripted below, so this runs with no key and
no network.  Here the approval comes from this script itself, a moment after the run starts
waiting, as a reviewer's click would.

Run it::

    python examples/research_agent.py                 # in real time
    python examples/research_agent.py --batch         # as tasks on the embedded queue
    python examples/research_agent.py --reject        # the reviewer says no
    flowdsl graph examples/research_agent.py:research
"""

from __future__ import annotations

import argparse
import re
import tempfile
from typing import Any, ClassVar

import anyio
import attrs

import flowdsl as fd
from flowdsl.testing import FakeLLM, FakeReply

MODEL = "fake-research-model"

# --- values -------------------------------------------------------------------------------


@attrs.frozen
class AgentState:
    question: str
    notes: list[str]
    findings: list[str] = attrs.field(factory=list)
    turn: int = 0


@attrs.frozen
class Approval:
    approved: bool
    by: str = "someone"


@attrs.frozen
class Report:
    question: str
    answer: str
    sources: int
    turns: int
    approved: bool
    reviewer: str


# --- tools the model may call -------------------------------------------------------------

FACTS = {
    "otters": "Sea otters use rocks as tools and hold hands while sleeping.",
    "kelp": "Kelp forests grow up to 60 cm a day.",
    "urchins": "Otters eat urchins, which would otherwise eat the kelp.",
}


@fd.step
async def lookup(topic: str) -> str:
    """Look a topic up in the (tiny) encyclopedia."""
    return FACTS.get(topic.lower(), f"nothing known about {topic}")


@fd.step
async def calculate(expression: str) -> str:
    """Multiply two numbers written as 'a * b'."""
    a, b = (float(x) for x in expression.split("*"))
    return f"{a * b:g}"


# --- the steps ------------------------------------------------------------------------------


@fd.step
async def find_sources(question: str) -> list[str]:
    reply = await fd.llm.chat(f"List sources for: {question}", model=MODEL)
    return [line.strip("- ") for line in reply.text.splitlines() if line.strip()]


@fd.step(retries=2)
async def summarize(source: str, question: str) -> str:
    reply = await fd.llm.chat(f"Summarize {source} for the question: {question}", model=MODEL)
    return reply.text


@fd.step
async def plan(question: str, notes: list[str]) -> AgentState:
    return AgentState(question, notes)


@fd.step(retries=2)
async def agent_turn(state: AgentState) -> fd.Continue[AgentState] | fd.Done[str]:
    prompt = (
        f"Turn {state.turn} on: {state.question}\n"
        f"Notes: {' | '.join(state.notes)}\nFindings so far: {' | '.join(state.findings)}"
    )
    reply = await fd.llm.chat(prompt, model=MODEL, tools=[lookup, calculate], max_tool_rounds=1)
    if reply.tool_calls:  # the model used a tool: another turn, with what it found
        found = f"{reply.tool_calls[0].name}: {reply.text}"
        return fd.Continue(
            attrs.evolve(state, findings=[*state.findings, found], turn=state.turn + 1)
        )
    return fd.Done(reply.text)


@fd.step
async def publish(question: str, answer: str, sources: list[str], approval: Approval) -> Report:
    turns = answer.count("|") + 1
    return Report(question, answer, len(sources), turns, approval.approved, approval.by)


@fd.flow
async def research(question: str) -> Report:
    sources = await find_sources(question)
    notes = await summarize.map(sources, question=question)
    state = await plan(question, notes)
    answer = await fd.loop(agent_turn, state, max_iterations=8)
    approval = await fd.wait_for("approval", Approval, timeout=3600, after=answer)
    return await publish(question, answer, sources, approval)


# --- the scripted model ---------------------------------------------------------------------


class ScriptedResearcher:
    """Answers like a careful model: sources, summaries, then tool calls turn by turn."""

    TOOLS: ClassVar = [("lookup", {"topic": "otters"}), ("lookup", {"topic": "urchins"})]

    def __init__(self) -> None:
        self.asked: dict[str, int] = {}

    def __call__(self, prompt: str) -> Any:
        if prompt.startswith("List sources"):
            return "- field notes\n- marine survey 2021\n- kelp atlas"
        if prompt.startswith("Summarize"):
            source = prompt.split(" for the question")[0].removeprefix("Summarize ")
            return f"{source}: otters keep urchins in check"
        turn = int(re.match(r"Turn (\d+)", prompt)[1])  # type: ignore[index]
        # The same prompt comes twice in a turn: first the model asks for a tool, then it
        # reads the tool's answer and says what it learned.
        seen = self.asked[prompt] = self.asked.get(prompt, 0) + 1
        if turn < len(self.TOOLS):
            if seen % 2:
                return FakeReply(tool_calls=[self.TOOLS[turn]])
            return f"learned from tool call {turn + 1}"
        findings = prompt.split("Findings so far: ")[1]
        return f"Otters protect kelp forests by eating urchins | {findings}"


# --- running it -----------------------------------------------------------------------------


async def main(batch: bool, approve: bool) -> None:
    llm = FakeLLM(ScriptedResearcher(), model=MODEL)
    with tempfile.TemporaryDirectory() as directory:
        store = f"sqlite:///{directory}/research.db"
        ctx = fd.Context(batch=True, store=store, llm=llm) if batch else fd.Context(llm=llm)
        async with ctx:
            run = await ctx.start(research, "Why do sea otters matter to kelp?", run_id="otters")
            async for event in run.events():
                if isinstance(event, fd.events.MapStarted):
                    print(f"summarizing {event.items} sources ({event.node_id}.map)")
                elif isinstance(event, fd.events.StepFinished) and "@" in event.node_id:
                    print(f"agent turn {event.node_id.split('@')[1]} done")
                elif isinstance(event, fd.events.RunWaiting):
                    status = (await ctx.store.get_run(run.run_id)).status.value  # type: ignore[union-attr]
                    print(f"run {run.run_id} is {status} for {', '.join(event.waits)}")
                    # The reviewer answers; from a shell this would be
                    # `flowdsl signal otters approval --value '{"approved": true}' --store ...`.
                    await ctx.signal(run.run_id, "approval", Approval(approve, "the reviewer"))
            report: Report = await run.result()
    verdict = "approved" if report.approved else "rejected"
    print(f"{verdict} by {report.reviewer}: {report.answer.split(' | ')[0]}")
    mode = "batch" if batch else "real time"
    print(f"{report.sources} sources, {report.turns} agent turns, mode: {mode}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", action="store_true", help="run as tasks on a durable queue")
    parser.add_argument("--reject", action="store_true", help="the reviewer rejects the answer")
    args = parser.parse_args()
    anyio.run(main, args.batch, not args.reject)
