"""The one error the service and its client raise: a failed call, with its gRPC status name.

The service raises :class:`ServiceError` from the layer that knows what went wrong (an
unknown run, arguments that do not fit the flow) and the gRPC layer turns its ``code`` into
the call's status; the client turns a failed call's status back into a ``ServiceError``
with the same ``code``, so code on both sides catches one class.
"""

from __future__ import annotations

from .._errors import ConfigError, FlowError

__all__ = ["ServiceError", "require_asyncio"]

# The gRPC status names the service uses, and what each means here.
CODES = {
    "INVALID_ARGUMENT": "bad JSON, an unknown flow, or arguments that do not fit it",
    "NOT_FOUND": "no run of that id in the store",
    "ALREADY_EXISTS": "the run id belongs to a run of another flow",
    "FAILED_PRECONDITION": "the run is not in a state that allows the call",
    "RESOURCE_EXHAUSTED": "a message over the size limit",
    "UNAUTHENTICATED": "a missing or wrong token",
    "UNAVAILABLE": "the service is stopping, or cannot be reached",
    "UNIMPLEMENTED": "this flowdsl cannot do that yet",
    "INTERNAL": "the store failed",
}


class ServiceError(FlowError, RuntimeError):
    """A call to the run service failed; ``code`` is the gRPC status name."""

    def __init__(
        self,
        problem: str,
        *,
        code: str,
        flow: str | None = None,
        node: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.code = code
        super().__init__(problem, flow=flow, node=node, hint=hint)

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (self.problem, self.code, self.flow, self.node, self.hint))


def _rebuild(
    problem: str, code: str, flow: str | None, node: str | None, hint: str | None
) -> ServiceError:
    return ServiceError(problem, code=code, flow=flow, node=node, hint=hint)


def require_asyncio(what: str) -> None:
    """``ConfigError`` if the running event loop is not asyncio's (grpc.aio needs it)."""
    import sniffio

    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return
    if library != "asyncio":
        raise ConfigError(
            f"{what} runs on asyncio only (grpc.aio), not on {library}",
            hint="Run it under asyncio: anyio.run(main, backend='asyncio') or asyncio.run(main())",
        )
