"""``flowdsl serve`` as a process: start-up, SIGTERM, and a SIGKILL in the middle of a run.

The service serves ``service_flows`` on an SQLite file.  Its ``gated`` flow runs
``first -> held -> last``; ``held`` waits for a file the test creates, and every step logs
``start``/``done`` lines with its process id, so the test can tell which process ran what.
"""

from __future__ import annotations

import collections
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import flowdsl as fd

from _service_proc import Service, serve, service_env

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]


@pytest.fixture
def anyio_backend() -> Any:
    return "asyncio"  # grpc.aio is asyncio only


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
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


def step_lines(tmp_path: Path) -> list[tuple[int, str, str]]:
    out = []
    for line in (tmp_path / "steps.log").read_text().splitlines():
        pid, kind, label = line.split()
        out.append((int(pid), kind, label))
    return out


async def wait_until_started(client: fd.Client, run_id: str, node: str) -> None:
    async for event in client.watch(run_id):
        if event.type == "StepStarted" and event.node_id == node:
            return
    raise AssertionError(f"run {run_id} ended before {node} started")


async def test_serve_starts_answers_and_stops_on_sigterm(services: Any) -> None:
    service = services()
    assert "flows service_flows:add" in service.banner
    async with fd.Client(service.url) as client:
        run = await client.start("service_flows:add", {"a": 40, "b": 2})
        assert (await client.wait(run.run_id)).result == 42
    said = service.stop()
    assert "SIGTERM, stopping" in said
    assert "flowdsl serve: stopped" in said


async def test_sigkill_mid_run_then_restart_finishes_without_rerunning_steps(
    services: Any, tmp_path: Path
) -> None:
    first = services()
    async with fd.Client(first.url) as client:
        run_id = (await client.start("service_flows:gated", {"x": 1}, run_id="crash")).run_id
        await wait_until_started(client, run_id, "held")
    first.kill()  # mid-run: `first` is journaled, `held` in flight

    second = services()
    assert "took up 1 running run(s)" in second.banner
    (tmp_path / "gates" / "held").touch()
    async with fd.Client(second.url) as client:
        ended = await client.wait(run_id)
        assert (ended.status, ended.result) == ("finished", 22)
        seen = [event async for event in client.watch(run_id)]
    lines = step_lines(tmp_path)
    done = collections.Counter(label for _, kind, label in lines if kind == "done")
    assert done == {"first": 1, "held": 1, "last": 1}
    held_pids = [pid for pid, kind, label in lines if kind == "start" and label == "held"]
    assert held_pids == [first.proc.pid, second.proc.pid]  # in flight: run again, once
    assert [pid for pid, kind, label in lines if label == "first"] == [first.proc.pid] * 2
    # The watch stream of the taken-up run tells its history, then the resumed drive.
    types = [event.type for event in seen]
    assert types[:3] == ["RunStarted", "StepFinished", "RunStarted"]
    assert seen[2].data["resumed"] is True
    assert "StepReused" in types
    assert types[-1] == "RunFinished"
    assert [event.seq for event in seen] == list(range(1, len(seen) + 1))
    second.stop()


async def test_sigterm_hands_unfinished_runs_back(services: Any, tmp_path: Path) -> None:
    first = services()
    async with fd.Client(first.url) as client:
        await client.start("service_flows:gated", {"x": 2}, run_id="handed")
        await wait_until_started(client, "handed", "held")
    first.stop()  # --grace 0: the run is handed back at once, not cancelled

    second = services()
    assert "took up 1 running run(s)" in second.banner
    (tmp_path / "gates" / "held").touch()
    async with fd.Client(second.url) as client:
        ended = await client.wait("handed")
    assert (ended.status, ended.result) == ("finished", 32)
    done = collections.Counter(label for _, kind, label in step_lines(tmp_path) if kind == "done")
    assert done == {"first": 1, "held": 1, "last": 1}
    second.stop()


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (("--token-env", "FD_NO_SUCH_VARIABLE"), "the environment variable FD_NO_SUCH_VARIABLE"),
        (("--tls-cert", __file__), "--tls-cert and --tls-key go together"),
        (("--import", "service_flows_nonexistent"), "--import service_flows_nonexistent"),
    ],
)
def test_serve_refuses_bad_options(
    tmp_path: Path, env: dict[str, str], extra: tuple[str, ...], says: str
) -> None:
    env.pop("FD_NO_SUCH_VARIABLE", None)
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
    assert done.returncode != 0
    assert says in done.stderr


def test_runs_as_store_records_for_runs_list(services: Any) -> None:
    import anyio

    from flowdsl.cli.remote import records_from_service

    service = services()

    async def three() -> list[str]:
        async with fd.Client(service.url) as client:
            ids = []
            for a in range(3):
                run = await client.start("service_flows:add", {"a": a})
                ids.append((await client.wait(run.run_id)).run_id)
            return ids

    ids = anyio.run(three, backend="asyncio")
    records = records_from_service(service.url, limit=2)
    assert [r.run_id for r in records] == ids[:0:-1]
    finished = fd.RunStatus.FINISHED
    assert [(r.status, r.flow, r.result) for r in records] == [
        (finished, "add", "3"),
        (finished, "add", "2"),
    ]
    assert len(records_from_service(service.url, limit=50)) == 3
