"""The gRPC face of the run service: ``flowdsl.v1.Flows``, health and reflection, on grpc.aio.

:func:`open_service` starts a ``grpc.aio`` server over a :class:`RunService` and yields a
:class:`Serving` handle; leaving the block stops it gracefully: health turns to
NOT_SERVING, new runs are refused, runs get ``grace`` seconds to end, the rest are handed
back (running, journal intact) for the next service, then the server stops.  ``flowdsl
serve`` wraps it and leaves the block on SIGINT or SIGTERM.

grpc.aio runs on asyncio only: under trio, :func:`open_service` raises ``ConfigError``.
"""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, NoReturn, TypeVar

import anyio
import attrs
import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .._define.dsl import Flow
from .._errors import ConfigError, FlowError
from .._records import RunRecord
from ._errors import ServiceError, require_asyncio
from ._flows import FlowRegistry
from ._generated import flows_pb2 as pb
from ._generated import flows_pb2_grpc as pb_grpc
from ._runs import RunService, as_service_error

__all__ = ["SERVICE_NAME", "FlowRegistry", "FlowsServicer", "Serving", "open_service"]

T = TypeVar("T")

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["Flows"].full_name
DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024
# What a Run message carries besides its result: ids, status, error, times.
_ENVELOPE = 64 * 1024
# Health answers load balancers' probes, which carry no token; it tells nothing else.
_OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})


class FlowsServicer:
    """The RPCs of ``flowdsl.v1.Flows``, each a thin translation to :class:`RunService`."""

    def __init__(self, runs: RunService, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE) -> None:
        self.runs = runs
        self.max_message_bytes = max_message_bytes

    async def StartRun(
        self, request: pb.StartRunRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.StartRunResponse:
        record, created = await _answer(
            context, self.runs.start(request.flow, request.input_json, request.run_id)
        )
        return pb.StartRunResponse(run=await self._run(record, context), created=created)

    async def GetRun(
        self, request: pb.GetRunRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.GetRunResponse:
        record = await _answer(context, self.runs.get(request.run_id))
        return pb.GetRunResponse(run=await self._run(record, context))

    async def WatchRun(
        self, request: pb.WatchRunRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WatchRunResponse]:
        limit = self.max_message_bytes - 1024
        try:
            async for entry in self.runs.watch(request.run_id, request.after_seq):
                if len(entry.json) > limit:
                    raise ServiceError(
                        f"event {entry.seq} ({entry.type}) of run {request.run_id!r} is "
                        f"{len(entry.json)} bytes, over the service's message limit",
                        code="RESOURCE_EXHAUSTED",
                        node=entry.node_id,
                        hint="Start the service with a larger --max-message-bytes",
                    )
                event = pb.Event(
                    seq=entry.seq, type=entry.type, node_id=entry.node_id or "", json=entry.json
                )
                yield pb.WatchRunResponse(event=event)
        except FlowError as exc:
            await _abort(context, as_service_error(exc))

    async def SignalRun(
        self, request: pb.SignalRunRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.SignalRunResponse:
        record = await _answer(
            context, self.runs.signal(request.run_id, request.name, request.value_json)
        )
        return pb.SignalRunResponse(run=await self._run(record, context))

    async def CancelRun(
        self, request: pb.CancelRunRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.CancelRunResponse:
        record = await _answer(context, self.runs.cancel(request.run_id))
        return pb.CancelRunResponse(run=await self._run(record, context))

    async def ResumeRun(
        self, request: pb.ResumeRunRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ResumeRunResponse:
        record = await _answer(context, self.runs.resume(request.run_id))
        return pb.ResumeRunResponse(run=await self._run(record, context))

    async def ListRuns(
        self, request: pb.ListRunsRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ListRunsResponse:
        records, token = await _answer(
            context,
            self.runs.page(
                status=request.status,
                flow=request.flow,
                page_size=request.page_size,
                page_token=request.page_token,
            ),
        )
        size = sum(len(r.result or "") + len(r.error or "") + 512 for r in records)
        if size > self.max_message_bytes - _ENVELOPE and len(records) > 1:
            await _abort(
                context,
                ServiceError(
                    f"a page of {len(records)} runs is about {size} bytes, over the service's "
                    f"message limit of {self.max_message_bytes} bytes",
                    code="RESOURCE_EXHAUSTED",
                    hint="Ask for a smaller page_size",
                ),
            )
        runs = [await self._run(record, context) for record in records]
        return pb.ListRunsResponse(runs=runs, next_page_token=token)

    async def _run(self, record: RunRecord, context: aio.ServicerContext[Any, Any]) -> pb.Run:
        size = len(record.result or "")
        if size > self.max_message_bytes - _ENVELOPE:
            await _abort(
                context,
                ServiceError(
                    f"the result of run {record.run_id!r} is {size} bytes, over the service's "
                    f"message limit of {self.max_message_bytes} bytes",
                    code="RESOURCE_EXHAUSTED",
                    flow=record.flow,
                    hint="Start the service with a larger --max-message-bytes, or read the "
                    "result from the store",
                ),
            )
        return run_message(record)


def run_message(record: RunRecord) -> pb.Run:
    return pb.Run(
        run_id=record.run_id,
        flow=record.flow_ref,
        flow_name=record.flow,
        status=record.status.value,
        result_json=record.result or "",
        error=record.error or "",
        failed_node=record.failed_node or "",
        created_at=record.created_at,
        updated_at=record.updated_at,
    )


async def _answer(context: aio.ServicerContext[Any, Any], call: Awaitable[T]) -> T:
    try:
        return await call
    except FlowError as exc:
        await _abort(context, as_service_error(exc))


async def _abort(context: aio.ServicerContext[Any, Any], error: ServiceError) -> NoReturn:
    await context.abort(grpc.StatusCode[error.code], str(error))
    raise AssertionError("context.abort returned")  # it raises; this tells mypy so


class TokenCheck(aio.ServerInterceptor):
    """Every call (but health's) carries ``authorization: Bearer <token>``, or it is
    refused with ``UNAUTHENTICATED``; the token is compared in constant time."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler_call_details.method in _OPEN_METHODS or handler is None:
            return handler
        sent = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                sent = value.encode() if isinstance(value, str) else bytes(value)
        if hmac.compare_digest(sent, self._expected):
            return handler
        why = "missing" if not sent else "wrong"
        return _refusal(
            handler, f"the token is {why}: send the metadata `authorization: Bearer <token>`"
        )


def _refusal(
    handler: grpc.RpcMethodHandler[Any, Any], message: str
) -> grpc.RpcMethodHandler[Any, Any]:
    async def refuse(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    deserialize = handler.request_deserializer
    serialize = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, deserialize, serialize)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, deserialize, serialize)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, deserialize, serialize)
    return grpc.unary_unary_rpc_method_handler(refuse, deserialize, serialize)


@attrs.define(eq=False)
class Serving:
    """A running service: where it listens, and its runs."""

    address: str  # host:port, with the port the system chose for port 0
    port: int
    runs: RunService
    server: aio.Server = attrs.field(repr=False)

    @property
    def url(self) -> str:
        return f"grpc://{self.address}"


@contextlib.asynccontextmanager
async def open_service(
    flows: FlowRegistry | Iterable[Flow[..., Any]],
    *,
    store: str | None,
    broker: str | None = None,
    listen: str = "127.0.0.1:50051",
    token: str | None = None,
    tls: tuple[bytes, bytes] | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE,
    grace: float = 10.0,
    workers: int | None = None,
    take_over_every: float | None = 2.0,
    signing_key: Any = None,
    old_signing_keys: Sequence[Any] = (),
    llm: Any = None,
) -> AsyncIterator[Serving]:
    """Serve *flows* on *listen* until the block ends.

    *flows* are the flows requests may name (by ``module:qualname``), or a registry of the
    flows of some modules (what ``flowdsl serve --import`` builds).  *tls* is ``(certificate
    chain PEM, private key PEM)``; *token*, when given, is the bearer token every call must
    carry.  Every *take_over_every* seconds the service takes up the unfinished runs whose
    driver is gone (``None``: only when it starts).  *signing_key* and *old_signing_keys*
    are the context's (see docs/security.md): the service signs what it writes and refuses
    records it cannot verify.  *llm* is the provider of the runs' steps
    (``fd.Context(llm=...)``): cancelling a run cancels the provider batch jobs that hold
    only its requests.
    """
    require_asyncio("the flowdsl service")
    if token is not None and not token:
        raise ConfigError("the service's token is empty", hint="Set a non-empty token")
    registry = flows if isinstance(flows, FlowRegistry) else FlowRegistry(flows)
    runs = RunService(
        registry,
        store=store,
        broker=broker,
        workers=workers,
        take_over_every=take_over_every,
        signing_key=signing_key,
        old_signing_keys=old_signing_keys,
        llm=llm,
    )
    async with runs.running():
        server = aio.server(
            interceptors=[TokenCheck(token)] if token is not None else None,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
            ],
        )
        pb_grpc.add_FlowsServicer_to_server(  # type: ignore[no-untyped-call]
            FlowsServicer(runs, max_message_bytes=max_message_bytes), server
        )
        healthy = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(healthy, server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        port = _bind(server, listen, tls)
        await server.start()
        try:
            for name in ("", SERVICE_NAME):
                await healthy.set(name, health_pb2.HealthCheckResponse.SERVING)
            host = listen.rpartition(":")[0]
            yield Serving(f"{host}:{port}", port, runs, server)
        finally:
            with anyio.CancelScope(shield=True):
                await healthy.enter_graceful_shutdown()
                await runs.drain(grace)
                # The runs still going are handed back when `running()` ends; their
                # watchers' streams end with the server, not as if the runs had ended.
                await server.stop(grace=1.0)


def _bind(server: aio.Server, listen: str, tls: tuple[bytes, bytes] | None) -> int:
    try:
        if tls is None:
            port = server.add_insecure_port(listen)
        else:
            cert, key = tls
            port = server.add_secure_port(listen, grpc.ssl_server_credentials([(key, cert)]))
    except RuntimeError as exc:
        port = 0
        cause: BaseException | None = exc
    else:
        cause = None
    if port == 0:
        raise ConfigError(
            f"cannot listen on {listen}" + (f": {cause}" if cause else ""),
            hint="Use host:port with a free port (port 0 lets the system choose)",
        ) from cause
    return port
