"""Key and subject names of the NATS backend and the encoding of what is stored: base64url
tokens for ids (NATS keys refuse or give meaning to most punctuation), UTF-8 bytes, JSON
records, and the checks of what is read back (``Malformed``).
"""

from __future__ import annotations

import base64
import json
import logging
import re
from typing import Any, Final

from .._validate import Malformed

__all__ = [
    "BLOB_HEADER",
    "Malformed",
    "dead_letter_of",
    "dump_json",
    "from_bytes",
    "from_token",
    "load_json",
    "task_ids",
    "to_bytes",
    "to_token",
]

#: A message whose payload is too large for the server is stored in the bucket by content
#: hash; the message carries its hash in this header instead.
BLOB_HEADER: Final = "Flowdsl-Blob"

# --- encoding -------------------------------------------------------------------------------

_TOKEN: Final = re.compile(r"[A-Za-z0-9_-]+")


def to_token(text: str) -> str:
    """*text* as one NATS subject token or key part: base64url, unpadded; ``=`` for ''."""
    raw = text.encode("utf-8", "surrogatepass")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=") or "="


def from_token(part: str) -> str:
    """The text :func:`to_token` made; ValueError for anything it cannot have made."""
    if part == "=":
        return ""
    if not _TOKEN.fullmatch(part):
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


def load_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(from_bytes(data))
    except (UnicodeDecodeError, ValueError):
        raise Malformed(f"{what} is not JSON that flowdsl wrote") from None


def field(data: dict[str, Any], name: str, *kinds: type) -> Any:
    value = data.get(name)
    if type(value) not in kinds:
        raise Malformed(
            f"{name} is {type(value).__name__}, not {'/'.join(k.__name__ for k in kinds)}"
        )
    return value


def check_json_text(text: str, what: str) -> str:
    try:
        json.loads(text)
    except ValueError:
        raise Malformed(f"the stored {what} is not valid JSON") from None
    return text


def run_key(run_id: str) -> str:
    return f"run.{to_token(run_id)}"


def node_key(run_id: str, node_id: str) -> str:
    return f"node.{to_token(run_id)}.{to_token(node_id)}"


def lease_key(run_id: str) -> str:
    return f"lease.{to_token(run_id)}"


def cache_key(key: str) -> str:
    return f"cache.{to_token(key)}"


def id_of(key: str, kind: str) -> str:
    """The id a key's last token encodes; Malformed for a key flowdsl did not make."""
    try:
        return from_token(key.rsplit(".", 1)[-1])
    except (ValueError, UnicodeDecodeError):
        raise Malformed(f"the key {key!r} does not name a {kind}") from None


def task_ids(prefix: str, subject: str) -> tuple[str | None, str | None]:
    """The run and node a task's subject names (None for a subject flowdsl did not make):
    what fails the right run when a payload is unreadable."""
    parts = subject.split(".")
    if len(parts) != 4 or parts[0] != prefix or parts[1] != "tasks":
        return None, None
    try:
        return from_token(parts[2]), from_token(parts[3])
    except (ValueError, UnicodeDecodeError):
        return None, None


def text_of(data: bytes) -> str:
    """A message's payload as text; bytes flowdsl did not write are kept visible (the
    worker or the listener reports them as malformed)."""
    try:
        return data.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return data.decode("utf-8", "replace")


def dead_letter_of(data: bytes, run_id: str) -> dict[str, Any]:
    """A dead letter's message as ``Broker.dead_letters`` lists it."""
    try:
        fields = json.loads(text_of(data))
        if not isinstance(fields, dict):
            raise ValueError("not an object")
        return {
            "node_id": str(fields["node_id"]),
            "reason": str(fields["reason"]),
            "at": float(fields["at"]),
            "payload": str(fields["payload"]),
        }
    except (ValueError, KeyError, TypeError):  # logged, listed as unreadable
        logging.getLogger("flowdsl.nats").warning("an unreadable dead letter of run %s", run_id)
        return {"node_id": "?", "reason": "unreadable dead letter", "at": 0.0, "payload": ""}
