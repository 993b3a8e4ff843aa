"""The command line against a real ``flowdsl serve`` process: ``runs list`` and ``runs show``
with ``--server`` (token, TLS, the errors a user meets), and ``serve --signing-key-env``.

The command line runs in this process through click's CliRunner; the service is a
subprocess serving ``service_flows`` on an SQLite file.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import pytest
from click.testing import CliRunner, Result

import flowdsl as fd
from flowdsl.cli import cli

from _grpc_stubs import self_signed
from _service_proc import Service, serve, service_env

pytestmark = pytest.mark.timeout(120)

TOKEN = "tok-" + "s3cret" * 6


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.delenv("FLOWDSL_STORE", raising=False)
    monkeypatch.delenv("FLOWDSL_TRACEBACK", raising=False)
    monkeypatch.setenv("FD_TOKEN", TOKEN)
    monkeypatch.setenv("FD_WRONG_TOKEN", "not-" + TOKEN)
    return service_env(tmp_path)


@pytest.fixture
def services(tmp_path: Path, env: dict[str, str]) -> Iterator[Any]:
    started: list[Service] = []

    def start(*extra: str) -> Service:
        service = serve(f"sqlite:///{tmp_path / 'runs.db'}", env, *extra)
        started.append(service)
        return service

    yield start
    for service in started:
        service.reap()


def start_runs(url: str, token: str | None = TOKEN, ca: bytes | None = None) -> None:
    """Three runs, in this order: add(1) and add(2) finish, failing(3) fails."""

    async def go() -> None:
        async with fd.Client(url, token=token, ca_cert=ca) as client:
            for flow, inputs, run_id in (
                ("service_flows:add", {"a": 1}, "one"),
                ("service_flows:add", {"a": 2}, "two"),
                ("service_flows:failing", {"x": 3}, "bad"),
            ):
                await client.start(flow, inputs, run_id=run_id)
                await client.wait(run_id)

    anyio.run(go, backend="asyncio")


def refused(result: Result, says: str, code: int = 1) -> None:
    """One line, `Error: ...`, no traceback, and never the token."""
    assert result.exit_code == code, result.output
    assert says in result.output
    assert result.output.startswith("Error: ")
    assert "Traceback" not in result.output
    assert TOKEN not in result.output


def test_runs_list_and_show_through_a_service(services: Any) -> None:
    service = services("--token-env", "FD_TOKEN")
    start_runs(service.url)
    server = ("--server", service.url, "--token-env", "FD_TOKEN")

    listed = json.loads(invoke("runs", "list", *server, "--json").stdout)
    assert [(r["run_id"], r["status"], r["flow_ref"]) for r in listed] == [
        ("bad", "failed", "service_flows:failing"),
        ("two", "finished", "service_flows:add"),
        ("one", "finished", "service_flows:add"),
    ]
    assert listed[1]["result"] == 3
    newest = json.loads(invoke("runs", "list", *server, "--json", "--limit", "1").stdout)
    assert [r["run_id"] for r in newest] == ["bad"]
    done = json.loads(invoke("runs", "list", *server, "--json", "--status", "finished").stdout)
    assert [r["run_id"] for r in done] == ["two", "one"]
    both = invoke("runs", "list", *server, "--json", "--status", "failed", "--status", "finished")
    assert [r["run_id"] for r in json.loads(both.stdout)] == ["bad", "two", "one"]
    table = invoke("runs", "list", *server)
    assert table.exit_code == 0
    assert f"runs in {service.url}" in table.stdout
    assert "two" in table.stdout

    shown = json.loads(invoke("runs", "show", "two", *server, "--json").stdout)
    assert shown["run"]["status"] == "finished"
    assert shown["run"]["result"] == 3
    assert [(n["node_id"], n["status"], n["attempts"], n["result"]) for n in shown["nodes"]] == [
        ("plus", "done", 1, 3)
    ]
    failed = json.loads(invoke("runs", "show", "bad", *server, "--json").stdout)
    assert failed["run"]["failed_node"] == "boom"
    assert [(n["node_id"], n["status"]) for n in failed["nodes"]] == [("boom", "failed")]
    text = invoke("runs", "show", "two", *server)
    assert text.exit_code == 0
    assert "plus" in text.stdout


def test_runs_show_of_a_run_still_going_shows_its_record(services: Any, tmp_path: Path) -> None:
    service = services()

    async def go() -> None:
        async with fd.Client(service.url) as client:
            await client.start("service_flows:gated", {"x": 1}, run_id="going")

    anyio.run(go, backend="asyncio")
    shown = json.loads(invoke("runs", "show", "going", "--server", service.url, "--json").stdout)
    assert shown["run"]["status"] == "running"
    # No journal through the service while it runs: nothing is shown as done (the nodes
    # are listed, as pending, when the flow's module is imported here).
    assert [n for n in shown["nodes"] if n["status"] != "pending"] == []
    (tmp_path / "gates" / "held").touch()


def test_wrong_or_missing_token_is_one_clear_line(services: Any) -> None:
    service = services("--token-env", "FD_TOKEN")
    wrong = invoke("runs", "list", "--server", service.url, "--token-env", "FD_WRONG_TOKEN")
    refused(wrong, "the token is wrong")
    assert "check the token in the variable --token-env names" in wrong.output
    missing = invoke("runs", "show", "one", "--server", service.url)
    refused(missing, "the token is missing")
    assert "pass the service's token with --token-env VAR" in missing.output
    unset = invoke("runs", "list", "--server", service.url, "--token-env", "FD_NO_SUCH_VAR")
    refused(unset, "the environment variable FD_NO_SUCH_VAR is not set", code=2)


def test_unknown_run_and_unreachable_service(services: Any) -> None:
    service = services()
    unknown = invoke("runs", "show", "nope", "--server", service.url)
    refused(unknown, "answered NOT_FOUND: no run 'nope'")
    with socket.socket() as sock:  # a port nobody listens on once it is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    away = invoke("runs", "list", "--server", f"grpc://127.0.0.1:{port}", "--token-env", "FD_TOKEN")
    refused(away, f"cannot reach the service at grpc://127.0.0.1:{port}")
    bad_url = invoke("runs", "list", "--server", "http://127.0.0.1:1")
    refused(bad_url, "is not a service URL", code=2)


def test_server_goes_without_store(tmp_path: Path, env: dict[str, str]) -> None:
    store = f"sqlite:///{tmp_path / 'runs.db'}"
    both = invoke("runs", "list", "--server", "grpc://127.0.0.1:1", "--store", store)
    refused(both, "--server and --store are mutually exclusive", code=2)
    show_both = invoke("runs", "show", "x", "--store", store, "--server", "grpc://127.0.0.1:1")
    refused(show_both, "--server and --store are mutually exclusive", code=2)
    token_alone = invoke("runs", "list", "--store", store, "--token-env", "FD_TOKEN")
    refused(token_alone, "--token-env goes with --server", code=2)
    signed = invoke(
        "runs", "list", "--server", "grpc://127.0.0.1:1", "--signing-key-env", "FD_TOKEN"
    )
    refused(signed, "--signing-key-env goes with --store", code=2)


def test_tls_with_and_without_the_ca(services: Any, tmp_path: Path) -> None:
    cert, key = self_signed()
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    service = services(
        "--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem")
    )
    assert service.url.startswith("grpcs://")
    start_runs(service.url, token=None, ca=cert)
    listed = invoke("runs", "list", "--server", service.url, "--tls-ca", str(tmp_path / "cert.pem"))
    assert listed.exit_code == 0, listed.output
    assert "one" in listed.stdout
    untrusted = invoke("runs", "list", "--server", service.url)
    refused(untrusted, f"cannot reach the service at {service.url}")
    plain = invoke("runs", "list", "--server", service.url.replace("grpcs://", "grpc://"))
    refused(plain, "cannot reach the service")


# --- flowdsl serve --signing-key-env ----------------------------------------------------------


def serve_fails(
    tmp_path: Path, env: dict[str, str], *extra: str
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flowdsl",
            "serve",
            "--store",
            f"sqlite:///{tmp_path / 'runs.db'}",
            "--import",
            "service_flows",
            "--listen",
            "127.0.0.1:0",
            *extra,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("Error: the service cannot read the runs in sqlite:///")
    assert "Traceback" not in done.stderr
    assert "start the service with that key (--signing-key-env VAR" in done.stderr
    return done


def test_serve_with_a_signing_key_refuses_records_it_cannot_verify(
    services: Any, tmp_path: Path, env: dict[str, str]
) -> None:
    env["FD_KEY"] = "k" * 32
    env["FD_OTHER_KEY"] = "o" * 32
    signed = services("--signing-key-env", "FD_KEY")
    start_runs(signed.url, token=None)
    signed.stop()

    # Another key, no key: the service refuses to start, and says why.
    assert "signed with a key this process does not know" in (
        serve_fails(tmp_path, env, "--signing-key-env", "FD_OTHER_KEY").stderr
    )
    assert "it is signed, and this process has no signing key" in serve_fails(tmp_path, env).stderr
    # The old key as an old key: it reads them (rotation).
    rotated = services("--signing-key-env", "FD_OTHER_KEY", "--old-signing-key-env", "FD_KEY")
    listed = json.loads(invoke("runs", "list", "--server", rotated.url, "--json").stdout)
    assert {r["run_id"] for r in listed} == {"one", "two", "bad"}
    rotated.stop()

    # A record changed behind the service's back is refused, by the call that reads it.
    same = services("--signing-key-env", "FD_KEY")
    # closing(): a connection's own `with` commits but does not close it.
    with closing(sqlite3.connect(tmp_path / "runs.db")) as db, db:
        db.execute("UPDATE runs SET result = '999' WHERE run_id = 'two'")
    tampered = invoke("runs", "show", "two", "--server", same.url)
    refused(tampered, "answered FAILED_PRECONDITION: run 'two' in sqlite:///")
    assert "does not match its signature" in tampered.output
    untouched = json.loads(invoke("runs", "show", "one", "--server", same.url, "--json").stdout)
    assert untouched["run"]["result"] == 2
    same.stop()


def test_serve_with_a_signing_key_refuses_unsigned_records(
    services: Any, tmp_path: Path, env: dict[str, str]
) -> None:
    unsigned = services()
    start_runs(unsigned.url, token=None)
    unsigned.stop()
    env["FD_KEY"] = "k" * 32
    done = serve_fails(tmp_path, env, "--signing-key-env", "FD_KEY")
    assert "it is not signed (written by a process without the signing key" in done.stderr


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("service_flows", "give MODULE:ATTR"),
        ("batch_llm_provider:openai", "is not one of the --import modules"),
        ("service_flows:add", "not an LLM provider"),
    ],
)
def test_serve_llm_must_be_a_provider_of_an_import_module(
    sqlite_url: str, ref: str, message: str
) -> None:
    result = CliRunner().invoke(
        cli, ["serve", "--store", sqlite_url, "--import", "service_flows", "--llm", ref]
    )
    assert result.exit_code != 0
    assert message in result.output + str(result.exception)
