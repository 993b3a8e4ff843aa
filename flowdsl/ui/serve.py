"""Serving the inspector with uvicorn, until a signal stops it."""

from __future__ import annotations

from typing import Any

from .._errors import ConfigError

__all__ = ["serve"]


async def serve(app: Any, host: str, port: int, *, log_level: str = "warning") -> None:
    """Serve *app* on *host*:*port* until the process is interrupted (asyncio only:
    uvicorn runs on asyncio)."""
    try:
        import uvicorn
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError(
            "the run inspector needs uvicorn", hint="pip install 'flowdsl[ui]'"
        ) from exc
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        # Tracebacks of the app's own errors still reach the log; the access log is noise
        # for a page that polls.
        access_log=False,
        server_header=False,
        # An open page holds a stream: stopping waits this long for it, then closes it.
        timeout_graceful_shutdown=3,
    )
    server = uvicorn.Server(config)
    await server.serve()
