"""The sealed message format, read without a second encoding.

A task or completion is written (``messages._sealed``) as the JSON text of the message
without its check, its closing brace replaced by ``,"check":"..."}``: the check covers
that text exactly.  So a reader can verify the check over the text it received, cut at
the check, instead of parsing the message and encoding it again to find the text the
check was made over (what ``messages`` did before, a large share of a worker's time on
trivial steps).  The guarantee is the same: the check is verified over the bytes the
message carries, and the message is parsed only after; a text in any other form goes
the long way.
"""

from __future__ import annotations

from typing import Final

__all__ = ["split_sealed"]

_MARK: Final = ',"check":"'


def split_sealed(text: str) -> tuple[str, str] | None:
    """``(body, check)`` of a message written as ``messages._sealed`` writes one: the
    text the check was made over, and the check; ``None`` for a text in another form.

    The check must be the text's last member and a plain string (no quote, no escape),
    so that the parsed message's ``check`` is the one verified over *body*: a JSON object
    whose members repeat keeps the last.
    """
    if not text.endswith('"}'):
        return None
    at = text.rfind(_MARK)
    if at <= 0:
        return None
    check = text[at + len(_MARK) : -2]
    if '"' in check or "\\" in check:
        return None
    return text[:at] + "}", check
