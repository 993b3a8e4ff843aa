"""Redis connections: the client library loaded on first use, URLs, one client per server
and event loop shared by every store and broker of the process, and calls that ride out a
server restart (``RedisLink.call``).

Only redis-py's asyncio client is used, so the Redis backend runs under asyncio; under
trio, opening a store or a broker refuses with :class:`~flowdsl.ConfigError`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

import attrs

from ..._errors import BackendUnavailable, CheckpointError, ConfigError
from ..._urls import hide_credentials
from .._retry import retry_while_away

__all__ = [
    "DEFAULT_PREFIX",
    "MAX_CONNECTIONS",
    "Command",
    "LuaScript",
    "RedisLink",
    "RedisURL",
    "parse_keep",
    "parse_prefix",
    "redis_modules",
    "require_asyncio",
]

log = logging.getLogger("flowdsl.redis")

T = TypeVar("T")

DEFAULT_PREFIX: Final = "flowdsl"
_INSTALL_HINT: Final = "Install the Redis client: pip install 'flowdsl[redis]'"
_URL_FORM: Final = "redis://[user:password@]host:6379/0 (rediss:// for TLS)"
# Options flowdsl reads from the URL's query string; the rest go to redis-py.
_OWN_OPTIONS: Final = frozenset({"prefix", "keep", "ttl"})
_MIN_SERVER: Final = (6, 2)  # XAUTOCLAIM
#: Connections per server and process, by default (each blocking read holds one).
MAX_CONNECTIONS: Final = 64


# --- the client library, loaded on first use ------------------------------------------------


def redis_modules() -> tuple[Any, Any]:
    """``(redis.asyncio, redis.exceptions)``, or a ConfigError naming the extra to install."""
    try:
        import redis.asyncio as redis_asyncio
        import redis.exceptions as redis_exceptions
    except ImportError as exc:
        raise ConfigError(
            "the Redis backend needs the redis package, which is not installed",
            hint=_INSTALL_HINT,
        ) from exc
    return redis_asyncio, redis_exceptions


def require_asyncio(url: str) -> None:
    """Refuse any event loop but asyncio: redis-py's client only runs on asyncio."""
    import sniffio

    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        library = "none"
    if library != "asyncio":
        raise ConfigError(
            f"the Redis backend ({url}) runs on asyncio only, and this is {library}",
            hint="Run the flow under asyncio (anyio.run(main) or asyncio.run(main)), or keep "
            "trio with the SQLite store and queue (sqlite:///runs.db)",
        )


# --- URLs -----------------------------------------------------------------------------------


@attrs.frozen
class RedisURL:
    """A Redis URL taken apart: what connects, what may be shown, and flowdsl's options."""

    connect: str = attrs.field(repr=False)  # for redis-py: with the password, no own options
    shown: str  # the URL with its password hidden, for messages
    host: str
    port: int
    db: int
    options: Mapping[str, str] = attrs.field(factory=dict)

    @classmethod
    def parse(cls, url: str) -> RedisURL:
        try:
            parts = urlsplit(url)
            port = parts.port or 6379
        except ValueError as exc:
            raise _bad_url(_hide_password(url), str(exc)) from None
        scheme = parts.scheme.lower()
        if scheme not in ("redis", "rediss") or not parts.hostname:
            raise _bad_url(_hide_password(url), "it needs a redis:// or rediss:// host")
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise _bad_url(_hide_password(url), f"the database {path!r} is not a number")
        try:
            query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            raise _bad_url(
                _hide_password(url), f"cannot read the options {parts.query!r}"
            ) from None
        own = {k: v for k, v in query if k in _OWN_OPTIONS}
        passed = [(k, v) for k, v in query if k not in _OWN_OPTIONS]
        netloc = parts.netloc
        connect = f"{scheme}://{netloc}/{path or 0}"
        if passed:
            connect += "?" + urlencode(passed)
        return cls(
            connect=connect,
            shown=_hide_password(url),
            host=parts.hostname,
            port=port,
            db=int(path or 0),
            options=own,
        )

    def option(self, name: str, default: str) -> str:
        return self.options.get(name, default)

    @property
    def query_ttl(self) -> str | None:
        """The ``ttl`` option of the URL (how long ended runs are kept), if given."""
        return self.options.get("ttl")


def _hide_password(url: str) -> str:
    """*url* with its credentials masked (the one helper: :func:`hide_credentials`)."""
    return hide_credentials(url)


def _bad_url(shown: str, why: str) -> ConfigError:
    return ConfigError(f"malformed Redis URL {shown!r}: {why}", hint=f"Use {_URL_FORM}")


def parse_prefix(url: RedisURL, prefix: str | None) -> str:
    chosen = prefix if prefix is not None else url.option("prefix", DEFAULT_PREFIX)
    if not chosen or any(c.isspace() for c in chosen):
        raise ConfigError(
            f"the key prefix {chosen!r} of {url.shown} must be non-empty, without spaces",
            hint="For example ?prefix=myapp",
        )
    return chosen


def parse_keep(url: RedisURL, keep: int | None) -> int:
    if keep is None:
        text = url.option("keep", "100000")
        try:
            keep = int(text)
        except ValueError:
            keep = 0
    if keep < 100:
        raise ConfigError(
            f"keep={keep!r} for {url.shown}: streams must keep at least 100 entries",
            hint="keep is how many completions and events each stream keeps (default 100000)",
        )
    return keep


# --- one client per server and event loop ---------------------------------------------------


@attrs.define(eq=False)
class _Shared:
    client: Any
    users: int = 0


_SHARED: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _Shared]] = (
    weakref.WeakKeyDictionary()
)


async def acquire_client(url: RedisURL) -> Any:
    """The process's client for *url* on this event loop, connected and checked.

    A store and a broker of one context on the same server share it (and its connection
    pool).  Connecting fails fast, with a BackendUnavailable (no server there) or a ConfigError
    (refused credentials, an old server) that says which URL and why.
    """
    require_asyncio(url.shown)
    clients = _SHARED.setdefault(asyncio.get_running_loop(), {})
    shared = clients.get(url.connect)
    if shared is None:
        client = await _connect(url)
        shared = clients.setdefault(url.connect, _Shared(client))
        if shared.client is not client:  # another open() connected first
            await _close_client(client)
    shared.users += 1
    return shared.client


async def release_client(url: RedisURL, client: Any) -> None:
    clients = _SHARED.get(asyncio.get_running_loop(), {})
    shared = clients.get(url.connect)
    if shared is None or shared.client is not client:
        await _close_client(client)
        return
    shared.users -= 1
    if shared.users <= 0:
        del clients[url.connect]
        await _close_client(client)


async def _close_client(client: Any) -> None:
    try:
        await client.aclose()
        await client.connection_pool.disconnect()
    except Exception as exc:  # closing a broken connection: nothing left to save
        log.debug("closing a Redis client: %s", exc)


async def _connect(url: RedisURL) -> Any:
    redis_asyncio, errors = redis_modules()
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    try:
        # Our own retry loop (RedisLink.call) is the one policy; redis-py's would retry
        # underneath it, non-idempotent commands included.
        # A bounded pool that makes callers wait for a connection: a thousand runs
        # starting at once must not open a thousand connections (the server refuses
        # past its maxclients).  ?max_connections=N in the URL overrides the bound.
        pool = redis_asyncio.BlockingConnectionPool.from_url(
            url.connect,
            max_connections=MAX_CONNECTIONS,
            timeout=None,
            retry=Retry(NoBackoff(), 0),
            socket_connect_timeout=5.0,
            socket_timeout=10.0,
            socket_keepalive=True,
        )
        client = redis_asyncio.Redis(connection_pool=pool)
    except (ValueError, TypeError) as exc:
        raise _bad_url(url.shown, str(exc)) from None
    try:
        await client.ping()
        info = await client.info("server")
    except errors.AuthenticationError as exc:
        await _close_client(client)
        raise ConfigError(
            f"the Redis server at {url.shown} refused the credentials: {exc}",
            hint="Check the user name and password in the URL (redis://user:password@host:port/db)",
        ) from None
    except (errors.ConnectionError, errors.TimeoutError, OSError) as exc:
        await _close_client(client)
        raise BackendUnavailable(
            f"the Redis server at {url.shown}",
            reason=str(exc),
            hint="Check that redis-server runs there and that host, port and scheme "
            "(rediss:// for TLS) are right",
        ) from None
    except TypeError as exc:  # a query option redis-py's connections do not take
        await _close_client(client)
        raise _bad_url(url.shown, f"an option is unknown to redis-py ({exc})") from None
    except errors.RedisError as exc:
        await _close_client(client)
        raise ConfigError(
            f"the Redis server at {url.shown} refused the connection: {exc}",
            hint="Check the database number and the user's permissions",
        ) from None
    version = str(info.get("redis_version", "0"))
    if _version(version) < _MIN_SERVER:
        await _close_client(client)
        raise ConfigError(
            f"the Redis server at {url.shown} is version {version}; flowdsl needs 6.2 or later",
            hint="Upgrade redis-server (XAUTOCLAIM came in 6.2)",
        )
    return client


def _version(text: str) -> tuple[int, ...]:
    out: list[int] = []
    for part in text.split(".")[:2]:
        out.append(int(part) if part.isdigit() else 0)
    return tuple(out)


# --- commands sent as they are -------------------------------------------------------------

#: A command's arguments: bytes (text is encoded by the caller), or str and int for names
#: and counts.
Command = Sequence[bytes | str | int]


def _pack_python(args: Command) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _packer() -> Callable[[Command], bytes]:
    try:
        from hiredis import pack_command
    except ImportError:  # the extra installs it; without it, the same bytes more slowly
        return _pack_python
    # Typed as a one-element tuple in hiredis: any length is meant.
    return lambda args: pack_command(tuple(args))  # type: ignore[arg-type]


_pack: Callable[[Command], bytes] | None = None


def pack(args: Command) -> bytes:
    """*args* as one command in the Redis protocol."""
    global _pack
    if _pack is None:
        _pack = _packer()
    return _pack(args)


@attrs.frozen
class LuaScript:
    """A Lua script, run by its SHA-1 (EVALSHA), sent whole when the server lacks it."""

    source: bytes = attrs.field(repr=False)
    sha: bytes

    @classmethod
    def of(cls, source: str) -> LuaScript:
        data = source.encode()
        return cls(data, hashlib.sha1(data, usedforsecurity=False).hexdigest().encode())


# --- calls that survive a restart -----------------------------------------------------------


@attrs.define(eq=False)
class RedisLink:
    """A client and the policy for its calls: transient failures (connection lost, server
    restarting or loading its data) are retried with backoff for ``retry_for`` seconds;
    anything else, or a server away for longer, becomes a flowdsl error."""

    url: RedisURL
    retry_for: float = 30.0
    client: Any = attrs.field(default=None, init=False)
    _transient: tuple[type[BaseException], ...] = attrs.field(default=(), init=False)
    _auth: type[BaseException] | None = attrs.field(default=None, init=False)
    _response: type[BaseException] | None = attrs.field(default=None, init=False)
    _no_script: type[BaseException] | None = attrs.field(default=None, init=False)

    @property
    def is_open(self) -> bool:
        return self.client is not None

    async def open(self) -> Any:
        if self.client is None:
            _, errors = redis_modules()
            self.client = await acquire_client(self.url)
            self._transient = (errors.ConnectionError, errors.TimeoutError, errors.ReadOnlyError)
            self._auth = errors.AuthenticationError
            self._response = errors.ResponseError
            self._no_script = errors.NoScriptError
        return self.client

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            await release_client(self.url, client)

    def require(self, what: str) -> Any:
        if self.client is None:
            raise ConfigError(
                f"the {what} {self.url.shown} is not open",
                hint="Use it inside `async with ctx:` or call `await ....open()` first",
            )
        return self.client

    async def send(self, commands: Sequence[Command]) -> list[Any]:
        """The replies to *commands*, sent in one write on one connection and read as the
        server gave them: none of redis-py's per-argument encoding and per-command reply
        conversions (a batch's commands carry thousands of arguments).  An error reply is
        its exception in the list; a lost connection raises (and the connection is
        dropped, not given back with replies unread)."""
        client = self.require("connection")
        pool = client.connection_pool
        response = self._response or Exception
        packed = b"".join(pack(c) for c in commands)
        try:
            acquiring = pool.get_connection()
        except TypeError:  # redis-py before 5.3 wants a command's name (and ignores it)
            acquiring = pool.get_connection("_")
        conn = await acquiring
        try:
            await conn.send_packed_command(packed)
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await conn.read_response())
                except response as exc:  # an error reply: the others still come
                    replies.append(exc)
            return replies
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        finally:
            await pool.release(conn)

    async def run_scripts(
        self, calls: Sequence[tuple[LuaScript, Sequence[Any], Sequence[Any]]]
    ) -> list[Any]:
        """The replies of script calls (script, keys, args) sent in one write, each by
        its SHA-1; those the server had not loaded are sent again whole (a script that
        was not found did not run)."""
        commands = [(b"EVALSHA", s.sha, len(keys), *keys, *args) for s, keys, args in calls]
        replies = await self.send(commands)
        no_script = self._no_script or ()
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, no_script)]
        if missing:
            again = await self.send(
                [(b"EVAL", calls[i][0].source, *commands[i][2:]) for i in missing]
            )
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def run_script(self, script: LuaScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """The reply of one script call; an error reply is raised."""
        [reply] = await self.run_scripts([(script, keys, args)])
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def call(
        self,
        what: str,
        op: Callable[[], Awaitable[T]],
        *,
        on_response: Callable[[Exception], T] | None = None,
    ) -> T:
        """``await op()``, retried while the server is away (at most ``retry_for`` s,
        then :class:`~flowdsl.BackendUnavailable`).

        Only operations that may run twice are passed here: each is idempotent, or its
        repetition is harmless (see the broker's notes on lost replies).  A refusal that is
        not the server being away (credentials, a key of the wrong kind) is not retried.
        """

        async def attempt() -> T:
            try:
                return await op()
            except Exception as exc:
                if self._auth is not None and isinstance(exc, self._auth):
                    raise ConfigError(
                        f"the Redis server at {self.url.shown} refused the credentials "
                        f"({what}): {exc}",
                        hint="Check the user name and password in the URL",
                    ) from exc
                if (
                    self._response is not None
                    and isinstance(exc, self._response)
                    and not (isinstance(exc, self._transient))
                ):
                    if on_response is not None:
                        return on_response(exc)
                    raise CheckpointError(
                        f"the Redis server at {self.url.shown} refused {what}: {exc}",
                        hint="A key flowdsl uses holds data of another kind (written by hand "
                        "or another program?); delete it or use another prefix=",
                    ) from exc
                raise

        return await retry_while_away(
            attempt,
            away=lambda exc: isinstance(exc, self._transient),
            retry_for=self.retry_for,
            server=f"the Redis server at {self.url.shown}",
            operation=what,
            log=log,
            hint="Check that redis-server runs and is reachable",
        )
