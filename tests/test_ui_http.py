"""The inspector over HTTP: every endpoint, the token, cross-site requests and bad input,
through Starlette's TestClient (the live stream over a real uvicorn server too)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")

import httpx
from starlette.testclient import TestClient

import flowdsl as fd
from flowdsl._records import RunRecord, RunStatus
from flowdsl.backends import open_store
from flowdsl.ui import create_app
from flowdsl.ui.security import COOKIE, CSRF_HEADER, LOOPBACK_HOSTS

import ui_flows
from _ui_server import HeldRun, ServedApp, populate

ACTION = {CSRF_HEADER: "1"}
WAIT = 20.0  # seconds a condition gets before the test fails


@pytest.fixture(autouse=True)
def _reset_flags() -> Iterator[None]:
    ui_flows.FIXED.clear()
    ui_flows.GATE.clear()
    yield
    ui_flows.GATE.set()  # a held run must never outlive its test


@pytest.fixture
def store_url(sqlite_url: str) -> str:
    anyio.run(populate, sqlite_url)
    return sqlite_url


@pytest.fixture
def client(store_url: str) -> Iterator[TestClient]:
    app = create_app(store_url, flows=[ui_flows], poll_interval=0.05)
    with TestClient(app) as test_client:
        yield test_client


def wait_for(check: Callable[[], Any], what: str) -> Any:
    """Poll *check* until it returns something true; fail after WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def nodes_of(view: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["id"]: n for n in view["nodes"]}


# --- the page -------------------------------------------------------------------------------


def test_page_and_its_files_are_served_with_a_strict_policy(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "/static/app.js" in page.text
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy
    assert "unsafe-inline" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    script = client.get("/static/app.js")
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    assert client.get("/static/app.css").status_code == 200


@pytest.mark.parametrize("path", ["/static/nope.js", "/static/..%2Fapp.py", "/nowhere"])
def test_unknown_paths_are_json_404s(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


# --- the run list ---------------------------------------------------------------------------


def test_runs_lists_every_run_newest_first(client: TestClient) -> None:
    data = client.get("/api/runs").json()
    assert [r["run_id"] for r in data["runs"]] == ["t-failed", "t-urgent", "t-finished"]
    assert data["total"] == 3
    assert data["next_page"] is None
    assert data["flows"] == ["ingest", "triage"]
    failed = data["runs"][0]
    assert failed["status"] == "failed"
    assert failed["failed_node"] == "parse"
    assert failed["graph"] == "flow"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("status=failed", ["t-failed"]),
        ("status=finished", ["t-urgent", "t-finished"]),
        ("flow=triage", ["t-urgent", "t-finished"]),
        ("flow=triage&status=failed", []),
        ("q=t-f", ["t-failed", "t-finished"]),
        ("q=t-urgent", ["t-urgent"]),
        ("q=zzz", []),
    ],
)
def test_runs_filter_and_search(client: TestClient, query: str, expected: list[str]) -> None:
    data = client.get(f"/api/runs?{query}").json()
    assert [r["run_id"] for r in data["runs"]] == expected
    assert data["total"] == len(expected)


def test_runs_are_paged(client: TestClient) -> None:
    first = client.get("/api/runs?page_size=2").json()
    assert [r["run_id"] for r in first["runs"]] == ["t-failed", "t-urgent"]
    assert first["next_page"] == 2
    second = client.get("/api/runs?page_size=2&page=2").json()
    assert [r["run_id"] for r in second["runs"]] == ["t-finished"]
    assert second["next_page"] is None


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ("page=0", "bad_page"),
        ("page=x", "bad_page"),
        ("page_size=100000", "bad_page_size"),
        ("status=exploded", "bad_status"),
        ("q=%01", "bad_run_id"),
        ("q=" + "x" * 300, "bad_run_id"),
    ],
)
def test_runs_refuse_bad_queries(client: TestClient, query: str, error: str) -> None:
    response = client.get(f"/api/runs?{query}")
    assert response.status_code == 400
    assert response.json()["error"] == error


# --- one run ----------------------------------------------------------------------------------


def test_failed_run_shows_its_nodes_and_the_error(client: TestClient) -> None:
    view = client.get("/api/runs/t-failed").json()
    assert view["run"]["status"] == "failed"
    assert view["run"]["inputs"] == {"path": "data.txt"}
    nodes = nodes_of(view)
    assert [n["id"] for n in view["nodes"]] == ["load", "parse", "summarize"]
    assert nodes["load"]["status"] == "finished"
    assert nodes["load"]["attempts"] == 1
    assert nodes["load"]["result"] == ["data.txt:0", "data.txt:1", "data.txt:2"]
    assert nodes["load"]["arguments"] == {"path": "data.txt"}
    parse = nodes["parse"]
    assert parse["status"] == "failed"
    assert "ValueError: cannot parse 'data.txt:1'" in parse["error"]
    # What it was called with: the journaled result of load.
    assert parse["arguments"] == {"lines": ["data.txt:0", "data.txt:1", "data.txt:2"]}
    assert nodes["summarize"]["status"] == "not run"
    assert nodes["summarize"]["arguments"] is None
    assert view["edges"] == [
        {"src": "load", "dst": "parse", "kind": "data", "case": None},
        {"src": "parse", "dst": "summarize", "kind": "data", "case": None},
    ]
    assert [n["depth"] for n in view["nodes"]] == [0, 1, 2]
    assert view["actions"] == {"resume": True, "cancel": False, "signal": False}


def test_finished_run_shows_branches_usage_and_timeline(client: TestClient) -> None:
    view = client.get("/api/runs/t-finished").json()
    nodes = nodes_of(view)
    assert nodes["route"]["kind"] == "branch"
    assert nodes["route"]["result"] == "auto"
    assert nodes["route.auto/draft_reply"]["status"] == "finished"
    assert nodes["route.escalate/escalate"]["status"] == "skipped"
    assert nodes["route.join"]["status"] == "finished"
    assert nodes["classify"]["result"] == {"team": "billing", "urgent": False}
    assert nodes["route.auto/draft_reply"]["arguments"] == {
        "ticket": "my invoice is wrong",
        "label": {"team": "billing", "urgent": False},
    }
    assert nodes["route.escalate/escalate"]["arguments"] is None
    # Tokens and cost per node, and for the run.
    classify = nodes["classify"]["usage"]
    draft = nodes["route.auto/draft_reply"]["usage"]
    assert classify["calls"] == 1
    assert classify["cost"] > 0
    total = view["run"]["usage"]
    assert total["input_tokens"] == classify["input_tokens"] + draft["input_tokens"]
    assert total["cost"] == pytest.approx(classify["cost"] + draft["cost"])
    assert view["run"]["result"].startswith("[billing] Thanks")
    bars = view["timeline"]["bars"]
    assert {b["id"] for b in bars} == {"classify", "sentiment", "route", "route.auto/draft_reply"}
    for bar in bars:
        assert bar["start"] <= bar["end"]
        assert bar["status"] == "finished"
    assert client.get("/api/runs/t-finished/timeline").json()["bars"] == bars


def test_run_of_a_flow_not_imported_shows_its_journal_only(store_url: str) -> None:
    # The record names ui_flows:ingest, which the test process has imported: the
    # inspector still does not use it, since it was not given it.
    with TestClient(create_app(store_url)) as client:
        view = client.get("/api/runs/t-failed").json()
    assert view["run"]["graph"] == "journal"
    assert view["edges"] == []
    assert [(n["id"], n["status"]) for n in view["nodes"]] == [
        ("load", "finished"),
        ("parse", "failed"),
    ]
    assert view["actions"]["resume"] is False


def test_unknown_and_malformed_run_ids(client: TestClient) -> None:
    for path in ("/api/runs/nope", "/api/runs/nope/timeline", "/api/runs/nope/stream"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.json() == {"error": "unknown_run", "message": "no run 'nope' in this store"}
    for bad in ("%01", "x" * 300, "a%0Ab"):
        response = client.get(f"/api/runs/{bad}")
        assert response.status_code == 400, bad
        assert response.json()["error"] == "bad_run_id"
    response = client.post("/api/runs/nope/resume", headers=ACTION)
    assert response.status_code == 404
    assert client.post("/api/runs/%01/cancel", headers=ACTION).status_code == 400


def test_stream_of_an_ended_run_sends_it_and_ends(client: TestClient) -> None:
    with client.stream("GET", "/api/runs/t-failed/stream") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _events("".join(response.iter_text()))
    assert [name for name, _ in events] == ["run", "end"]
    assert events[0][1]["run"]["status"] == "failed"
    assert events[1][1] == {"status": "failed"}


def _events(text: str) -> list[tuple[str, Any]]:
    out = []
    for block in text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in lines:
            out.append((lines["event"], json.loads(lines["data"])))
    return out


# --- actions --------------------------------------------------------------------------------


def test_resume_finishes_a_failed_run_here(client: TestClient) -> None:
    before = nodes_of(client.get("/api/runs/t-failed").json())
    ui_flows.FIXED.set()
    response = client.post("/api/runs/t-failed/resume", headers=ACTION)
    assert response.status_code == 202
    assert response.json() == {"run_id": "t-failed", "resuming": True}
    view = wait_for(
        lambda: (v := client.get("/api/runs/t-failed").json())["run"]["status"] == "finished" and v,
        "the resumed run to finish",
    )
    nodes = nodes_of(view)
    assert nodes["summarize"]["status"] == "finished"
    assert nodes["parse"]["status"] == "finished"
    assert nodes["load"]["started_at"] == before["load"]["started_at"]  # not run again
    assert view["inspector"] == {"driving": False, "error": None}


def test_resume_refuses_what_it_cannot_resume(client: TestClient, store_url: str) -> None:
    response = client.post("/api/runs/t-finished/resume", headers=ACTION)
    assert response.status_code == 409
    assert response.json()["error"] == "not_resumable"
    with TestClient(create_app(store_url)) as bare:
        response = bare.post("/api/runs/t-failed/resume", headers=ACTION)
    assert response.status_code == 409
    body = response.json()
    assert body["error"] == "unknown_flow"
    assert "--import ui_flows" in body["message"]


def test_cancel_a_run_driven_elsewhere_marks_it(client: TestClient, store_url: str) -> None:
    _put_run(store_url, "t-orphan", RunStatus.RUNNING)
    response = client.post("/api/runs/t-orphan/cancel", headers=ACTION)
    assert response.status_code == 200
    body = response.json()
    assert body["cancelled"] is True
    assert body["driven_here"] is False
    assert "not interrupted" in body["note"]
    assert client.get("/api/runs/t-orphan").json()["run"]["status"] == "cancelled"
    again = client.post("/api/runs/t-orphan/cancel", headers=ACTION)
    assert again.status_code == 409


def test_cancel_a_run_resumed_here_cancels_it(client: TestClient, store_url: str) -> None:
    _put_run(store_url, "t-held", RunStatus.CANCELLED)
    assert client.post("/api/runs/t-held/resume", headers=ACTION).status_code == 202
    wait_for(
        lambda: nodes_of(client.get("/api/runs/t-held").json())["hold"]["status"] == "running",
        "the resumed run to reach hold",
    )
    response = client.post("/api/runs/t-held/cancel", headers=ACTION)
    assert response.json() == {"run_id": "t-held", "cancelled": True, "driven_here": True}
    view = wait_for(
        lambda: (v := client.get("/api/runs/t-held").json())["inspector"]["driving"] is False and v,
        "the cancelled run to settle",
    )
    assert view["run"]["status"] == "cancelled"
    assert nodes_of(view)["prepare"]["status"] == "finished"


def _put_run(url: str, run_id: str, status: RunStatus) -> None:
    """A record of ui_flows.gated as a process that died (or was cancelled) left it."""

    async def put() -> None:
        store = open_store(url)
        await store.open()
        try:
            now = time.time()
            record = RunRecord(
                run_id=run_id,
                flow="gated",
                flow_ref=ui_flows.gated.ref,
                fingerprint=ui_flows.gated.graph.fingerprint,
                inputs='{"n":4}',
                status=status,
                created_at=now,
                updated_at=now,
            )
            await store.create_run(record)
        finally:
            await store.close()

    anyio.run(put)


def test_signal_reaches_a_waiting_run(client: TestClient, store_url: str) -> None:
    async def leave_waiting() -> None:
        async with fd.Context(store=store_url) as ctx:
            run = await ctx.start(ui_flows.approval, "the post", run_id="t-waiting")
            async for event in run.events():
                if isinstance(event, fd.events.RunWaiting):
                    break

    anyio.run(leave_waiting)
    view = client.get("/api/runs/t-waiting").json()
    assert view["run"]["status"] == "waiting"
    assert view["actions"]["signal"] is True
    response = client.post(
        "/api/runs/t-waiting/signal", headers=ACTION, json={"name": "approval", "value": True}
    )
    assert response.status_code == 200, response.text
    # No process drives the run any more: the inspector resumes it to take the signal.
    assert response.json() == {"run_id": "t-waiting", "signalled": "approval", "resuming": True}
    wait_for(lambda: _run_of(client, "t-waiting")["status"] == "finished", "the run to finish")
    assert _run_of(client, "t-waiting")["result"] == "the post: approved"
    again = client.post(
        "/api/runs/t-waiting/signal", headers=ACTION, json={"name": "approval", "value": True}
    )
    assert again.status_code == 409


def test_signal_to_a_run_a_live_process_drives_is_taken_there(
    client: TestClient, store_url: str
) -> None:
    async def drive() -> Any:
        async with fd.Context(store=store_url) as ctx:
            run = await ctx.start(ui_flows.approval, "the draft", run_id="t-live-wait")
            async for event in run.events():
                if isinstance(event, fd.events.RunWaiting):
                    break
            # The page signals while this context still drives (and polls) the run.
            reply = await anyio.to_thread.run_sync(
                lambda: client.post(
                    "/api/runs/t-live-wait/signal",
                    headers=ACTION,
                    json={"name": "approval", "value": False},
                )
            )
            assert reply.status_code == 200, reply.text
            return await run.result()

    assert anyio.run(drive) == "the draft: refused"
    assert _run_of(client, "t-live-wait")["status"] == "finished"


@pytest.mark.parametrize(
    ("body", "content_type", "error"),
    [
        (b"{not json", "application/json", "bad_json"),
        (b"[1, 2]", "application/json", "bad_json"),
        (b'{"value": 1}', "application/json", "bad_signal"),
        (b'{"name": "", "value": 1}', "application/json", "bad_signal"),
        (b'{"name": "approval"}', "application/json", "bad_signal"),
        (b'{"name": "approval", "value": 1}', "text/plain", "bad_body"),
    ],
)
def test_signal_refuses_bad_bodies(
    client: TestClient, body: bytes, content_type: str, error: str
) -> None:
    response = client.post(
        "/api/runs/t-failed/signal",
        headers={**ACTION, "content-type": content_type},
        content=body,
    )
    assert response.status_code == 400
    assert response.json()["error"] == error


def test_unknown_action_and_wrong_method(client: TestClient) -> None:
    response = client.post("/api/runs/t-failed/explode", headers=ACTION)
    assert response.status_code == 404
    assert response.json()["error"] == "unknown_action"
    response = client.get("/api/runs/t-failed/resume")
    assert response.status_code == 405
    assert response.json()["error"] == "method_not_allowed"


# --- cross-site requests, the token, the host -----------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},  # no custom header: a plain cross-site form could send this
        {CSRF_HEADER: "1", "origin": "http://evil.example"},
        {CSRF_HEADER: "1", "sec-fetch-site": "cross-site"},
        {CSRF_HEADER: "1", "sec-fetch-site": "same-site"},
        {CSRF_HEADER: "1", "origin": "null"},
    ],
)
def test_actions_refuse_cross_site_requests(client: TestClient, headers: dict[str, str]) -> None:
    ui_flows.FIXED.set()
    response = client.post("/api/runs/t-failed/resume", headers=headers)
    assert response.status_code == 403
    assert response.json()["error"] == "cross_site"
    assert client.get("/api/runs/t-failed").json()["run"]["status"] == "failed"


def test_actions_accept_the_pages_own_requests(client: TestClient) -> None:
    headers = {**ACTION, "origin": "http://testserver", "sec-fetch-site": "same-origin"}
    response = client.post("/api/runs/t-finished/resume", headers=headers)
    assert response.status_code == 409  # past the guard; refused for what the run is


@pytest.fixture
def token_client(store_url: str) -> Iterator[TestClient]:
    app = create_app(store_url, token="s3cret-token", flows=[ui_flows])
    with TestClient(app) as test_client:
        yield test_client


def test_token_is_required_everywhere(token_client: TestClient) -> None:
    for path in ("/", "/static/app.js", "/api/runs", "/api/runs/t-failed", "/nowhere"):
        response = token_client.get(path)
        assert response.status_code == 401, path
        assert response.json()["error"] == "unauthorized"
    assert token_client.post("/api/runs/t-failed/cancel", headers=ACTION).status_code == 401


@pytest.mark.parametrize("wrong", ["", "s3cret", "s3cret-token-and-more", "S3CRET-TOKEN"])
def test_wrong_tokens_are_refused(token_client: TestClient, wrong: str) -> None:
    response = token_client.get("/api/runs", headers={"authorization": f"Bearer {wrong}"})
    assert response.status_code == 401
    response = token_client.get(f"/?token={wrong}", follow_redirects=False)
    assert response.status_code == 401
    assert "set-cookie" not in response.headers


def test_bearer_token_is_accepted(token_client: TestClient) -> None:
    response = token_client.get("/api/runs", headers={"authorization": "Bearer s3cret-token"})
    assert response.status_code == 200
    assert response.json()["total"] == 3


def test_login_link_sets_a_cookie_and_drops_the_token(token_client: TestClient) -> None:
    response = token_client.get("/?token=s3cret-token", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    assert "s3cret-token" not in cookie  # a keyed hash of the token, not the token
    # The client keeps the cookie, as a browser does.
    assert token_client.get("/api/runs").status_code == 200
    assert token_client.get("/").status_code == 200
    token_client.cookies.clear()
    token_client.cookies.set(COOKIE, "0" * 64)
    assert token_client.get("/api/runs").status_code == 401


def test_login_link_never_redirects_off_site(token_client: TestClient) -> None:
    response = token_client.get("//evil.example/?token=s3cret-token", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/"


def test_loopback_inspector_answers_loopback_hosts_only(store_url: str) -> None:
    app = create_app(store_url, allowed_hosts=LOOPBACK_HOSTS)
    with TestClient(app, base_url="http://127.0.0.1:8765") as client:
        assert client.get("/api/runs").status_code == 200
        assert client.get("/api/runs", headers={"host": "localhost:8765"}).status_code == 200
        assert client.get("/api/runs", headers={"host": "[::1]:8765"}).status_code == 200
        response = client.get("/api/runs", headers={"host": "evil.example:8765"})
        assert response.status_code == 400
        assert response.json()["error"] == "bad_host"


# --- the live stream, over a real server ----------------------------------------------------


@pytest.mark.slow
def test_stream_pushes_a_running_runs_changes(store_url: str) -> None:
    served = ServedApp(create_app(store_url, flows=[ui_flows], poll_interval=0.05)).start()
    held = HeldRun(store_url, "t-live").start()
    try:
        wait_for(lambda: _status_of(served.url, "t-live") == "running", "the held run to start")
        seen: list[tuple[str, Any]] = []
        statuses: dict[str, str] = {}
        with httpx.stream("GET", f"{served.url}/api/runs/t-live/stream", timeout=WAIT) as response:
            assert response.status_code == 200
            buffer = ""
            for chunk in response.iter_text():
                buffer += chunk
                while "\n\n" in buffer:
                    block, buffer = buffer.split("\n\n", 1)
                    for name, data in _events(block + "\n\n"):
                        seen.append((name, data))
                        if name in ("run", "patch"):
                            for node in data.get("nodes", []):
                                statuses[node["id"]] = node["status"]
                        if statuses.get("hold") == "running" and not ui_flows.GATE.is_set():
                            ui_flows.GATE.set()  # the page saw it wait: let it go
        assert held.finish() == "published 41"
    finally:
        ui_flows.GATE.set()
        served.stop()
    names = [name for name, _ in seen]
    assert names[0] == "run"
    assert names[-1] == "end"
    assert "patch" in names
    assert statuses == {"prepare": "finished", "hold": "finished", "publish": "finished"}
    assert seen[-1][1] == {"status": "finished"}


def _run_of(client: TestClient, run_id: str) -> dict[str, Any]:
    run: dict[str, Any] = client.get(f"/api/runs/{run_id}").json()["run"]
    return run


def _status_of(url: str, run_id: str) -> str | None:
    response = httpx.get(f"{url}/api/runs/{run_id}", timeout=WAIT)
    return response.json()["run"]["status"] if response.status_code == 200 else None


def test_view_helpers_do_not_need_a_server() -> None:
    from flowdsl.ui.views import node_diff

    old = {
        "run": {"status": "running"},
        "nodes": [{"id": "a", "status": "pending"}],
        "timeline": {"now": 1},
    }
    same = {
        "run": {"status": "running"},
        "nodes": [{"id": "a", "status": "pending"}],
        "timeline": {"now": 2},
    }
    assert node_diff(old, same) is None
    new = {
        "run": {"status": "running"},
        "nodes": [{"id": "a", "status": "running"}],
        "timeline": {"now": 3},
    }
    assert node_diff(old, new) == {"nodes": [{"id": "a", "status": "running"}]}
    assert node_diff(None, new) == {"full": new}


# --- every store ----------------------------------------------------------------------------


def _check_store(url: str) -> None:
    anyio.run(populate, url)
    with TestClient(create_app(url, flows=[ui_flows])) as client:
        runs = client.get("/api/runs?flow=triage").json()
        assert [r["run_id"] for r in runs["runs"]] == ["t-urgent", "t-finished"]
        view = client.get("/api/runs/t-failed").json()
        statuses = {n["id"]: n["status"] for n in view["nodes"]}
        assert statuses == {"load": "finished", "parse": "failed", "summarize": "not run"}
        urgent = nodes_of(client.get("/api/runs/t-urgent").json())
        assert urgent["route"]["result"] == "escalate"
        assert urgent["route.auto/draft_reply"]["status"] == "skipped"
        assert client.get("/api/runs/nope").status_code == 404


def test_the_inspector_reads_a_redis_store(redis_server: Any) -> None:
    _check_store(redis_server.url)


def test_the_inspector_reads_a_nats_store(nats_server: Any) -> None:
    _check_store(nats_server.url)


# --- signed stores --------------------------------------------------------------------------


def test_with_the_signing_key_a_resume_signs_and_without_it_signed_runs_still_show(
    sqlite_url: str,
) -> None:
    key = fd.Secret("UI_HTTP_TEST_KEY", "u" * 32)
    anyio.run(populate, sqlite_url, key)
    # No key: records signed by others are shown (unverified), as `runs show` shows them.
    with TestClient(create_app(sqlite_url, flows=[ui_flows])) as client:
        assert client.get("/api/runs/t-failed").json()["run"]["status"] == "failed"
    ui_flows.FIXED.set()
    app = create_app(sqlite_url, flows=[ui_flows], poll_interval=0.05, signing_key=key)
    with TestClient(app) as client:
        assert client.post("/api/runs/t-failed/resume", headers=ACTION).status_code == 202
        wait_for(lambda: _run_of(client, "t-failed")["status"] == "finished", "the resume")

    async def read_with_the_key() -> Any:
        async with fd.Context(store=sqlite_url, signing_key=key) as ctx:
            return await ctx.resume("t-failed", flow=ui_flows.ingest)  # verified, finished

    assert anyio.run(read_with_the_key) == "data.txt:0=10, data.txt:1=10, data.txt:2=10"
