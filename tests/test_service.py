"""The gRPC service, through a client built from the shipped .proto (not ``fd.Client``).

Each test serves ``service_flows`` in this process (grpc.aio, asyncio only) on a fresh
SQLite file and talks to it over loopback with stubs generated at test time.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import flowdsl as fd
from flowdsl.service._flows import FlowRegistry
from flowdsl.service.server import open_service

import service_flows
from _grpc_stubs import build_stubs, self_signed

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

FLOWS = "service_flows"


@pytest.fixture
def anyio_backend() -> Any:
    return ("asyncio", {"debug": True})  # grpc.aio is asyncio only


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_stubs(tmp_path_factory.mktemp("stubs"))


@pytest.fixture
def gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The folder whose files let held steps finish (see service_flows._gate)."""
    folder = tmp_path / "gates"
    folder.mkdir()
    monkeypatch.setenv("FD_SERVICE_GATE", str(folder))
    monkeypatch.setenv("FD_SERVICE_LOG", str(tmp_path / "steps.log"))
    return folder


def step_lines(tmp_path: Path) -> list[str]:
    path = tmp_path / "steps.log"
    return (
        [line.split(" ", 1)[1] for line in path.read_text().splitlines()] if path.exists() else []
    )


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, **options: Any) -> AsyncIterator[Any]:
    options.setdefault("store", f"sqlite:///{tmp_path / 'runs.db'}")
    options.setdefault("grace", 0.0)
    async with open_service(
        FlowRegistry.from_modules([FLOWS]), listen="127.0.0.1:0", **options
    ) as service:
        yield service


@contextlib.asynccontextmanager
async def channel_to(service: Any, credentials: Any = None) -> AsyncIterator[grpc.aio.Channel]:
    if credentials is None:
        channel = grpc.aio.insecure_channel(service.address)
    else:
        channel = grpc.aio.secure_channel(service.address, credentials)
    async with channel:
        yield channel


@pytest.fixture
async def service(tmp_path: Path, gate: Path) -> AsyncIterator[Any]:
    async with serving(tmp_path) as running:
        yield running


@pytest.fixture
async def stub(service: Any, stubs: Any) -> AsyncIterator[Any]:
    async with channel_to(service) as channel:
        yield stubs.grpc.FlowsStub(channel)


async def start(stub: Any, stubs: Any, flow: str, args: dict[str, Any], **fields: Any) -> Any:
    request = stubs.pb.StartRunRequest(
        flow=f"{FLOWS}:{flow}", input_json=json.dumps(args), **fields
    )
    return await stub.StartRun(request)


async def events(stub: Any, stubs: Any, run_id: str, after: int = 0) -> list[Any]:
    request = stubs.pb.WatchRunRequest(run_id=run_id, after_seq=after)
    return [reply.event async for reply in stub.WatchRun(request)]


async def fails_with(code: grpc.StatusCode, call: Any) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    return str(info.value.details())


# --- start, get, watch ----------------------------------------------------------------------


async def test_start_watch_get(stub: Any, stubs: Any) -> None:
    started = await start(stub, stubs, "hello", {"greeting": {"name": "ada", "times": 2}})
    assert started.created
    run = started.run
    assert (run.flow, run.flow_name) == (f"{FLOWS}:hello", "hello")
    seen = await events(stub, stubs, run.run_id)
    assert [e.seq for e in seen] == list(range(1, len(seen) + 1))
    assert [e.type for e in seen] == ["RunStarted", "StepStarted", "StepFinished", "RunFinished"]
    assert [e.node_id for e in seen] == ["", "shout", "shout", ""]
    assert json.loads(seen[-1].json)["result"] == "ADA! ADA! "
    got = (await stub.GetRun(stubs.pb.GetRunRequest(run_id=run.run_id))).run
    assert (got.status, json.loads(got.result_json), got.error) == ("finished", "ADA! ADA! ", "")


async def test_start_is_idempotent_by_run_id(stub: Any, stubs: Any, gate: Path) -> None:
    first = await start(stub, stubs, "gated", {"x": 1}, run_id="once")
    again = await start(stub, stubs, "gated", {"x": 999}, run_id="once")
    assert (first.created, again.created) == (True, False)
    assert again.run.run_id == "once"
    (gate / "held").touch()
    assert json.loads((await events(stub, stubs, "once"))[-1].json)["result"] == 22
    after = await start(stub, stubs, "gated", {"x": 1}, run_id="once")
    assert (after.created, after.run.status, after.run.result_json) == (False, "finished", "22")
    details = await fails_with(
        grpc.StatusCode.ALREADY_EXISTS, start(stub, stubs, "add", {"a": 1}, run_id="once")
    )
    assert "is a run of service_flows:gated" in details


async def test_concurrent_starts_of_one_run_id_make_one_run(
    stub: Any, stubs: Any, gate: Path, tmp_path: Path
) -> None:
    replies: list[Any] = []

    async def one() -> None:
        replies.append(await start(stub, stubs, "gated", {"x": 1}, run_id="race"))

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(one)
    assert sorted(r.created for r in replies) == [False] * 4 + [True]
    (gate / "held").touch()
    await events(stub, stubs, "race")
    assert step_lines(tmp_path).count("done first") == 1


async def test_watch_reconnects_without_gaps_or_repeats(stub: Any, stubs: Any, gate: Path) -> None:
    run_id = (await start(stub, stubs, "gated", {"x": 1})).run.run_id
    first: list[Any] = []
    call = stub.WatchRun(stubs.pb.WatchRunRequest(run_id=run_id))
    async for reply in call:
        first.append(reply.event)
        if reply.event.type == "StepStarted" and reply.event.node_id == "held":
            break
    call.cancel()  # the watcher goes away mid-run...
    (gate / "held").touch()
    rest = await events(stub, stubs, run_id, after=first[-1].seq)  # ...and comes back
    together = first + rest
    assert [e.seq for e in together] == list(range(1, len(together) + 1))
    assert together[-1].type == "RunFinished"
    # The whole log again, and any suffix of it, is what was seen.
    whole = await events(stub, stubs, run_id)
    assert [(e.seq, e.type, e.json) for e in whole] == [(e.seq, e.type, e.json) for e in together]
    assert await events(stub, stubs, run_id, after=len(whole)) == []


async def test_watch_of_a_run_ended_before_the_service_started_is_stable(
    tmp_path: Path, stubs: Any, gate: Path
) -> None:
    async with serving(tmp_path) as first, channel_to(first) as channel:
        stub = stubs.grpc.FlowsStub(channel)
        run_id = (await start(stub, stubs, "add", {"a": 2, "b": 5})).run.run_id
        await events(stub, stubs, run_id)
    async with serving(tmp_path) as second, channel_to(second) as channel:
        stub = stubs.grpc.FlowsStub(channel)
        once = await events(stub, stubs, run_id)
        twice = await events(stub, stubs, run_id)
        tail = await events(stub, stubs, run_id, after=1)
    assert [e.type for e in once] == ["RunStarted", "StepFinished", "RunFinished"]
    assert [(e.seq, e.json) for e in once] == [(e.seq, e.json) for e in twice]
    assert [(e.seq, e.json) for e in tail] == [(e.seq, e.json) for e in once[1:]]
    assert json.loads(once[-1].json)["result"] == 7


# --- cancel and resume ----------------------------------------------------------------------


async def wait_for_node(stub: Any, stubs: Any, run_id: str, node: str) -> int:
    """Watch until *node* has started; the seq of that event."""
    call = stub.WatchRun(stubs.pb.WatchRunRequest(run_id=run_id))
    try:
        async for reply in call:
            if reply.event.type == "StepStarted" and reply.event.node_id == node:
                return int(reply.event.seq)
    finally:
        call.cancel()
    raise AssertionError(f"the run ended before {node} started")


async def test_cancel_then_resume(stub: Any, stubs: Any, gate: Path, tmp_path: Path) -> None:
    run_id = (await start(stub, stubs, "gated", {"x": 1})).run.run_id
    seq = await wait_for_node(stub, stubs, run_id, "held")
    cancelled = (await stub.CancelRun(stubs.pb.CancelRunRequest(run_id=run_id))).run
    assert cancelled.status == "cancelled"
    rest = await events(stub, stubs, run_id, after=seq)
    assert rest[-1].type == "RunFailed"
    assert json.loads(rest[-1].json)["cancelled"]
    again = (await stub.CancelRun(stubs.pb.CancelRunRequest(run_id=run_id))).run
    assert again.status == "cancelled"

    (gate / "held").touch()
    resumed = (await stub.ResumeRun(stubs.pb.ResumeRunRequest(run_id=run_id))).run
    assert resumed.status in ("running", "finished")  # the gate is open: it may be done
    more = await events(stub, stubs, run_id, after=rest[-1].seq)
    assert [e.type for e in more][:2] == ["RunStarted", "StepReused"]
    assert more[-1].type == "RunFinished"
    assert step_lines(tmp_path).count("done first") == 1  # not run again
    finished = (await stub.GetRun(stubs.pb.GetRunRequest(run_id=run_id))).run
    assert (finished.status, finished.result_json) == ("finished", "22")
    details = await fails_with(
        grpc.StatusCode.FAILED_PRECONDITION,
        stub.CancelRun(stubs.pb.CancelRunRequest(run_id=run_id)),
    )
    assert "already finished" in details


async def test_a_failed_run_reports_its_error(stub: Any, stubs: Any) -> None:
    run_id = (await start(stub, stubs, "failing", {"x": 3})).run.run_id
    seen = await events(stub, stubs, run_id)
    assert seen[-1].type == "RunFailed"
    run = (await stub.GetRun(stubs.pb.GetRunRequest(run_id=run_id))).run
    assert run.status == "failed"
    assert "boom 3" in run.error
    assert run.failed_node == "boom"


# --- signals --------------------------------------------------------------------------------


async def test_signal_without_wait_for_support_is_unimplemented(stub: Any, stubs: Any) -> None:
    if hasattr(fd.Context, "signal"):
        pytest.skip("this flowdsl has ctx.signal: test_signal_a_waiting_run covers SignalRun")
    run_id = (await start(stub, stubs, "add", {"a": 1})).run.run_id
    request = stubs.pb.SignalRunRequest(run_id=run_id, name="approval", value_json="true")
    await fails_with(grpc.StatusCode.UNIMPLEMENTED, stub.SignalRun(request))


@pytest.mark.skipif(
    not hasattr(fd.Context, "signal"),
    reason="fd.wait_for / ctx.signal (issue 16) are not in this flowdsl yet: SignalRun "
    "answers UNIMPLEMENTED until then",
)
async def test_signal_a_waiting_run(stub: Any, stubs: Any) -> None:
    # A flow waiting for "approval" is signalled through SignalRun and finishes with the
    # value; signalling it again, or an ended run, is FAILED_PRECONDITION.
    run_id = (await start(stub, stubs, "approved", {"topic": "otters"})).run.run_id
    call = stub.WatchRun(stubs.pb.WatchRunRequest(run_id=run_id))
    try:
        async for reply in call:
            if reply.event.type == "RunWaiting":
                break
    finally:
        call.cancel()
    waiting = (await stub.GetRun(stubs.pb.GetRunRequest(run_id=run_id))).run
    assert waiting.status == "waiting"
    request = stubs.pb.SignalRunRequest(run_id=run_id, name="approval", value_json="true")
    await stub.SignalRun(request)
    seen = await events(stub, stubs, run_id)
    assert [e.type for e in seen if e.type in ("RunWaiting", "SignalReceived")] == [
        "RunWaiting",
        "SignalReceived",
    ]
    run = (await stub.GetRun(stubs.pb.GetRunRequest(run_id=run_id))).run
    assert run.status == "finished"
    assert json.loads(run.result_json) == "otters: yes"
    await fails_with(grpc.StatusCode.FAILED_PRECONDITION, stub.SignalRun(request))
    ended = (await start(stub, stubs, "add", {"a": 1})).run.run_id
    await events(stub, stubs, ended)
    request = stubs.pb.SignalRunRequest(run_id=ended, name="approval", value_json="true")
    await fails_with(grpc.StatusCode.FAILED_PRECONDITION, stub.SignalRun(request))


# --- listing --------------------------------------------------------------------------------


async def test_list_pages_through_every_run_once(stub: Any, stubs: Any) -> None:
    ids = []
    for i in range(7):
        ids.append((await start(stub, stubs, "add", {"a": i})).run.run_id)
    for i in range(2):
        ids.append((await start(stub, stubs, "failing", {"x": i})).run.run_id)
    for run_id in ids:
        await events(stub, stubs, run_id)

    async def every(**filters: Any) -> list[Any]:
        seen, token = [], ""
        while True:
            request = stubs.pb.ListRunsRequest(page_size=3, page_token=token, **filters)
            reply = await stub.ListRuns(request)
            assert len(reply.runs) <= 3
            seen.extend(reply.runs)
            token = reply.next_page_token
            if not token:
                return seen

    everything = await every()
    assert [r.run_id for r in everything] == ids[::-1]  # newest first, each once
    failed = await every(status="failed")
    assert [r.run_id for r in failed] == ids[:6:-1]
    by_flow = await every(flow=f"{FLOWS}:add")
    assert [r.run_id for r in by_flow] == ids[6::-1]
    assert [r.run_id for r in await every(flow="add", status="finished")] == ids[6::-1]
    one = await stub.ListRuns(stubs.pb.ListRunsRequest())
    assert len(one.runs) == 9
    assert one.next_page_token == ""


@pytest.mark.parametrize(
    "fields", [{"page_token": "garbage"}, {"status": "sleeping"}, {"page_size": -1}]
)
async def test_list_refuses_bad_requests(stub: Any, stubs: Any, fields: dict[str, Any]) -> None:
    request = stubs.pb.ListRunsRequest(**fields)
    await fails_with(grpc.StatusCode.INVALID_ARGUMENT, stub.ListRuns(request))


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flow", "input_json", "says"),
    [
        (f"{FLOWS}:nothing", "{}", "this service has no flow 'service_flows:nothing'"),
        ("os:system", '{"command": "true"}', "this service has no flow 'os:system'"),
        (f"{FLOWS}:add", "{not json", "input_json is not JSON"),
        (f"{FLOWS}:add", "[1, 2]", "input_json must be a JSON object, not an array"),
        (f"{FLOWS}:add", '{"a": 1, "c": 2}', "unknown argument 'c'"),
        (f"{FLOWS}:add", '{"a": "one"}', "cannot decode argument 'a' as int"),
        (f"{FLOWS}:add", '{"b": 2}', "missing a required argument: 'a'"),
        (f"{FLOWS}:hello", '{"greeting": {"name": 5}}', "cannot decode argument 'greeting'"),
    ],
)
async def test_start_refuses_what_does_not_fit(
    stub: Any, stubs: Any, flow: str, input_json: str, says: str
) -> None:
    request = stubs.pb.StartRunRequest(flow=flow, input_json=input_json)
    details = await fails_with(grpc.StatusCode.INVALID_ARGUMENT, stub.StartRun(request))
    assert says in details


async def test_a_request_never_imports_a_module(
    stub: Any, stubs: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    canary = tmp_path / "imported"
    (tmp_path / "canary_flows.py").write_text(
        f"import pathlib\npathlib.Path({str(canary)!r}).touch()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    request = stubs.pb.StartRunRequest(flow="canary_flows:anything", input_json="{}")
    await fails_with(grpc.StatusCode.INVALID_ARGUMENT, stub.StartRun(request))
    assert not canary.exists()
    assert "canary_flows" not in sys.modules


async def test_unknown_runs_are_not_found(stub: Any, stubs: Any) -> None:
    pb = stubs.pb
    for call in (
        stub.GetRun(pb.GetRunRequest(run_id="nope")),
        stub.CancelRun(pb.CancelRunRequest(run_id="nope")),
        stub.ResumeRun(pb.ResumeRunRequest(run_id="nope")),
        stub.WatchRun(pb.WatchRunRequest(run_id="nope")).read(),
    ):
        details = await fails_with(grpc.StatusCode.NOT_FOUND, call)
        assert "no run 'nope'" in details


async def test_bad_run_ids_are_refused(stub: Any, stubs: Any) -> None:
    for run_id in ("x" * 300, " padded", "tab\there"):
        await fails_with(
            grpc.StatusCode.INVALID_ARGUMENT, start(stub, stubs, "add", {"a": 1}, run_id=run_id)
        )


async def test_messages_over_the_limit_are_refused_clearly(
    tmp_path: Path, stubs: Any, gate: Path
) -> None:
    limit = 256 * 1024
    async with (
        serving(tmp_path, max_message_bytes=limit) as service,
        channel_to(service) as channel,
    ):
        stub = stubs.grpc.FlowsStub(channel)
        huge = {"greeting": {"name": "x" * (limit + 10)}}
        await fails_with(grpc.StatusCode.RESOURCE_EXHAUSTED, start(stub, stubs, "hello", huge))
        run_id = "large"
        # The run may have finished, with its large result, before the reply.
        with contextlib.suppress(grpc.aio.AioRpcError):
            await start(stub, stubs, "large", {"n": limit}, run_id=run_id)
        # The run finishes; only its reply is too large to send.
        while True:
            try:
                run = (await stub.GetRun(stubs.pb.GetRunRequest(run_id=run_id))).run
            except grpc.aio.AioRpcError as exc:
                failure = exc
                break
            assert run.status == "running"
            await anyio.sleep(0.01)  # until it has finished
        assert failure.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = str(failure.details())
        assert "over the service's message limit" in details
        assert "--max-message-bytes" in details
        stream = stub.WatchRun(stubs.pb.WatchRunRequest(run_id=run_id))
        details = await fails_with(grpc.StatusCode.RESOURCE_EXHAUSTED, _drain(stream))
        assert "StepFinished" in details


async def _drain(stream: Any) -> None:
    async for _ in stream:
        pass


# --- health and reflection ------------------------------------------------------------------


async def test_health_says_serving(service: Any) -> None:
    async with channel_to(service) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "flowdsl.v1.Flows"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_and_describes_the_service(service: Any) -> None:
    async with channel_to(service) as channel:
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="flowdsl.v1.Flows"),
        ]
        replies = [reply async for reply in reflect.ServerReflectionInfo(iter(requests))]
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"flowdsl.v1.Flows", "grpc.health.v1.Health"} <= names
    from google.protobuf import descriptor_pb2

    [raw] = replies[1].file_descriptor_response.file_descriptor_proto
    described = descriptor_pb2.FileDescriptorProto.FromString(raw)
    assert described.package == "flowdsl.v1"
    methods = {m.name for m in described.service[0].method}
    assert methods == {
        "StartRun",
        "GetRun",
        "WatchRun",
        "SignalRun",
        "CancelRun",
        "ResumeRun",
        "ListRuns",
    }


# --- token and TLS --------------------------------------------------------------------------


async def test_token_right_wrong_and_missing(tmp_path: Path, stubs: Any, gate: Path) -> None:
    async with serving(tmp_path, token="s3cret-token") as service, channel_to(service) as channel:
        stub = stubs.grpc.FlowsStub(channel)
        request = stubs.pb.ListRunsRequest()
        details = await fails_with(grpc.StatusCode.UNAUTHENTICATED, stub.ListRuns(request))
        assert "token is missing" in details
        wrong = (("authorization", "Bearer s3cret-tokem"),)
        details = await fails_with(
            grpc.StatusCode.UNAUTHENTICATED, stub.ListRuns(request, metadata=wrong)
        )
        assert "token is wrong" in details
        stream = stub.WatchRun(stubs.pb.WatchRunRequest(run_id="x"), metadata=wrong)
        await fails_with(grpc.StatusCode.UNAUTHENTICATED, _drain(stream))
        right = (("authorization", "Bearer s3cret-token"),)
        assert (await stub.ListRuns(request, metadata=right)).runs == []
        # Probes carry no token: health answers anyway, and tells nothing else.
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # Reflection describes the API: it needs the token.
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        await fails_with(grpc.StatusCode.UNAUTHENTICATED, _drain(reflect.ServerReflectionInfo(ask)))


@pytest.fixture
def certificate(tmp_path: Path) -> Iterator[tuple[bytes, bytes]]:
    return self_signed()


async def test_tls_right_and_wrong(
    tmp_path: Path, stubs: Any, gate: Path, certificate: tuple[bytes, bytes]
) -> None:
    cert, key = certificate
    other, _ = self_signed()
    async with serving(tmp_path, tls=(cert, key)) as service:
        trusted = grpc.ssl_channel_credentials(root_certificates=cert)
        async with channel_to(service, trusted) as channel:
            stub = stubs.grpc.FlowsStub(channel)
            assert (await start(stub, stubs, "add", {"a": 1})).created
        stranger = grpc.ssl_channel_credentials(root_certificates=other)
        async with channel_to(service, stranger) as channel:
            stub = stubs.grpc.FlowsStub(channel)
            request = stubs.pb.ListRunsRequest()
            await fails_with(grpc.StatusCode.UNAVAILABLE, stub.ListRuns(request, timeout=10))
        async with channel_to(service) as channel:  # plain text to a TLS port
            stub = stubs.grpc.FlowsStub(channel)
            request = stubs.pb.ListRunsRequest()
            await fails_with(grpc.StatusCode.UNAVAILABLE, stub.ListRuns(request, timeout=10))


# --- asyncio only ---------------------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_under_trio_the_service_refuses_clearly(tmp_path: Path) -> None:
    with pytest.raises(fd.ConfigError, match=r"^the flowdsl service runs on asyncio only"):
        async with serving(tmp_path):
            pass


def test_the_proto_ships_inside_the_package() -> None:
    from _grpc_stubs import shipped_protos

    assert [p.name for p in shipped_protos()] == ["flows.proto"]
    assert os.path.getsize(shipped_protos()[0]) > 0
    assert service_flows.add.ref == f"{FLOWS}:add"
