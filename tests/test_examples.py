"""The examples run as their README says, and do what they claim.

Every script in ``examples/`` runs as a subprocess and must exit 0 printing what it is known
to print; the support-triage flow also runs in-process on both event loops, where its events
show the three independent calls overlapping.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import flowdsl as fd
from flowdsl import events as ev

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FAST = {"TRIAGE_LATENCY": "0.01"}  # the stand-in model's delay, so the suite stays quick

# What each sample ticket comes to: (action, label, language, sentiment, team).
TRIAGED = {
    "T-1": ("auto-replied", "billing", "en", "neutral", None),
    "T-2": ("escalated", "bug", "en", "neutral", "engineering"),
    "T-3": ("auto-replied", "account", "fr", "neutral", None),
    "T-4": ("escalated", "billing", "de", "angry", "billing"),
    "T-5": ("auto-replied", "question", "en", "happy", None),
}

# Lines each script must print (as regular expressions), keyed by file name.
EXPECTED_OUTPUT: dict[str, list[str]] = {
    "support_triage.py": [
        rf"^\s*\d+\.\d\ds  {ticket}  {action}\s+{label}\s+{language}  {mood}"
        + (rf"\s+-> team {team}$" if team else r"\s*$")
        for ticket, (action, label, language, mood, team) in TRIAGED.items()
    ],
    "research_agent.py": [
        r"^summarizing 3 sources \(summarize\.map\)$",
        r"^agent turn 2 done$",
        r"^run otters is waiting for approval$",
        r"^approved by the reviewer: Otters protect kelp forests by eating urchins$",
        r"^3 sources, 3 agent turns, mode: real time$",
    ],
}


def run_script(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(path), *args],
        cwd=EXAMPLES.parent,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **FAST},
    )


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_every_example_script_runs(script: str) -> None:
    assert script in EXPECTED_OUTPUT, f"add what {script} prints to EXPECTED_OUTPUT"
    done = run_script(EXAMPLES / script)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for pattern in EXPECTED_OUTPUT[script]:
        assert any(re.match(pattern, line) for line in lines), (pattern, done.stdout)


@pytest.mark.parametrize("flag", ["--batch", "--reject"])
def test_the_research_agent_runs_in_batch_mode_and_can_be_rejected(flag: str) -> None:
    done = run_script(EXAMPLES / "research_agent.py", flag)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "run otters is waiting for approval" in lines
    if flag == "--batch":
        assert "3 sources, 3 agent turns, mode: batch" in lines
        assert lines[-2].startswith("approved by the reviewer")
    else:
        assert lines[-2].startswith("rejected by the reviewer")


def test_the_example_readme_names_every_script() -> None:
    readme = (EXAMPLES / "README.md").read_text()
    for script in EXAMPLES.glob("*.py"):
        assert f"examples/{script.name}" in readme


def test_the_cli_runs_the_example_flow() -> None:
    ticket = {"id": "T-7", "text": "Mon mot de passe ne marche pas, c'est inacceptable"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flowdsl",
            "run",
            "examples/support_triage.py:support_triage",
            "--input",
            json.dumps(ticket),
        ],
        cwd=EXAMPLES.parent,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **FAST},
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "ticket_id": "T-7",
        "action": "escalated",
        "label": "account",
        "language": "fr",
        "sentiment": "angry",
        "message": "[account, angry] Mon mot de passe ne marche pas, c'est inacceptable",
        "team": "identity",
    }


# --- in process -----------------------------------------------------------------------------


@pytest.fixture
def triage(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """examples/support_triage.py as module ``support_triage`` (the name `flowdsl run` gives
    it), with a faster stand-in model."""
    name = "support_triage"
    module = sys.modules.get(name)
    loaded_here = module is None
    if module is None:
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / "support_triage.py")
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    monkeypatch.setattr(module, "llm", module.FakeLLM(module.stand_in, latency=0.01))
    yield module
    if loaded_here:
        del sys.modules[name]


ROOTS = ("classify", "detect_language", "sentiment")


@pytest.mark.anyio
@pytest.mark.parametrize("ticket_id", sorted(TRIAGED))
async def test_triage_results_and_overlap(triage: ModuleType, ticket_id: str) -> None:
    ticket = next(t for t in triage.SAMPLE_TICKETS if t.id == ticket_id)
    events: list[Any] = []
    result = await fd.Context(on_event=events.append).run(triage.support_triage, ticket)

    action, label, language, mood, team = TRIAGED[ticket_id]
    assert isinstance(result, triage.Resolution)
    assert result.action is triage.Action(action)
    assert result.label is triage.Label(label)
    assert result.language == language
    assert result.sentiment is triage.Sentiment(mood)
    assert result.team == team

    # The three calls that take only the ticket overlap: each one started before any of
    # them finished.
    kinds = [(type(e), e.node_id) for e in events if e.node_id in ROOTS]
    first_finish = next(i for i, (kind, _) in enumerate(kinds) if kind is ev.StepFinished)
    started = {node for kind, node in kinds[:first_finish] if kind is ev.StepStarted}
    assert started == set(ROOTS)

    # Only the chosen case ran; the other one is recorded as skipped.
    taken = next(e for e in events if isinstance(e, ev.BranchTaken))
    assert taken.case == ("escalate" if action == "escalated" else "auto")
    ran = {e.node_id for e in events if isinstance(e, ev.StepFinished)}
    skipped = {e.node_id for e in events if isinstance(e, ev.StepSkipped)}
    escalation = {"route.escalate/summarize_for_agent", "route.escalate/open_escalation"}
    reply = {"route.auto/draft_reply"}
    assert (ran - set(ROOTS) - {"route"}, skipped) == (
        (escalation, reply) if taken.case == "escalate" else (reply, escalation)
    )


def test_the_graph_has_three_independent_roots(triage: ModuleType) -> None:
    graph = triage.support_triage.graph
    assert graph.nodes[:4] == (*ROOTS, "route")
    into = {edge.dst: set() for edge in graph.edges}
    for edge in graph.edges:
        into[edge.dst].add(edge.src)
    assert not any(set(ROOTS) & into.get(root, set()) for root in ROOTS)
    assert into["route"] == {"classify", "sentiment"}


@pytest.mark.anyio
async def test_the_steps_stay_plain_functions(triage: ModuleType) -> None:
    ticket = triage.Ticket("T-0", "Where is my invoice?")
    assert await triage.classify(ticket) == triage.Triage(triage.Label.BILLING, 0.7)
    assert await triage.detect_language(ticket) == "en"
    unknown = triage.Ticket("T-0", "App crashes, unacceptable")  # no common word at all
    assert await triage.detect_language(unknown) == "en"
    assert (
        await triage.route(triage.Triage(triage.Label.BUG, 0.9), triage.Sentiment.HAPPY)
        == "escalate"
    )
