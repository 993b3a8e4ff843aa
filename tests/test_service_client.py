"""``fd.Client`` against a service in this process."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import flowdsl as fd
from flowdsl.service import ServiceError
from flowdsl.service._flows import FlowRegistry
from flowdsl.service.server import open_service

import service_flows
from _grpc_stubs import self_signed

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


@pytest.fixture
def anyio_backend() -> Any:
    return ("asyncio", {"debug": True})


@pytest.fixture
def gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "gates"
    folder.mkdir()
    monkeypatch.setenv("FD_SERVICE_GATE", str(folder))
    return folder


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, **options: Any) -> AsyncIterator[Any]:
    async with open_service(
        FlowRegistry.from_modules(["service_flows"]),
        store=f"sqlite:///{tmp_path / 'runs.db'}",
        listen="127.0.0.1:0",
        grace=0.0,
        **options,
    ) as service:
        yield service


@pytest.fixture
async def client(tmp_path: Path, gate: Path) -> AsyncIterator[fd.Client]:
    async with serving(tmp_path) as service, fd.Client(service.url) as client:
        yield client


async def test_start_wait_get_with_values_through_the_codec(client: fd.Client) -> None:
    greeting = service_flows.Greeting("bo", times=3)
    run = await client.start(service_flows.hello, {"greeting": greeting})
    assert run.created
    assert run.flow == "service_flows:hello"
    ended = await client.wait(run.run_id)
    assert (ended.status, ended.result, ended.ended) == ("finished", "BO! BO! BO! ", True)
    assert (await client.get(run.run_id)) == ended


async def test_watch_gives_events_and_resumes_from_a_seq(client: fd.Client, gate: Path) -> None:
    run = await client.start("service_flows:gated", {"x": 3})
    first = []
    async for event in client.watch(run.run_id):
        first.append(event)
        if event.type == "StepStarted" and event.node_id == "held":
            break
    (gate / "held").touch()
    rest = [event async for event in client.watch(run.run_id, after_seq=first[-1].seq)]
    seqs = [event.seq for event in first + rest]
    assert seqs == list(range(1, len(seqs) + 1))
    assert isinstance(first[0].event, fd.events.RunStarted)
    finished = rest[-1].event
    assert isinstance(finished, fd.events.RunFinished)
    assert finished.result == 42
    held = [e.event for e in rest if e.type == "StepFinished" and e.node_id == "held"]
    assert [e.result for e in held] == [40]


async def test_cancel_resume_and_list(client: fd.Client, gate: Path) -> None:
    run = await client.start("service_flows:gated", {"x": 1}, run_id="c1")
    async for event in client.watch(run.run_id):
        if event.node_id == "held":
            break
    assert (await client.cancel("c1")).status == "cancelled"
    done = await client.start("service_flows:add", {"a": 1}, run_id="c2")
    await client.wait(done.run_id)
    page = await client.list(page_size=1)
    assert [r.run_id for r in page.runs] == ["c2"]
    assert page.next_page_token
    page = await client.list(page_size=1, page_token=page.next_page_token)
    assert [r.run_id for r in page.runs] == ["c1"]
    assert not page.next_page_token
    assert [r.run_id for r in (await client.list(status="cancelled")).runs] == ["c1"]
    (gate / "held").touch()
    await client.resume("c1")
    assert (await client.wait("c1")).result == 22


@pytest.mark.parametrize(
    ("call", "code"),
    [
        (lambda c: c.get("nope"), "NOT_FOUND"),
        (lambda c: c.cancel("nope"), "NOT_FOUND"),
        (lambda c: c.start("service_flows:add", {"a": "x"}), "INVALID_ARGUMENT"),
        (lambda c: c.start("elsewhere:flow"), "INVALID_ARGUMENT"),
        (lambda c: c.list(status="dozing"), "INVALID_ARGUMENT"),
    ],
)
async def test_failed_calls_raise_service_errors(client: fd.Client, call: Any, code: str) -> None:
    with pytest.raises(ServiceError) as info:
        await call(client)
    assert info.value.code == code
    assert isinstance(info.value, fd.FlowError)


async def test_watching_an_unknown_run_raises(client: fd.Client) -> None:
    with pytest.raises(ServiceError, match=r"^no run 'nope'") as info:
        async for _ in client.watch("nope"):
            pass
    assert info.value.code == "NOT_FOUND"


async def test_token_and_tls(tmp_path: Path, gate: Path) -> None:
    cert, key = self_signed()
    async with serving(tmp_path, token="t0ken", tls=(cert, key)) as service:
        url = f"grpcs://{service.address}"
        async with fd.Client(url, token="t0ken", ca_cert=cert) as client:
            assert (await client.list()).runs == ()
        cert_file = tmp_path / "ca.pem"
        cert_file.write_bytes(cert)
        async with fd.Client(url, token="wrong", ca_cert=cert_file) as client:
            with pytest.raises(ServiceError, match="token is wrong") as info:
                await client.list()
            assert info.value.code == "UNAUTHENTICATED"
        async with fd.Client(url, ca_cert=cert) as client:
            with pytest.raises(ServiceError, match="token is missing"):
                await client.list()


async def test_no_service_is_unavailable(tmp_path: Path) -> None:
    async with serving(tmp_path) as service:
        url = service.url
    async with fd.Client(url, timeout=10) as client:
        with pytest.raises(ServiceError, match="Is `flowdsl serve` running") as info:
            await client.get("x")
    assert info.value.code == "UNAVAILABLE"


@pytest.mark.parametrize("url", ["http://127.0.0.1:50051", "grpc://127.0.0.1", "127.0.0.1:5"])
def test_bad_urls_are_config_errors(url: str) -> None:
    with pytest.raises(fd.ConfigError, match="is not a service URL"):
        fd.Client(url)


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_under_trio_the_client_refuses_clearly() -> None:
    with pytest.raises(fd.ConfigError, match=r"^fd.Client runs on asyncio only \(grpc.aio\)"):
        fd.Client("grpc://127.0.0.1:50051")


def test_the_client_is_flowdsl_client() -> None:
    assert fd.Client is fd.service.Client
    assert repr(fd.Client("grpc://127.0.0.1:1")) == "<flowdsl.Client grpc://127.0.0.1:1>"


def test_the_docs_python_example_runs_as_written(tmp_path: Path) -> None:
    import re
    import subprocess
    import sys

    text = (Path(__file__).parent.parent / "docs" / "service.md").read_text()
    [example] = re.findall(r"```python\n(.*?)```", text, re.S)
    script = tmp_path / "example.py"
    script.write_text(example)
    done = subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "4 RunFinished "


async def test_batch_mode_through_the_embedded_queue(tmp_path: Path, gate: Path) -> None:
    db = tmp_path / "batch.db"
    async with (
        open_service(
            [service_flows.add],
            store=f"sqlite:///{db}",
            broker=f"sqlite:///{db}",
            listen="127.0.0.1:0",
            grace=0.0,
        ) as service,
        fd.Client(service.url) as client,
    ):
        assert service.runs.context.batch
        run = await client.start(service_flows.add, {"a": 2, "b": 3})
        types = [event.type async for event in client.watch(run.run_id)]
        assert types == ["RunStarted", "StepStarted", "StepFinished", "RunFinished"]
        assert (await client.get(run.run_id)).result == 5
