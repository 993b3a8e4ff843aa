"""``flowdsl ui``: its options, and the command serving a store as a real process."""

from __future__ import annotations

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

from flowdsl.cli.main import cli
from flowdsl.cli.ui import is_loopback, parse_listen

from _servers import free_port
from _ui_server import populate

TESTS = Path(__file__).resolve().parent
WAIT = 20.0


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.output


def test_help_names_the_options() -> None:
    code, output = invoke("ui", "--help")
    assert code == 0
    for option in ("--store", "--broker", "--listen", "--token-env", "--import"):
        assert option in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--listen", "8765"], "is not HOST:PORT"),
        (["--listen", "127.0.0.1:99999"], "is not HOST:PORT"),
        (["--token-env", "FLOWDSL_TEST_NO_SUCH_VAR"], "FLOWDSL_TEST_NO_SUCH_VAR is not set"),
    ],
)
def test_bad_options_are_usage_errors(sqlite_url: str, args: list[str], message: str) -> None:
    code, output = invoke("ui", "--store", sqlite_url, *args)
    assert code == 2
    assert message in output


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


@pytest.fixture
def ui_process(sqlite_url: str, tmp_path: Path) -> Iterator[tuple[str, str]]:
    anyio.run(populate, sqlite_url)
    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), *filter(None, [env.get("PYTHONPATH")])])
    env["UI_TEST_TOKEN"] = "t0ken-for-the-test"
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
        yield url, log.read_text()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise


@pytest.mark.slow
def test_the_command_serves_the_store_behind_its_token(ui_process: tuple[str, str]) -> None:
    url, banner = ui_process
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
