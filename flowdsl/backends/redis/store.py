"""The Redis store: run records and node journals on a Redis server (``store="redis://..."``).

Layout, under one key prefix per deployment (``prefix=``, default ``flowdsl``)::

    {prefix}:run:{run_id}     hash: the run record, one field per attribute
    {prefix}:runs             sorted set: run ids scored by created_at (for list_runs)
    {prefix}:nodes:{run_id}   hash: the journal, node id -> the node's record (JSON)
    {prefix}:blob:{sha256}    string: a large value, once per distinct content
    {prefix}:blobrefs         hash: sha256 -> how many records and cache entries use it
    {prefix}:cache            hash: cache key -> a value (JSON) or a blob reference

Committing a node is one ``HSETNX`` (first commit wins), with its blob in the same Lua
script when the value is larger than :data:`INLINE_MAX` bytes.  Every field read back is
checked before it is believed: a key written by hand or by another program raises
:class:`~flowdsl.CheckpointError` naming the run and the node.

The connection code here is shared with the Redis broker (``flowdsl.contexts.redis``):
URLs (``redis://[user:password@]host:port/db``, ``rediss://`` for TLS), one client per
server and event loop shared by every store and broker of the process, and calls that
ride out a server restart by retrying with backoff for ``retry_for`` seconds.

Only redis-py's asyncio client is used, so the Redis backend runs under asyncio; under
trio, :meth:`RedisStore.open` refuses with :class:`~flowdsl.ConfigError`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import anyio
import attrs
from anyio.lowlevel import checkpoint_if_cancelled

from ... import _codec
from ..._errors import CheckpointError, CodecError, ConfigError
from ..._records import NodeRecord, RunRecord, RunStatus

__all__ = ["DEFAULT_PREFIX", "INLINE_MAX", "RedisLink", "RedisStore", "RedisURL"]

log = logging.getLogger("flowdsl.redis")

T = TypeVar("T")

DEFAULT_PREFIX: Final = "flowdsl"
#: A value whose UTF-8 text is longer than this many bytes is stored once, by content hash.
INLINE_MAX: Final = 1024
_INSTALL_HINT: Final = "Install the Redis client: pip install 'flowdsl[redis]'"
_URL_FORM: Final = "redis://[user:password@]host:6379/0 (rediss:// for TLS)"
# Options flowdsl reads from the URL's query string; the rest go to redis-py.
_OWN_OPTIONS: Final = frozenset({"prefix", "keep"})
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


def _hide_password(url: str) -> str:
    """*url* with its password replaced by ``***`` (user names stay: they help)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<a malformed URL>"
    if password is None:
        return url
    user = quote(unquote(parts.username or ""), safe="")
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


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
    pool).  Connecting fails fast with a ConfigError that says which URL and why.
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
        raise ConfigError(
            f"cannot reach the Redis server at {url.shown}: {exc}",
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

    async def call(
        self,
        what: str,
        op: Callable[[], Awaitable[T]],
        *,
        on_response: Callable[[Exception], T] | None = None,
    ) -> T:
        """``await op()``, retried while the server is away (at most ``retry_for`` s).

        Only operations that may run twice are passed here: each is idempotent, or its
        repetition is harmless (see the broker's notes on lost replies).
        """
        deadline: float | None = None
        delay = 0.01
        while True:
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
                if not isinstance(exc, self._transient):
                    raise
                now = anyio.current_time()
                if deadline is None:
                    deadline = now + self.retry_for
                    log.warning("Redis at %s: %s (%s); retrying", self.url.shown, exc, what)
                if now >= deadline:
                    raise CheckpointError(
                        f"the Redis server at {self.url.shown} has not answered for "
                        f"{self.retry_for:g} s ({what}): {exc}",
                        hint="Check that redis-server runs and is reachable",
                    ) from exc
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.5)


# --- encoding -------------------------------------------------------------------------------


def to_bytes(text: str) -> bytes:
    """UTF-8, keeping lone surrogates (Python text may hold them) byte-exact."""
    return text.encode("utf-8", "surrogatepass")


class Malformed(Exception):
    """A field that does not hold what flowdsl writes."""


def from_bytes(data: object, field: str) -> str:
    if not isinstance(data, bytes):
        raise Malformed(f"{field} is missing")
    try:
        return data.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise Malformed(f"{field} is not UTF-8 text") from None


@attrs.frozen
class Layout:
    """Key names under one prefix: the store's and the broker's (see the module docs)."""

    prefix: str

    def run(self, run_id: str) -> str:
        return f"{self.prefix}:run:{run_id}"

    def nodes(self, run_id: str) -> str:
        return f"{self.prefix}:nodes:{run_id}"

    def blob(self, digest: str) -> str:
        return f"{self.prefix}:blob:{digest}"

    @property
    def runs(self) -> str:
        return f"{self.prefix}:runs"

    @property
    def blobrefs(self) -> str:
        return f"{self.prefix}:blobrefs"

    @property
    def cache(self) -> str:
        return f"{self.prefix}:cache"

    @property
    def no_blob(self) -> str:
        # A key slot for scripts called without a blob (never written).
        return f"{self.prefix}:blob:-"


def encode_node(record: NodeRecord) -> tuple[bytes, str, bytes]:
    """``(field, digest, blob)`` of a node record: digest and blob are empty when the
    value sits inline."""
    data = to_bytes(record.value)
    fields: dict[str, Any] = {}
    digest = ""
    blob = b""
    if len(data) > INLINE_MAX:
        digest = hashlib.sha256(data).hexdigest()
        blob = data
        fields["blob"] = digest  # first: the Lua scripts find it with a pattern
    else:
        fields["value"] = record.value
    fields["attempts"] = record.attempts
    fields["started_at"] = record.started_at
    fields["finished_at"] = record.finished_at
    fields["code"] = record.code
    fields["usage"] = record.usage
    return to_bytes(_codec.dumps(fields)), digest, blob


_NODE_KEYS: Final = frozenset({"attempts", "started_at", "finished_at", "code", "usage"})
_DIGEST_CHARS: Final = frozenset("0123456789abcdef")


def parse_node(raw: object) -> dict[str, Any]:
    """A stored node record's fields, checked; its value may still be a blob reference."""
    data = _json(from_bytes(raw, "the record"), "the record")
    if not isinstance(data, dict):
        raise Malformed("the record is not a JSON object")
    keys = set(data)
    inline = "value" in keys
    if inline == ("blob" in keys) or keys - {"value", "blob"} != _NODE_KEYS:
        raise Malformed(f"the record has the fields {sorted(keys)}")
    if inline:
        if not isinstance(data["value"], str):
            raise Malformed("the value is not JSON text")
        _json(data["value"], "value")
    elif not is_digest(data["blob"]):
        raise Malformed("the blob reference is not a SHA-256 hash")
    attempts = data["attempts"]
    if type(attempts) is not int or attempts < 0:
        raise Malformed(f"attempts is {attempts!r}, not a count")
    for name in ("started_at", "finished_at"):
        data[name] = _time(data[name], name)
    if not isinstance(data["code"], str):
        raise Malformed("code is not text")
    if data["usage"] is not None and not isinstance(data["usage"], dict):
        raise Malformed("usage is not a mapping")
    return data


def is_digest(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _DIGEST_CHARS


def node_from_fields(node_id: str, data: Mapping[str, Any], blob: object) -> NodeRecord:
    value = data["value"] if "value" in data else _blob_text(data["blob"], blob)
    return NodeRecord(
        node_id=node_id,
        value=value,
        attempts=data["attempts"],
        started_at=data["started_at"],
        finished_at=data["finished_at"],
        code=data["code"],
        usage=data["usage"],
    )


def _blob_text(digest: str, blob: object) -> str:
    if not isinstance(blob, bytes):
        raise Malformed(f"the value's blob {digest[:16]}... is missing")
    if hashlib.sha256(blob).hexdigest() != digest:
        raise Malformed(f"the value's blob {digest[:16]}... does not match its hash")
    return _check_json(from_bytes(blob, "the value's blob"), "value")


def _json(text: str, field: str) -> Any:
    try:
        return _codec.loads(text)
    except CodecError:
        raise Malformed(f"the stored {field} is not valid JSON") from None


def _check_json(text: str, field: str) -> str:
    _json(text, field)
    return text


def _time(value: object, field: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise Malformed(f"{field} is {value!r}, not a timestamp")


def _float_text(value: bytes | None, field: str) -> float:
    text = from_bytes(value, field)
    try:
        number = float(text)
    except ValueError:
        raise Malformed(f"{field} is {text!r}, not a timestamp") from None
    if not math.isfinite(number):
        raise Malformed(f"{field} is {text!r}, not a timestamp")
    return number


# --- Lua: each script is one atomic step on the server ---------------------------------------

# KEYS: run hash, runs zset.  ARGV: run id, created_at, field/value pairs.
CREATE_RUN: Final = """
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('HGETALL', KEYS[1]) end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return false
"""

# KEYS: run hash.  ARGV: n, n field/value pairs to set, then fields to delete.
UPDATE_RUN: Final = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n = tonumber(ARGV[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 2, 1 + 2 * n))
if #ARGV > 1 + 2 * n then redis.call('HDEL', KEYS[1], unpack(ARGV, 2 + 2 * n)) end
return 1
"""

# A node's commit, first one wins.  KEYS: nodes hash, blob key, blobrefs.
# ARGV: node id, record, digest ('' for an inline value), blob.  Shared with the broker's
# commit-and-complete, which appends its own steps after it.
COMMIT_NODE_BODY: Final = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return redis.call('HGET', KEYS[1], ARGV[1])
end
if ARGV[3] ~= '' then
  redis.call('SET', KEYS[2], ARGV[4], 'NX')
  redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
end
"""
COMMIT_NODE: Final = COMMIT_NODE_BODY + "return 1\n"

# Drop a use of a blob; the blob goes with its last use.
_UNREF: Final = """
local function blob_of(record)
  if not record then return nil end
  return string.match(record, '^{"blob":"(%x+)"')
end
local function unref(prefix, refs, digest)
  if not digest then return end
  if redis.call('HINCRBY', refs, digest, -1) <= 0 then
    redis.call('HDEL', refs, digest)
    redis.call('DEL', prefix .. ':blob:' .. digest)
  end
end
"""

# KEYS: nodes hash, blobrefs.  ARGV: prefix, node ids.
FORGET_NODES: Final = (
    _UNREF
    + """
for i = 2, #ARGV do
  local record = redis.call('HGET', KEYS[1], ARGV[i])
  if record then
    redis.call('HDEL', KEYS[1], ARGV[i])
    unref(ARGV[1], KEYS[2], blob_of(record))
  end
end
return 1
"""
)

# KEYS: cache hash, blob key, blobrefs.  ARGV: prefix, cache key, entry, digest, blob.
PUT_CACHED: Final = (
    _UNREF
    + """
local old = redis.call('HGET', KEYS[1], ARGV[2])
if ARGV[4] ~= '' then
  redis.call('SET', KEYS[2], ARGV[5], 'NX')
  redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
unref(ARGV[1], KEYS[3], blob_of(old))
return 1
"""
)

_RUN_FIELDS: Final = frozenset(
    {
        "run_id",
        "flow",
        "flow_ref",
        "fingerprint",
        "inputs",
        "status",
        "created_at",
        "updated_at",
        "result",
        "error",
        "failed_node",
        "code",
    }
)
_OPTIONAL_RUN_FIELDS: Final = frozenset({"result", "error", "failed_node"})
_RESTORE_HINT: Final = (
    "Delete the run's keys ({keys}) and start it again, or restore the server's data from a backup"
)


class RedisStore:
    """Runs and node journals on a Redis server, shared by every process that uses it.

    *url* is ``redis://[user:password@]host:port/db`` (``rediss://`` for TLS), optionally
    with ``?prefix=NAME``; *prefix* (default ``flowdsl``) keeps deployments on one server
    apart.  Durability is the server's: with ``appendonly yes`` and ``appendfsync always``
    a committed node survives the server being killed.
    """

    def __init__(self, url: str, *, prefix: str | None = None, retry_for: float = 30.0) -> None:
        self._link = RedisLink(RedisURL.parse(url), retry_for=retry_for)
        self.prefix = parse_prefix(self._link.url, prefix)
        self.layout = Layout(self.prefix)
        self.url = self._link.url.shown
        self._scripts: dict[str, Any] = {}

    @classmethod
    def from_url(cls, url: str) -> RedisStore:
        return cls(url)

    @classmethod
    def reading_through(cls, link: RedisLink, prefix: str) -> RedisStore:
        """A store on another object's open connection (a broker's), for reading records;
        it neither opens nor closes the connection."""
        store = cls.__new__(cls)
        store._link = link
        store.prefix = prefix
        store.layout = Layout(prefix)
        store.url = link.url.shown
        store._scripts = {}
        return store

    def __repr__(self) -> str:
        state = "open" if self._link.is_open else "closed"
        return f"<RedisStore {self.url!r} prefix={self.prefix!r} {state}>"

    @property
    def server(self) -> tuple[str, str]:
        """What identifies this store's data: the connection and the prefix."""
        return (self._link.url.connect, self.prefix)

    # --- lifetime -------------------------------------------------------------------------

    async def open(self) -> None:
        if self._link.is_open:
            require_asyncio(self.url)
            return
        client = await self._link.open()
        self._scripts = {
            name: client.register_script(source)
            for name, source in (
                ("create_run", CREATE_RUN),
                ("update_run", UPDATE_RUN),
                ("commit_node", COMMIT_NODE),
                ("forget_nodes", FORGET_NODES),
                ("put_cached", PUT_CACHED),
            )
        }

    async def close(self) -> None:
        self._scripts = {}
        await self._link.close()

    def _client(self) -> Any:
        return self._link.require("store")

    async def _script(self, name: str, what: str, keys: list[str], args: list[Any]) -> Any:
        self._client()
        script = self._scripts[name]
        return await self._link.call(what, lambda: script(keys=keys, args=args))

    # --- runs -----------------------------------------------------------------------------

    async def create_run(self, record: RunRecord) -> tuple[RunRecord, bool]:
        fields = _run_fields(record)
        args: list[Any] = [to_bytes(record.run_id), repr(record.created_at)]
        for name, value in fields.items():
            args += [name, value]
        key = self.layout.run(record.run_id)
        stored = await self._script(
            "create_run", f"creating run {record.run_id!r}", [key, self.layout.runs], args
        )
        if not stored:
            return record, True
        return self._run_from_hash(record.run_id, _pairs(stored)), False

    async def get_run(self, run_id: str) -> RunRecord | None:
        client = self._client()
        key = self.layout.run(run_id)
        data = await self._link.call(f"reading run {run_id!r}", lambda: client.hgetall(key))
        if not data:
            return None
        return self._run_from_hash(run_id, data)

    async def update_run(
        self,
        run_id: str,
        *,
        status: RunStatus,
        result: str | None = None,
        error: str | None = None,
        failed_node: str | None = None,
        fingerprint: str | None = None,
        code: dict[str, str] | None = None,
    ) -> None:
        setting: dict[str, bytes] = {
            "status": to_bytes(status.value),
            "updated_at": repr(time.time()).encode(),
        }
        dropping: list[str] = []
        for name, value in (("result", result), ("error", error), ("failed_node", failed_node)):
            if value is None:
                dropping.append(name)
            else:
                setting[name] = to_bytes(value)
        if fingerprint is not None:
            setting["fingerprint"] = to_bytes(fingerprint)
        if code is not None:
            setting["code"] = to_bytes(_codec.dumps(code))
        args: list[Any] = [len(setting)]
        for name, data in setting.items():
            args += [name, data]
        args += dropping
        updated = await self._script(
            "update_run", f"updating run {run_id!r}", [self.layout.run(run_id)], args
        )
        if not updated:
            raise CheckpointError(
                f"run {run_id!r} does not exist in {self.url}",
                hint="Create the run (ctx.start) before updating it",
            )

    async def list_runs(self, *, limit: int = 50) -> list[RunRecord]:
        if limit <= 0:
            return []
        client = self._client()
        ids = await self._link.call(
            "listing runs", lambda: client.zrevrange(self.layout.runs, 0, limit - 1)
        )
        if not ids:
            return []

        async def read_all() -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for raw in ids:
                pipe.hgetall(self.layout.run(from_bytes(raw, "run id")))
            return list(await pipe.execute())

        try:
            names = [from_bytes(raw, "run id") for raw in ids]
        except Malformed as exc:
            raise CheckpointError(
                f"the run list {self.layout.runs} in {self.url} is corrupted: {exc}",
                hint=f"Delete the key {self.layout.runs} (list_runs only reads it)",
            ) from None
        hashes = await self._link.call("listing runs", read_all)
        # A run whose hash was deleted by hand drops out of the list.
        return [self._run_from_hash(n, h) for n, h in zip(names, hashes, strict=True) if h]

    # --- the journal ----------------------------------------------------------------------

    async def commit_node(self, run_id: str, record: NodeRecord) -> bool:
        """First commit wins.  Cancelled, it has committed nothing: a write already sent
        is seen through and then taken back, so that a node is never in the journal
        without its caller having been able to report it done (the node runs again on
        resume, as every node in flight does)."""
        await checkpoint_if_cancelled()
        # Node tasks are cancelled natively (asyncio's task.cancel, which anyio's shields
        # do not stop), so the write runs as a task of its own that a cancellation of
        # ours cannot interrupt halfway.
        write = asyncio.ensure_future(self._commit_node(run_id, record))
        try:
            return await asyncio.shield(write)
        except asyncio.CancelledError:
            if await _see_through(write):
                await _see_through(self.forget_nodes(run_id, [record.node_id]))
            raise

    async def _commit_node(self, run_id: str, record: NodeRecord) -> bool:
        client = self._client()
        field, digest, blob = encode_node(record)
        key = self.layout.nodes(run_id)
        what = f"committing node {record.node_id!r} of run {run_id!r}"
        if not digest:
            created = await self._link.call(
                what, lambda: client.hsetnx(key, to_bytes(record.node_id), field)
            )
            return bool(created)
        done = await self._script(
            "commit_node",
            what,
            [key, self.layout.blob(digest), self.layout.blobrefs],
            [to_bytes(record.node_id), field, digest, blob],
        )
        return bool(done == 1)

    async def load_nodes(self, run_id: str) -> dict[str, NodeRecord]:
        client = self._client()
        key = self.layout.nodes(run_id)
        raw = await self._link.call(f"reading run {run_id!r}", lambda: client.hgetall(key))
        parsed: dict[str, dict[str, Any]] = {}
        for raw_id, raw_record in raw.items():
            node_id = _node_name(raw_id)
            try:
                parsed[node_id] = parse_node(raw_record)
            except Malformed as exc:
                raise self._corrupted(run_id, node_id, str(exc)) from None
        digests = sorted({d["blob"] for d in parsed.values() if "blob" in d})
        blobs: dict[str, object] = {}
        if digests:
            keys = [self.layout.blob(d) for d in digests]
            values = await self._link.call(f"reading run {run_id!r}", lambda: client.mget(keys))
            blobs = dict(zip(digests, values, strict=True))
        out: dict[str, NodeRecord] = {}
        for node_id, data in parsed.items():
            try:
                out[node_id] = node_from_fields(node_id, data, blobs.get(data.get("blob", "")))
            except Malformed as exc:
                raise self._corrupted(run_id, node_id, str(exc)) from None
        return out

    async def load_node(self, run_id: str, node_id: str) -> NodeRecord | None:
        """One node's record, or ``None`` (for the broker's duplicate commits)."""
        client = self._client()
        key = self.layout.nodes(run_id)
        raw = await self._link.call(
            f"reading run {run_id!r}", lambda: client.hget(key, to_bytes(node_id))
        )
        if raw is None:
            return None
        return await self.node_from_raw(run_id, node_id, raw)

    async def node_from_raw(self, run_id: str, node_id: str, raw: object) -> NodeRecord:
        """A stored record (as HGET returned it) read back and checked."""
        try:
            data = parse_node(raw)
        except Malformed as exc:
            raise self._corrupted(run_id, node_id, str(exc)) from None
        blob: object = None
        if "blob" in data:
            client = self._client()
            blob_key = self.layout.blob(data["blob"])
            blob = await self._link.call(f"reading run {run_id!r}", lambda: client.get(blob_key))
        try:
            return node_from_fields(node_id, data, blob)
        except Malformed as exc:
            raise self._corrupted(run_id, node_id, str(exc)) from None

    async def forget_nodes(self, run_id: str, node_ids: list[str]) -> None:
        if not node_ids:
            return
        await self._script(
            "forget_nodes",
            f"forgetting nodes of run {run_id!r}",
            [self.layout.nodes(run_id), self.layout.blobrefs],
            [self.prefix, *(to_bytes(n) for n in node_ids)],
        )

    # --- the step cache -------------------------------------------------------------------

    async def get_cached(self, key: str) -> str | None:
        client = self._client()
        raw = await self._link.call(
            "reading the step cache", lambda: client.hget(self.layout.cache, to_bytes(key))
        )
        if raw is None:
            return None
        try:
            data = parse_cached(raw)
            if "value" in data:
                return str(data["value"])
            blob_key = self.layout.blob(data["blob"])
            blob = await self._link.call("reading the step cache", lambda: client.get(blob_key))
            return _blob_text(data["blob"], blob)
        except Malformed as exc:
            raise CheckpointError(
                f"cache entry {key!r} in {self.url} is corrupted: {exc}",
                hint=f"Delete the entry (HDEL {self.layout.cache} KEY)",
            ) from None

    async def put_cached(self, key: str, value: str) -> None:
        data = to_bytes(value)
        if len(data) > INLINE_MAX:
            digest = hashlib.sha256(data).hexdigest()
            entry = to_bytes(_codec.dumps({"blob": digest}))
            blob = data
        else:
            digest, blob = "", b""
            entry = to_bytes(_codec.dumps({"value": value}))
        await self._script(
            "put_cached",
            "writing the step cache",
            [self.layout.cache, self.layout.blob(digest or "-"), self.layout.blobrefs],
            [self.prefix, to_bytes(key), entry, digest, blob],
        )

    # --- reading back ---------------------------------------------------------------------

    def _run_from_hash(self, run_id: str, data: Mapping[Any, Any]) -> RunRecord:
        try:
            fields = {from_bytes(k, "a field name"): v for k, v in data.items()}
            unknown = set(fields) - _RUN_FIELDS
            missing = _RUN_FIELDS - _OPTIONAL_RUN_FIELDS - set(fields)
            if unknown or missing:
                raise Malformed(
                    f"the run hash has unknown fields {sorted(unknown)} or lacks {sorted(missing)}"
                )

            def text(name: str) -> str:
                return from_bytes(fields[name], name)

            def optional(name: str) -> str | None:
                return None if name not in fields else text(name)

            result = optional("result")
            status_text = text("status")
            try:
                status = RunStatus(status_text)
            except ValueError:
                raise Malformed(f"status {status_text!r} is not a known run status") from None
            return RunRecord(
                run_id=text("run_id"),
                flow=text("flow"),
                flow_ref=text("flow_ref"),
                fingerprint=text("fingerprint"),
                inputs=_check_json(text("inputs"), "inputs"),
                status=status,
                created_at=_float_text(fields["created_at"], "created_at"),
                updated_at=_float_text(fields["updated_at"], "updated_at"),
                result=None if result is None else _check_json(result, "result"),
                error=optional("error"),
                failed_node=optional("failed_node"),
                code=_code_map(text("code")),
            )
        except Malformed as exc:
            raise self._corrupted(run_id, None, str(exc)) from None

    def _corrupted(self, run_id: str, node_id: str | None, what: str) -> CheckpointError:
        keys = f"{self.layout.run(run_id)}, {self.layout.nodes(run_id)}"
        return CheckpointError(
            f"run {run_id!r} in {self.url} is corrupted: {what}",
            node=node_id,
            hint=_RESTORE_HINT.format(keys=keys),
        )

    # --- signals (fd.wait_for) --------------------------------------------------------------

    def _signal_key(self, run_id: str, name: str) -> str:
        # A signal name is an identifier (no ':'), so the name ends the key unambiguously.
        return f"{self.prefix}:signals:{run_id}:{name}"

    async def put_signal(self, run_id: str, name: str, value: str) -> int:
        """Append *value* (JSON text) to the run's signals called *name*; its index."""
        client = self._client()
        key, data = self._signal_key(run_id, name), to_bytes(value)
        length = await self._link.call(
            f"sending signal {name!r} to run {run_id!r}", lambda: client.rpush(key, data)
        )
        return int(length) - 1

    async def get_signal(self, run_id: str, name: str, index: int) -> str | None:
        """The *index*-th signal *name* sent to the run (from 0), or ``None`` if not yet."""
        client = self._client()
        key = self._signal_key(run_id, name)
        raw = await self._link.call(
            f"reading signal {name!r} of run {run_id!r}", lambda: client.lindex(key, index)
        )
        if raw is None:
            return None
        try:
            return _check_json(from_bytes(raw, "the signal"), "the signal")
        except Malformed as exc:
            raise self._corrupted(run_id, None, str(exc)) from None


async def _see_through(work: Awaitable[T]) -> T:
    """The result of *work*, run to its end whatever cancellations this task receives
    meanwhile (the caller re-raises the one it is handling)."""
    task = asyncio.ensure_future(work)
    while True:
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                return task.result()


def _run_fields(record: RunRecord) -> dict[str, bytes]:
    fields = {
        "run_id": record.run_id,
        "flow": record.flow,
        "flow_ref": record.flow_ref,
        "fingerprint": record.fingerprint,
        "inputs": record.inputs,
        "status": record.status.value,
        "created_at": repr(record.created_at),
        "updated_at": repr(record.updated_at),
        "result": record.result,
        "error": record.error,
        "failed_node": record.failed_node,
        "code": _codec.dumps(record.code),
    }
    return {k: to_bytes(v) for k, v in fields.items() if v is not None}


def _pairs(flat: list[Any]) -> dict[Any, Any]:
    return dict(zip(flat[0::2], flat[1::2], strict=True))


def _node_name(raw: object) -> str:
    try:
        return from_bytes(raw, "node id")
    except Malformed:
        return repr(raw)


def _code_map(text: str) -> dict[str, str]:
    data = _json(text, "code")
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise Malformed("code is not a mapping of node ids to code hashes")
    return data


def parse_cached(raw: object) -> dict[str, Any]:
    data = _json(from_bytes(raw, "the entry"), "entry")
    if not isinstance(data, dict) or len(data) != 1:
        raise Malformed("the entry is not a value or a blob reference")
    if "value" in data and isinstance(data["value"], str):
        _json(data["value"], "value")
        return data
    if "blob" in data and is_digest(data["blob"]):
        return data
    raise Malformed("the entry is not a value or a blob reference")
