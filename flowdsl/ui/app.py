"""The inspector's ASGI app: one static page, JSON endpoints, a live stream, and actions.

Built by :func:`create_app` from a list of routes, with no module-level state, so that
tests (and applications that mount it) can make as many as they like.

=========================================  =====================================================
``GET /``                                  the page (``static/index.html``)
``GET /static/<file>``                     its script and style sheet
``GET /api/runs``                          runs: ``status``, ``flow``, ``q`` (id prefix),
                                           ``page``, ``page_size``
``GET /api/runs/<id>``                     one run: record, nodes, edges, timeline, usage
``GET /api/runs/<id>/timeline``            the run's Gantt bars alone
``GET /api/runs/<id>/stream``              server-sent events: the run, then what changes
``POST /api/runs/<id>/resume``             resume a failed or cancelled run (here)
``POST /api/runs/<id>/cancel``             cancel a running run
``POST /api/runs/<id>/signal``             ``{"name": ..., "value": ...}`` to a waiting run
=========================================  =====================================================

Errors are JSON, ``{"error": code, "message": text}``, with 400 (malformed input), 404
(unknown run or path), 409 (an action that does not fit the run), 422 (a run whose
records cannot be read: corrupted, or not signed with the inspector's key).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .._define.dsl import Flow
from .._errors import CheckpointError, FlowError
from .._integrity import Seal, seal_from
from ..backends import open_store
from ..backends.base import Store
from .driver import ActionError, Driver
from .security import Guard
from .views import flow_of, list_view, node_diff, run_view

__all__ = ["collect_flows", "create_app"]

STATIC = Path(__file__).parent / "static"
_STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
}
_STATUSES = frozenset({"running", "waiting", "finished", "failed", "cancelled"})
_MAX_ID = 256
_MAX_BODY = 1 << 20  # bytes of a signal's JSON body
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _check_id(run_id: str) -> str:
    if not run_id or len(run_id) > _MAX_ID or _CONTROL.search(run_id):
        raise ActionError(400, "bad_run_id", f"not a run id: {run_id[:80]!r}")
    return run_id


def _error(exc: ActionError) -> JSONResponse:
    return JSONResponse({"error": exc.code, "message": exc.message}, status_code=exc.status)


def collect_flows(items: Iterable[Any]) -> dict[str, Flow[..., Any]]:
    """Flows by ``module:qualname`` from flows and modules (every flow a module defines)."""
    flows: dict[str, Flow[..., Any]] = {}
    for item in items:
        if isinstance(item, Flow):
            flows[item.ref] = item
            continue
        for value in vars(item).values():
            if isinstance(value, Flow):
                flows[value.ref] = value
    return flows


class _Inspector:
    """The handlers, over one store, one driver and the flows the inspector knows."""

    def __init__(
        self,
        store: Store,
        driver: Driver,
        flows: Mapping[str, Flow[..., Any]],
        *,
        broker_url: str | None,
        poll_interval: float,
        scan_limit: int,
    ) -> None:
        self.store = store
        self.driver = driver
        self.flows = flows
        self.broker_url = broker_url
        self.poll_interval = poll_interval
        self.scan_limit = scan_limit
        self._static = {p.name: p for p in STATIC.iterdir() if p.is_file()}

    # --- pages ---------------------------------------------------------------------------

    async def index(self, request: Request) -> Response:
        return self._file("index.html")

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self._static:
            raise HTTPException(404)
        return self._file(name)

    def _file(self, name: str) -> Response:
        path = self._static[name]
        media = _STATIC_TYPES.get(path.suffix, "application/octet-stream")
        return Response(path.read_bytes(), media_type=media)

    # --- JSON --------------------------------------------------------------------------

    async def runs(self, request: Request) -> Response:
        query = request.query_params
        try:
            status = query.get("status") or None
            if status is not None and status not in _STATUSES:
                raise ActionError(400, "bad_status", f"unknown status {status[:40]!r}")
            page = _int(query.get("page"), "page", 1, 1, 1_000_000)
            page_size = _int(query.get("page_size"), "page_size", 50, 1, 500)
            search = query.get("q") or None
            if search is not None:
                _check_id(search)
        except ActionError as exc:
            return _error(exc)
        try:
            records = await self.store.list_runs(limit=self.scan_limit)
            if search is not None and not any(r.run_id == search for r in records):
                exact = await self.store.get_run(search)  # older than the scanned window
                if exact is not None:
                    records.append(exact)
        except CheckpointError as exc:
            return _error(ActionError(422, "unreadable_runs", str(exc)))
        data = list_view(
            records,
            self.flows,
            status=status,
            flow=query.get("flow") or None,
            search=search,
            page=page,
            page_size=page_size,
        )
        data["scan_limit"] = self.scan_limit
        return JSONResponse(data)

    async def _view(self, run_id: str) -> dict[str, Any]:
        try:
            record = await self.store.get_run(_check_id(run_id))
            if record is None:
                raise ActionError(404, "unknown_run", f"no run {run_id!r} in this store")
            journal = await self.store.load_nodes(run_id)
        except CheckpointError as exc:  # corrupted, or not signed as the key requires
            raise ActionError(422, "unreadable_run", str(exc)) from exc
        dead = await self._dead_letters(run_id)
        view = run_view(record, journal, flow_of(record, self.flows), dead_letters=dead)
        view["inspector"] = self.driver.state(run_id)
        return view

    async def _dead_letters(self, run_id: str) -> list[dict[str, Any]]:
        queue = self.driver.queue
        if queue is None:
            return []
        try:
            letters = await queue.dead_letters(run_id)
        except FlowError:
            return []
        return [{k: v for k, v in letter.items() if k != "payload"} for letter in letters]

    async def run(self, request: Request) -> Response:
        try:
            return JSONResponse(await self._view(request.path_params["run_id"]))
        except ActionError as exc:
            return _error(exc)

    async def timeline(self, request: Request) -> Response:
        try:
            view = await self._view(request.path_params["run_id"])
        except ActionError as exc:
            return _error(exc)
        return JSONResponse(view["timeline"])

    async def stream(self, request: Request) -> Response:
        run_id = request.path_params["run_id"]
        try:
            first = await self._view(run_id)
        except ActionError as exc:
            return _error(exc)
        return StreamingResponse(
            self._events(run_id, first),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    async def _events(self, run_id: str, first: dict[str, Any]) -> AsyncIterator[str]:
        """The run in full, then a patch whenever a poll of the store finds a change; the
        stream ends (``event: end``) once the run has ended and nothing drives it here."""
        yield "retry: 2000\n\n"
        last = first
        yield _sse("run", first)
        quiet = 0.0
        while True:
            if _ended(last) and not last["inspector"]["driving"]:
                yield _sse("end", {"status": last["run"]["status"]})
                return
            await anyio.sleep(self.poll_interval)
            try:
                view = await self._view(run_id)
            except ActionError as exc:
                yield _sse("gone", {"error": exc.code, "message": exc.message})
                return
            patch = node_diff(last, view)
            last = view
            if patch is not None:
                quiet = 0.0
                yield _sse("patch", patch)
            else:
                quiet += self.poll_interval
                if quiet >= 15.0:  # a comment line keeps proxies from closing the stream
                    quiet = 0.0
                    yield ": keep-alive\n\n"

    # --- actions -------------------------------------------------------------------------

    async def action(self, request: Request) -> Response:
        run_id = request.path_params["run_id"]
        name = request.path_params["action"]
        try:
            _check_id(run_id)
            if name == "resume":
                reply = await self.driver.resume(run_id)
            elif name == "cancel":
                reply = await self.driver.cancel(run_id)
            elif name == "signal":
                body = await _json_body(request)
                signal = body.get("name")
                if not isinstance(signal, str) or not signal or len(signal) > _MAX_ID:
                    raise ActionError(400, "bad_signal", "give the signal's name: {'name': ...}")
                if "value" not in body:
                    raise ActionError(400, "bad_signal", "give the signal's value: {'value': ...}")
                reply = await self.driver.signal(run_id, signal, body["value"])
            else:
                raise ActionError(404, "unknown_action", f"no action {name[:40]!r}")
        except ActionError as exc:
            return _error(exc)
        return JSONResponse(reply, status_code=202 if name == "resume" else 200)


def _int(text: str | None, name: str, default: int, low: int, high: int) -> int:
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise ActionError(400, f"bad_{name}", f"{name} must be a whole number") from None
    if not low <= value <= high:
        raise ActionError(400, f"bad_{name}", f"{name} must be between {low} and {high}")
    return value


async def _json_body(request: Request) -> dict[str, Any]:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ActionError(400, "bad_body", "send the action's body as application/json")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_BODY:
            raise ActionError(413, "too_large", f"the body is over {_MAX_BODY} bytes")
    try:
        data = json.loads(body)
    except ValueError:
        raise ActionError(400, "bad_json", "the body is not JSON") from None
    if not isinstance(data, dict):
        raise ActionError(400, "bad_json", "the body must be a JSON object")
    return data


def _ended(view: dict[str, Any]) -> bool:
    return view["run"]["status"] not in ("running", "waiting")


def _sse(event: str, data: Any) -> str:
    # One `data:` line: json.dumps never emits a raw line break.
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _not_found(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    code = {404: "not_found", 405: "method_not_allowed"}.get(status, "error")
    message = exc.detail if isinstance(exc, HTTPException) else "internal error"
    return JSONResponse({"error": code, "message": message}, status_code=status)


def create_app(
    store_url_or_store: str | Store,
    broker: str | None = None,
    token: str | None = None,
    *,
    flows: Iterable[Any] = (),
    allowed_hosts: Sequence[str] | None = None,
    poll_interval: float = 0.5,
    scan_limit: int = 2000,
    signing_key: Any = None,
    old_signing_keys: Sequence[Any] = (),
    llm: Any = None,
) -> Starlette:
    """The inspector as an ASGI app over a store (a URL or a store object).

    *flows*: flows, or modules whose flows to know, for the graphs of their runs and to
    resume them (a run's flow is never imported because its record names it).
    *broker*: the queue of batch runs, for their dead letters and for resuming them
    through its workers.  *token*: required of every request.  *allowed_hosts*: the
    ``Host`` names to answer (``None``: any).  The store is polled every
    *poll_interval* seconds for a watched run; the run list looks at the newest
    *scan_limit* runs.

    *signing_key* (and *old_signing_keys*, a :class:`~flowdsl.Secret` each) verify the
    store's records and sign what a resume writes, as a context's do (docs/security.md).
    Without one, records signed by others are shown unverified, as ``flowdsl runs show``
    shows them, and unsigned ones are checked against their digests.

    *llm* is the provider of the runs' steps (``fd.Context(llm=...)``): cancelling a run
    from the page cancels the provider batch jobs that hold only its requests.
    """
    store = open_store(store_url_or_store)
    if signing_key is not None or old_signing_keys:
        store.seal = seal_from(signing_key, old_signing_keys)
    elif isinstance(store_url_or_store, str):
        store.seal = Seal(trust_signed=True)
    known = collect_flows(flows)
    keys = {"signing_key": signing_key, "old_signing_keys": list(old_signing_keys)}
    driver = Driver(store, broker, known, keys, llm)
    inspector = _Inspector(
        store,
        driver,
        known,
        broker_url=broker,
        poll_interval=poll_interval,
        scan_limit=scan_limit,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await store.open()
        try:
            await driver.open_queue()
            async with anyio.create_task_group() as tg:
                driver.tg = tg
                try:
                    yield
                finally:
                    driver.tg = None
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await driver.close_queue()
                await store.close()

    routes = [
        Route("/", inspector.index),
        Route("/static/{name}", inspector.static),
        Route("/api/runs", inspector.runs),
        Route("/api/runs/{run_id}", inspector.run),
        Route("/api/runs/{run_id}/timeline", inspector.timeline),
        Route("/api/runs/{run_id}/stream", inspector.stream),
        Route("/api/runs/{run_id}/{action}", inspector.action, methods=["POST"]),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(Guard, token=token, allowed_hosts=allowed_hosts)],
        exception_handlers={HTTPException: _not_found},
        lifespan=lifespan,
    )
