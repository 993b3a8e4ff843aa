"""``flowdsl signal``, and what ``flowdsl runs list/show`` say of waits, maps and loops."""

from __future__ import annotations

import json
import re
from pathlib import Path

import anyio
import pytest
from click.testing import CliRunner, Result

import flowdsl as fd
from flowdsl import _codec
from flowdsl.cli.main import cli

from wait_flows import Approval, reviewed


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv("FLOWDSL_STORE", raising=False)
    return f"sqlite:///{tmp_path}/runs.db"


def _leave_waiting(store: str, run_id: str) -> None:
    async def start() -> None:
        async with fd.Context(store=store) as ctx:
            run = await ctx.start(reviewed, "seals", run_id=run_id)
            async for event in run.events():
                if isinstance(event, fd.events.RunWaiting):
                    break

    anyio.run(start)


def test_signal_then_resume_finishes_a_waiting_run(store: str) -> None:
    _leave_waiting(store, "s1")
    listed = invoke("runs", "list", "--store", store, "--json")
    assert [r["status"] for r in json.loads(listed.stdout)] == ["waiting"]
    shown = json.loads(invoke("runs", "show", "s1", "--store", store, "--json").stdout)
    rows = {row["node_id"]: row for row in shown["nodes"]}
    assert rows["approval"]["status"] == "waiting"
    assert rows["approval"]["progress"] == "waiting for signal 'approval'"
    sent = invoke(
        "signal", "s1", "approval", "--value", '{"ok": true, "by": "kim"}', "--store", store
    )
    assert sent.exit_code == 0, sent.stderr
    assert json.loads(sent.stdout) == {"run_id": "s1", "signal": "approval", "index": 0}
    resumed = invoke("resume", "s1", "--store", store, "--quiet")
    assert resumed.exit_code == 0, resumed.stderr
    assert json.loads(resumed.stdout) == "draft about seals: approved by kim"


def test_signal_finds_the_store_as_runs_and_resume_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLOWDSL_STORE", raising=False)
    monkeypatch.chdir(tmp_path)
    missing = invoke("signal", "s1", "approval")
    assert missing.exit_code == 2
    assert "no --store given, and no .flowdsl/flowdsl.db here" in missing.stderr
    # The file `flowdsl run --batch` keeps its runs in, by default.
    _leave_waiting("sqlite:///.flowdsl/flowdsl.db", "s1")
    sent = invoke("signal", "s1", "approval", "--value", '{"ok": true}')
    assert sent.exit_code == 0, sent.stderr
    assert json.loads(sent.stdout)["index"] == 0
    # FLOWDSL_STORE names another.
    other = f"sqlite:///{tmp_path}/other.db"
    _leave_waiting(other, "s2")
    monkeypatch.setenv("FLOWDSL_STORE", other)
    sent = invoke("signal", "s2", "approval", "--value", '{"ok": false}')
    assert sent.exit_code == 0, sent.stderr
    resumed = invoke("resume", "s2", "--quiet")
    assert json.loads(resumed.stdout) == "draft about seals: rejected by "


def test_signal_errors_are_one_line(store: str) -> None:
    unknown = invoke("signal", "nope", "approval", "--store", store)
    assert unknown.exit_code == 1
    assert re.match(r"^Error: no run 'nope' in store sqlite:///", unknown.stderr)
    bad = invoke("signal", "nope", "approval", "--value", "{not json", "--store", store)
    assert bad.exit_code == 2
    assert "--value is not JSON" in bad.stderr
    memory = invoke("signal", "x", "approval", "--store", "memory://")
    assert memory.exit_code == 2


def test_signal_has_help() -> None:
    result = invoke("signal", "--help")
    assert result.exit_code == 0
    assert result.stdout.startswith("Usage: cli signal [OPTIONS] RUN_ID NAME")


def test_runs_show_counts_items_and_iterations(store: str) -> None:
    from test_map_loop import launch, shouting

    async def run_both() -> None:
        async with fd.Context(store=store) as ctx:
            await ctx.run(shouting, "one two three", run_id="m")
            await ctx.run(launch, 2, run_id="l")

    anyio.run(run_both)
    rows = {
        r["node_id"]: r
        for r in json.loads(invoke("runs", "show", "m", "--store", store, "--json").stdout)["nodes"]
    }
    assert rows["shout"]["progress"] == "3/3 items"
    assert {"shout[0]", "shout[1]", "shout[2]"} <= set(rows)
    rows = {
        r["node_id"]: r
        for r in json.loads(invoke("runs", "show", "l", "--store", store, "--json").stdout)["nodes"]
    }
    assert rows["countdown"]["progress"] == "3 iterations"


def test_approval_values_cross_as_json() -> None:
    # What `--value` carries is decoded as the wait's type.
    assert _codec.decode('{"ok": false, "by": "x"}', Approval) == Approval(False, "x")
