"""The ``flowdsl`` command line: in-process through click's CliRunner, and as a real process.

Every flow here lives in a ``flows.py`` written into the test's own directory, as a user's
file would be; its steps append their names to ``calls.log`` beside it, which is how the
tests count executions across invocations (and processes) without mocks.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

import flowdsl as fd
from flowdsl import events as ev
from flowdsl.cli.live import StepTable
from flowdsl.cli.load import load_flow
from flowdsl.cli.main import cli
from flowdsl.cli.run import call_of, derive_run_id

FLOWS = """
from __future__ import annotations

import pathlib

import flowdsl as fd

HERE = pathlib.Path(__file__).parent


def _log(name: str) -> None:
    with open(HERE / "calls.log", "a") as f:
        f.write(name + "\\n")


@fd.step
async def double(x: int) -> int:
    _log("double")
    return x * 2


@fd.step
async def inc(x: int) -> int:
    _log("inc")
    return x + 1


@fd.step
async def check(x: int) -> int:
    _log("check")
    if (HERE / "broken").exists():
        raise ValueError(f"check refuses {x}")
    return x


@fd.step
async def greet() -> str:
    return "hello"


@fd.branch
async def sign(x: int) -> str:
    return "pos" if x >= 0 else "neg"


@fd.flow
async def pipeline(x: int) -> int:
    return await inc(await double(x))


@fd.flow
async def pair(a: int, b: int = 10) -> dict[str, int]:
    d = await double(a)
    return {"a": d, "b": b}


@fd.flow
async def fragile(x: int) -> int:
    d = await double(x)
    c = await check(d)
    return await inc(c)


@fd.flow
async def routed(x: int) -> int:
    d = await double(x)
    return await sign(x).cases(pos=lambda: inc(d), neg=lambda: double(d))


@fd.flow
async def hello() -> str:
    return await greet()


@fd.step
async def markup(x: int) -> str:
    if (HERE / "broken").exists():
        raise ValueError(f"[bold]{x}[/bold] is wrong")
    return f"[red]{x}[/red]"


@fd.flow
async def looks_like_markup(x: int) -> str:
    return await markup(x)
"""


@pytest.fixture(autouse=True)
def _isolated_imports(tmp_path: Path) -> Iterator[None]:
    """Forget the modules a test loaded from its directory, and the path entries it added,
    so that the next test's ``flows.py`` is its own."""
    path = list(sys.path)
    yield
    sys.path[:] = path
    root = str(tmp_path)
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(root):
            del sys.modules[name]


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory holding ``flows.py``; the working directory for the test."""
    (tmp_path / "flows.py").write_text(FLOWS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FLOWDSL_STORE", raising=False)
    monkeypatch.delenv("FLOWDSL_TRACEBACK", raising=False)
    return tmp_path


def invoke(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def calls(project: Path) -> list[str]:
    log = project / "calls.log"
    return log.read_text().split() if log.exists() else []


def one_error_line(result: Result, pattern: str) -> None:
    """The error is one line on stderr matching *pattern*, and stdout carries nothing."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert re.match(pattern, lines[0]), lines[0]
    assert result.stdout == ""


# --- help and version ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [[], ["run"], ["graph"], ["runs"], ["runs", "list"], ["runs", "show"], ["resume"], ["worker"]],
    ids=lambda c: " ".join(c) or "flowdsl",
)
def test_every_command_has_help(command: list[str]) -> None:
    for flag in ("--help", "-h"):
        result = invoke(*command, flag)
        assert result.exit_code == 0
        assert result.stdout.startswith(f"Usage: {' '.join(['cli', *command])}")


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout == f"flowdsl {fd.__version__}\n"


# --- flowdsl run: results -----------------------------------------------------------------


def test_run_prints_the_result_as_json(project: Path) -> None:
    result = invoke("run", "flows.py:pipeline", "--input", "3")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == 7
    assert result.stderr == ""  # not a terminal: no live view


def test_run_object_input_gives_keyword_arguments(project: Path) -> None:
    result = invoke("run", "flows.py:pair", "--input", '{"a": 2}')
    assert json.loads(result.stdout) == {"a": 4, "b": 10}
    result = invoke("run", "flows.py:pair", "--input", '{"a": 2, "b": 3}')
    assert json.loads(result.stdout) == {"a": 4, "b": 3}


def test_run_object_input_names_the_one_parameter(project: Path) -> None:
    result = invoke("run", "flows.py:pipeline", "--input", '{"x": 5}')
    assert json.loads(result.stdout) == 11


def test_run_input_from_stdin(project: Path) -> None:
    result = invoke("run", "flows.py:pipeline", "--input", "-", input="20\n")
    assert json.loads(result.stdout) == 41


def test_run_flow_without_parameters_needs_no_input(project: Path) -> None:
    result = invoke("run", "flows.py:hello")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == "hello"


def test_run_module_target(project: Path) -> None:
    result = invoke("run", "flows:pipeline", "--input", "1")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == 3


def test_run_file_target_from_another_directory(
    project: Path, tmp_path_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    monkeypatch.chdir(elsewhere)
    result = invoke("run", str(project / "flows.py") + ":pipeline", "--input", "2")
    assert json.loads(result.stdout) == 5


def test_a_file_is_loaded_under_its_stem_so_it_can_be_imported_again(project: Path) -> None:
    flow = load_flow("flows.py:pipeline")
    assert flow.ref == "flows:pipeline"
    assert sys.modules["flows"].__file__ == str(project / "flows.py")
    assert load_flow("flows:pipeline") is flow  # the same module, not a second copy


def test_a_file_inside_a_package_is_loaded_under_its_dotted_name(tmp_path: Path) -> None:
    package = tmp_path / "app"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helpers.py").write_text("FACTOR = 3\n")
    (package / "jobs.py").write_text(
        textwrap.dedent("""
        import flowdsl as fd
        from .helpers import FACTOR

        @fd.step
        async def scale(x: int) -> int:
            return x * FACTOR

        @fd.flow
        async def job(x: int) -> int:
            return await scale(x)
    """)
    )
    flow = load_flow(f"{package / 'jobs.py'}:job")
    assert flow.ref == "app.jobs:job"
    result = invoke("run", f"{package / 'jobs.py'}:job", "--input", "2")
    assert json.loads(result.stdout) == 6


def test_run_output_file(project: Path) -> None:
    result = invoke("run", "flows.py:pipeline", "--input", "3", "-o", "out.json")
    assert result.exit_code == 0
    assert result.stdout == ""
    assert json.loads((project / "out.json").read_text()) == 7


def test_run_with_a_run_id_and_a_durable_store_runs_once(project: Path, sqlite_url: str) -> None:
    for _ in range(2):
        result = invoke(
            "run", "flows.py:pipeline", "--input", "3", "--store", sqlite_url, "--run-id", "r-1"
        )
        assert json.loads(result.stdout) == 7
    assert calls(project) == ["double", "inc"]


def test_run_on_trio(project: Path) -> None:
    result = invoke("run", "flows.py:routed", "--input", "-2", "--backend", "trio")
    assert json.loads(result.stdout) == -8


def test_run_live_view_shows_every_step(project: Path) -> None:
    result = invoke("run", "flows.py:routed", "--input", "4", "--live")
    assert json.loads(result.stdout) == 9
    table = result.stderr
    assert re.search(r"double\s+│ done", table), table
    assert re.search(r"sign\s+│ done .* case 'pos'", table), table
    assert re.search(r"sign\.pos/inc\s+│ done", table), table
    assert re.search(r"sign\.neg/double\s+│ skipped", table), table
    assert "join" not in table  # joins run no code


def test_quiet_wins_over_live(project: Path) -> None:
    result = invoke("run", "flows.py:pipeline", "--input", "1", "--live", "--quiet")
    assert result.stderr == ""


# --- flowdsl run: errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["nope.py:x"], r"^Error: no file 'nope\.py'\. Check the path"),
        (
            ["flows.py"],
            r"^Error: TARGET 'flows\.py' names no flow\. Add ':name' .*: "
            r"fragile, hello, looks_like_markup, pair, pipeline, routed$",
        ),
        (["flows.py:"], r"^Error: TARGET 'flows\.py:' names no flow"),
        (["flows.py:nope"], r"^Error: flows\.py has no flow 'nope'\. .*: fragile, hello"),
        (["flows.py:double"], r"^Error: flows\.py:double is the step 'double', not a flow"),
        (["flows.py:sign"], r"^Error: flows\.py:sign is the branch 'sign', not a flow"),
        (["flows.py:HERE"], r"^Error: flows\.py:HERE is a PosixPath, not a flow"),
        (["no_such_module_xyz:f"], r"^Error: no module 'no_such_module_xyz' \(in TARGET"),
        ([":f"], r"^Error: TARGET ':f' names no module or file"),
        (
            ["flows.py:pipeline", "--input", "{bad"],
            r"^Error: --input is not valid JSON: Expecting property name",
        ),
        (
            ["flows.py:pipeline", "--input", '"x"'],
            r"^Error: --input does not fit flow 'pipeline': cannot decode input 'x' as int: .*"
            r"\(the flow takes pipeline\(x: int\) -> int\)$",
        ),
        (
            ["flows.py:pair", "--input", '{"c": 1}'],
            r"^Error: --input does not fit flow 'pair': .*missing a required argument: 'a'",
        ),
        (
            ["flows.py:pipeline"],
            r"^Error: --input does not fit flow 'pipeline': .*missing a required argument: 'x'",
        ),
        (
            ["flows.py:pipeline", "--input", "1", "--inputs", "flows.py"],
            r"^Error: give --input or --inputs, not both$",
        ),
        (
            ["flows.py:pipeline", "--input", "1", "--store", "foo://x"],
            r"^Error: unknown store URL 'foo://x'\. Use memory://, sqlite:///path\.db, "
            r"redis://host:6379/0 or nats://host:4222$",
        ),
        (
            ["flows.py:pipeline", "--input", "1", "--broker", "sqlite:///b.db"],
            r"^Error: broker= and workers= configure batch mode",
        ),
        (
            ["flows.py:pipeline", "--bogus"],
            r"^Error: No such option.*--bogus.* \(see 'cli run --help'\)$",
        ),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_run_usage_errors_are_one_line_and_exit_2(
    project: Path, args: list[str], pattern: str
) -> None:
    result = invoke("run", *args)
    assert result.exit_code == 2
    one_error_line(result, pattern)
    assert calls(project) == []


def test_import_failure_of_the_users_module_is_one_line(project: Path) -> None:
    (project / "bad.py").write_text("import flowdsl as fd\nraise RuntimeError('boom at import')\n")
    result = invoke("run", "bad.py:f")
    assert result.exit_code == 2
    one_error_line(result, r"^Error: importing bad\.py failed: RuntimeError: boom at import\.")


def test_traceback_flag_shows_the_cause(project: Path) -> None:
    (project / "bad.py").write_text("raise RuntimeError('boom at import')\n")
    result = invoke("--traceback", "run", "bad.py:f")
    assert result.exit_code == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("Error: importing bad.py failed")


def test_tracing_error_at_definition_is_a_usage_error(project: Path) -> None:
    (project / "wrong.py").write_text(
        textwrap.dedent("""
        import flowdsl as fd

        @fd.step
        async def one() -> int:
            return 1

        @fd.flow
        async def wrong() -> int:
            x = await one()
            if x:
                return x
            return 0
    """)
    )
    result = invoke("run", "wrong.py:wrong")
    assert result.exit_code == 2
    one_error_line(result, r"^Error: flow 'wrong'.*@fd\.branch")


def test_a_failing_run_prints_the_error_and_exits_1(project: Path) -> None:
    (project / "broken").touch()
    result = invoke("run", "flows.py:fragile", "--input", "2")
    assert result.exit_code == 1
    one_error_line(
        result,
        r"^Error: flow 'fragile', node 'check': step failed: ValueError: check refuses 4$",
    )


def test_a_failing_run_with_a_store_says_how_to_resume(project: Path, sqlite_url: str) -> None:
    (project / "broken").touch()
    result = invoke(
        "run", "flows.py:fragile", "--input", "2", "--store", sqlite_url, "--run-id", "r-9"
    )
    assert result.exit_code == 1
    one_error_line(
        result,
        rf"^Error: .*check refuses 4 \(run 'r-9': `flowdsl resume r-9 "
        rf"--store {re.escape(sqlite_url)} --import flows.py`\)$",
    )


def test_a_failing_run_marks_the_step_failed_in_the_live_view(project: Path) -> None:
    (project / "broken").touch()
    result = invoke("run", "flows.py:fragile", "--input", "2", "--live")
    assert result.exit_code == 1
    assert re.search(r"check\s+│ failed .*ValueError: check refuses 4", result.stderr)
    assert re.search(r"inc\s+│ waiting", result.stderr)
    assert result.stderr.rstrip().splitlines()[-1].startswith("Error: flow 'fragile'")


# --- flowdsl run --inputs -----------------------------------------------------------------


def jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def test_inputs_writes_one_json_line_per_input_in_order(project: Path) -> None:
    (project / "in.jsonl").write_text('1\n\n{"x": 2}\n"nope"\n3\n')
    result = invoke("run", "flows.py:pipeline", "--inputs", "in.jsonl")
    assert result.exit_code == 1  # one input failed
    lines = jsonl(result.stdout)
    ids = [derive_run_id("pipeline", v) for v in (1, {"x": 2}, "nope", 3)]
    assert lines[0] == {"input": 1, "run_id": ids[0], "result": 3}
    assert lines[1] == {"input": {"x": 2}, "run_id": ids[1], "result": 5}
    assert lines[2]["input"] == "nope"
    assert lines[2]["run_id"] == ids[2]
    assert lines[2]["error"].startswith("input does not fit flow 'pipeline': cannot decode")
    assert lines[3] == {"input": 3, "run_id": ids[3], "result": 7}
    assert result.stderr.splitlines()[-1] == "Error: 1 of 4 runs failed"


def test_inputs_reports_failed_runs_as_error_lines(project: Path) -> None:
    (project / "broken").touch()
    result = invoke("run", "flows.py:fragile", "--inputs", "-", input="1\n2\n")
    assert result.exit_code == 1
    lines = jsonl(result.stdout)
    assert [line["error"] for line in lines] == [
        "flow 'fragile', node 'check': step failed: ValueError: check refuses 2",
        "flow 'fragile', node 'check': step failed: ValueError: check refuses 4",
    ]
    assert result.stderr.splitlines()[-1] == "Error: 2 of 2 runs failed"


def test_failed_runs_of_inputs_in_a_durable_store_say_how_to_resume_them(
    project: Path, sqlite_url: str
) -> None:
    (project / "broken").touch()
    result = invoke("run", "flows.py:fragile", "--inputs", "-", "--store", sqlite_url, input="1\n")
    assert result.stderr.splitlines()[-1] == (
        "Error: 1 of 1 runs failed "
        f"(once fixed: `flowdsl resume --all-failed --store {sqlite_url} --import flows.py`)"
    )


def test_inputs_all_succeeding_exits_0(project: Path) -> None:
    result = invoke(
        "run",
        "flows.py:pair",
        "--inputs",
        "-",
        "--concurrency",
        "1",
        input='{"a": 1}\n{"a": 2, "b": 0}\n',
    )
    assert result.exit_code == 0, result.stderr
    assert [line["result"] for line in jsonl(result.stdout)] == [
        {"a": 2, "b": 10},
        {"a": 4, "b": 0},
    ]


def test_inputs_with_a_durable_store_are_idempotent(project: Path, sqlite_url: str) -> None:
    (project / "in.jsonl").write_text("1\n2\n3\n")
    first = invoke(
        "run",
        "flows.py:pipeline",
        "--inputs",
        "in.jsonl",
        "--store",
        sqlite_url,
        "-o",
        "out1.jsonl",
    )
    second = invoke(
        "run",
        "flows.py:pipeline",
        "--inputs",
        "in.jsonl",
        "--store",
        sqlite_url,
        "-o",
        "out2.jsonl",
    )
    assert first.exit_code == second.exit_code == 0
    out1 = (project / "out1.jsonl").read_text()
    assert out1 == (project / "out2.jsonl").read_text()
    assert [line["result"] for line in jsonl(out1)] == [3, 5, 7]
    assert sorted(calls(project)) == sorted(["double", "inc"] * 3)  # nothing ran twice


def test_inputs_file_errors(project: Path) -> None:
    (project / "bad.jsonl").write_text("1\n{oops\n")
    result = invoke("run", "flows.py:pipeline", "--inputs", "bad.jsonl")
    assert result.exit_code == 2
    one_error_line(result, r"^Error: bad\.jsonl line 2 is not valid JSON: ")
    (project / "empty.jsonl").write_text("\n\n")
    result = invoke("run", "flows.py:pipeline", "--inputs", "empty.jsonl")
    assert result.exit_code == 2
    one_error_line(result, r"^Error: empty\.jsonl holds no inputs")
    result = invoke("run", "flows.py:pipeline", "--inputs", "missing.jsonl")
    assert result.exit_code == 2
    one_error_line(result, r"^Error: Invalid value for '--inputs': 'missing\.jsonl'")
    result = invoke("run", "flows.py:pipeline", "--inputs", "empty.jsonl", "--run-id", "x")
    assert result.exit_code == 2
    one_error_line(result, r"^Error: --run-id names one run")
    assert calls(project) == []


# --- batch mode ---------------------------------------------------------------------------


def test_batch_run_gives_the_real_time_result(project: Path, sqlite_url: str) -> None:
    result = invoke("run", "flows.py:routed", "--input", "3", "--batch", "--store", sqlite_url)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == 7


def test_a_failing_batch_run_is_one_line_and_exit_1(project: Path, sqlite_url: str) -> None:
    (project / "broken").touch()
    result = invoke(
        "run",
        "flows.py:fragile",
        "--input",
        "2",
        "--batch",
        "--store",
        sqlite_url,
        "--run-id",
        "b-1",
    )
    assert result.exit_code == 1
    one_error_line(
        result,
        r"^Error: flow 'fragile', node 'check': step failed: ValueError: "
        r"check refuses 4 \(run 'b-1': `flowdsl resume b-1 --store ",
    )


def test_batch_with_an_unavailable_broker_is_a_clean_config_error(project: Path) -> None:
    result = invoke(
        "run", "flows.py:pipeline", "--input", "1", "--batch", "--broker", "foo://127.0.0.1:1"
    )
    assert result.exit_code == 2
    one_error_line(result, r"^Error: unknown broker URL 'foo://127\.0\.0\.1:1'")


def test_worker_reports_an_unimportable_module(project: Path, sqlite_url: str) -> None:
    result = invoke("worker", "--broker", sqlite_url, "--import", "no_such_module_xyz")
    assert result.exit_code == 2
    one_error_line(result, r"^Error: cannot import 'no_such_module_xyz': ModuleNotFoundError")


def test_worker_needs_broker_and_import() -> None:
    result = invoke("worker", "--import", "x")
    assert result.exit_code == 2
    one_error_line(result, r"^Error: Missing option '--broker' \(see 'cli worker --help'\)$")


# --- flowdsl graph ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["mermaid", "dot"])
def test_graph_prints_the_flows_graph(project: Path, fmt: str) -> None:
    args = ["graph", "flows.py:routed"] + (["--format", fmt] if fmt == "dot" else [])
    result = invoke(*args)
    assert result.exit_code == 0
    graph = load_flow("flows.py:routed").graph
    assert result.stdout == (graph.to_mermaid() if fmt == "mermaid" else graph.to_dot())
    first = "flowchart TD" if fmt == "mermaid" else 'digraph "routed" {'
    assert result.stdout.splitlines()[0] == first


def test_graph_errors(project: Path) -> None:
    result = invoke("graph", "flows.py:routed", "--format", "png")
    assert result.exit_code == 2
    one_error_line(result, r"^Error: Invalid value for '--format': 'png' is not one of")
    result = invoke("graph", "flows.py")
    assert result.exit_code == 2
    one_error_line(result, r"^Error: TARGET 'flows\.py' names no flow")


# --- flowdsl runs list / show -------------------------------------------------------------


def test_runs_list(project: Path, sqlite_url: str) -> None:
    invoke("run", "flows.py:pipeline", "--input", "1", "--store", sqlite_url, "--run-id", "a-1")
    (project / "broken").touch()
    invoke("run", "flows.py:fragile", "--input", "1", "--store", sqlite_url, "--run-id", "b-2")
    result = invoke("runs", "list", "--store", sqlite_url, "--json")
    assert result.exit_code == 0
    listed = json.loads(result.stdout)
    assert [(r["run_id"], r["flow"], r["status"]) for r in listed] == [
        ("b-2", "fragile", "failed"),
        ("a-1", "pipeline", "finished"),
    ]
    assert listed[1]["result"] == 3
    assert listed[1]["inputs"] == {"x": 1}
    assert listed[0]["failed_node"] == "check"
    assert listed[1]["duration"] >= 0
    assert (
        len(
            json.loads(
                invoke("runs", "list", "--store", sqlite_url, "--json", "--limit", "1").stdout
            )
        )
        == 1
    )
    table = invoke("runs", "list", "--store", sqlite_url).stdout
    assert re.search(r"│ b-2\s+│ fragile\s+│ failed\s+│ \d{4}-\d\d-\d\d \d\d:\d\d:\d\d │", table)
    assert re.search(r"│ a-1\s+│ pipeline\s+│ finished\s+│", table)


def test_stored_text_is_shown_as_it_is_not_as_rich_markup(project: Path, sqlite_url: str) -> None:
    result = invoke(
        "run",
        "flows.py:looks_like_markup",
        "--input",
        "3",
        "--live",
        "--store",
        sqlite_url,
        "--run-id",
        "m-1",
    )
    assert json.loads(result.stdout) == "[red]3[/red]"
    shown = invoke("runs", "show", "m-1", "--store", sqlite_url).stdout
    assert '"[red]3[/red]"' in shown
    (project / "broken").touch()
    failed = invoke("run", "flows.py:looks_like_markup", "--input", "4", "--live")
    assert "ValueError: [bold]4[/bold] is wrong" in failed.stderr.splitlines()[-1]
    assert re.search(r"markup\s+│ failed .* ValueError: \[bold\]4\[/bold\]", failed.stderr)


def test_runs_list_of_an_empty_store(sqlite_url: str) -> None:
    assert json.loads(invoke("runs", "list", "--store", sqlite_url, "--json").stdout) == []
    assert "no runs yet" in invoke("runs", "list", "--store", sqlite_url).stdout


def test_runs_show(project: Path, sqlite_url: str) -> None:
    invoke("run", "flows.py:routed", "--input", "5", "--store", sqlite_url, "--run-id", "r-1")
    result = invoke("runs", "show", "r-1", "--store", sqlite_url, "--json")
    assert result.exit_code == 0
    shown = json.loads(result.stdout)
    assert shown["run"]["status"] == "finished"
    assert shown["run"]["result"] == 11
    nodes = {n["node_id"]: n for n in shown["nodes"]}
    assert list(nodes) == ["double", "sign", "sign.pos/inc", "sign.neg/double"]
    assert nodes["double"]["result"] == 10
    assert nodes["double"]["attempts"] == 1
    assert nodes["sign"]["result"] == "pos"
    assert nodes["sign.neg/double"] == {"node_id": "sign.neg/double", "status": "skipped"}
    table = invoke("runs", "show", "r-1", "--store", sqlite_url).stdout
    assert re.search(r"status\s+finished", table)
    assert re.search(r"│ sign\.pos/inc\s+│ done\s+│\s+1 │ .* │ 11\s+│", table)
    assert re.search(r"│ sign\.neg/double\s+│ skipped", table)


def test_runs_show_of_a_failed_run(project: Path, sqlite_url: str) -> None:
    (project / "broken").touch()
    invoke("run", "flows.py:fragile", "--input", "1", "--store", sqlite_url, "--run-id", "f-1")
    shown = json.loads(invoke("runs", "show", "f-1", "--store", sqlite_url, "--json").stdout)
    assert [(n["node_id"], n["status"]) for n in shown["nodes"]] == [
        ("double", "done"),
        ("check", "failed"),
        ("inc", "not run"),
    ]
    assert shown["run"]["error"].endswith("ValueError: check refuses 2")


def test_runs_show_without_the_flow_lists_the_journal(
    project: Path, sqlite_url: str, tmp_path_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    (project / "broken").touch()
    invoke("run", "flows.py:fragile", "--input", "1", "--store", sqlite_url, "--run-id", "f-1")
    del sys.modules["flows"]
    sys.path[:] = [p for p in sys.path if p not in ("", str(project))]
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    result = invoke("runs", "show", "f-1", "--store", sqlite_url)
    assert "the flow does not import here" in result.stdout
    shown = json.loads(invoke("runs", "show", "f-1", "--store", sqlite_url, "--json").stdout)
    assert [(n["node_id"], n["status"]) for n in shown["nodes"]] == [
        ("double", "done"),
        ("check", "failed"),
    ]


NO_STORE = (
    r"^Error: no --store given, and no \.flowdsl/flowdsl\.db here \(where `flowdsl run --batch` "
    r"keeps its runs by default\)\. Name the store: --store sqlite:///runs\.db \(or set "
    r"FLOWDSL_STORE\)$"
)


def test_runs_errors(project: Path, sqlite_url: str) -> None:
    result = invoke("runs", "show", "nope", "--store", sqlite_url)
    assert result.exit_code == 1
    one_error_line(result, rf"^Error: no run 'nope' in {re.escape(sqlite_url)}")
    for command in (["runs", "list"], ["runs", "show", "r-1"], ["resume", "r-1"]):
        result = invoke(*command)
        assert result.exit_code == 2
        one_error_line(result, NO_STORE)
    result = invoke("runs", "list", "--store", "memory://")
    assert result.exit_code == 2
    one_error_line(result, r"^Error: memory:// keeps runs only inside one process")


def test_store_from_the_environment(
    project: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLOWDSL_STORE", sqlite_url)
    invoke("run", "flows.py:pipeline", "--input", "1", "--run-id", "e-1")
    assert [r["run_id"] for r in json.loads(invoke("runs", "list", "--json").stdout)] == ["e-1"]


# --- flowdsl resume -----------------------------------------------------------------------


def test_resume_finishes_a_failed_run_without_rerunning_finished_steps(
    project: Path, sqlite_url: str
) -> None:
    (project / "broken").touch()
    failed = invoke(
        "run", "flows.py:fragile", "--input", "3", "--store", sqlite_url, "--run-id", "r-1"
    )
    assert failed.exit_code == 1
    assert calls(project) == ["double", "check"]
    (project / "broken").unlink()  # the fix
    result = invoke("resume", "r-1", "--store", sqlite_url, "--strict")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == 7
    assert calls(project) == ["double", "check", "check", "inc"]
    status = json.loads(invoke("runs", "show", "r-1", "--store", sqlite_url, "--json").stdout)
    assert status["run"]["status"] == "finished"


def test_resume_live_view_marks_reused_steps(project: Path, sqlite_url: str) -> None:
    (project / "broken").touch()
    invoke("run", "flows.py:fragile", "--input", "3", "--store", sqlite_url, "--run-id", "r-1")
    (project / "broken").unlink()
    result = invoke("resume", "r-1", "--store", sqlite_url, "--live")
    assert json.loads(result.stdout) == 7
    assert re.search(r"double\s+│ reused", result.stderr)
    assert re.search(r"check\s+│ done", result.stderr)


def test_resume_a_run_that_fails_again(project: Path, sqlite_url: str) -> None:
    (project / "broken").touch()
    invoke("run", "flows.py:fragile", "--input", "3", "--store", sqlite_url, "--run-id", "r-1")
    result = invoke("resume", "r-1", "--store", sqlite_url)
    assert result.exit_code == 1
    one_error_line(
        result,
        r"^Error: flow 'fragile', node 'check': step failed: .*"
        r"\(fix it, then `flowdsl resume r-1 --store .*` again\)$",
    )


def test_resume_no_wait_refuses_a_run_another_process_drives(
    project: Path, sqlite_url: str
) -> None:
    import anyio

    from flowdsl.backends.sqlite.store import SQLiteStore

    (project / "broken").touch()
    invoke("run", "flows.py:fragile", "--input", "3", "--store", sqlite_url, "--run-id", "r-1")
    (project / "broken").unlink()

    async def driven_elsewhere() -> None:
        store = SQLiteStore.from_url(sqlite_url)
        await store.open()
        try:  # a process on another machine resumes it (this one cannot check its pid)
            assert await store.acquire_lease("r-1", "far:4242:1:0123456789ab:x", 60.0) is None
        finally:
            await store.close()

    anyio.run(driven_elsewhere)
    result = invoke("resume", "r-1", "--store", sqlite_url, "--no-wait")
    assert result.exit_code == 1
    one_error_line(
        result,
        r"^Error: flow 'fragile': run 'r-1' is being driven by process 4242 on host 'far', "
        r"its lease runs until \d\d:\d\d:\d\d; nothing was run here\. Wait for its result",
    )
    assert calls(project) == ["double", "check"]  # nothing ran


def test_worker_takes_max_deliveries() -> None:
    assert "--max-deliveries N" in invoke("worker", "--help").stdout
    result = invoke(
        "worker", "--broker", "sqlite:///q.db", "--import", "x", "--max-deliveries", "0"
    )
    assert result.exit_code == 2
    assert "--max-deliveries" in result.stderr


def test_resume_with_an_explicit_flow(project: Path, sqlite_url: str) -> None:
    (project / "broken").touch()
    invoke("run", "flows:fragile", "--input", "3", "--store", sqlite_url, "--run-id", "r-1")
    (project / "broken").unlink()
    result = invoke("resume", "r-1", "--store", sqlite_url, "--flow", "flows.py:fragile")
    assert json.loads(result.stdout) == 7


def test_resume_a_run_started_in_main_needs_flow(project: Path, sqlite_url: str) -> None:
    # A script run as `python script.py` defines its flows in __main__.
    (project / "script.py").write_text(
        FLOWS
        + textwrap.dedent("""
        if __name__ == "__main__":
            import sys

            import anyio

            async def main() -> None:
                async with fd.Context(store=sys.argv[1]) as ctx:
                    print(await ctx.run(pipeline, 1, run_id="m-1"))
                    try:
                        await ctx.run(fragile, 1, run_id="m-2")
                    except fd.StepFailed:
                        print("m-2 failed")

            anyio.run(main)
    """)
    )
    (project / "broken").touch()
    done = subprocess.run(
        [sys.executable, "script.py", sqlite_url],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout == "3\nm-2 failed\n", done.stderr
    (project / "broken").unlink()
    # A finished run has nothing left to run: its stored result, without its flow.
    finished = invoke("resume", "m-1", "--store", sqlite_url)
    assert finished.exit_code == 0, finished.stderr
    assert json.loads(finished.stdout) == 3
    result = invoke("resume", "m-2", "--store", sqlite_url)
    assert result.exit_code == 2
    one_error_line(
        result,
        r"^Error: flow 'fragile': run 'm-2' was started by a script run as "
        r"__main__.*--flow path/to/script\.py:flow",
    )
    named = invoke("resume", "m-2", "--store", sqlite_url, "--flow", "script.py:fragile")
    assert named.exit_code == 0, named.stderr
    assert json.loads(named.stdout) == 3


def test_resume_errors(project: Path, sqlite_url: str) -> None:
    result = invoke("resume", "nope", "--store", sqlite_url)
    assert result.exit_code == 1
    one_error_line(result, r"^Error: no run 'nope' in ")
    result = invoke("resume", "--store", sqlite_url)
    assert result.exit_code == 2
    one_error_line(result, r"^Error: give the RUN_ID to resume, or --all-failed to resume every")
    result = invoke("resume", "r-1", "--all-failed", "--store", sqlite_url)
    assert result.exit_code == 2
    one_error_line(result, r"^Error: give a RUN_ID or --all-failed, not both")


# --- what a new user runs into ---------------------------------------------------------


def test_commands_that_read_runs_default_to_the_batch_file(project: Path) -> None:
    (project / "broken").touch()
    ran = invoke("run", "flows.py:fragile", "--input", "1", "--batch", "--run-id", "d-1")
    assert ran.exit_code == 1
    # The hint names the default file the batch used, as a command to type.
    hint = "`flowdsl resume d-1 --store sqlite:///.flowdsl/flowdsl.db --import flows.py`"
    assert hint in ran.stderr
    listed = json.loads(invoke("runs", "list", "--json").stdout)
    assert [(r["run_id"], r["status"]) for r in listed] == [("d-1", "failed")]
    shown = json.loads(invoke("runs", "show", "d-1", "--json").stdout)
    assert shown["run"]["status"] == "failed"
    (project / "broken").unlink()
    resumed = invoke("resume", "d-1")
    assert resumed.exit_code == 0, resumed.stderr
    assert json.loads(resumed.stdout) == 3


def test_runs_list_by_status(project: Path, sqlite_url: str) -> None:
    for run_id, x in (("a-1", 1), ("a-2", 2)):
        invoke(
            "run", "flows.py:pipeline", "--input", str(x), "--store", sqlite_url, "--run-id", run_id
        )
    (project / "broken").touch()
    for run_id, x in (("f-1", 1), ("f-2", 2)):
        invoke(
            "run", "flows.py:fragile", "--input", str(x), "--store", sqlite_url, "--run-id", run_id
        )

    def listed(*options: str) -> list[str]:
        result = invoke("runs", "list", "--store", sqlite_url, "--json", *options)
        assert result.exit_code == 0, result.stderr
        return [r["run_id"] for r in json.loads(result.stdout)]

    assert listed("--status", "failed") == ["f-2", "f-1"]
    assert listed("--status", "finished", "--limit", "1") == ["a-2"]
    assert listed("--status", "finished", "--status", "failed") == ["f-2", "f-1", "a-2", "a-1"]
    assert listed("--status", "cancelled") == []
    table = invoke("runs", "list", "--store", sqlite_url, "--status", "cancelled").stdout
    assert "no cancelled runs" in table
    bad = invoke("runs", "list", "--store", sqlite_url, "--status", "broken")
    assert bad.exit_code == 2


def test_resume_all_failed(project: Path, sqlite_url: str) -> None:
    invoke("run", "flows.py:pipeline", "--input", "1", "--store", sqlite_url, "--run-id", "ok")
    (project / "broken").touch()
    for run_id, x in (("f-1", 1), ("f-2", 2)):
        invoke(
            "run", "flows.py:fragile", "--input", str(x), "--store", sqlite_url, "--run-id", run_id
        )
    again = invoke("resume", "--all-failed", "--store", sqlite_url)
    assert again.exit_code == 1
    assert again.stderr == "Error: 2 of 2 runs failed again\n"
    lines = jsonl(again.stdout)
    assert [(line["run_id"], "error" in line) for line in lines] == [("f-2", True), ("f-1", True)]
    assert "ctx.resume" not in again.stdout
    (project / "broken").unlink()
    fixed = invoke("resume", "--all-failed", "--store", sqlite_url)
    assert fixed.exit_code == 0, fixed.stderr
    assert jsonl(fixed.stdout) == [
        {"run_id": "f-2", "flow": "fragile", "result": 5},
        {"run_id": "f-1", "flow": "fragile", "result": 3},
    ]
    assert calls(project).count("double") == 3  # each run's double ran once, in its first try
    none_left = invoke("resume", "--all-failed", "--store", sqlite_url)
    assert none_left.exit_code == 0
    assert none_left.stdout == ""
    assert none_left.stderr == f"flowdsl resume: no failed runs in {sqlite_url}\n"


def test_hints_on_the_command_line_are_commands(project: Path, sqlite_url: str) -> None:
    (project / "broken").touch()
    args = ("run", "flows.py:fragile", "--input", "2", "--store", sqlite_url, "--run-id", "h-1")
    invoke(*args)
    again = invoke(*args)  # the stored failure, not a second attempt
    assert again.exit_code == 1
    one_error_line(
        again,
        rf"^Error: flow 'fragile', node 'check': the run ended failed: step failed: "
        rf"ValueError: check refuses 4 \(run 'h-1': "
        rf"`flowdsl resume h-1 --store {re.escape(sqlite_url)} --import flows.py`\)$",
    )
    (project / "in.jsonl").write_text("2\n")
    inputs = ("run", "flows.py:fragile", "--inputs", "in.jsonl", "--store", sqlite_url)
    invoke(*inputs)
    (line,) = jsonl(invoke(*inputs).stdout)
    assert "ctx.resume" not in line["error"]
    command = f"flowdsl resume {line['run_id']} --store {sqlite_url} --import MODULE"
    assert f"Resume it: `{command}`" in line["error"]


def test_backend_trio_without_trio_is_one_line(project: Path) -> None:
    code = "import sys; sys.modules['trio'] = None; from flowdsl.cli import main; main()"
    for command in (["run", "flows.py:pipeline", "--input", "1"], ["resume", "r-1"]):
        done = subprocess.run(
            [sys.executable, "-c", code, *command, "--backend", "trio"],
            cwd=project,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        assert done.returncode == 2
        assert done.stderr == (
            "Error: --backend trio needs trio, which is not installed. Install it: "
            "pip install 'flowdsl[trio]', or use --backend asyncio\n"
        )
        assert done.stdout == ""


FRAGILE_AT_THE_END = """
@fd.step
async def finish(x: int) -> int:
    _log("finish")
    if (HERE / "broken").exists():
        raise ValueError("finish refuses")
    return x


@fd.flow
async def long(x: int) -> int:
    return await finish(await inc(await double(x)))
"""


def test_a_resume_after_a_code_change_says_what_ran_again_and_why(
    project: Path, sqlite_url: str
) -> None:
    (project / "flows.py").write_text(FLOWS + FRAGILE_AT_THE_END)
    (project / "broken").touch()
    invoke("run", "flows.py:long", "--input", "1", "--store", sqlite_url, "--run-id", "c-1")
    assert calls(project) == ["double", "inc", "finish"]
    # Change double's code (not what it returns); fix finish; resume in a new "process".
    source = (project / "flows.py").read_text()
    (project / "flows.py").write_text(source.replace("return x * 2", "return 2 * x"))
    (project / "broken").unlink()
    del sys.modules["flows"]
    strict = invoke("resume", "c-1", "--store", sqlite_url, "--import", "flows.py", "--strict")
    assert strict.exit_code == 1
    assert "without --strict" in strict.stderr
    assert "strict=True" not in strict.stderr
    resumed = invoke("resume", "c-1", "--store", sqlite_url, "--import", "flows.py", "--live")
    assert resumed.exit_code == 0, resumed.stderr
    assert json.loads(resumed.stdout) == 3
    assert calls(project)[3:] == ["double", "inc", "finish"]
    assert "run c-1 · done · 2 nodes ran again after code changes" in resumed.stderr
    assert re.search(r"double\s+│ done .* re-ran: its code changed", resumed.stderr)
    assert re.search(r"inc\s+│ done .* re-ran: a node it depends on changed", resumed.stderr)
    shown = json.loads(invoke("runs", "show", "c-1", "--store", sqlite_url, "--json").stdout)
    assert {n["node_id"]: n.get("rerun") for n in shown["nodes"]} == {
        "double": "changed",
        "inc": "upstream",
        "finish": None,
    }
    table = invoke("runs", "show", "c-1", "--store", sqlite_url).stdout
    assert re.search(r"double .* re-ran on resume: its code changed", table)
    assert re.search(r"inc .* re-ran on resume: a node it depends on changed", table)


# --- the live view, driven by hand --------------------------------------------------------


def render(table: StepTable) -> str:
    console = Console(file=io.StringIO(), width=140, color_system=None)
    console.print(table)
    return console.file.getvalue()  # type: ignore[attr-defined]


def test_step_table_follows_events(project: Path) -> None:
    flow = load_flow("flows.py:routed")
    table = StepTable(flow.graph, "r-1")
    assert re.search(r"double\s+│ waiting", render(table))
    t = time.time()
    table.handle(ev.RunStarted("r-1", "routed", t))
    table.handle(ev.StepStarted("r-1", "double", t, 1))
    assert re.search(r"double\s+│ running\s+│\s+1 │", render(table))
    table.handle(ev.StepRetrying("r-1", "double", t, "ValueError: flaky", 1, 0.5))
    assert re.search(r"double\s+│ retrying .* ValueError: flaky \(again in 0\.5s\)", render(table))
    table.handle(ev.StepStarted("r-1", "double", t, 2))
    table.handle(ev.StepFinished("r-1", "double", t + 1.5, 6, 2, 1.5))
    assert re.search(r"double\s+│ done\s+│\s+2 │\s+1\.5 s │", render(table))
    table.handle(ev.StepStarted("r-1", "sign", t, 1))
    table.handle(ev.TokenDelta("r-1", "sign", t, "thinking about ", 1))
    table.handle(ev.TokenDelta("r-1", "sign", t, "the sign", 1))
    assert "thinking about the sign" in render(table)  # streamed text, while it runs
    table.handle(ev.BranchTaken("r-1", "sign", t, "neg", 1))
    table.handle(ev.StepFinished("r-1", "sign", t, "neg", 1, 0.002))
    table.handle(ev.StepSkipped("r-1", "sign.pos/inc", t))
    table.handle(ev.StepStarted("r-1", "sign.neg/double", t, 1))
    table.handle(ev.StepFailed("r-1", "sign.neg/double", t + 0.25, "KeyError: 'k'", 1))
    table.handle(ev.RunFailed("r-1", t, "boom", "sign.neg/double"))
    text = render(table)
    assert "thinking about" not in text  # the stream panel goes once the step is done
    assert re.search(r"sign\s+│ done\s+│\s+1 │\s+2 ms │ case 'neg'", text)
    assert re.search(r"sign\.pos/inc\s+│ skipped", text)
    assert re.search(r"sign\.neg/double\s+│ failed\s+│\s+1 │\s+250 ms │ KeyError: 'k'", text)
    assert "run r-1 · failed" in text


def test_step_table_shows_resume_events(project: Path) -> None:
    flow = load_flow("flows.py:fragile")
    table = StepTable(flow.graph, "r-2")
    t = time.time()
    table.handle(ev.RunStarted("r-2", "fragile", t, resumed=True))
    table.handle(ev.StepReused("r-2", "double", t, "journal"))
    table.handle(ev.StepInvalidated("r-2", "check", t, "changed"))
    table.handle(ev.StepInvalidated("r-2", "inc", t, "upstream"))
    text = render(table)
    assert "run r-2 · resuming · 2 nodes ran again after code changes" in text
    assert re.search(r"double\s+│ reused .* from the journal", text)
    assert re.search(r"check\s+│ waiting .* runs again: its code changed", text)
    assert re.search(r"inc\s+│ waiting .* runs again: a node it depends on changed", text)
    for node in ("check", "inc"):
        table.handle(ev.StepStarted("r-2", node, t, 1))
        table.handle(ev.StepFinished("r-2", node, t + 0.01, 1, 1, 0.01))
    table.handle(ev.RunFinished("r-2", t, 1, None))
    text = render(table)
    # Once done, the rows still say why they ran: "done" alone would hide the re-run.
    assert "run r-2 · done · 2 nodes ran again after code changes" in text
    assert re.search(r"check\s+│ done .* re-ran: its code changed", text)
    assert re.search(r"inc\s+│ done .* re-ran: a node it depends on changed", text)


# --- pure helpers -------------------------------------------------------------------------


def test_call_of(project: Path) -> None:
    pipeline = load_flow("flows.py:pipeline")
    pair = load_flow("flows.py:pair")
    assert call_of(pipeline, 3) == ((3,), {})
    assert call_of(pipeline, {"x": 3}) == ((), {"x": 3})
    assert call_of(pipeline, {"y": 3}) == (({"y": 3},), {})  # the object is the argument
    assert call_of(pair, {"a": 1}) == ((), {"a": 1})
    assert call_of(pair, {"c": 1}) == ((), {"c": 1})  # bind will name the wrong keyword
    assert call_of(pair, [1, 2]) == (([1, 2],), {})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=12,
)


@given(value=json_values, name=st.sampled_from(["triage", "pipeline"]))
def test_derived_run_ids_depend_on_the_flow_and_the_value_only(value: Any, name: str) -> None:
    run_id = derive_run_id(name, value)
    assert re.fullmatch(r"[0-9a-f]{20}", run_id)
    # The same value parsed again, with its object keys in another order, gives the same id.
    text = json.dumps(value)
    assert derive_run_id(name, json.loads(text)) == run_id
    if isinstance(value, dict):
        assert derive_run_id(name, dict(reversed(list(value.items())))) == run_id
    assert derive_run_id(name + "_other", value) != run_id


@given(a=json_values, b=json_values)
def test_different_inputs_get_different_run_ids(a: Any, b: Any) -> None:
    same = json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert (derive_run_id("f", a) == derive_run_id("f", b)) == same


# --- as a real process --------------------------------------------------------------------


def flowdsl(
    *args: str, cwd: Path, env: dict[str, str] | None = None, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flowdsl", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        input=input,
        env={**os.environ, **(env or {})},
    )


def test_process_run_graph_and_errors(project: Path) -> None:
    done = flowdsl("run", "flows.py:pair", "--input", '{"a": 21}', cwd=project)
    assert (done.returncode, json.loads(done.stdout), done.stderr) == (0, {"a": 42, "b": 10}, "")
    graph = flowdsl("graph", "flows.py:routed", cwd=project)
    assert graph.returncode == 0
    assert graph.stdout == load_flow("flows.py:routed").graph.to_mermaid()
    bad = flowdsl("run", "flows.py:nope", "--input", "1", cwd=project)
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert bad.stderr.splitlines() == [
        "Error: flows.py has no flow 'nope'. Check the name after ':': flows in flows.py: "
        "fragile, hello, looks_like_markup, pair, pipeline, routed"
    ]
    version = flowdsl("--version", cwd=project)
    assert version.stdout == f"flowdsl {fd.__version__}\n"


def test_process_run_fails_then_another_process_resumes(project: Path, sqlite_url: str) -> None:
    (project / "broken").touch()
    failed = flowdsl(
        "run",
        "flows.py:fragile",
        "--input",
        "5",
        "--store",
        sqlite_url,
        "--run-id",
        "p-1",
        cwd=project,
    )
    assert failed.returncode == 1
    assert failed.stdout == ""
    assert failed.stderr.splitlines() == [
        "Error: flow 'fragile', node 'check': step failed: ValueError: check refuses 10 "
        f"(run 'p-1': `flowdsl resume p-1 --store {sqlite_url} --import flows.py`)"
    ]
    (project / "broken").unlink()
    # Resumed from another directory: the run's module is imported again because the
    # command says so (a run record never makes it import anything).
    resumed = flowdsl(
        "resume",
        "p-1",
        "--store",
        sqlite_url,
        "--import",
        "flows",
        "--path",
        str(project),
        cwd=project.parent,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout) == 11
    assert calls(project) == ["double", "check", "check", "inc"]
    listed = flowdsl("runs", "list", "--store", sqlite_url, "--json", cwd=project)
    assert [(r["run_id"], r["status"]) for r in json.loads(listed.stdout)] == [("p-1", "finished")]


def test_process_inputs_jsonl(project: Path, sqlite_url: str) -> None:
    done = flowdsl(
        "run",
        "flows.py:pipeline",
        "--inputs",
        "-",
        "--store",
        sqlite_url,
        cwd=project,
        input="1\n2\n",
    )
    assert done.returncode == 0, done.stderr
    assert [line["result"] for line in jsonl(done.stdout)] == [3, 5]


def test_process_worker_runs_the_steps_of_a_batch_run(project: Path, sqlite_url: str) -> None:
    worker = subprocess.Popen(
        [sys.executable, "-m", "flowdsl", "worker", "--broker", sqlite_url, "--import", "flows.py"],
        cwd=project,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stderr is not None
        ready = worker.stderr.readline()  # blocks until the worker says it serves
        assert ready.startswith(f"flowdsl worker: serving {sqlite_url} (flows)")
        done = flowdsl(
            "run",
            "flows:routed",
            "--input",
            "2",
            "--batch",
            "--workers",
            "0",
            "--store",
            sqlite_url,
            cwd=project,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == 5
        assert calls(project) == ["double", "inc"]  # run by the worker process
        worker.send_signal(signal.SIGINT)
        assert worker.wait(timeout=60) == 0
        assert "SIGINT, stopping" in worker.stderr.read()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        if worker.stderr is not None:
            worker.stderr.close()


def test_runs_show_lists_a_runs_dead_letters(tmp_path: Path) -> None:
    import anyio

    from flowdsl._records import RunRecord, RunStatus
    from flowdsl.backends import link, open_broker, open_store

    url = f"sqlite:///{tmp_path}/dead.db"

    async def bury() -> None:
        store, queue = open_store(url), open_broker(url)
        link(store, queue)
        await store.open()
        await queue.open()
        try:
            now = time.time()
            record = RunRecord("r-dead", "f", "m:f", "fp", "{}", RunStatus.FAILED, now, now)
            await store.create_run(record)
            await queue.enqueue([("r-dead", "flaky", "{}")])
            (claimed,) = await queue.claim("w", 1, 30.0)
            await queue.dead_letter(claimed.task_id, "r-dead", "flaky", "{}", "handed out 2 times")
        finally:
            await queue.close()
            await store.close()

    anyio.run(bury)
    shown = invoke("runs", "show", "r-dead", "--store", url)
    assert shown.exit_code == 0, shown.output
    assert "dead letters" in shown.output
    assert re.search(r"flaky .* handed out 2 times", shown.output)
    data = json.loads(invoke("runs", "show", "r-dead", "--store", url, "--json").output)
    assert [(d["node_id"], d["reason"]) for d in data["dead_letters"]] == [
        ("flaky", "handed out 2 times")
    ]
