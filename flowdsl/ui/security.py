"""Who may talk to the inspector: the token, the Host header, and cross-site requests.

Three guards, in one ASGI middleware that wraps the app:

- **Host**: a page served on loopback answers only to loopback host names, so a web page
  that rebinds its own domain's DNS to 127.0.0.1 cannot read it (``allowed_hosts``).
- **Token** (``--token-env VAR``): every request carries it, as ``Authorization: Bearer
  <token>`` or as the cookie a login link (``/?token=<token>``) sets; it is compared in
  constant time.  The cookie holds a keyed hash of the token, not the token.
- **Cross-site requests**: a POST must come from the page itself: a ``Sec-Fetch-Site``
  other than ``same-origin``, or an ``Origin`` that is not this host, is refused, and the
  custom header :data:`CSRF_HEADER` is required (a cross-site form cannot set one, and a
  cross-site script cannot without a CORS preflight, which this app never grants).

Every page also gets a strict Content-Security-Policy: scripts and styles from this
origin only, so stored data shown on the page can never run as code.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

__all__ = ["COOKIE", "CSRF_HEADER", "Guard"]

CSRF_HEADER = "x-flowdsl-request"
COOKIE = "flowdsl_token"

Scope = dict[str, Any]
Receive = Any
Send = Any

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

_SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]


def cookie_value(token: str) -> str:
    """What the login cookie holds: a keyed hash of the token."""
    return hmac.new(token.encode(), b"flowdsl-ui-session", hashlib.sha256).hexdigest()


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _host_name(host: str) -> str:
    """``127.0.0.1:8765`` -> ``127.0.0.1``; ``[::1]:8765`` -> ``::1``."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Guard:
    """The ASGI middleware of the module docstring."""

    def __init__(
        self,
        app: Any,
        *,
        token: str | None = None,
        allowed_hosts: Iterable[str] | None = None,
    ) -> None:
        self.app = app
        self.token = token
        self._cookie = cookie_value(token) if token else None
        self.allowed_hosts = (
            None if allowed_hosts is None else frozenset(h.lower() for h in allowed_hosts)
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = _header(scope, b"host") or ""
        if self.allowed_hosts is not None and _host_name(host).lower() not in self.allowed_hosts:
            await _refuse(send, 400, "bad_host", f"this inspector does not answer to host {host!r}")
            return
        if self.token is not None:
            login = self._login(scope)
            if login is not None:
                await send_redirect(send, login[0], login[1])
                return
            if not self._authorized(scope):
                await _refuse(
                    send,
                    401,
                    "unauthorized",
                    "this inspector needs its token: open the login link it printed, or "
                    "send `Authorization: Bearer <token>`",
                )
                return
        if scope["method"] not in ("GET", "HEAD") and not self._same_site(scope, host):
            await _refuse(
                send,
                403,
                "cross_site",
                f"actions must come from the inspector's own page (with the {CSRF_HEADER} header)",
            )
            return

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in _SECURITY_HEADERS if k not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _login(self, scope: Scope) -> tuple[str, str] | None:
        """A ``?token=`` link: the redirect without it, and the cookie, when it is right."""
        query = scope.get("query_string", b"").decode("latin-1")
        pairs = parse_qsl(query, keep_blank_values=True)
        given = [v for k, v in pairs if k == "token"]
        if not given or scope["method"] != "GET":
            return None
        assert self.token is not None
        assert self._cookie is not None
        if not hmac.compare_digest(given[0].encode(), self.token.encode()):
            return None
        rest = urlencode([(k, v) for k, v in pairs if k != "token"])
        path = scope.get("path", "/") or "/"
        if not path.startswith("/") or path.startswith("//"):
            path = "/"  # never a redirect to another site (`//host`)
        return (path + ("?" + rest if rest else ""), self._cookie)

    def _authorized(self, scope: Scope) -> bool:
        assert self.token is not None
        assert self._cookie is not None
        auth = _header(scope, b"authorization")
        if auth is not None and auth[:7].lower() == "bearer ":
            return hmac.compare_digest(auth[7:].strip().encode(), self.token.encode())
        raw = _header(scope, b"cookie")
        if raw:
            jar: SimpleCookie = SimpleCookie()
            try:
                jar.load(raw)
            except Exception:
                return False
            morsel = jar.get(COOKIE)
            if morsel is not None:
                return hmac.compare_digest(morsel.value.encode(), self._cookie.encode())
        return False

    def _same_site(self, scope: Scope, host: str) -> bool:
        if _header(scope, CSRF_HEADER.encode()) is None:
            return False
        fetch_site = _header(scope, b"sec-fetch-site")
        if fetch_site is not None and fetch_site not in ("same-origin", "none"):
            return False
        origin = _header(scope, b"origin")
        if origin is not None and origin != "null":
            return urlsplit(origin).netloc.lower() == host.lower()
        return origin is None


async def _refuse(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps({"error": code, "message": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *_SECURITY_HEADERS,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_redirect(send: Send, location: str, cookie: str) -> None:
    # SameSite=Strict: a cross-site request never carries the cookie, so the token
    # cannot be used by another site even for GETs.
    set_cookie = f"{COOKIE}={cookie}; Path=/; HttpOnly; SameSite=Strict"
    await send(
        {
            "type": "http.response.start",
            "status": 303,
            "headers": [
                (b"location", location.encode("latin-1")),
                (b"set-cookie", set_cookie.encode("latin-1")),
                (b"content-length", b"0"),
                *_SECURITY_HEADERS,
            ],
        }
    )
    await send({"type": "http.response.body", "body": b""})
