"""``fd.Client``: the Python client of a ``flowdsl serve`` service.

``import flowdsl`` makes this class available without importing grpc or protobuf: they are
imported when a client is made, so a missing ``serve`` extra is reported then, as a
``ConfigError`` naming it.  Calls run on asyncio only (grpc.aio); under trio they raise
``ConfigError``.  A failed call raises :class:`~flowdsl.service.ServiceError` whose
``code`` is the gRPC status name (``NOT_FOUND``, ``INVALID_ARGUMENT``, ...).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import attrs

from .. import _codec
from .. import events as ev
from .._errors import CodecError, ConfigError
from ._errors import ServiceError, require_asyncio

if TYPE_CHECKING:
    from grpc import aio

__all__ = ["Client", "RemoteEvent", "RunInfo", "RunPage"]

_EVENTS = {cls.__name__: cls for cls in ev.EVENT_TYPES}


@attrs.frozen
class RunInfo:
    """A run as the service reports it; ``result`` is the flow's result as JSON data."""

    run_id: str
    flow: str  # module:qualname
    status: str  # "running", "waiting", "finished", "failed" or "cancelled"
    result: Any = None
    error: str | None = None
    flow_name: str = ""
    failed_node: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    created: bool = False  # from start(): whether that call created the run

    @property
    def ended(self) -> bool:
        return self.status not in ("running", "waiting")


@attrs.frozen
class RemoteEvent:
    """One event of a watched run: ``seq`` to resume watching from, ``data`` the event."""

    seq: int
    type: str  # the event class name: "RunStarted", "StepFinished", ...
    node_id: str | None
    data: dict[str, Any]

    @property
    def event(self) -> Any:
        """The event as its ``fd.events`` class, or ``None`` for a type this flowdsl lacks."""
        cls = _EVENTS.get(self.type)
        if cls is None:
            return None
        with contextlib.suppress(Exception):
            return _codec.converter.structure(self.data, cls)
        # Run-level events declare `node_id: None`, which the converter has no hook for:
        # their fields are plain JSON values, so build them directly.
        data = {k: v for k, v in self.data.items() if k != "node_id" or v is not None}
        try:
            return cls(**data)
        except TypeError:
            return None


@attrs.frozen
class RunPage:
    """One page of :meth:`Client.list`; pass ``next_page_token`` for the next ("" at the end)."""

    runs: tuple[RunInfo, ...]
    next_page_token: str


class Client:
    """A connection to a flowdsl service at ``grpc://host:port`` (``grpcs://`` for TLS).

    *token* is sent as ``authorization: Bearer <token>``; *ca_cert* (PEM bytes or a file)
    is the certificate to trust for TLS (default: the system's).  Use it as
    ``async with fd.Client(url) as client:``, or call :meth:`close` when done.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        ca_cert: bytes | str | os.PathLike[str] | None = None,
        timeout: float | None = 30.0,
        max_message_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        require_asyncio("fd.Client")
        parts = urlsplit(url)
        if parts.scheme not in ("grpc", "grpcs") or not parts.hostname or parts.port is None:
            raise ConfigError(
                f"{url!r} is not a service URL",
                hint="Write grpc://host:port (or grpcs://host:port for TLS)",
            )
        try:
            import grpc  # noqa: F401  (here, so that a missing extra is reported now)
        except ImportError as exc:
            raise ConfigError(
                "fd.Client needs grpcio", hint="Install it: pip install 'flowdsl[serve]'"
            ) from exc
        self.url = url
        self.target = parts.netloc
        self.tls = parts.scheme == "grpcs" or ca_cert is not None
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._ca = _read_pem(ca_cert) if ca_cert is not None else None
        self._channel: aio.Channel | None = None
        self._stub: Any = None

    def __repr__(self) -> str:
        return f"<flowdsl.Client {self.url}>"

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel, self._stub = self._channel, None, None
            await channel.close()

    # --- the calls ------------------------------------------------------------------------

    async def start(
        self,
        flow: Any,
        inputs: Mapping[str, Any] | None = None,
        /,
        *,
        run_id: str | None = None,
    ) -> RunInfo:
        """Start *flow* (``module:qualname``, or the flow itself) with *inputs* by name."""
        ref = flow if isinstance(flow, str) else getattr(flow, "ref", None)
        if not isinstance(ref, str):
            raise ConfigError(f"{flow!r} names no flow", hint="Pass 'module:qualname' or a flow")
        data = {
            name: _codec.to_data(value, what=f"argument {name!r}")
            for name, value in (inputs or {}).items()
        }
        pb = _pb()
        request = pb.StartRunRequest(flow=ref, input_json=_codec.dumps(data), run_id=run_id or "")
        reply = await self._call("StartRun", request)
        return _run_info(reply.run, created=reply.created)

    async def get(self, run_id: str) -> RunInfo:
        reply = await self._call("GetRun", _pb().GetRunRequest(run_id=run_id))
        return _run_info(reply.run)

    async def watch(self, run_id: str, *, after_seq: int = 0) -> AsyncIterator[RemoteEvent]:
        """The run's events after *after_seq*, until the run ends.  To pick up after a
        broken connection, watch again with the ``seq`` of the last event received."""
        stub = self._connect()
        request = _pb().WatchRunRequest(run_id=run_id, after_seq=after_seq)
        call = stub.WatchRun(request, metadata=self._metadata)
        try:
            async for reply in _translated(call, self):
                event = reply.event
                data = _codec.loads(event.json)
                yield RemoteEvent(event.seq, event.type, event.node_id or None, data)
        finally:
            call.cancel()

    async def wait(self, run_id: str) -> RunInfo:
        """Wait for the run to end; the run as it ended."""
        async for _ in self.watch(run_id):
            pass
        return await self.get(run_id)

    async def signal(self, run_id: str, name: str, value: Any = None) -> RunInfo:
        """Deliver *value* to the run's ``fd.wait_for(name, ...)``."""
        text = _codec.encode(value, what=f"the value of signal {name!r}")
        request = _pb().SignalRunRequest(run_id=run_id, name=name, value_json=text)
        return _run_info((await self._call("SignalRun", request)).run)

    async def cancel(self, run_id: str) -> RunInfo:
        return _run_info((await self._call("CancelRun", _pb().CancelRunRequest(run_id=run_id))).run)

    async def resume(self, run_id: str) -> RunInfo:
        return _run_info((await self._call("ResumeRun", _pb().ResumeRunRequest(run_id=run_id))).run)

    async def list(
        self,
        *,
        status: str | None = None,
        flow: str | None = None,
        page_size: int = 50,
        page_token: str = "",
    ) -> RunPage:
        """A page of the service's runs, newest first, filtered by status and flow."""
        request = _pb().ListRunsRequest(
            status=status or "", flow=flow or "", page_size=page_size, page_token=page_token
        )
        reply = await self._call("ListRuns", request)
        return RunPage(tuple(_run_info(r) for r in reply.runs), reply.next_page_token)

    # --- plumbing -------------------------------------------------------------------------

    def _connect(self) -> Any:
        require_asyncio("fd.Client")
        if self._stub is None:
            import grpc

            from ._generated import flows_pb2_grpc

            options = [
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", self.max_message_bytes),
            ]
            if self.tls:
                credentials = grpc.ssl_channel_credentials(root_certificates=self._ca)
                self._channel = grpc.aio.secure_channel(self.target, credentials, options)
            else:
                self._channel = grpc.aio.insecure_channel(self.target, options)
            self._stub = flows_pb2_grpc.FlowsStub(self._channel)  # type: ignore[no-untyped-call]
        return self._stub

    async def _call(self, method: str, request: Any) -> Any:
        import grpc

        stub = self._connect()
        try:
            return await getattr(stub, method)(
                request, metadata=self._metadata, timeout=self.timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise _error(exc, self) from None


async def _translated(call: Any, client: Client) -> AsyncIterator[Any]:
    import grpc

    try:
        async for reply in call:
            yield reply
    except grpc.aio.AioRpcError as exc:
        raise _error(exc, client) from None


def _error(exc: Any, client: Client) -> ServiceError:
    code = exc.code().name
    hint = None
    if code == "UNAVAILABLE":
        hint = f"Is `flowdsl serve` running at {client.target}?"
    elif code == "UNAUTHENTICATED":
        hint = "Pass the service's token: fd.Client(url, token=...)"
    return ServiceError(exc.details() or code, code=code, hint=hint)


def _pb() -> Any:
    from ._generated import flows_pb2

    return flows_pb2


def _run_info(run: Any, *, created: bool = False) -> RunInfo:
    result = None
    if run.result_json:
        try:
            result = _codec.loads(run.result_json)
        except CodecError:
            result = run.result_json
    return RunInfo(
        run_id=run.run_id,
        flow=run.flow,
        status=run.status,
        result=result,
        error=run.error or None,
        flow_name=run.flow_name,
        failed_node=run.failed_node or None,
        created_at=run.created_at,
        updated_at=run.updated_at,
        created=created,
    )


def _read_pem(value: bytes | str | os.PathLike[str]) -> bytes:
    if isinstance(value, bytes):
        return value
    with open(value, "rb") as file:
        return file.read()
