"""The one retry-while-away loop of the backends that talk to a server (Redis, NATS).

A call whose server is away for now (a restart, a failover, a lost connection) is tried
again with backoff, for at most ``retry_for`` seconds from its first failure; then it
raises :class:`~flowdsl.BackendUnavailable`.  Every other error passes through at once:
whether a failure means "away" is the backend's to say (``away``), since only it knows
its client library's exceptions.

Only operations that may run twice are passed here: each is idempotent, or its caller
tells its own earlier write from another's (see the backends' notes on lost replies).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

from .._errors import BackendUnavailable

__all__ = ["retry_while_away"]

T = TypeVar("T")

_FIRST_DELAY = 0.01
_MAX_DELAY = 0.5


async def retry_while_away(
    op: Callable[[], Awaitable[T]],
    *,
    away: Callable[[Exception], bool],
    retry_for: float,
    server: str,
    operation: str,
    log: logging.Logger,
    run_id: str | None = None,
    node: str | None = None,
    hint: str | None = None,
) -> T:
    """``await op()``, retried while *away* says its failure is the server being away.

    *server* names the server in messages ("the Redis server at redis://host:6379/0");
    *operation* says what the call does.  The first failure is logged as a warning, once.
    """
    deadline: float | None = None
    delay = _FIRST_DELAY
    while True:
        try:
            return await op()
        except Exception as exc:
            if not away(exc):
                raise
            now = anyio.current_time()
            if deadline is None:
                deadline = now + retry_for
                log.warning("%s: %r (%s); retrying", server, exc, operation)
            if now >= deadline:
                raise BackendUnavailable(
                    server,
                    operation=operation,
                    waited=retry_for,
                    reason=repr(exc) if not str(exc) else str(exc),
                    run_id=run_id,
                    node=node,
                    hint=hint,
                ) from exc
        await anyio.sleep(delay)
        delay = min(delay * 2, _MAX_DELAY)
