"""NATS URLs and options: ``nats://[token@|user:password@]host:4222[,host2...][?options]``
taken apart, the client library loaded on first use, and the asyncio-only check.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import parse_qsl, unquote

import attrs

from ..._errors import ConfigError
from ..._urls import hide_credentials

__all__ = [
    "DEFAULT_PREFIX",
    "INLINE_MAX",
    "NatsOptions",
    "NatsURL",
    "nats_modules",
    "require_asyncio",
]

DEFAULT_PREFIX: Final = "flowdsl"
#: A value whose UTF-8 text is longer than this many bytes is stored once, by content hash.
INLINE_MAX: Final = 32 * 1024
_INSTALL_HINT: Final = "Install the NATS client: pip install 'flowdsl[nats]'"
_URL_FORM: Final = (
    "nats://[token@|user:password@]host:4222[,host2:4222...][?option=value&...] (tls:// for TLS)"
)
# Stream, consumer and bucket names: NATS allows more, but these also fit in a subject.
_NAME: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_HEX: Final = re.compile(r"^[0-9a-f]{64}$")


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


def _ttl(text: str) -> float:
    from .._retention import parse_duration

    seconds = parse_duration(text)
    if not seconds > 0:
        raise ValueError("must be positive")
    return seconds


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
    "ttl": _ttl,
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
    is stored once by content hash; ``tls_ca``, ``tls_cert`` and ``tls_key`` are PEM files;
    ``ttl`` (a duration such as ``7d``) is how long ended runs are kept before the store
    deletes them (by default they are kept until ``flowdsl runs prune``).
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
    ttl: float | None = None


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
