"""Maps and loops on Redis and NATS: random flows in batch mode (tasks on the server's
broker, the journal in its store) agree with plain Python and with real time, and resume
after a crash at any node, item or iteration as if never interrupted."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flowdsl as fd
from flowdsl import events as ev
from flowdsl.testing import CrashPoint, check_resume

from _servers import NatsServer, RedisServer
from strategies import (
    DagSpec,
    Signalling,
    build_flow,
    dag_specs,
    flow_inputs,
    recording,
    reference,
    wait_names,
)

pytestmark = pytest.mark.anyio

# A server round trip per node and item: a handful of examples per property.
SETTINGS = settings(
    max_examples=10,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
_n = itertools.count()


@pytest.fixture
def anyio_backend() -> Any:
    """The Redis and NATS clients run on asyncio."""
    return ("asyncio", {"debug": False})


@pytest.fixture(params=["redis", "nats"])
def server_url(request: pytest.FixtureRequest) -> Any:
    """A URL factory on a running server: each call a deployment of its own (a prefix)."""
    if request.param == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        return lambda: f"{redis.url}?prefix=d{next(_n)}"
    nats: NatsServer = request.getfixturevalue("nats_server")
    return lambda: f"{nats.url}?prefix=d{uuid.uuid4().hex[:8]}"


def _batch(url: str, names: list[str], **kwargs: Any) -> fd.Context:
    return Signalling(names, batch=True, broker=url, store=url, workers=2, **kwargs)


@SETTINGS
@given(spec=dag_specs(max_ops=4, max_subflows=1, dynamic=True, waits=True), inputs=flow_inputs())
async def test_random_dynamic_dags_in_batch_mode_match_real_time(
    server_url: Any, spec: DagSpec, inputs: tuple[int, str]
) -> None:
    flow = build_flow(spec)
    expected = await reference(spec, *inputs)
    url = server_url()
    names = wait_names(spec)
    async with Signalling(names, store=url) as ctx:
        assert await ctx.run(flow, *inputs, run_id="rt") == expected.result
    with recording() as rec:
        async with _batch(url, names) as ctx:
            assert await ctx.run(flow, *inputs, run_id="batch") == expected.result
            journals = [await ctx.store.load_nodes(r) for r in ("rt", "batch")]
    assert rec.counts == expected.ran
    values = [{n: r.value for n, r in journal.items()} for journal in journals]
    assert values[0] == values[1]


@SETTINGS
@given(
    spec=dag_specs(max_ops=4, max_subflows=1, dynamic=True, waits=True),
    inputs=flow_inputs(),
    point=st.integers(0, 1000),
    mode=st.sampled_from(["realtime", "batch"]),
)
async def test_random_dynamic_dags_resume_after_a_crash(
    server_url: Any, spec: DagSpec, inputs: tuple[int, str], point: int, mode: str
) -> None:
    flow = build_flow(spec)
    names = wait_names(spec)
    events: list[Any] = []
    async with Signalling(names, on_event=events.append) as ctx:
        await ctx.run(flow, *inputs)
    ids = sorted({e.node_id for e in events if isinstance(e, ev.StepStarted)})
    crash = CrashPoint(ids[point % len(ids)], "exception")

    def make(**kwargs: Any) -> fd.Context:
        url = server_url()
        if mode == "batch":
            return _batch(url, names, **kwargs)
        return Signalling(names, store=url, **kwargs)

    report = await check_resume(flow, *inputs, crash=crash, context=make)
    assert report.result == report.expected == (await reference(spec, *inputs)).result
    assert not report.rerun, report.explain()


# --- a wait outlives its process --------------------------------------------------------------

TESTS = Path(__file__).parent


def _python(*args: str) -> str:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, *args], cwd=TESTS, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("backend", ["sqlite", "redis", "nats"])
def test_a_wait_started_in_one_process_is_signalled_and_resumed_in_others(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path}/waits.db"
    elif backend == "redis":
        url = f"{request.getfixturevalue('redis_server').url}?prefix=w{next(_n)}"
    else:
        url = f"{request.getfixturevalue('nats_server').url}?prefix=w{uuid.uuid4().hex[:8]}"
    # Process 1 starts the run; it reaches its wait, and the process exits.
    start = "import sys, anyio, wait_flows; anyio.run(wait_flows.start, *sys.argv[1:])"
    assert _python("-c", start, url, "otter-1") == "waiting"
    # Process 2 signals it; process 3 resumes it to its end.
    sent = _python(
        "-m",
        "flowdsl",
        "signal",
        "otter-1",
        "approval",
        "--value",
        '{"ok": true, "by": "pat"}',
        "--store",
        url,
    )
    assert json.loads(sent) == {"run_id": "otter-1", "signal": "approval", "index": 0}
    # The flow's module is named: a resume never imports what the run record names.
    resume = ("resume", "otter-1", "--store", url, "--import", "wait_flows", "--quiet")
    result = _python("-m", "flowdsl", *resume)
    assert json.loads(result) == "draft about otters: approved by pat"
