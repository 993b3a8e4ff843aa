"""URLs in messages: credentials never reach a log line, an error or the terminal.

:func:`hide_credentials` is the one helper every place that shows a URL uses: tables,
errors, banners, logs and reprs.
"""

from __future__ import annotations

import re

__all__ = ["hide_credentials"]

# scheme://userinfo@ ; userinfo may hold anything but '/', '@' (several servers: ',').
_USERINFO = re.compile(r"(://)([^/@,?#\s]*)@")
# Options in a query string that hold a credential (redis-py's password=, a token=...).
_SECRET_OPTION = re.compile(
    r"([?&;](?:password|passwd|pass|pwd|token|auth|secret|api_key|apikey|key|user_credentials"
    r"|nkeys_seed|creds)=)[^&;#\s]*",
    re.IGNORECASE,
)


def _mask(match: re.Match[str]) -> str:
    userinfo = match.group(2)
    user, colon, _ = userinfo.partition(":")
    # user:password keeps the user (it helps, and is no secret); a bare token or a
    # password alone is masked whole.
    shown = f"{user}:***" if colon else "***"
    return f"{match.group(1)}{shown}@"


def hide_credentials(url: str) -> str:
    """*url* with its credentials masked: ``nats://s3cret@host:4222`` becomes
    ``nats://***@host:4222``, ``redis://app:pw@host`` ``redis://app:***@host``, and an
    option such as ``?password=pw`` ``?password=***``."""
    return _SECRET_OPTION.sub(r"\1***", _USERINFO.sub(_mask, url))
