"""``flowdsl ui``: its options, and the command serving a store as a real process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import httpx
from click.testing import CliRunner

import flowdsl as fd
from flowdsl.cli.main import cli
from flowdsl.cli.ui import is_loopback, parse_listen

import ui_flows
from _servers import free_port
from _ui_server import PARSE_RAISES, populate

TESTS = Path(__file__).resolve().parent
WAIT = 20.0


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.output


def test_help_names_the_options() -> None:
    code, output = invoke("ui", "--help")
    assert code == 0
    for option in (
        "--store",
        "--broker",
        "--listen",
        "--token-env",
        "--import",
        "--signing-key-env",
        "--old-signing-key-env",
    ):
        assert option in output
    assert ".flowdsl/flowdsl.db" in output  # the default store, as `runs` and `resume` have


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--listen", "8765"], "is not HOST:PORT"),
        (["--listen", "127.0.0.1:99999"], "is not HOST:PORT"),
        (["--token-env", "FLOWDSL_TEST_NO_SUCH_VAR"], "FLOWDSL_TEST_NO_SUCH_VAR is not set"),
        (["--signing-key-env", "FLOWDSL_TEST_NO_SUCH_VAR"], "FLOWDSL_TEST_NO_SUCH_VAR"),
        (["--old-signing-key-env", "HOME"], "needs --signing-key-env"),
        (["--llm", "batch_llm_provider"], "give MODULE:ATTR"),
        (["--llm", "batch_llm_provider:openai"], "is not one of the --import modules"),
    ],
)
def test_bad_options_are_usage_errors(sqlite_url: str, args: list[str], message: str) -> None:
    code, output = invoke("ui", "--store", sqlite_url, *args)
    assert code == 2
    assert message in output


def test_without_a_store_the_default_file_is_served_or_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLOWDSL_STORE", raising=False)
    monkeypatch.chdir(tmp_path)
    code, output = invoke("ui")
    assert code == 2
    assert "no --store given, and no .flowdsl/flowdsl.db here" in output


def test_runs_show_prints_the_kept_traceback(sqlite_url: str) -> None:
    anyio.run(populate, sqlite_url)
    code, output = invoke("runs", "show", "t-failed", "--store", sqlite_url)
    assert code == 0
    assert "kept: add --traceback to see it" in output
    code, output = invoke("runs", "show", "t-failed", "--store", sqlite_url, "--traceback")
    assert code == 0
    assert "traceback of node parse:" in output
    assert PARSE_RAISES in output.replace("\n", "")  # the table may wrap a long path
    code, output = invoke("runs", "show", "t-failed", "--store", sqlite_url, "--json")
    assert PARSE_RAISES in json.loads(output)["run"]["traceback"]


def test_a_memory_store_is_refused() -> None:
    code, output = invoke("ui", "--store", "memory://")
    assert code == 2
    assert "keeps runs only inside one process" in output


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8765", ("127.0.0.1", 8765)),
        ("[::1]:9000", ("::1", 9000)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),  # noqa: S104 - parsing, not binding
        ("localhost:1", ("localhost", 1)),
    ],
)
def test_listen_is_parsed(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


def test_loopback_hosts() -> None:
    assert is_loopback("127.0.0.1")
    assert is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0")  # noqa: S104
    assert not is_loopback("example.org")


SIGNING_KEY = "s" * 32


async def unsigned_run(url: str) -> None:
    """A run written by a process without the signing key."""
    async with fd.Context(store=url) as ctx:
        with contextlib.suppress(fd.StepFailed):
            await ctx.run(ui_flows.ingest, "other.txt", run_id="t-unsigned")


@pytest.fixture
def ui_process(sqlite_url: str, tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    anyio.run(populate, sqlite_url, fd.Secret("UI_TEST_KEY", SIGNING_KEY))
    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), *filter(None, [env.get("PYTHONPATH")])])
    env["UI_TEST_TOKEN"] = "t0ken-for-the-test"
    env["UI_TEST_KEY"] = SIGNING_KEY
    log = tmp_path / "ui.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flowdsl",
                "ui",
                "--store",
                sqlite_url,
                "--listen",
                f"127.0.0.1:{port}",
                "--token-env",
                "UI_TEST_TOKEN",
                "--import",
                "ui_flows",
                "--signing-key-env",
                "UI_TEST_KEY",
            ],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                httpx.get(url + "/", timeout=1.0)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        yield url, log.read_text(), sqlite_url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise


@pytest.mark.slow
def test_the_command_serves_the_store_behind_its_token(
    ui_process: tuple[str, str, str],
) -> None:
    url, banner, store = ui_process
    assert f"at {url}/" in banner
    assert "?token=<the value of $UI_TEST_TOKEN>" in banner
    assert "t0ken-for-the-test" not in banner
    assert httpx.get(url + "/api/runs").status_code == 401
    auth = {"authorization": "Bearer t0ken-for-the-test"}
    runs = httpx.get(url + "/api/runs", headers=auth).json()
    assert [r["run_id"] for r in runs["runs"]] == ["t-failed", "t-urgent", "t-finished"]
    view = httpx.get(url + "/api/runs/t-failed", headers=auth).json()
    assert view["run"]["graph"] == "flow"  # --import ui_flows
    # On loopback it answers loopback names only.
    rebound = httpx.get(url + "/api/runs", headers={**auth, "host": "evil.example"})
    assert rebound.status_code == 400
    # With --signing-key-env, records are verified with the key: one written without it
    # is refused, as a context with the key refuses it.
    assert httpx.get(url + "/api/runs/t-failed", headers=auth).status_code == 200
    anyio.run(unsigned_run, store)
    unsigned = httpx.get(url + "/api/runs/t-unsigned", headers=auth)
    assert unsigned.status_code == 422
    assert "this process requires signed data" in unsigned.json()["message"]
    listed = httpx.get(url + "/api/runs", headers=auth)
    assert listed.status_code == 422
    assert listed.json()["error"] == "unreadable_runs"
