"""The one check of a record read back from a store, shared by the SQLite, Redis and NATS
stores.

What a store reads is data from outside: a file, a server that other programs write to.
Each store first takes its own encoding apart (SQLite columns, Redis hash fields, NATS
JSON, blobs fetched by hash) into plain values; :func:`run_record` and
:func:`node_record` then check those values the same way for every store and build the
record.  Anything that is not what flowdsl writes raises :class:`Malformed`, which the
store turns into a :class:`~flowdsl.CheckpointError` naming the run and the node with
:func:`corrupted`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .. import _codec
from .._errors import CheckpointError, CodecError
from .._integrity import UNKEYED, Invalid, Seal
from .._records import NodeRecord, RunRecord, RunStatus

__all__ = [
    "RUN_FIELDS",
    "Malformed",
    "check_cached",
    "check_json",
    "corrupted",
    "load_json",
    "node_record",
    "run_record",
    "text",
    "timestamp",
]

#: The fields a store keeps of a run, in the order SQLite's SELECTs name its columns.
RUN_FIELDS: tuple[str, ...] = (
    "run_id",
    "flow",
    "flow_ref",
    "fingerprint",
    "inputs",
    "status",
    "created_at",
    "updated_at",
    "result",
    "error",
    "failed_node",
    "code",
    "check",
    "state_check",
    "traceback",
)


class Malformed(Exception):
    """A stored value that does not hold what flowdsl writes; its text says which and why."""


def text(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise Malformed(f"{field} is {type(value).__name__}, not text")
    return value


def optional_text(value: object, field: str) -> str | None:
    return None if value is None else text(value, field)


def load_json(data: str, field: str) -> Any:
    """The value JSON text *data* holds; Malformed when it is not JSON."""
    try:
        return _codec.loads(data)
    except CodecError:
        raise Malformed(f"the stored {field} is not valid JSON") from None


def check_json(value: object, field: str) -> str:
    """*value* itself, once it is known to be text holding valid JSON."""
    data = text(value, field)
    load_json(data, field)
    return data


def timestamp(value: object, field: str) -> float:
    if type(value) is not float and type(value) is not int:
        raise Malformed(f"{field} is {type(value).__name__}, not a timestamp")
    if not math.isfinite(value):
        raise Malformed(f"{field} is {value!r}, not a timestamp")
    return float(value)


def _status(value: object) -> RunStatus:
    try:
        return RunStatus(value)
    except ValueError:
        raise Malformed(f"status {value!r} is not a known run status") from None


def _code_map(value: object) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise Malformed("code is not a mapping of node ids to code hashes")
    return value


def _attempts(value: object) -> int:
    if type(value) is not int or value < 0:
        raise Malformed(f"attempts is {value!r}, not a count")
    return value


def _usage(value: object) -> dict[str, Any] | None:
    if value is not None and not isinstance(value, dict):
        raise Malformed("usage is not a mapping")
    return value


def run_record(run_id: str, fields: Mapping[str, object], seal: Seal = UNKEYED) -> RunRecord:
    """The run record *fields* describe, checked.

    *fields* holds every attribute of :class:`~flowdsl._records.RunRecord` as plain
    values: texts (``inputs`` and ``result`` JSON text), numbers for the times, the
    status's text and ``code`` as a mapping; ``result``, ``error``, ``failed_node`` and
    ``traceback`` may be None (``traceback`` missing: older records lack it).  The record
    must be of the run it was read for, and its integrity checks
    (``check`` over its identity and inputs, ``state_check`` over how it stands) must hold
    under *seal* (see :mod:`flowdsl._integrity`).
    """
    stored_id = text(fields.get("run_id"), "run_id")
    if stored_id != run_id:
        raise Malformed(f"the record is of run {stored_id!r}")
    result = fields.get("result")
    record = RunRecord(
        run_id=stored_id,
        flow=text(fields.get("flow"), "flow"),
        flow_ref=text(fields.get("flow_ref"), "flow_ref"),
        fingerprint=text(fields.get("fingerprint"), "fingerprint"),
        inputs=check_json(fields.get("inputs"), "inputs"),
        status=_status(fields.get("status")),
        created_at=timestamp(fields.get("created_at"), "created_at"),
        updated_at=timestamp(fields.get("updated_at"), "updated_at"),
        result=None if result is None else check_json(result, "result"),
        error=optional_text(fields.get("error"), "error"),
        failed_node=optional_text(fields.get("failed_node"), "failed_node"),
        code=_code_map(fields.get("code")),
        traceback=optional_text(fields.get("traceback"), "traceback"),
    )
    try:
        seal.verify_run_head(record, fields.get("check"))
        seal.verify_run_state(record, fields.get("state_check"))
    except Invalid as exc:
        raise Malformed(f"the run record: {exc}") from None
    return record


def node_record(
    run_id: str,
    node_id: str,
    fields: Mapping[str, object],
    seal: Seal = UNKEYED,
    *,
    expected: NodeRecord | None = None,
) -> NodeRecord:
    """The node record *fields* describe, checked: ``value`` JSON text, ``attempts`` a
    count, the times numbers, ``code`` text and ``usage`` a mapping or None; its
    ``check`` must hold for this run and node under *seal*.

    *expected* is the record a verified message (a sealed completion) says was committed:
    fields identical to it are that record, already checked, and are taken as it is."""
    if expected is not None and _same_fields(node_id, fields, expected):
        return expected
    record = NodeRecord(
        node_id=node_id,
        value=check_json(fields.get("value"), "value"),
        attempts=_attempts(fields.get("attempts")),
        started_at=timestamp(fields.get("started_at"), "started_at"),
        finished_at=timestamp(fields.get("finished_at"), "finished_at"),
        code=text(fields.get("code"), "code"),
        usage=_usage(fields.get("usage")),
    )
    try:
        seal.verify_node(run_id, record, fields.get("check"))
    except Invalid as exc:
        raise Malformed(f"the record of this node: {exc}") from None
    return record


def _same_fields(node_id: str, fields: Mapping[str, object], record: NodeRecord) -> bool:
    value, attempts = fields.get("value"), fields.get("attempts")
    return (
        record.node_id == node_id
        and type(value) is str
        and value == record.value
        and type(attempts) is int
        and attempts == record.attempts
        and fields.get("started_at") == record.started_at
        and fields.get("finished_at") == record.finished_at
        and fields.get("code") == record.code
        and fields.get("usage") == record.usage
    )


def check_cached(seal: Seal, key: str, value: str, check: object) -> None:
    """Malformed unless *check* holds for the cached *value* under cache *key*."""
    try:
        seal.verify_cached(key, value, check)
    except Invalid as exc:
        raise Malformed(f"the cached value: {exc}") from None


def corrupted(
    where: str, run_id: str, node_id: str | None, what: str, hint: str
) -> CheckpointError:
    """The error for a record of *run_id* (and *node_id*) in *where* that is malformed."""
    return CheckpointError(
        f"run {run_id!r} in {where} is corrupted: {what}", node=node_id, hint=hint
    )
