"""``ListRuns`` paging: the status filter, and the page token (the last run of a page).

A page token is the last listed run's id and creation time, as JSON in URL-safe base64: the
next page starts after that run in the store's newest-first list, or, if it is gone, after
the runs created at or after its time.
"""

from __future__ import annotations

import base64

from .. import _codec
from .._errors import CodecError
from .._records import RunRecord, RunStatus
from ._errors import ServiceError

__all__ = ["after_cursor", "decode_token", "encode_token", "status_filter"]


def status_filter(status: str) -> RunStatus | None:
    if not status:
        return None
    try:
        return RunStatus(status)
    except ValueError:
        known = ", ".join(s.value for s in RunStatus)
        raise ServiceError(
            f"unknown status {status!r}", code="INVALID_ARGUMENT", hint=f"Use one of {known}"
        ) from None


def encode_token(record: RunRecord) -> str:
    text = _codec.dumps([record.run_id, record.created_at])
    return base64.urlsafe_b64encode(text.encode()).decode()


def decode_token(token: str) -> tuple[str, float]:
    try:
        run_id, created_at = _codec.loads(base64.urlsafe_b64decode(token.encode()))
        if isinstance(run_id, str) and isinstance(created_at, int | float):
            return run_id, float(created_at)
    except (ValueError, TypeError, CodecError):
        pass
    raise ServiceError(
        "page_token is not one this service gave",
        code="INVALID_ARGUMENT",
        hint="Pass the next_page_token of the previous ListRuns reply, or none",
    )


def after_cursor(records: list[RunRecord], cursor: tuple[str, float] | None) -> int:
    """The index of the first record after *cursor* in a newest-first list."""
    if cursor is None:
        return 0
    run_id, created_at = cursor
    for i, record in enumerate(records):
        if record.run_id == run_id:
            return i + 1
    # The cursor's run is gone (or not read yet): go by time.
    for i, record in enumerate(records):
        if record.created_at < created_at:
            return i
    return len(records)
