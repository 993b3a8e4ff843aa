"""Untrusted data at the command line (docs/security.md): no command prints a credential,
no command imports what a store names, workers import only what they are told to, and
bad input is a one-line error with exit code 2.  Every command runs as a real process
against real servers, and its whole output (stdout and stderr) is searched.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from _servers import NatsServer, RedisServer

PASSWORD = "hunter2-redis-pw-7741"
TOKEN = "s3cret-nats-token-9912"

FLOWS = """
import flowdsl as fd
from pathlib import Path


@fd.step
async def double(x: int) -> int:
    return 2 * x


@fd.step
async def check(x: int) -> int:
    if Path("broken").exists():
        raise ValueError(f"check refuses {x}")
    return x + 1


@fd.flow
async def flow(x: int) -> int:
    return await check(await double(x))
"""

CANARY = """
from pathlib import Path

Path("canary.txt").write_text("imported")
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "flows.py").write_text(FLOWS)
    return tmp_path


def flowdsl(
    *args: str, cwd: Path, env: dict[str, str] | None = None, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLOWDSL_")}
    return subprocess.run(
        [sys.executable, "-m", "flowdsl", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        input=input,
        env={**base, **(env or {})},
    )


def output(done: subprocess.CompletedProcess[str]) -> str:
    return done.stdout + done.stderr


# --- no command prints a credential ----------------------------------------------------------


def every_command(project: Path, url: str) -> Iterator[tuple[str, str]]:
    """``(what, output)`` of every command run against the store and queue at *url*."""

    def run(what: str, *args: str) -> tuple[str, str]:
        done = flowdsl(*args, cwd=project)
        return what, output(done)

    yield run("run", "run", "flows.py:flow", "--input", "1", "--store", url, "--run-id", "ok")
    (project / "broken").touch()
    yield run("failed run", "run", "flows.py:flow", "--input", "2", "--store", url)
    yield run(
        "failed run, traceback",
        "--traceback",
        *("run", "flows.py:flow", "--input", "2", "--store", url, "--run-id", "bad"),
    )
    (project / "broken").unlink()
    yield run(
        "batch run",
        *("run", "flows.py:flow", "--input", "3", "--batch", "--workers", "1"),
        *("--broker", url, "--store", url),
    )
    yield run("runs list", "runs", "list", "--store", url)
    yield run("runs list --json", "runs", "list", "--store", url, "--json")
    yield run("runs show", "runs", "show", "ok", "--store", url, "--import", "flows.py")
    yield run("runs show --json", "runs", "show", "ok", "--store", url, "--json")
    yield run("runs show, missing", "runs", "show", "missing", "--store", url)
    yield run("runs prune", "runs", "prune", "--store", url, "--older-than", "30d")
    yield run("signal", "signal", "bad", "go", "--value", "1", "--store", url)
    yield run("signal, missing", "signal", "missing", "go", "--store", url)
    yield run("resume, missing", "resume", "missing", "--store", url)
    yield run("resume", "resume", "bad", "--store", url, "--import", "flows.py")
    yield run("resume, no --import", "resume", "ok", "--store", url)
    yield run("runs list, traceback", "--traceback", "runs", "show", "missing", "--store", url)
    # The worker's banner, then a clean stop.
    worker = subprocess.Popen(
        [sys.executable, "-m", "flowdsl", "worker", "--broker", url, "--import", "flows.py"],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert worker.stderr is not None
    banner = worker.stderr.readline()
    worker.send_signal(signal.SIGINT)
    rest, errors = worker.communicate(timeout=60)
    assert "serving" in banner, banner + errors
    yield "worker", banner + rest + errors


def assert_never_printed(secret: str, outputs: Iterator[tuple[str, str]]) -> None:
    seen = 0
    for what, text in outputs:
        seen += 1
        assert secret not in text, f"{what} printed the credential:\n{text}"
    assert seen >= 15


@pytest.mark.redis
def test_no_command_prints_the_redis_password(project: Path, redis_server_factory: object) -> None:
    server: RedisServer = redis_server_factory(requirepass=PASSWORD)  # type: ignore[operator]
    url = f"{server.url}?prefix=cli"
    assert PASSWORD in url
    assert_never_printed(PASSWORD, every_command(project, url))
    # Refused credentials and an unreachable server too.
    wrong = server.make_url(password=PASSWORD + "x")
    for args in (("runs", "list", "--store", wrong), ("runs", "show", "x", "--store", wrong)):
        done = flowdsl("--traceback", *args, cwd=project)
        assert done.returncode != 0
        assert PASSWORD not in output(done)


@pytest.mark.nats
def test_no_command_prints_the_nats_token(project: Path, nats_server_factory: object) -> None:
    server: NatsServer = nats_server_factory(token=TOKEN)  # type: ignore[operator]
    url = f"{server.url}?prefix=cli"
    assert TOKEN in url
    assert_never_printed(TOKEN, every_command(project, url))
    wrong = server.make_url(token=TOKEN + "x")
    done = flowdsl("--traceback", "runs", "list", "--store", wrong, cwd=project)
    assert done.returncode != 0
    assert TOKEN not in output(done)


def test_a_url_in_an_error_is_masked(project: Path) -> None:
    done = flowdsl("runs", "list", "--store", f"bogus://user:{PASSWORD}@host/", cwd=project)
    assert done.returncode == 2
    assert PASSWORD not in output(done)
    assert "user:***@host" in done.stderr


# --- nothing a store names is imported -------------------------------------------------------


def edited_run(project: Path, module: str) -> str:
    """A finished run whose record now names *module* as its flow's (checks dropped, as a
    tamperer without a key would write it)."""
    url = f"sqlite:///{project}/runs.db"
    done = flowdsl(
        "run", "flows.py:flow", "--input", "1", "--store", url, "--run-id", "r", cwd=project
    )
    assert done.returncode == 0, done.stderr
    db = sqlite3.connect(project / "runs.db", isolation_level=None)
    db.execute(
        "UPDATE runs SET flow_ref = ?, integrity = NULL, status = 'failed', state_integrity = NULL",
        (f"{module}:flow",),
    )
    db.close()
    (project / f"{module}.py").write_text(CANARY)
    return url


def test_runs_show_and_list_never_import_what_a_record_names(project: Path) -> None:
    url = edited_run(project, "planted")
    for args in (
        ("runs", "show", "r", "--store", url),
        ("runs", "show", "r", "--store", url, "--json"),
        ("runs", "list", "--store", url),
    ):
        done = flowdsl(*args, cwd=project)
        assert done.returncode == 0, done.stderr
    assert not (project / "canary.txt").exists()


def test_resume_imports_only_what_it_is_told_to(project: Path) -> None:
    url = edited_run(project, "planted")
    refused = flowdsl("resume", "r", "--store", url, cwd=project)
    assert refused.returncode == 2
    assert refused.stderr.startswith("Error: flow 'flow': the flow of run 'r' is 'planted:flow'")
    assert "--import MODULE" in refused.stderr
    assert len(refused.stderr.splitlines()) == 1
    assert not (project / "canary.txt").exists()
    # Told which flow, it resumes.
    done = flowdsl("resume", "r", "--store", url, "--flow", "flows.py:flow", cwd=project)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == 3
    assert not (project / "canary.txt").exists()


def test_a_worker_leaves_the_current_directory_off_its_import_path(project: Path) -> None:
    (project / "planted.py").write_text(CANARY)
    url = f"sqlite:///{project}/q.db"
    done = flowdsl("worker", "--broker", url, "--import", "planted", cwd=project)
    assert done.returncode == 2
    assert "No module named 'planted'" in done.stderr
    assert not (project / "canary.txt").exists()


def test_a_worker_signs_with_the_key_its_variable_holds(project: Path) -> None:
    url = f"sqlite:///{project}/q.db"
    done = flowdsl(
        "worker",
        "--broker",
        url,
        "--import",
        "flows.py",
        "--signing-key-env",
        "NO_SUCH_VAR",
        cwd=project,
    )
    assert done.returncode == 2
    assert done.stderr == "Error: the environment variable NO_SUCH_VAR (a signing key) is not set\n"


def test_a_signed_run_resumes_only_with_its_key(project: Path) -> None:
    url = f"sqlite:///{project}/s.db"
    env = {"KEY_NOW": "n" * 32, "KEY_BEFORE": "b" * 32}
    (project / "broken").touch()
    failed = flowdsl(
        *("run", "flows.py:flow", "--input", "1", "--store", url, "--run-id", "s"),
        *("--signing-key-env", "KEY_BEFORE"),
        cwd=project,
        env=env,
    )
    assert failed.returncode == 1
    (project / "broken").unlink()
    resume = ("resume", "s", "--store", url, "--import", "flows.py")
    unkeyed = flowdsl(*resume, cwd=project, env=env)
    assert unkeyed.returncode == 1
    assert "this process has no signing key" in unkeyed.stderr
    rotated = flowdsl(
        *resume,
        *("--signing-key-env", "KEY_NOW", "--old-signing-key-env", "KEY_BEFORE"),
        cwd=project,
        env=env,
    )
    assert rotated.returncode == 0, rotated.stderr
    assert json.loads(rotated.stdout) == 3
    # Shown without the key: signed records are displayed, unverified.
    shown = flowdsl("runs", "show", "s", "--store", url, "--json", cwd=project)
    assert shown.returncode == 0, shown.stderr


# --- runs prune ------------------------------------------------------------------------------


def test_runs_prune_deletes_old_ended_runs(project: Path) -> None:
    url = f"sqlite:///{project}/p.db"
    for run_id in ("a", "b"):
        done = flowdsl(
            "run", "flows.py:flow", "--input", "1", "--store", url, "--run-id", run_id, cwd=project
        )
        assert done.returncode == 0, done.stderr
    db = sqlite3.connect(project / "p.db", isolation_level=None)
    db.execute("UPDATE runs SET updated_at = 1000 WHERE run_id = 'a'")
    db.close()
    kept = flowdsl(
        "runs", "prune", "--store", url, "--older-than", "1d", "--status", "failed", cwd=project
    )
    assert kept.returncode == 0, kept.stderr
    assert kept.stderr.startswith("pruned 0 run(s)")
    pruned = flowdsl("runs", "prune", "--store", url, "--older-than", "1d", "--json", cwd=project)
    assert pruned.returncode == 0, pruned.stderr
    assert json.loads(pruned.stdout) == ["a"]
    listed = flowdsl("runs", "list", "--store", url, "--json", cwd=project)
    assert [r["run_id"] for r in json.loads(listed.stdout)] == ["b"]
    bad = flowdsl("runs", "prune", "--store", url, "--older-than", "soon", cwd=project)
    assert bad.returncode == 2
    assert "is not a duration" in bad.stderr


# --- bad input at the edges ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (("--input", "-"), "[" * 100_000 + "]" * 100_000, "--input is nested too deeply"),
        (("--input", "[" * 900 + "]" * 900), None, "is nested too deeply"),
        (("--inputs", "bad.jsonl"), None, "bad.jsonl line 2 is not UTF-8 text"),
        (("--inputs", "-"), "\udcff\n", "stdin line 1 is not UTF-8 text"),
        (("--input", "-"), "\udcff", "--input - (stdin) is not UTF-8 text"),
    ],
    ids=["deep stdin", "deep argument", "non-UTF-8 line", "non-UTF-8 stdin lines", "stdin"],
)
def test_bad_input_is_one_line_and_exit_2(
    project: Path, args: tuple[str, ...], stdin: str | None, message: str
) -> None:
    (project / "bad.jsonl").write_bytes(b"1\n\xff\xfe\n")
    (project / "anything.py").write_text(
        "import flowdsl as fd\nfrom typing import Any\n\n\n@fd.step\nasync def echo(x: Any) -> "
        "Any:\n    return x\n\n\n@fd.flow\nasync def flow(x: Any) -> Any:\n"
        "    return await echo(x)\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "flowdsl", "run", "anything.py:flow", *args],
        cwd=project,
        capture_output=True,
        timeout=120,
        input=None if stdin is None else stdin.encode("utf-8", "surrogateescape"),
    )
    stderr = done.stderr.decode()
    assert done.returncode == 2, stderr
    assert len(stderr.splitlines()) == 1, stderr
    assert message in stderr
