"""URLs in messages: credentials never reach a log line, an error or the terminal."""

from __future__ import annotations

import re

__all__ = ["hide_credentials"]

_USERINFO = re.compile(r"(://)[^/@,?]*@")


def hide_credentials(url: str) -> str:
    """*url* with whatever stands between ``://`` and ``@`` (a user, password or token)
    masked: ``nats://s3cret@host:4222`` becomes ``nats://***@host:4222``."""
    return _USERINFO.sub(r"\1***@", url)
