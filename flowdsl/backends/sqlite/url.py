"""SQLite URLs: ``sqlite:///relative.db``, ``sqlite:////absolute.db``, ``sqlite://:memory:``,
with ``?durability=full&busy_timeout=SECONDS``."""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import parse_qsl

from ..._errors import ConfigError

__all__ = ["bad_url", "url_options"]

URL_FORM: Final = "sqlite:///relative/path.db, sqlite:////absolute/path.db or sqlite://:memory:"


def url_options(url: str, query: str) -> dict[str, Any]:
    """The store options in a URL's query string (``durability``, ``busy_timeout``)."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        raise bad_url(url, f"cannot read the options {query!r}") from None
    options: dict[str, Any] = {}
    for name, value in pairs:
        if name == "durability":
            if value not in ("normal", "full"):
                raise bad_url(url, f"durability={value!r} is neither 'normal' nor 'full'")
            options["durability"] = value
        elif name == "busy_timeout":
            try:
                seconds = float(value)
            except ValueError:
                seconds = -1.0
            if not seconds >= 0:
                raise bad_url(url, f"busy_timeout={value!r} is not a number of seconds")
            options["busy_timeout"] = seconds
        else:
            raise bad_url(url, f"unknown option {name!r}")
    return options


def bad_url(url: str, why: str | None = None) -> ConfigError:
    problem = f"malformed SQLite store URL {url!r}"
    if why:
        problem = f"{problem}: {why}"
    return ConfigError(
        problem,
        hint=f"Use {URL_FORM}, optionally with ?durability=full&busy_timeout=SECONDS",
    )
