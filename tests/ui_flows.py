"""Flows for the inspector's tests: a support-ticket triage (branches, an LLM call), a
pipeline whose middle step fails, one that waits on a gate the test opens, and one with a
map, a loop and a wait for a signal (``campaign``).

Importable by name (``tests/`` is on ``sys.path``), as ``flowdsl ui --import ui_flows``
would import them.
"""

from __future__ import annotations

import threading

import anyio
import attrs

import flowdsl as fd

GATE = threading.Event()
"""Opened by a test to let ``hold`` (and so the ``gated`` flow) finish."""
FIXED = threading.Event()
"""Set by a test to make ``parse`` succeed (the bug is fixed; resume the run)."""


@attrs.frozen
class Label:
    team: str
    urgent: bool


@fd.step
async def classify(ticket: str) -> Label:
    reply = await fd.llm.chat(f"Which team handles: {ticket}", model="gpt-4o-mini")
    return Label(team=reply.text, urgent="down" in ticket)


@fd.step
async def sentiment(ticket: str) -> float:
    return -0.8 if "angry" in ticket else 0.2


@fd.branch
async def route(label: Label) -> str:
    return "escalate" if label.urgent else "auto"


@fd.step
async def escalate(ticket: str, mood: float) -> str:
    return f"paged on-call for {ticket!r} (mood {mood})"


@fd.step
async def draft_reply(ticket: str, label: Label) -> str:
    reply = await fd.llm.chat(f"Draft a reply to: {ticket}", model="gpt-4o-mini")
    return f"[{label.team}] {reply.text}"


@fd.flow
async def triage(ticket: str) -> str:
    label = await classify(ticket)
    mood = await sentiment(ticket)
    return await route(label).cases(
        escalate=lambda: escalate(ticket, mood),
        auto=lambda: draft_reply(ticket, label),
    )


@fd.step
async def load(path: str) -> list[str]:
    return [f"{path}:{i}" for i in range(3)]


@fd.step
async def parse(lines: list[str]) -> dict[str, int]:
    if not FIXED.is_set():
        raise ValueError(f"cannot parse {lines[1]!r}: expected 'key=value'")
    return {line: len(line) for line in lines}


@fd.step
async def summarize(table: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(table.items()))


@fd.flow
async def ingest(path: str) -> str:
    return await summarize(await parse(await load(path)))


@fd.step
async def prepare(n: int) -> int:
    return n * 10


@fd.step
async def hold(n: int) -> int:
    # A cancelled run abandons the thread; the tests open the gate when they end.
    await anyio.to_thread.run_sync(GATE.wait, abandon_on_cancel=True)
    return n + 1


@fd.step
async def publish(n: int) -> str:
    return f"published {n}"


@fd.flow
async def gated(n: int) -> str:
    return await publish(await hold(await prepare(n)))


@fd.step
async def decide(text: str, ok: bool) -> str:
    return f"{text}: {'approved' if ok else 'refused'}"


@fd.flow
async def approval(text: str) -> str:
    """Waits for signal ``approval`` (a bool), then says what was decided."""
    ok = await fd.wait_for("approval", bool)
    return await decide(text, ok)


@fd.step
async def words(text: str) -> list[str]:
    return text.split()


@fd.step
async def shout(word: str) -> str:
    if word == "boom":
        raise RuntimeError(f"cannot shout {word!r}")
    return word.upper()


@fd.step
async def settle(n: int) -> fd.Continue[int] | fd.Done[str]:
    return fd.Done(f"settled after {n}") if n >= 3 else fd.Continue(n + 1)


@fd.step
async def announce(loud: list[str], settled: str, ok: bool) -> str:
    return f"{' '.join(loud)} ({settled}, {'approved' if ok else 'refused'})"


@fd.flow
async def campaign(text: str) -> str:
    """A map over the words of *text*, a loop of four iterations, then a wait for signal
    ``approve`` (a bool)."""
    loud = await shout.map(await words(text))
    settled = await fd.loop(settle, 0, max_iterations=8)
    ok = await fd.wait_for("approve", bool, after=settled)
    return await announce(loud, settled, ok)
