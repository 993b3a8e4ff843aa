"""The inspector over HTTP, for what a run's nodes say beyond a status: a failed step's
traceback (kept by the store, in real time and in batch, on SQLite, Redis and NATS), and
map, loop and wait nodes with their items, iterations and signal."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from starlette.testclient import TestClient

import flowdsl as fd
from flowdsl.ui import create_app
from flowdsl.ui.security import CSRF_HEADER

import ui_flows
from _ui_server import PARSE_RAISES, SHOUT_RAISES, fail_in_batch, leave_waiting, populate

ACTION = {CSRF_HEADER: "1"}
WAIT = 20.0


def wait_for(check: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + WAIT
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def nodes_of(view: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["id"]: n for n in view["nodes"]}


@pytest.fixture(autouse=True)
def _reset_flags() -> Iterator[None]:
    ui_flows.FIXED.clear()
    yield
    ui_flows.GATE.set()


def check_traceback(client: TestClient, run_id: str) -> None:
    view = client.get(f"/api/runs/{run_id}").json()
    parse = nodes_of(view)["parse"]
    assert parse["status"] == "failed"
    assert "ValueError: cannot parse 'data.txt:1'" in parse["error"]
    assert PARSE_RAISES in parse["traceback"]
    assert (
        parse["traceback"]
        .rstrip()
        .endswith("ValueError: cannot parse 'data.txt:1': expected 'key=value'")
    )
    assert nodes_of(view)["load"]["traceback"] is None


def test_a_failed_steps_traceback_in_real_time_and_in_batch(sqlite_url: str) -> None:
    anyio.run(populate, sqlite_url)
    anyio.run(fail_in_batch, sqlite_url, "t-batch-failed")
    with TestClient(create_app(sqlite_url, flows=[ui_flows])) as client:
        check_traceback(client, "t-failed")
        check_traceback(client, "t-batch-failed")


def test_a_traceback_is_shown_without_the_flow_too(sqlite_url: str) -> None:
    anyio.run(populate, sqlite_url)
    with TestClient(create_app(sqlite_url)) as client:
        view = client.get("/api/runs/t-failed").json()
        assert view["run"]["graph"] == "journal"
        assert PARSE_RAISES in nodes_of(view)["parse"]["traceback"]


@pytest.mark.parametrize("server", ["redis", "nats"])
def test_tracebacks_on_redis_and_nats_in_real_time_and_in_batch(
    server: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(f"{server}_server").url
    anyio.run(populate, url)
    anyio.run(fail_in_batch, url, "t-batch-failed")
    with TestClient(create_app(url, flows=[ui_flows])) as client:
        check_traceback(client, "t-failed")
        check_traceback(client, "t-batch-failed")


def test_map_loop_and_wait_nodes_show_their_counts_and_a_signal_finishes_the_run(
    sqlite_url: str,
) -> None:
    anyio.run(leave_waiting, sqlite_url, "t-campaign", "make some noise now")
    app = create_app(sqlite_url, flows=[ui_flows], poll_interval=0.05)
    with TestClient(app) as client:
        view = client.get("/api/runs/t-campaign").json()
        assert view["run"]["status"] == "waiting"
        nodes = nodes_of(view)
        # One node each in the graph, however many items or iterations.
        assert sorted(nodes) == ["announce", "approve", "settle", "shout", "words"]
        shout = nodes["shout"]
        assert (shout["kind"], shout["status"]) == ("map", "finished")
        assert shout["dynamic"]["label"] == "map 4/4"
        items = shout["dynamic"]["items"]
        assert [(i["id"], i["status"], i["result"]) for i in items] == [
            ("shout[0]", "finished", '"MAKE"'),
            ("shout[1]", "finished", '"SOME"'),
            ("shout[2]", "finished", '"NOISE"'),
            ("shout[3]", "finished", '"NOW"'),
        ]
        settle = nodes["settle"]["dynamic"]
        assert settle["label"] == "loop: 4 iterations"
        assert [i["id"] for i in settle["items"]] == [f"settle@{i}" for i in range(4)]
        assert settle["max_iterations"] == 8
        approve = nodes["approve"]
        assert (approve["kind"], approve["status"]) == ("wait", "waiting")
        assert approve["dynamic"]["label"] == "waiting for signal 'approve'"
        assert nodes["announce"]["status"] == "pending"

        # Nothing drives the run (its context ended): the inspector resumes it after the
        # signal, so that it takes it.
        reply = client.post(
            "/api/runs/t-campaign/signal", headers=ACTION, json={"name": "approve", "value": True}
        )
        assert reply.status_code == 200, reply.text
        assert reply.json() == {"run_id": "t-campaign", "signalled": "approve", "resuming": True}
        done = wait_for(
            lambda: (
                (v := client.get("/api/runs/t-campaign").json())["run"]["status"] == "finished"
                and v
            ),
            "the signalled run to finish",
        )
        assert done["run"]["result"] == "MAKE SOME NOISE NOW (settled after 3, approved)"
        approve = nodes_of(done)["approve"]
        assert approve["status"] == "finished"
        assert approve["dynamic"]["label"] == "signal 'approve' received"


def test_a_failed_map_item_fails_its_map_with_the_items_traceback(sqlite_url: str) -> None:
    async def fail() -> None:
        async with fd.Context(store=sqlite_url) as ctx:
            with pytest.raises(fd.StepFailed, match=r"node 'shout\[1\]'"):
                await ctx.run(ui_flows.campaign, "a boom b", run_id="t-boom")

    anyio.run(fail)
    with TestClient(create_app(sqlite_url, flows=[ui_flows])) as client:
        view = client.get("/api/runs/t-boom").json()
        assert view["run"]["failed_node"] == "shout[1]"
        shout = nodes_of(view)["shout"]
        assert shout["status"] == "failed"
        assert shout["dynamic"]["failed_item"] == 1
        assert shout["dynamic"]["label"].startswith("map ")
        assert shout["dynamic"]["label"].endswith("/3")
        statuses = {i["id"]: i["status"] for i in shout["dynamic"]["items"]}
        assert statuses["shout[1]"] == "failed"
        assert SHOUT_RAISES in shout["traceback"]
        assert nodes_of(view)["approve"]["dynamic"]["label"] == "waits for signal 'approve'"
