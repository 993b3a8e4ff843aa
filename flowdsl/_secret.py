"""Secrets: values that reach steps but never a store, a queue, an event or a log line.

A :class:`Secret` is known everywhere by its *name*; only the name is encoded.  Its value
lives in this process (given to the constructor) or in the environment variable of that
name, and :meth:`Secret.reveal` looks it up where the step runs.  A resumed run, or a batch
worker in another process, needs the value there too: set the environment variable, or
construct ``Secret(name, value)`` once in that process.
"""

from __future__ import annotations

import os
from typing import Any

import attrs

from . import _codec
from ._errors import CodecError, ConfigError

__all__ = ["Secret", "redact", "scrub"]

_VALUES: dict[str, str] = {}
# Every value this process has given a step (revealed), so that error messages and
# tracebacks can be cleaned of them; shorter values would mask ordinary words.
_KNOWN: set[str] = set()
_MIN_REDACTED = 4
MASK = "***"


@attrs.frozen(repr=False)
class Secret:
    """A named secret, for example ``fd.Secret("OPENAI_API_KEY", key)``."""

    name: str
    _value: str | None = attrs.field(default=None, eq=False, alias="value")

    def __attrs_post_init__(self) -> None:
        if not self.name:
            raise ConfigError("a secret needs a name", hint='Write fd.Secret("NAME", value)')
        if self._value is not None:
            _VALUES[self.name] = self._value
            _remember(self._value)

    def reveal(self) -> str:
        """The secret's value: given here, given earlier in this process, or from the env."""
        if self._value is not None:
            return self._value
        value = _VALUES.get(self.name)
        if value is None:
            value = os.environ.get(self.name)
        if value is None:
            raise ConfigError(
                f"secret {self.name!r} has no value in this process",
                hint=f"Set the environment variable {self.name}, or create "
                f"fd.Secret({self.name!r}, value) in this process before the run resumes",
            )
        _remember(value)
        return value

    def __repr__(self) -> str:
        return f"Secret({self.name!r})"

    __str__ = __repr__


def _remember(value: str) -> None:
    if len(value) >= _MIN_REDACTED:
        _KNOWN.add(value)


def redact(text: str) -> str:
    """*text* with the value of every secret this process knows replaced by ``***``."""
    if not _KNOWN or not text:
        return text
    # Longest first: a secret that contains another is masked whole.
    for value in sorted(_KNOWN, key=len, reverse=True):
        if value in text:
            text = text.replace(value, MASK)
    return text


def scrub(exc: BaseException) -> None:
    """Mask known secret values in *exc*'s arguments (what its message and a traceback
    print), and in the exceptions it was raised from, before it is stored or shown."""
    if not _KNOWN:
        return
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        try:
            if redact(str(current)) != str(current):
                current.args = tuple(redact(a) if isinstance(a, str) else a for a in current.args)
                for name in ("problem", "hint", "msg", "message", "reason"):
                    value = getattr(current, name, None)
                    if isinstance(value, str):
                        setattr(current, name, redact(value))
        except Exception:  # noqa: S110 - an exception that refuses new args keeps its own
            pass
        current = current.__cause__ or current.__context__


def _unstructure(secret: Secret) -> dict[str, str]:
    return {"secret": secret.name}


def _structure(data: Any, _: Any) -> Secret:
    if isinstance(data, Secret):
        return data
    if not (isinstance(data, dict) and set(data) == {"secret"} and isinstance(data["secret"], str)):
        raise CodecError(f"expected a secret reference {{'secret': name}}, got {data!r}")
    return Secret(data["secret"])


_codec.converter.register_unstructure_hook(Secret, _unstructure)
_codec.converter.register_structure_hook(Secret, _structure)
