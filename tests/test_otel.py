"""OpenTelemetry: the span tree of a run in real time, and across batch worker processes.

Each scenario runs in subprocesses (``_otel_proc.py``) that set their own tracer provider,
so that this process, and every other test, runs untraced.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

TESTS = Path(__file__).resolve().parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _spans(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _run(*args: str, cwd: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(TESTS / "_otel_proc.py"), *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def _by_run(spans: list[dict[str, Any]], run_id: str) -> list[dict[str, Any]]:
    return [s for s in spans if s["attributes"].get("flowdsl.run_id") == run_id]


def _one(spans: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = [s for s in spans if s["name"] == name]
    assert len(found) == 1, [s["name"] for s in spans]
    return found[0]


def _check_traced_run(spans: list[dict[str, Any]], llm_spans: list[dict[str, Any]]) -> None:
    """The tree of run r-traced: run -> nodes (ask -> its LLM call)."""
    mine = _by_run(spans, "r-traced")
    run = _one(mine, "flowdsl.run traced")
    nodes = {s["attributes"]["flowdsl.node_id"]: s for s in mine if s is not run}
    assert set(nodes) == {"ask", "flaky", "double"}
    for node in nodes.values():
        assert node["trace_id"] == run["trace_id"]
        assert node["parent_id"] == run["span_id"]
        assert node["attributes"]["flowdsl.status"] == "finished"
        assert node["attributes"]["flowdsl.flow"] == "traced"
    assert run["attributes"]["flowdsl.status"] == "finished"
    assert run["attributes"]["flowdsl.usage.input_tokens"] > 0
    # The retried node: its last attempt, and the failed one as an event.
    assert nodes["flaky"]["attributes"]["flowdsl.attempt"] == 2
    assert nodes["flaky"]["events"] == ["flowdsl.retry"]
    assert nodes["double"]["attributes"]["flowdsl.attempt"] == 1
    # The LLM call: a client span under the node that made it, with GenAI attributes.
    [chat] = [s for s in llm_spans if s["parent_id"] == nodes["ask"]["span_id"]]
    assert chat["name"] == "chat gpt-4o-mini"
    assert chat["kind"] == "CLIENT"
    assert chat["trace_id"] == run["trace_id"]
    attributes = chat["attributes"]
    assert attributes["gen_ai.system"] == "fakellm"
    assert attributes["gen_ai.request.model"] == "gpt-4o-mini"
    assert attributes["gen_ai.usage.input_tokens"] > 0
    assert attributes["gen_ai.usage.output_tokens"] == 6


def _check_failed_run(spans: list[dict[str, Any]]) -> None:
    mine = _by_run(spans, "r-failing")
    run = _one(mine, "flowdsl.run failing")
    assert run["status"] == "ERROR"
    assert run["attributes"]["flowdsl.status"] == "failed"
    [boom] = [s for s in mine if s["attributes"].get("flowdsl.node_id") == "boom"]
    assert boom["status"] == "ERROR"
    assert boom["attributes"]["flowdsl.status"] == "failed"
    assert boom["parent_id"] == run["span_id"]
    assert "exception" in boom["events"]  # the step's own exception, recorded


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_span_tree_of_a_run_in_real_time(tmp_path: Path, backend: str) -> None:
    out = tmp_path / "spans.jsonl"
    _run("realtime", backend, str(out), cwd=tmp_path)
    spans = _spans(out)
    llm = [s for s in spans if s["name"].startswith("chat ")]
    _check_traced_run(spans, llm)
    _check_failed_run(spans)
    # Runs are separate traces.
    traces = {s["trace_id"] for s in spans if s["name"].startswith("flowdsl.run ")}
    assert len(traces) == 3


@pytest.fixture
def worker_procs(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.slow
def test_worker_spans_join_the_clients_trace(
    tmp_path: Path, worker_procs: list[subprocess.Popen[bytes]]
) -> None:
    url = f"sqlite:///{tmp_path / 'queue.db'}"
    outs = [tmp_path / f"worker{i}.jsonl" for i in range(2)]
    for out in outs:
        with (tmp_path / f"{out.stem}.log").open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, str(TESTS / "_otel_proc.py"), "worker", url, str(out)],
                cwd=tmp_path,
                env=_env(),
                stdout=subprocess.PIPE,
                stderr=log,
            )
        worker_procs.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready", (
            tmp_path / f"{out.stem}.log"
        ).read_text()
    client_out = tmp_path / "client.jsonl"
    _run("client", url, str(client_out), cwd=tmp_path)
    client = _spans(client_out)
    # Node spans are written before their task completes, so they are all there now.
    workers = [s for out in outs if out.exists() for s in _spans(out)]
    # The client's spans are the runs'; the nodes' come from the worker processes.
    assert {s["name"] for s in client} == {
        "flowdsl.run traced",
        "flowdsl.run plain",
        "flowdsl.run failing",
    }
    spans = client + [s for s in workers if not s["name"].startswith("chat ")]
    _check_traced_run(spans, [s for s in workers if s["name"].startswith("chat ")])
    _check_failed_run(spans)
    plain = _one(client, "flowdsl.run plain")
    doubles = _by_run(workers, "r-plain")
    assert sorted(s["attributes"]["flowdsl.node_id"] for s in doubles) == ["double", "double-2"]
    assert {s["parent_id"] for s in doubles} == {plain["span_id"]}
    assert {s["trace_id"] for s in doubles} == {plain["trace_id"]}


def test_import_flowdsl_does_not_import_opentelemetry() -> None:
    code = (
        "import sys, flowdsl as fd\n"
        "@fd.step\nasync def one(x: int) -> int:\n    return x\n"
        "@fd.flow\nasync def f(x: int) -> int:\n    return await one(x)\n"
        "assert fd.run(f, 1) == 1\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
