"""NATS connections, shared by the store and the broker: one connection per server list and
event loop for every store and broker of the process, its JetStream context, and calls
that ride out a server restart (``NatsLink.call``).  nats-py runs on asyncio only.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import anyio
import attrs

from ..._errors import BackendUnavailable, CheckpointError, ConfigError, FlowError
from .._retry import retry_while_away
from .url import NatsOptions, NatsURL, nats_modules, require_asyncio

__all__ = ["ERR_PER_SUBJECT", "NatsLink", "ensure_stream", "quietly", "storage_type"]

log = logging.getLogger("flowdsl.nats")

T = TypeVar("T")

ERR_PER_SUBJECT: Final = 10077  # "maximum messages per subject exceeded": a refusal, not a fault

# --- one connection per server list and event loop ------------------------------------------


@attrs.define(eq=False)
class _Connection:
    nc: Any
    users: int = 0
    generation: int = 0  # bumped on every reconnect: consumers made before may be gone


_POOL: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[Any, ...], _Connection]]
_POOL = weakref.WeakKeyDictionary()
_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock]
_LOCKS = weakref.WeakKeyDictionary()


async def _acquire(url: NatsURL) -> _Connection:
    loop = asyncio.get_running_loop()
    lock = _LOCKS.setdefault(loop, asyncio.Lock())
    async with lock:
        pool = _POOL.setdefault(loop, {})
        conn = pool.get(url.connection_key)
        if conn is None or conn.nc.is_closed:
            conn = await _connect(url)
            pool[url.connection_key] = conn
        conn.users += 1
        return conn


async def _release(url: NatsURL, conn: _Connection) -> None:
    conn.users -= 1
    if conn.users > 0:
        return
    pool = _POOL.get(asyncio.get_running_loop(), {})
    if pool.get(url.connection_key) is conn:
        del pool[url.connection_key]
    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
        await conn.nc.close()


async def _connect(url: NatsURL) -> _Connection:
    nats = nats_modules()
    failures: list[BaseException] = []
    conn = _Connection(nc=None)

    async def on_error(exc: Exception) -> None:
        if conn.nc is None:
            failures.append(exc)
        else:
            log.debug("NATS at %s: %s", url.shown, exc)

    async def on_disconnect() -> None:
        if conn.nc is not None and not conn.nc.is_closed:
            log.warning("NATS at %s: disconnected; reconnecting", url.shown)

    async def on_reconnect() -> None:
        conn.generation += 1
        log.warning("NATS at %s: reconnected", url.shown)

    o = url.options
    client = nats.NATS()
    tls = _tls_context(url) if url.tls else None
    # Each server is tried twice (below); a failed TLS handshake can leave nats-py waiting
    # for the broken socket to close, so the whole first connection has a deadline too.
    budget = 2 * len(url.servers) * o.connect_timeout + 1
    try:
        with anyio.fail_after(budget):
            await client.connect(
                servers=list(url.servers),
                name="flowdsl",
                token=url.token,
                user=url.user,
                password=url.password,
                tls=tls,
                connect_timeout=o.connect_timeout,
                # The first connection fails fast: each server is tried twice (the least
                # nats-py allows), a moment apart.  Once connected, see below.
                allow_reconnect=True,
                max_reconnect_attempts=1,
                reconnect_time_wait=0.05,
                ping_interval=20,
                max_outstanding_pings=3,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
            )
    except Exception as exc:
        with anyio.CancelScope(shield=True), anyio.move_on_after(1):
            await client.close()
        raise _connect_error(url, exc, failures) from exc
    nc = client
    # From now on a lost server is waited for (a restart, a failover); calls wait for at
    # most retry_for seconds each (NatsLink.call).  nats-py reads these options on every
    # reconnect; it has no other way to set them after the first connection.
    nc.options["max_reconnect_attempts"] = -1
    nc.options["reconnect_time_wait"] = 0.25
    conn.nc = nc
    return conn


def _tls_context(url: NatsURL) -> ssl.SSLContext:
    o = url.options
    try:
        context = ssl.create_default_context(cafile=o.tls_ca)
        if o.tls_cert is not None:
            context.load_cert_chain(o.tls_cert, o.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load the TLS files for {url.shown}: {exc}",
            hint="Check tls_ca, tls_cert and tls_key (PEM files readable by this process)",
        ) from exc
    return context


def _connect_error(url: NatsURL, exc: Exception, failures: list[BaseException]) -> FlowError:
    texts = [f"{type(c).__name__}: {c}".strip().rstrip(":") for c in [*failures, exc]]
    refused = any("authorization" in t.lower() or "authentication" in t.lower() for t in texts)
    if refused:
        return ConfigError(
            f"the NATS server at {url.shown} refused the credentials (Authorization Violation)",
            hint="Check the token (nats://TOKEN@host:4222) or user and password "
            "(nats://USER:PASSWORD@host:4222) in the URL",
        )
    tls = any("ssl" in t.lower() or "tls" in t.lower() or "secure" in t.lower() for t in texts)
    # The last attempt's own failure says more than "no servers available" or a timeout.
    why = texts[len(failures) - 1] if failures else texts[-1]
    if isinstance(exc, TimeoutError) and not failures:
        why = "no answer in time"
    if tls:
        return ConfigError(
            f"cannot connect to NATS at {url.shown}: {why}",
            hint="Check TLS: tls:// and tls_ca=, tls_cert=, tls_key= options",
        )
    return BackendUnavailable(
        f"the NATS server at {url.shown}",
        reason=why,
        hint="Check that nats-server runs there with JetStream (nats-server -js) and is "
        "reachable from this machine",
    )


def _transient(exc: BaseException) -> bool:
    """Whether *exc* says the server is away for now (restart, failover, JetStream
    recovering) rather than refusing the request."""
    import nats.errors as ne
    import nats.js.errors as je

    if isinstance(exc, je.APIError):
        return exc.code == 503 and exc.err_code != ERR_PER_SUBJECT
    return isinstance(
        exc,
        (
            TimeoutError,
            asyncio.TimeoutError,
            ne.TimeoutError,
            ne.NoRespondersError,
            je.NoStreamResponseError,
            ne.ConnectionReconnectingError,
            ne.OutboundBufferLimitError,
            ne.StaleConnectionError,
        ),
    )


@attrs.define(eq=False)
class NatsLink:
    """A shared connection, its JetStream context, and the policy for calls: transient
    failures are retried with backoff for ``retry_for`` seconds; anything else, or a
    server away for longer, becomes a flowdsl error."""

    url: NatsURL
    _conn: _Connection | None = attrs.field(default=None, init=False)
    js: Any = attrs.field(default=None, init=False)

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    @property
    def nc(self) -> Any:
        assert self._conn is not None
        return self._conn.nc

    @property
    def generation(self) -> int:
        """Changes whenever the connection was re-established (server restart)."""
        return self._conn.generation if self._conn is not None else -1

    async def open(self) -> None:
        require_asyncio(self.url.shown)
        if self._conn is not None:
            return
        conn = await _acquire(self.url)
        try:
            js = conn.nc.jetstream(timeout=self.url.options.timeout)
            await self._check_jetstream(js)
        except BaseException:
            await _release(self.url, conn)
            raise
        self._conn, self.js = conn, js

    async def _check_jetstream(self, js: Any) -> None:
        import nats.errors as ne
        import nats.js.errors as je

        try:
            await js.account_info()
        except (ne.NoRespondersError, je.NoStreamResponseError, je.ServiceUnavailableError) as exc:
            raise ConfigError(
                f"JetStream is not enabled on the NATS server at {self.url.shown}",
                hint="Start nats-server with JetStream: nats-server -js (or jetstream {} in "
                "its configuration)",
            ) from exc
        except Exception as exc:
            raise ConfigError(
                f"the NATS server at {self.url.shown} did not answer JetStream: {exc}",
                hint="Check that the account may use JetStream",
            ) from exc

    async def close(self) -> None:
        conn, self._conn, self.js = self._conn, None, None
        if conn is not None:
            await _release(self.url, conn)

    def require(self, what: str) -> Any:
        if self._conn is None:
            raise ConfigError(
                f"the {what} {self.url.shown} is not open",
                hint="Use it inside `async with ctx:` or call `await ....open()` first",
            )
        return self.js

    async def call(
        self,
        what: str,
        op: Callable[[], Awaitable[T]],
        *,
        run_id: str | None = None,
        node: str | None = None,
    ) -> T:
        """``await op()``, retried while the server is away (at most ``retry_for`` s,
        then :class:`~flowdsl.BackendUnavailable`).

        Only operations that may run twice are passed here: each is idempotent, or says
        how it tells its own earlier write from another's (see the callers).
        """
        import nats.errors as ne

        where = f" (run {run_id!r})" if run_id is not None else ""

        async def attempt() -> T:
            try:
                return await op()
            except ne.Error as exc:
                if _transient(exc):
                    raise
                raise CheckpointError(
                    f"the NATS server at {self.url.shown} refused to {what}{where}: "
                    f"{type(exc).__name__}: {exc}",
                    node=node,
                    hint="A stream or bucket flowdsl uses was deleted or changed by "
                    "hand, or the account's limits are reached; see docs/nats.md",
                ) from exc

        return await retry_while_away(
            attempt,
            away=_transient,
            retry_for=self.url.options.retry_for,
            server=f"the NATS server at {self.url.shown}",
            operation=what,
            log=log,
            run_id=run_id,
            node=node,
            hint="Check that nats-server runs and is reachable",
        )


async def ensure_stream(link: NatsLink, config: Any) -> Any:
    """The stream named in *config*, created with it when missing (an existing stream is
    kept as it is: its settings may have been tuned by hand)."""
    import nats.js.errors as je

    js = link.require("stream")

    async def op() -> Any:
        try:
            return await js.stream_info(config.name)
        except je.NotFoundError:
            pass
        try:
            return await js.add_stream(config)
        except je.BadRequestError:
            # Created meanwhile by another process (with other settings, or ours).
            return await js.stream_info(config.name)

    return await link.call(f"create the stream {config.name}", op)


def storage_type(options: NatsOptions) -> Any:
    from nats.js.api import StorageType

    return StorageType.MEMORY if options.storage == "memory" else StorageType.FILE


async def quietly(op: Any) -> None:
    """An ack, a heartbeat, a clean-up: if the connection is away it will not arrive, and
    what depends on it copes (the task comes back; the consumer times out)."""
    import nats.errors

    try:
        await op()
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        log.debug("NATS: %r", exc)
