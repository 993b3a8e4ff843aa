"""Retention: how long ended runs are kept, shared by every store and the command line.

``flowdsl runs prune --older-than 30d`` and a store's ``ttl`` option (``?ttl=7d`` on a
Redis or NATS URL) both take a duration: a number of seconds, or a number followed by
``s``, ``m``, ``h``, ``d`` or ``w``.
"""

from __future__ import annotations

import math
import re
from typing import Final

from .._errors import ConfigError
from .._records import RunStatus

__all__ = ["ENDED", "parse_duration", "parse_ttl"]

#: The statuses a run may be pruned in: every one but running.
ENDED: Final = frozenset(s for s in RunStatus if s.ended)

_UNITS: Final = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION: Final = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*")


def parse_duration(text: str) -> float:
    """Seconds in *text* (``90``, ``90s``, ``15m``, ``12h``, ``30d``, ``2w``); ValueError
    for anything else."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration (for example 90s, 15m, 12h, 30d, 2w)")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if not math.isfinite(seconds):
        raise ValueError(f"{text!r} is not a duration")
    return seconds


def parse_ttl(value: str | float | None, shown: str) -> float | None:
    """A store's ``ttl`` option as seconds (None: runs are kept until pruned)."""
    if value is None or value == "":
        return None
    try:
        seconds = float(value) if not isinstance(value, str) else parse_duration(value)
    except ValueError as exc:
        raise ConfigError(
            f"the ttl of {shown} is not a duration: {exc}",
            hint="For example ?ttl=7d (ended runs are deleted 7 days after they end)",
        ) from None
    if not seconds > 0:
        raise ConfigError(f"the ttl of {shown} must be positive, not {value!r}")
    return seconds
