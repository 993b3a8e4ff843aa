"""Many log entries (completions and events) in one message of the log stream.

A worker's finisher completes a batch of tasks at once; one message per completion and
event cost a publish, an ack to parse and a stored message each, and the client a
delivered message each.  They go instead in as few messages on ``{prefix}.log.batch``
as the server's payload limit allows, each a run of frames::

    {kind} {run token} {length}\\n{payload}

*kind* is ``done`` or ``ev``, the run token is the run id as in the per-run subjects
(base64url), *length* the payload's byte count.  Order is kept: a node's events stay
before its completion.  An entry too large for a message of its own goes alone on its
per-run subject, as before (its payload then held in the bucket).

A message read back is untrusted: :func:`split` refuses (``Malformed``) anything it
cannot have been made by :func:`pack`, and the reader drops it with a warning.
"""

from __future__ import annotations

from typing import Final

from .keys import Malformed

__all__ = ["MAX_ENTRIES", "SLOTS", "messages", "split"]

#: Entries per message at most; a log position is ``sequence * SLOTS + index``, so that
#: a cursor can stop inside a message.
SLOTS: Final = 4096
MAX_ENTRIES: Final = SLOTS - 1
_KINDS: Final = frozenset({b"done", b"ev"})
_HEAD_MAX: Final = 256  # kind, run token and length: the token of a long run id is long


def messages(
    prefix: str, entries: list[tuple[str, str, bytes]], limit: int
) -> list[tuple[str, bytes]]:
    """``(subject, payload)`` of the log messages carrying *entries* (``(kind, run token,
    payload)``), in order: runs of them framed in batch messages of at most *limit* bytes
    and :data:`MAX_ENTRIES` entries; one alone, or too large to share a message, on its
    per-run subject (``{prefix}.log.{kind}.{run token}``)."""
    out: list[tuple[str, bytes]] = []
    group: list[tuple[str, str, bytes]] = []
    size = 0

    def flush() -> None:
        if len(group) == 1:
            kind, token, data = group[0]
            out.append((f"{prefix}.log.{kind}.{token}", data))
        elif group:
            body = b"".join(
                b"%s %s %d\n%s" % (k.encode(), t.encode(), len(d), d) for k, t, d in group
            )
            out.append((f"{prefix}.log.batch", body))
        group.clear()

    for kind, token, data in entries:
        cost = len(data) + len(token) + 16
        if group and (size + cost > limit or len(group) >= MAX_ENTRIES):
            flush()
            size = 0
        group.append((kind, token, data))
        size += cost
        if cost > limit:  # alone, on its own subject: the payload goes to the bucket
            flush()
            size = 0
    flush()
    return out


def split(body: bytes) -> list[tuple[str, str, bytes]]:
    """The ``(kind, run token, payload)`` entries of a batch message, in order (the token
    is decoded by who needs the run id)."""
    out: list[tuple[str, str, bytes]] = []
    i, n = 0, len(body)
    while i < n:
        end = body.find(b"\n", i, i + _HEAD_MAX)
        if end < 0:
            raise Malformed("a log batch frame has no readable head")
        parts = body[i:end].split(b" ")
        if len(parts) != 3 or parts[0] not in _KINDS or not parts[2].isdigit():
            raise Malformed("a log batch frame's head is not kind, run and length")
        size = int(parts[2])
        start = end + 1
        if start + size > n:
            raise Malformed("a log batch frame is longer than its message")
        try:
            token = parts[1].decode("ascii")
        except UnicodeDecodeError:
            raise Malformed("a log batch frame does not name a run") from None
        out.append((parts[0].decode("ascii"), token, body[start : start + size]))
        i = start + size
    if len(out) > MAX_ENTRIES:
        raise Malformed("a log batch holds more entries than flowdsl sends")
    return out
