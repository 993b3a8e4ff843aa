"""Redis key names and the encoding of what is stored under them, shared by the store and
the broker: text to bytes and back, node records (inline or by content hash), cache
entries.  Every reader here checks what it reads and raises :class:`Malformed`; the
store turns that into a :class:`~flowdsl.CheckpointError` naming the run and the node.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from json.encoder import encode_basestring as _quoted
from typing import Any, Final

import attrs

from ... import _codec
from ..._integrity import Seal
from ..._records import NodeRecord, RunRecord
from .._validate import Malformed, check_json, load_json, node_record

__all__ = [
    "INLINE_MAX",
    "Layout",
    "Malformed",
    "dead_letter_of",
    "encode_node",
    "entry_field",
    "entry_fields",
    "entry_key",
    "entry_payload",
    "event_args",
    "from_bytes",
    "node_from_fields",
    "parse_cached",
    "parse_node",
    "queued_field",
    "run_fields",
    "stream_entries",
    "to_bytes",
]

#: A value whose UTF-8 text is longer than this many bytes is stored once, by content hash.
INLINE_MAX: Final = 1024


def to_bytes(text: str) -> bytes:
    """UTF-8, keeping lone surrogates (Python text may hold them) byte-exact."""
    return text.encode("utf-8", "surrogatepass")


def from_bytes(data: object, field: str) -> str:
    if not isinstance(data, bytes):
        raise Malformed(f"{field} is missing")
    try:
        return data.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise Malformed(f"{field} is not UTF-8 text") from None


@attrs.frozen
class Layout:
    """Key names under one prefix: the store's and the broker's (see the module docs)."""

    prefix: str

    def run(self, run_id: str) -> str:
        return f"{self.prefix}:run:{run_id}"

    def nodes(self, run_id: str) -> str:
        return f"{self.prefix}:nodes:{run_id}"

    def lease(self, run_id: str) -> str:
        return f"{self.prefix}:lease:{run_id}"

    def blob(self, digest: str) -> str:
        return f"{self.prefix}:blob:{digest}"

    @property
    def runs(self) -> str:
        return f"{self.prefix}:runs"

    @property
    def blobrefs(self) -> str:
        return f"{self.prefix}:blobrefs"

    @property
    def cache(self) -> str:
        return f"{self.prefix}:cache"

    @property
    def no_blob(self) -> str:
        # A key slot for scripts called without a blob (never written).
        return f"{self.prefix}:blob:-"


def encode_node(record: NodeRecord, check: str) -> tuple[bytes, str, bytes]:
    """``(field, digest, blob)`` of a node record with its integrity *check*: digest and
    blob are empty when the value sits inline."""
    data = to_bytes(record.value)
    fields: dict[str, Any] = {}
    digest = ""
    blob = b""
    if len(data) > INLINE_MAX:
        digest = hashlib.sha256(data).hexdigest()
        blob = data
        fields["blob"] = digest  # first: the Lua scripts find it with a pattern
    else:
        fields["value"] = record.value
    fields["attempts"] = record.attempts
    fields["started_at"] = record.started_at
    fields["finished_at"] = record.finished_at
    fields["code"] = record.code
    fields["usage"] = record.usage
    fields["check"] = check
    return _record_json(fields) or to_bytes(_codec.dumps(fields)), digest, blob


def _record_json(fields: dict[str, Any]) -> bytes | None:
    """The bytes ``_codec.dumps`` makes of a node record's *fields*, written out (a
    worker commits thousands a second): None for what the encoder must see to, a usage
    mapping or text that is not UTF-8 (a lone surrogate, which the encoder escapes)."""
    head, first = ("value", fields["value"]) if "value" in fields else ("blob", fields["blob"])
    attempts, started, finished = fields["attempts"], fields["started_at"], fields["finished_at"]
    if (
        fields["usage"] is not None
        or not (type(first) is type(fields["code"]) is type(fields["check"]) is str)
        or type(attempts) is not int
        or type(started) is not float
        or type(finished) is not float
        or not (math.isfinite(started) and math.isfinite(finished))
    ):
        return None
    text = (
        f'{{"{head}":{_quoted(first)},"attempts":{attempts!r},"started_at":{started!r},'
        f'"finished_at":{finished!r},"code":{_quoted(fields["code"])},"usage":null,'
        f'"check":{_quoted(fields["check"])}}}'
    )
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return None


def run_fields(record: RunRecord) -> dict[str, bytes]:
    """A run record's stored fields (the store's run hash), those that are set."""
    fields = {
        "run_id": record.run_id,
        "flow": record.flow,
        "flow_ref": record.flow_ref,
        "fingerprint": record.fingerprint,
        "inputs": record.inputs,
        "status": record.status.value,
        "created_at": repr(record.created_at),
        "updated_at": repr(record.updated_at),
        "result": record.result,
        "error": record.error,
        "failed_node": record.failed_node,
        "code": _codec.dumps(record.code),
        "traceback": record.traceback,
    }
    return {k: to_bytes(v) for k, v in fields.items() if v is not None}


_NODE_KEYS: Final = frozenset({"attempts", "started_at", "finished_at", "code", "usage"})
# Records written before integrity checks have no "check" field.
_OPTIONAL_NODE_KEYS: Final = frozenset({"check"})
_DIGEST_CHARS: Final = frozenset("0123456789abcdef")


def parse_node(raw: object) -> dict[str, Any]:
    """A stored node record's fields, its shape checked (the values, an inline value's
    JSON included, are checked by :func:`node_from_fields`, which alone may know them
    for a verified message's); its value may still be a blob reference."""
    data = load_json(from_bytes(raw, "the record"), "the record")
    if not isinstance(data, dict):
        raise Malformed("the record is not a JSON object")
    keys = set(data)
    inline = "value" in keys
    if inline == ("blob" in keys) or keys - {"value", "blob"} - _OPTIONAL_NODE_KEYS != _NODE_KEYS:
        raise Malformed(f"the record has the fields {sorted(keys)}")
    if not inline and not is_digest(data["blob"]):
        raise Malformed("the blob reference is not a SHA-256 hash")
    return data


def is_digest(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _DIGEST_CHARS


def node_from_fields(
    run_id: str,
    node_id: str,
    data: Mapping[str, Any],
    blob: object,
    seal: Seal,
    expected: NodeRecord | None = None,
) -> NodeRecord:
    """The record :func:`parse_node`'s fields and the value's blob (if any) make, checked
    (its integrity check under *seal* included; see ``node_record``'s *expected*)."""
    if "value" not in data:
        data = {**data, "value": _blob_text(data["blob"], blob)}
    return node_record(run_id, node_id, data, seal, expected=expected)


def blob_text(digest: str, blob: object) -> str:
    return check_json(_blob_text(digest, blob), "value")


def _blob_text(digest: str, blob: object) -> str:
    """The text of a value's *blob*, matched against its *digest* (its JSON unchecked)."""
    if not isinstance(blob, bytes):
        raise Malformed(f"the value's blob {digest[:16]}... is missing")
    if hashlib.sha256(blob).hexdigest() != digest:
        raise Malformed(f"the value's blob {digest[:16]}... does not match its hash")
    return from_bytes(blob, "the value's blob")


def float_text(value: bytes | None, field: str) -> float:
    text = from_bytes(value, field)
    try:
        number = float(text)
    except ValueError:
        raise Malformed(f"{field} is {text!r}, not a timestamp") from None
    if not math.isfinite(number):
        raise Malformed(f"{field} is {text!r}, not a timestamp")
    return number


def parse_cached(raw: object) -> dict[str, Any]:
    data = load_json(from_bytes(raw, "the entry"), "entry")
    if not isinstance(data, dict):
        raise Malformed("the entry is not a value or a blob reference")
    check = data.pop("check", None)
    if len(data) != 1:
        raise Malformed("the entry is not a value or a blob reference")
    data["check"] = check
    if "value" in data and isinstance(data["value"], str):
        load_json(data["value"], "value")
        return data
    if "blob" in data and is_digest(data["blob"]):
        return data
    raise Malformed("the entry is not a value or a blob reference")


# --- stream entries (the broker's) ---------------------------------------------------------


def event_args(events: list[tuple[str, str]] | None) -> list[bytes]:
    out: list[bytes] = []
    for run_id, text in events or ():
        out += [to_bytes(run_id), to_bytes(text)]
    return out


def entry_key(entry_id: Any) -> tuple[int, int]:
    """A stream entry id (``"1700000000000-3"``) as a comparable pair."""
    ms, _, seq = str(entry_id).partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return 0, 0


def dead_letter_of(fields: dict[Any, Any]) -> dict[str, Any]:
    """A dead letter's entry as ``Broker.dead_letters`` lists it (ValueError or
    Malformed when it is not one flowdsl wrote)."""
    at = float(from_bytes(fields.get(b"at"), "at"))
    return {
        "node_id": from_bytes(fields.get(b"node"), "node"),
        "reason": from_bytes(fields.get(b"reason"), "reason"),
        "at": at,
        "payload": from_bytes(fields.get(b"payload"), "payload"),
    }


def queued_field(run_id: str, node_id: str) -> bytes:
    """The ``queued`` hash's field of a node: ``[run_id, node_id]`` as JSON."""
    if _plain(run_id) and _plain(node_id):  # the usual ids: JSON quotes them as they are
        return f'["{run_id}","{node_id}"]'.encode()
    return to_bytes(_codec.dumps([run_id, node_id]))


def _plain(text: str) -> bool:
    """Whether JSON writes *text* between quotes unchanged (printable ASCII, no quote
    or backslash)."""
    return text.isascii() and text.isprintable() and '"' not in text and "\\" not in text


def stream_entries(reply: Any) -> dict[str, list[tuple[bytes, list[Any]]]]:
    """XREAD's or XREADGROUP's reply as it came (RESP2: ``[[stream, entries], ...]``;
    RESP3: a map), by stream: ``(entry id, flat field list)`` pairs.  What is not of that
    shape (an entry deleted while pending has no fields) is left out."""
    streams = reply.items() if isinstance(reply, dict) else reply or []
    out: dict[str, list[tuple[bytes, list[Any]]]] = {}
    for item in streams:
        if not isinstance(item, list | tuple) or len(item) != 2:
            continue
        name, entries = item
        out[from_bytes(name, "stream")] = [
            (e[0], e[1])
            for e in entries or []
            if isinstance(e, list)
            and len(e) == 2
            and isinstance(e[0], bytes)
            and isinstance(e[1], list)
        ]
    return out


def entry_fields(fields: Any) -> dict[Any, Any]:
    if isinstance(fields, list):  # a flat list, as Lua returns it
        return dict(zip(fields[0::2], fields[1::2], strict=False))
    return fields if isinstance(fields, dict) else {}


def entry_field(fields: Any, name: bytes) -> str:
    try:
        return from_bytes(entry_fields(fields).get(name), name.decode())
    except Malformed:
        return ""


def entry_payload(fields: Any) -> str:
    """A stream entry's payload as text (empty when missing).  Bytes that are not UTF-8
    get a prefix no JSON parser accepts: the message fails to decode (a task fails the
    run its entry names) rather than being read with characters replaced."""
    if type(fields) is list and len(fields) == 2 and fields[0] == b"payload":
        raw = fields[1]  # a completion's entry: its payload alone
    else:
        raw = entry_fields(fields).get(b"payload")
    if not isinstance(raw, bytes):
        return ""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return _NOT_UTF8 + raw.decode("utf-8", "replace")


# Prepended to a payload that is not UTF-8 text: it can never parse as a task message.
_NOT_UTF8: Final = "(not UTF-8) "
