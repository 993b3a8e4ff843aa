"""The NATS store: runs and node journals in a JetStream key-value bucket (``store="nats://..."``).

Layout, in one bucket per deployment (``prefix=``, default ``flowdsl``; its stream is
``KV_{prefix}``), every key built from base64url tokens (no padding; ``=`` stands for the
empty string), because run and node ids hold characters NATS keys refuse or give meaning
to (``.`` separates tokens, ``*`` and ``>`` are wildcards, spaces and most punctuation are
not allowed)::

    run.{b64(run_id)}                 the run record (JSON)
    node.{b64(run_id)}.{b64(node_id)} the journal: one key per finished node (JSON)
    cache.{b64(cache key)}            ``@fd.step(cache=True)`` results
    blob.{sha256 hex}                 head of a large value: its size and chunk count
    blob.{sha256 hex}.{i}             its chunks (raw bytes)

Committing a node is one KV ``create`` of its key: the server refuses a second create of
a live key (compare-and-set on revision 0), so the first commit wins, whoever else
finishes the node.  A run's status changes by ``update`` against the revision it was read
at, retried on a conflict, so no update is lost.

Large values: text up to ``inline_max`` bytes (32 KiB by default) sits in its record; a
longer one is stored once per distinct content under its SHA-256, in chunks of at most
256 KiB in the same bucket (the server's max payload is 1 MB by default).  Chunks rather
than the object store because chunks of content-addressed data are idempotent to write
(two workers storing the same value write the same bytes, in any order), need no
consumer per read (the object store streams each object through a fresh consumer), and
keep one consistency model, revisions of one bucket, for everything.  Blobs are not
collected when the nodes that used them are forgotten: a resume after a code change
leaves its old large values behind (they are content-addressed, so nothing reads them by
mistake).

Every record read back is checked before it is believed: a key written by hand or by
another program raises :class:`~flowdsl.CheckpointError` naming the run and the node.
Nothing is ever unpickled or evaluated: records are JSON.

``list_runs`` reads every run record (one consumer streams the bucket's ``run.*`` keys)
and sorts them by creation time: fine for thousands of runs, slow for millions.

The connection code here is shared with the NATS broker (``flowdsl.contexts.nats``): URLs,
one connection per server list and event loop shared by every store and broker of the
process, and calls that ride out a server restart by retrying with backoff for
``retry_for`` seconds.  nats-py runs on asyncio only: under trio, :meth:`NATSStore.open`
refuses with :class:`~flowdsl.ConfigError`.  See docs/nats.md.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import re
import ssl
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar
from urllib.parse import parse_qsl, unquote

import anyio
import attrs
from anyio.lowlevel import checkpoint_if_cancelled

from ..._errors import CheckpointError, ConfigError
from ..._records import NodeRecord, RunRecord, RunStatus
from ..._urls import hide_credentials

__all__ = [
    "DEFAULT_PREFIX",
    "INLINE_MAX",
    "NATSStore",
    "NatsLink",
    "NatsOptions",
    "NatsURL",
    "from_token",
    "nats_modules",
    "require_asyncio",
    "to_token",
]

log = logging.getLogger("flowdsl.nats")

T = TypeVar("T")

DEFAULT_PREFIX: Final = "flowdsl"
#: A value whose UTF-8 text is longer than this many bytes is stored once, by content hash.
INLINE_MAX: Final = 32 * 1024
_CHUNK: Final = 256 * 1024
_INSTALL_HINT: Final = "Install the NATS client: pip install 'flowdsl[nats]'"
_URL_FORM: Final = (
    "nats://[token@|user:password@]host:4222[,host2:4222...][?option=value&...] (tls:// for TLS)"
)
# Stream, consumer and bucket names: NATS allows more, but these also fit in a subject.
_NAME: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_HEX: Final = re.compile(r"^[0-9a-f]{64}$")
_RECORD_VERSION: Final = 1
_ERR_PER_SUBJECT: Final = 10077  # "maximum messages per subject exceeded": a refusal, not a fault


# --- the client library, loaded on first use ------------------------------------------------


def nats_modules() -> Any:
    """The ``nats`` package, or a ConfigError naming the extra to install."""
    try:
        import nats
        import nats.errors
        import nats.js.api
        import nats.js.errors
    except ImportError as exc:
        raise ConfigError(
            "the NATS backend needs the nats-py package, which is not installed",
            hint=_INSTALL_HINT,
        ) from exc
    return nats


def require_asyncio(shown: str) -> None:
    """Refuse any event loop but asyncio: nats-py runs on asyncio only."""
    import sniffio

    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        library = "none"
    if library != "asyncio":
        raise ConfigError(
            f"the NATS backend ({shown}) runs on asyncio only (nats-py is an asyncio "
            f"client), and this is {library}",
            hint="Run the flow under asyncio (anyio.run(main) or asyncio.run(main)), or keep "
            "trio with the SQLite store and queue (sqlite:///runs.db)",
        )


# --- URLs -----------------------------------------------------------------------------------


def _positive(kind: type[float] | type[int]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not (value > 0 and math.isfinite(value)):
            raise ValueError("must be a positive number")
        return value

    return parse


def _non_negative(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError("must be a number of seconds >= 0 (0: forever)")
    return value


def _prefix(text: str) -> str:
    if not _NAME.match(text):
        raise ValueError("must be 1-64 letters, digits, '-' or '_'")
    return text


def _storage(text: str) -> str:
    if text not in ("file", "memory"):
        raise ValueError("must be 'file' or 'memory'")
    return text


def _replicas(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 5:
        raise ValueError("must be 1 to 5")
    return value


_OPTIONS: Final[dict[str, Callable[[str], Any]]] = {
    "prefix": _prefix,
    "replicas": _replicas,
    "storage": _storage,
    "max_age": _non_negative,
    "connect_timeout": _positive(float),
    "timeout": _positive(float),
    "retry_for": _non_negative,
    "max_deliver": _positive(int),
    "inline_max": _positive(int),
    "tls_ca": str,
    "tls_cert": str,
    "tls_key": str,
}


@attrs.frozen
class NatsOptions:
    """What a NATS URL's query string (or the constructor's keywords) can set.

    ``prefix`` names the bucket, streams and subjects of one deployment; ``replicas`` and
    ``storage`` (``file`` or ``memory``) apply to every stream and bucket flowdsl creates;
    ``max_age`` (seconds, 0 for no limit) is how long completions and events are kept;
    ``connect_timeout`` bounds each connection attempt, ``timeout`` each JetStream request,
    ``retry_for`` how long a call waits for a server that went away; ``max_deliver`` is the
    task consumer's backstop on deliveries; ``inline_max`` is the size above which a value
    is stored once by content hash; ``tls_ca``, ``tls_cert`` and ``tls_key`` are PEM files.
    """

    prefix: str = DEFAULT_PREFIX
    replicas: int = 1
    storage: str = "file"
    max_age: float = 86400.0
    connect_timeout: float = 2.0
    timeout: float = 5.0
    retry_for: float = 60.0
    max_deliver: int = 1000
    inline_max: int = INLINE_MAX
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None


@attrs.frozen
class NatsURL:
    """A NATS URL taken apart: the servers, the credentials (never shown) and the options."""

    servers: tuple[str, ...]  # scheme://host:port, without credentials
    shown: str  # for messages: credentials hidden
    tls: bool
    options: NatsOptions
    token: str | None = attrs.field(default=None, repr=False)
    user: str | None = attrs.field(default=None, repr=False)
    password: str | None = attrs.field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str, **overrides: Any) -> NatsURL:
        """``nats://[token@|user:password@]host[:port][,host2[:port]...][?options]``.

        Several servers (a cluster) are separated by commas, each with or without its own
        scheme; one set of credentials serves them all.  ``tls://`` asks for TLS.
        *overrides* take precedence over the query's options.
        """
        if not isinstance(url, str):
            raise ConfigError(f"a NATS URL must be text, not {type(url).__name__}")
        rest, _, query = url.partition("?")
        servers: list[str] = []
        hosts: list[str] = []
        credentials: set[tuple[str | None, str | None, str | None]] = set()
        schemes: set[str] = set()
        default_scheme = ""
        for index, piece in enumerate(rest.split(",")):
            scheme, userinfo, hostport = _split_server(url, piece, default_scheme, index)
            default_scheme = default_scheme or scheme
            schemes.add(scheme)
            if userinfo is not None:
                credentials.add(_credentials(userinfo))
            servers.append(f"{scheme}://{hostport}")
            hosts.append(hostport)
        if len(credentials) > 1:
            raise _bad_url(url, "the servers name different credentials; give them once")
        token, user, password = credentials.pop() if credentials else (None, None, None)
        tls = "tls" in schemes
        options = _parse_options(url, query, overrides)
        if options.tls_cert is not None and options.tls_key is None:
            raise _bad_url(url, "tls_cert needs tls_key (the certificate's private key)")
        scheme = "tls" if tls else "nats"
        auth = "***@" if (token or user or password) else ""
        shown = f"{scheme}://{auth}{','.join(hosts)}" + (f"?{query}" if query else "")
        return cls(
            servers=tuple(servers),
            shown=shown,
            tls=tls or options.tls_ca is not None or options.tls_cert is not None,
            options=options,
            token=token,
            user=user,
            password=password,
        )

    @property
    def connection_key(self) -> tuple[Any, ...]:
        """What makes two URLs share a connection: servers, credentials and TLS."""
        o = self.options
        return (
            self.servers,
            self.token,
            self.user,
            self.password,
            self.tls,
            o.tls_ca,
            o.tls_cert,
            o.tls_key,
            o.connect_timeout,
        )


def _split_server(
    url: str, piece: str, default_scheme: str, index: int
) -> tuple[str, str | None, str]:
    """``(scheme, userinfo, host:port)`` of one comma-separated server."""
    piece = piece.strip()
    if "://" in piece:
        scheme, _, piece = piece.partition("://")
        scheme = scheme.lower()
    elif index == 0:
        raise _bad_url(url, "it must start with nats:// or tls://")
    else:
        scheme = default_scheme
    if scheme not in ("nats", "tls"):
        raise _bad_url(url, f"unknown scheme {scheme!r}")
    userinfo: str | None = None
    if "@" in piece:
        userinfo, _, piece = piece.rpartition("@")
    piece = piece.removesuffix("/")
    if not piece or "/" in piece:
        raise _bad_url(url, "each server is host[:port], with no path")
    host, port = piece, "4222"
    if piece.startswith("["):  # [IPv6]:port
        host, _, tail = piece.partition("]")
        host += "]"
        if tail:
            if not tail.startswith(":"):
                raise _bad_url(url, f"cannot read the server {piece!r}")
            port = tail[1:]
    elif ":" in piece:
        host, _, port = piece.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise _bad_url(url, f"cannot read the server {piece!r} (host:port)")
    return scheme, userinfo, f"{host}:{int(port)}"


def _credentials(userinfo: str) -> tuple[str | None, str | None, str | None]:
    """``(token, user, password)``: ``user:password`` or a bare token, percent-decoded."""
    if ":" in userinfo:
        user, _, password = userinfo.partition(":")
        return None, unquote(user), unquote(password)
    return unquote(userinfo), None, None


def _parse_options(url: str, query: str, overrides: dict[str, Any]) -> NatsOptions:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        raise _bad_url(url, f"cannot read the options {query!r}") from None
    values: dict[str, Any] = {}
    for name, text in [*pairs, *((k, v) for k, v in overrides.items())]:
        parse = _OPTIONS.get(name)
        if parse is None:
            raise _bad_url(url, f"unknown option {name!r} (known: {', '.join(_OPTIONS)})")
        if text is None:
            continue
        try:
            values[name] = parse(str(text))
        except ValueError as exc:
            raise _bad_url(url, f"{name}={text!r}: {exc}") from None
    return NatsOptions(**values)


def _bad_url(url: str, why: str) -> ConfigError:
    return ConfigError(
        f"malformed NATS URL {_hide(url)!r}: {why}",
        hint=f"Use {_URL_FORM}",
    )


def _hide(url: str) -> str:
    """*url* with anything between '://' and '@' masked (it may be a credential)."""
    return hide_credentials(url)


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


def _connect_error(url: NatsURL, exc: Exception, failures: list[BaseException]) -> ConfigError:
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
    return ConfigError(
        f"cannot connect to NATS at {url.shown}: {why}",
        hint="Check TLS: tls:// and tls_ca=, tls_cert=, tls_key= options"
        if tls
        else "Check that nats-server runs there with JetStream (nats-server -js) and is "
        "reachable from this machine",
    )


def _transient(exc: BaseException) -> bool:
    """Whether *exc* says the server is away for now (restart, failover, JetStream
    recovering) rather than refusing the request."""
    import nats.errors as ne
    import nats.js.errors as je

    if isinstance(exc, je.APIError):
        return exc.code == 503 and exc.err_code != _ERR_PER_SUBJECT
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
        """``await op()``, retried while the server is away (at most ``retry_for`` s).

        Only operations that may run twice are passed here: each is idempotent, or says
        how it tells its own earlier write from another's (see the callers).
        """
        import nats.errors as ne

        deadline: float | None = None
        delay = 0.01
        where = f" (run {run_id!r})" if run_id is not None else ""
        while True:
            try:
                return await op()
            except Exception as exc:
                if not _transient(exc):
                    if isinstance(exc, ne.Error):
                        raise CheckpointError(
                            f"the NATS server at {self.url.shown} refused to {what}{where}: "
                            f"{type(exc).__name__}: {exc}",
                            node=node,
                            hint="A stream or bucket flowdsl uses was deleted or changed by "
                            "hand, or the account's limits are reached; see docs/nats.md",
                        ) from exc
                    raise
                now = anyio.current_time()
                if deadline is None:
                    deadline = now + self.url.options.retry_for
                    log.warning("NATS at %s: %r (%s); retrying", self.url.shown, exc, what)
                if now >= deadline:
                    raise CheckpointError(
                        f"the NATS server at {self.url.shown} has not answered for "
                        f"{self.url.options.retry_for:g} s ({what}){where}: {exc!r}",
                        node=node,
                        hint="Check that nats-server runs and is reachable",
                    ) from exc
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.5)


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


# --- encoding -------------------------------------------------------------------------------


def to_token(text: str) -> str:
    """*text* as one NATS subject token or key part: base64url, unpadded; ``=`` for ''."""
    raw = text.encode("utf-8", "surrogatepass")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=") or "="


def from_token(part: str) -> str:
    """The text :func:`to_token` made; ValueError for anything it cannot have made."""
    if part == "=":
        return ""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", part):
        raise ValueError(f"{part!r} is not a base64url token")
    raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    return raw.decode("utf-8", "surrogatepass")


def to_bytes(text: str) -> bytes:
    """UTF-8, keeping lone surrogates (Python text may hold them) byte-exact."""
    return text.encode("utf-8", "surrogatepass")


def from_bytes(data: bytes) -> str:
    return data.decode("utf-8", "surrogatepass")


def dump_json(data: Any) -> bytes:
    return to_bytes(json.dumps(data, ensure_ascii=False, separators=(",", ":")))


class Malformed(Exception):
    """A record that does not hold what flowdsl writes."""


def load_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(from_bytes(data))
    except (UnicodeDecodeError, ValueError):
        raise Malformed(f"{what} is not JSON that flowdsl wrote") from None


def _field(data: dict[str, Any], name: str, *kinds: type) -> Any:
    value = data.get(name)
    if type(value) not in kinds:
        raise Malformed(
            f"{name} is {type(value).__name__}, not {'/'.join(k.__name__ for k in kinds)}"
        )
    return value


def _time(data: dict[str, Any], name: str) -> float:
    value = _field(data, name, float, int)
    if not math.isfinite(value):
        raise Malformed(f"{name} is not a finite timestamp")
    return float(value)


def _json_text(text: str, what: str) -> str:
    try:
        json.loads(text)
    except ValueError:
        raise Malformed(f"the stored {what} is not valid JSON") from None
    return text


# --- a bucket -------------------------------------------------------------------------------


class Bucket:
    """A JetStream key-value bucket and the calls flowdsl makes on it, each retried while
    the server is away; large values are stored once, by content hash, in chunks."""

    def __init__(self, link: NatsLink, kv: Any, *, inline_max: int) -> None:
        self.link = link
        self.kv = kv
        # Every record must fit in one message: chunks and inline values stay well below
        # the server's max payload (1 MB by default).
        max_payload = int(link.nc.max_payload or 1024 * 1024)
        self.max_payload = max_payload
        self.chunk = max(1024, min(_CHUNK, max_payload - 4096))
        self.inline_max = min(inline_max, max(256, max_payload // 8))

    @classmethod
    async def open(cls, link: NatsLink, options: NatsOptions) -> Bucket:
        """The deployment's bucket, created on first use."""
        from nats.js.api import KeyValueConfig
        from nats.js.errors import BadRequestError, BucketNotFoundError

        js = link.require("store")
        name = options.prefix
        config = KeyValueConfig(
            bucket=name,
            description="flowdsl runs and node journals",
            history=1,
            replicas=options.replicas,
            storage=storage_type(options),
        )

        async def op() -> Any:
            try:
                return await js.key_value(name)
            except BucketNotFoundError:
                pass
            try:
                return await js.create_key_value(config=config)
            except BadRequestError:  # created meanwhile by another process
                return await js.key_value(name)

        kv = await link.call(f"open the bucket {name}", op)
        return cls(link, kv, inline_max=options.inline_max)

    async def get(self, key: str, what: str, run_id: str | None = None) -> tuple[bytes, int] | None:
        from nats.js.errors import KeyNotFoundError

        kv = self.kv

        async def op() -> tuple[bytes, int] | None:
            try:
                entry = await kv.get(key)
            except KeyNotFoundError:  # never written, deleted or purged
                return None
            return bytes(entry.value or b""), int(entry.revision)

        return await self.link.call(what, op, run_id=run_id)

    async def create(self, key: str, value: bytes, what: str, run_id: str) -> bool:
        """KV create: True when this call wrote the key, False when it existed."""
        from nats.js.errors import KeyWrongLastSequenceError

        kv = self.kv

        async def op() -> bool:
            try:
                await kv.create(key, value)
            except KeyWrongLastSequenceError:
                return False
            return True

        return await self.link.call(what, op, run_id=run_id)

    async def update(self, key: str, value: bytes, last: int, what: str, run_id: str) -> bool:
        from nats.js.errors import KeyWrongLastSequenceError

        kv = self.kv

        async def op() -> bool:
            try:
                await kv.update(key, value, last=last)
            except KeyWrongLastSequenceError:
                return False
            return True

        return await self.link.call(what, op, run_id=run_id)

    async def put(self, key: str, value: bytes, what: str) -> None:
        kv = self.kv

        async def op() -> None:
            await kv.put(key, value)

        await self.link.call(what, op)

    async def delete(self, key: str, what: str, run_id: str) -> None:
        kv = self.kv

        async def op() -> None:
            await kv.delete(key)

        await self.link.call(what, op, run_id=run_id)

    async def scan(
        self, pattern: str, what: str, run_id: str | None = None
    ) -> list[tuple[str, bytes]]:
        """The latest value of every live key matching *pattern*: one consumer streams
        them all (a get per key would cost a round trip each)."""
        kv = self.kv
        timeout = self.link.url.options.timeout

        async def op() -> list[tuple[str, bytes]]:
            watcher = await kv.watch(pattern, ignore_deletes=True)
            try:
                found: list[tuple[str, bytes]] = []
                while True:
                    entry = await watcher.updates(timeout=timeout)
                    if entry is None:  # the initial values are all in
                        return found
                    if entry.operation is None:
                        found.append((str(entry.key), bytes(entry.value or b"")))
            finally:
                with anyio.CancelScope(shield=True):
                    await watcher.stop()

        return await self.link.call(what, op, run_id=run_id)

    async def pack(self, text: str, run_id: str | None = None) -> str | dict[str, str]:
        """Text kept inline, or a reference to its content-addressed blob."""
        data = to_bytes(text)
        if len(data) <= self.inline_max:
            return text
        return {"blob": await self.put_blob(data, run_id)}

    async def put_blob(self, data: bytes, run_id: str | None = None) -> str:
        """Store *data* once by content; its SHA-256 (hex) names it."""
        digest = hashlib.sha256(data).hexdigest()
        head = f"blob.{digest}"
        if await self.get(head, "read a large value", run_id) is None:
            # Chunks first, head last: a head always finds its chunks.  Writing the same
            # content twice (two workers) writes the same bytes, so needs no coordination.
            chunks = [data[i : i + self.chunk] for i in range(0, len(data), self.chunk)]
            async with anyio.create_task_group() as tg:
                for i, chunk in enumerate(chunks):
                    tg.start_soon(self.put, f"{head}.{i}", chunk, "store a large value")
            info = dump_json({"size": len(data), "chunks": len(chunks)})
            await self.put(head, info, "store a large value")
        return digest

    async def get_blob(self, digest: object, what: str, run_id: str | None = None) -> bytes:
        """The bytes :meth:`put_blob` stored; Malformed when they are missing or altered."""
        if not isinstance(digest, str) or not _HEX.match(digest):
            raise Malformed(f"{what}'s blob reference is not a SHA-256")
        head = await self.get(f"blob.{digest}", "read a large value", run_id)
        if head is None:
            raise Malformed(f"{what}'s blob {digest[:16]}... is missing")
        info = load_json(head[0], "a blob head")
        if not isinstance(info, dict):
            raise Malformed(f"{what}'s blob head is not an object")
        size = _field(info, "size", int)
        count = _field(info, "chunks", int)
        if not 0 < count <= size // 1024 + 2:
            raise Malformed(f"{what}'s blob head names {count} chunks for {size} bytes")
        parts: list[bytes | None] = [None] * count

        async def fetch(i: int) -> None:
            got = await self.get(f"blob.{digest}.{i}", "read a large value", run_id)
            parts[i] = None if got is None else got[0]

        async with anyio.create_task_group() as tg:
            for i in range(count):
                tg.start_soon(fetch, i)
        if any(part is None for part in parts):
            raise Malformed(f"{what}'s blob {digest[:16]}... lost a chunk")
        data = b"".join(p for p in parts if p is not None)
        if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
            raise Malformed(f"{what}'s blob {digest[:16]}... does not match its hash")
        return data

    async def unpack(
        self, value: object, what: str, run_id: str | None, *, json_text: bool = True
    ) -> str:
        """The text :meth:`pack` was given; Malformed for anything it cannot have made."""
        if isinstance(value, str):
            return _json_text(value, what) if json_text else value
        if not (isinstance(value, dict) and set(value) == {"blob"}):
            raise Malformed(f"{what} is neither text nor a blob reference")
        data = await self.get_blob(value["blob"], what, run_id)
        try:
            text = from_bytes(data)
        except UnicodeDecodeError:
            raise Malformed(f"{what}'s blob is not UTF-8 text") from None
        return _json_text(text, what) if json_text else text

    async def unpack_optional(
        self, value: object, what: str, run_id: str | None, *, json_text: bool = True
    ) -> str | None:
        if value is None:
            return None
        return await self.unpack(value, what, run_id, json_text=json_text)


# --- the store ------------------------------------------------------------------------------

_RESTORE_HINT: Final = (
    "Restore the bucket from a backup, or delete the run's keys (nats kv del BUCKET KEY) "
    "and start it again"
)


class NATSStore:
    """Runs and node journals in a JetStream key-value bucket.

    *url* is ``nats://[token@|user:password@]host:4222[,host2:4222...]`` (``tls://`` for
    TLS), with options in its query string or as keywords (see :class:`NatsOptions`).
    """

    def __init__(self, url: str, **options: Any) -> None:
        nats_modules()  # a missing client fails here, where the store is named
        self._url = NatsURL.parse(url, **options)
        self.url = self._url.shown
        self.options = self._url.options
        self.bucket = self.options.prefix
        self._link = NatsLink(self._url)
        self._kv: Bucket | None = None

    @classmethod
    def from_url(cls, url: str) -> NATSStore:
        return cls(url)

    def __repr__(self) -> str:
        state = "open" if self._kv is not None else "closed"
        return f"<NATSStore {self.url!r} bucket={self.bucket!r} {state}>"

    @property
    def link(self) -> NatsLink:
        return self._link

    # --- lifetime -------------------------------------------------------------------------

    async def open(self) -> None:
        await checkpoint_if_cancelled()
        if self._kv is not None:
            return
        await self._link.open()
        try:
            self._kv = await Bucket.open(self._link, self.options)
        except BaseException:
            await self._link.close()
            raise

    async def close(self) -> None:
        self._kv = None
        await self._link.close()

    @property
    def _bucket(self) -> Bucket:
        if self._kv is None:
            raise ConfigError(
                f"the store {self.url} is not open",
                hint="Use it inside `async with ctx:` or call `await store.open()` first",
            )
        return self._kv

    # --- runs -----------------------------------------------------------------------------

    async def create_run(self, record: RunRecord) -> tuple[RunRecord, bool]:
        await checkpoint_if_cancelled()
        key = _run_key(record.run_id)
        data = await self._encode_run(record)
        while True:
            if await self._bucket.create(key, data, "create a run", record.run_id):
                return record, True
            stored = await self.get_run(record.run_id)
            if stored is not None:
                # Our own create, when its reply was lost and the call was retried.
                return stored, stored == record
            # Deleted between the create and the read: try again.

    async def get_run(self, run_id: str) -> RunRecord | None:
        await checkpoint_if_cancelled()
        got = await self._bucket.get(_run_key(run_id), "read a run", run_id)
        return None if got is None else await self._decode_run(run_id, got[0])

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
        import time

        await checkpoint_if_cancelled()
        key = _run_key(run_id)
        while True:
            got = await self._bucket.get(key, "read a run", run_id)
            if got is None:
                raise CheckpointError(
                    f"run {run_id!r} does not exist in {self.url}",
                    hint="Create the run (ctx.start) before updating it",
                )
            record = await self._decode_run(run_id, got[0])
            changes: dict[str, Any] = {
                "status": status,
                "result": result,
                "error": error,
                "failed_node": failed_node,
                "updated_at": time.time(),
            }
            if fingerprint is not None:
                changes["fingerprint"] = fingerprint
            if code is not None:
                changes["code"] = code
            data = await self._encode_run(attrs.evolve(record, **changes))
            # Compare-and-set on the revision read: a concurrent update makes us read again
            # rather than overwrite it with stale fields.
            if await self._bucket.update(key, data, got[1], "update a run", run_id):
                return

    async def list_runs(self, *, limit: int = 50) -> list[RunRecord]:
        await checkpoint_if_cancelled()
        if limit <= 0:
            return []
        entries = await self._bucket.scan("run.*", "list the runs")
        runs = []
        for key, data in entries:
            run_id = _id_of(key, "run")
            runs.append(await self._decode_run(run_id, data))
        runs.sort(key=lambda r: (r.created_at, r.run_id), reverse=True)
        return runs[:limit]

    async def _encode_run(self, record: RunRecord) -> bytes:
        return dump_json(
            {
                "v": _RECORD_VERSION,
                "run_id": record.run_id,
                "flow": record.flow,
                "flow_ref": record.flow_ref,
                "fingerprint": record.fingerprint,
                "inputs": await self._bucket.pack(record.inputs, record.run_id),
                "status": record.status.value,
                "created_at": record.created_at,
                "updated_at": record.updated_at,
                "result": None
                if record.result is None
                else await self._bucket.pack(record.result, record.run_id),
                "error": None
                if record.error is None
                else await self._bucket.pack(record.error, record.run_id),
                "failed_node": record.failed_node,
                "code": record.code,
            }
        )

    async def _decode_run(self, run_id: str, data: bytes) -> RunRecord:
        try:
            fields = load_json(data, "the run record")
            if not isinstance(fields, dict) or fields.get("v") != _RECORD_VERSION:
                raise Malformed("the run record is not an object of this version")
            code = fields.get("code")
            if not isinstance(code, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in code.items()
            ):
                raise Malformed("code is not a mapping of node ids to code hashes")
            try:
                status = RunStatus(fields.get("status"))
            except ValueError:
                raise Malformed(f"status {fields.get('status')!r} is not a run status") from None
            stored_id = _field(fields, "run_id", str)
            if stored_id != run_id:
                raise Malformed(f"the record is of run {stored_id!r}")
            return RunRecord(
                run_id=stored_id,
                flow=_field(fields, "flow", str),
                flow_ref=_field(fields, "flow_ref", str),
                fingerprint=_field(fields, "fingerprint", str),
                inputs=await self._bucket.unpack(fields.get("inputs"), "inputs", run_id),
                status=status,
                created_at=_time(fields, "created_at"),
                updated_at=_time(fields, "updated_at"),
                result=await self._bucket.unpack_optional(fields.get("result"), "result", run_id),
                error=await self._bucket.unpack_optional(
                    fields.get("error"), "error", run_id, json_text=False
                ),
                failed_node=_field(fields, "failed_node", str, type(None)),
                code=code,
            )
        except Malformed as exc:
            raise self._corrupted(run_id, None, str(exc)) from None

    # --- the journal ----------------------------------------------------------------------

    async def commit_node(self, run_id: str, record: NodeRecord) -> bool:
        await checkpoint_if_cancelled()
        data = dump_json(
            {
                "v": _RECORD_VERSION,
                "node_id": record.node_id,
                "value": await self._bucket.pack(record.value, run_id),
                "attempts": record.attempts,
                "started_at": record.started_at,
                "finished_at": record.finished_at,
                "code": record.code,
                "usage": record.usage,
            }
        )
        key = _node_key(run_id, record.node_id)
        if await self._bucket.create(key, data, "commit a node", run_id):
            return True
        # Taken: by another worker (first commit wins), or by this very call when its
        # reply was lost and it was retried; only the latter holds exactly our record.
        got = await self._bucket.get(key, "read a node", run_id)
        return got is not None and got[0] == data

    async def load_nodes(self, run_id: str) -> dict[str, NodeRecord]:
        await checkpoint_if_cancelled()
        entries = await self._bucket.scan(f"node.{to_token(run_id)}.*", "read the journal", run_id)
        records: dict[str, NodeRecord] = {}
        for key, data in entries:
            record = await self._decode_node(run_id, key, data)
            records[record.node_id] = record
        return records

    async def forget_nodes(self, run_id: str, node_ids: list[str]) -> None:
        await checkpoint_if_cancelled()
        async with anyio.create_task_group() as tg:
            for node_id in node_ids:
                tg.start_soon(
                    self._bucket.delete, _node_key(run_id, node_id), "forget a node", run_id
                )

    async def _decode_node(self, run_id: str, key: str, data: bytes) -> NodeRecord:
        node_id: str | None = None
        try:
            node_id = _id_of(key, "node")
            fields = load_json(data, "the node record")
            if not isinstance(fields, dict) or fields.get("v") != _RECORD_VERSION:
                raise Malformed("the node record is not an object of this version")
            if fields.get("node_id") != node_id:
                raise Malformed(f"the record under this node's key names {fields.get('node_id')!r}")
            attempts = _field(fields, "attempts", int)
            if attempts < 0:
                raise Malformed(f"attempts is {attempts}, not a count")
            usage = _field(fields, "usage", dict, type(None))
            return NodeRecord(
                node_id=node_id,
                value=await self._bucket.unpack(fields.get("value"), "value", run_id),
                attempts=attempts,
                started_at=_time(fields, "started_at"),
                finished_at=_time(fields, "finished_at"),
                code=_field(fields, "code", str),
                usage=usage,
            )
        except Malformed as exc:
            raise self._corrupted(run_id, node_id or key, str(exc)) from None

    # --- the step cache -------------------------------------------------------------------

    async def get_cached(self, key: str) -> str | None:
        await checkpoint_if_cancelled()
        got = await self._bucket.get(_cache_key(key), "read the cache")
        if got is None:
            return None
        try:
            fields = load_json(got[0], "the cache entry")
            if not isinstance(fields, dict) or "value" not in fields:
                raise Malformed("the cache entry is not an object with a value")
            return await self._bucket.unpack(fields["value"], "the cached value", None)
        except Malformed as exc:
            raise CheckpointError(
                f"cache entry {key!r} in {self.url} is corrupted: {exc}",
                hint=f"Delete the entry: nats kv del {self.bucket} {_cache_key(key)}",
            ) from None

    async def put_cached(self, key: str, value: str) -> None:
        await checkpoint_if_cancelled()
        data = dump_json({"value": await self._bucket.pack(value)})
        await self._bucket.put(_cache_key(key), data, "write the cache")

    # --- errors ---------------------------------------------------------------------------

    def _corrupted(self, run_id: str, node_id: str | None, what: str) -> CheckpointError:
        return CheckpointError(
            f"run {run_id!r} in {self.url} (bucket {self.bucket!r}) is corrupted: {what}",
            node=node_id,
            hint=_RESTORE_HINT,
        )

    # --- signals (fd.wait_for) --------------------------------------------------------------

    async def put_signal(self, run_id: str, name: str, value: str) -> int:
        """Append *value* (JSON text) to the run's signals called *name*; its index.

        Each signal is a key of its own, created at the first free index (a create of a
        live key is refused), so two senders never take the same index.
        """
        await checkpoint_if_cancelled()
        data = dump_json({"value": await self._bucket.pack(value, run_id)})
        index = 0
        while not await self._bucket.create(
            _signal_key(run_id, name, index), data, "send a signal", run_id
        ):
            index += 1
        return index

    async def get_signal(self, run_id: str, name: str, index: int) -> str | None:
        """The *index*-th signal *name* sent to the run (from 0), or ``None`` if not yet."""
        await checkpoint_if_cancelled()
        got = await self._bucket.get(_signal_key(run_id, name, index), "read a signal", run_id)
        if got is None:
            return None
        try:
            fields = load_json(got[0], "the signal")
            if not isinstance(fields, dict) or "value" not in fields:
                raise Malformed("the signal is not an object with a value")
            return await self._bucket.unpack(fields["value"], "the signal", run_id)
        except Malformed as exc:
            raise self._corrupted(run_id, None, str(exc)) from None


def _signal_key(run_id: str, name: str, index: int) -> str:
    return f"signal.{to_token(run_id)}.{to_token(name)}.{index}"


def _run_key(run_id: str) -> str:
    return f"run.{to_token(run_id)}"


def _node_key(run_id: str, node_id: str) -> str:
    return f"node.{to_token(run_id)}.{to_token(node_id)}"


def _cache_key(key: str) -> str:
    return f"cache.{to_token(key)}"


def _id_of(key: str, kind: str) -> str:
    """The id a key's last token encodes; Malformed for a key flowdsl did not make."""
    try:
        return from_token(key.rsplit(".", 1)[-1])
    except (ValueError, UnicodeDecodeError):
        raise Malformed(f"the key {key!r} does not name a {kind}") from None
