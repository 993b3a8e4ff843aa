"""One driver per run, across processes (``_driver_proc.py``): on SQLite, Redis and NATS,
in real time and in batch, two processes resuming one run, two starting one run id, one
asked not to wait, and a driver SIGKILLed while another waits for it.

Every step's side effect (its line in the execution log, ``batch_steps``) happens once
(the step in flight at a kill aside: at least once); both callers get the result, or the
clear error.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from test_one_driver import ends, started, until

import flowdsl as fd
from flowdsl._engine.lease import new_owner

import batch_steps as bs
from _servers import NatsServer, RedisServer

TESTS = Path(__file__).parent

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture
def exec_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "exec.jsonl"
    monkeypatch.setenv(bs.EXEC_LOG, str(path))
    monkeypatch.delenv(bs.HOLD, raising=False)
    monkeypatch.delenv(bs.FAIL, raising=False)
    return path


@attrs.frozen
class Setup:
    store: str
    broker: str | None  # None: real time

    def context(self) -> fd.Context:
        if self.broker is None:
            return fd.Context(store=self.store)
        return fd.Context(batch=True, broker=self.broker, store=self.store, workers=1)


KINDS = [
    pytest.param(("sqlite", False), id="sqlite-realtime"),
    pytest.param(("sqlite", True), id="sqlite-batch"),
    pytest.param(("redis", False), id="redis-realtime", marks=pytest.mark.redis),
    pytest.param(("redis", True), id="redis-batch", marks=pytest.mark.redis),
    pytest.param(("nats", False), id="nats-realtime", marks=pytest.mark.nats),
    pytest.param(("nats", True), id="nats-batch", marks=pytest.mark.nats),
]


@pytest.fixture(params=KINDS)
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> Setup:
    kind, batch = request.param
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'runs.db'}"
    else:
        server: RedisServer | NatsServer = request.getfixturevalue(f"{kind}_server")
        url = f"{server.url}?prefix=drivers"
    return Setup(url, url if batch else None)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the Redis and NATS clients need it


class Drivers:
    """The driver processes of one test; killed at teardown."""

    def __init__(self, setup: Setup, log: Path) -> None:
        self.setup = setup
        self.log = log
        self.procs: list[subprocess.Popen[str]] = []

    def spawn(self, *args: str, hold: str = "", no_wait: bool = False) -> subprocess.Popen[str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
        env[bs.EXEC_LOG] = str(self.log)
        env[bs.HOLD] = hold
        env.pop(bs.FAIL, None)
        command = [sys.executable, str(TESTS / "_driver_proc.py"), args[0], self.setup.store]
        command += args[1:]
        if self.setup.broker is not None:
            command += ["--broker", self.setup.broker]
        if no_wait:
            command.append("--no-wait")
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.procs.append(proc)
        return proc

    async def answer(self, proc: subprocess.Popen[str]) -> str:
        """The process's last line, once it exits."""
        out, err = await anyio.to_thread.run_sync(proc.communicate)
        lines = out.splitlines()
        assert lines, f"no output; stderr: {err[-3000:]}"
        return lines[-1]

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


@pytest.fixture
def drivers(setup: Setup, exec_log: Path) -> Iterator[Drivers]:
    d = Drivers(setup, exec_log)
    yield d
    d.close()


DELAY = 1.0  # seconds per step: a second process comes while the first still drives
EXPECTED = f"result {bs.expected_trio_chain(7)}"


async def failed_at_b(setup: Setup, run_id: str) -> None:
    """A run of slow_chain(7) that failed at b (a bug, since fixed)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(bs.FAIL, "b")
        async with setup.context() as ctx:
            with pytest.raises(fd.StepFailed, match="step 'b' fails"):
                await ctx.run(bs.slow_chain, 7, DELAY, run_id=run_id)


async def test_two_processes_resuming_one_run_run_each_step_once(
    setup: Setup, drivers: Drivers, exec_log: Path
) -> None:
    await failed_at_b(setup, "twice")
    first = drivers.spawn("resume", "twice")
    await until(lambda: sum(1 for _ in _starts(exec_log, "b")) == 2)  # the first drives
    second = drivers.spawn("resume", "twice")
    assert await drivers.answer(first) == EXPECTED
    assert await drivers.answer(second) == EXPECTED
    assert ends(exec_log, "twice") == Counter({"a": 1, "b": 1, "c": 1})


async def test_two_processes_starting_one_run_id_run_each_step_once(
    drivers: Drivers, exec_log: Path
) -> None:
    first = drivers.spawn("start", "same", "7", str(DELAY))
    await until(lambda: started(exec_log, "same", "a"))
    second = drivers.spawn("start", "same", "7", str(DELAY))
    assert await drivers.answer(first) == EXPECTED
    assert await drivers.answer(second) == EXPECTED
    assert ends(exec_log, "same") == Counter({"a": 1, "b": 1, "c": 1})


async def test_a_process_asked_not_to_wait_is_refused_and_runs_nothing(
    drivers: Drivers, exec_log: Path
) -> None:
    first = drivers.spawn("start", "busy", "7", str(DELAY))
    await until(lambda: started(exec_log, "busy", "a"))
    starting = drivers.spawn("start", "busy", "7", str(DELAY), no_wait=True)
    resuming = drivers.spawn("resume", "busy", no_wait=True)
    driver = f"process {first.pid} on host {new_owner().host!r}"
    for proc in (starting, resuming):
        answer = await drivers.answer(proc)
        assert answer.startswith(
            f"error RunBusy flow 'slow_chain': run 'busy' is being driven by {driver}"
        )
        assert proc.returncode == 3
    assert await drivers.answer(first) == EXPECTED
    assert ends(exec_log, "busy") == Counter({"a": 1, "b": 1, "c": 1})


async def test_a_waiting_process_takes_over_at_once_when_the_driver_is_killed(
    drivers: Drivers, exec_log: Path
) -> None:
    first = drivers.spawn("start", "kill", "7", "0", hold="b")  # b never ends there
    await until(lambda: started(exec_log, "kill", "b"))
    second = drivers.spawn("resume", "kill")
    assert second.stdout is not None
    assert (await anyio.to_thread.run_sync(second.stdout.readline)).strip() == "entered"
    first.kill()
    first.communicate()
    with anyio.fail_after(20):  # no 30 s task lease, no 5 s run lease waited out
        assert await drivers.answer(second) == EXPECTED
    assert ends(exec_log, "kill") == Counter({"a": 1, "b": 1, "c": 1})
    # b was in flight at the kill: at least once (twice here); the rest exactly once.
    assert Counter(line["label"] for line in _starts_all(exec_log, "kill")) == Counter(
        {"a": 1, "b": 2, "c": 1}
    )


def _starts(log: Path, label: str) -> list[dict[str, Any]]:
    return [line for line in bs.read_log(log) if (line["label"], line["event"]) == (label, "start")]


def _starts_all(log: Path, run_id: str) -> list[dict[str, Any]]:
    return [line for line in bs.read_log(log) if (line["run"], line["event"]) == (run_id, "start")]
