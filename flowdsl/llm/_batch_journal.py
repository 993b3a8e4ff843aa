"""What provider batch jobs leave in the store, and under which ids.

Each request of a job has a ``custom_id`` derived from (run, node, item, call index within
the step's attempt), so that a step run again asks for the same ids in the same order.
When the provider accepts a job, the collector (``_batch``) writes, in the run's store's
cache:

- ``llm-batch:<custom_id>``: ``{"provider", "job", "digest", "round"}``: the job holding
  the request (``null`` once its answer was an error, so that a retry sends it afresh),
  what the request asked (a digest: a changed request is sent anew), and whether it is
  the first submission (0) or the one after a job that did not run it (1);
- ``llm-batch-job:<job id>``: ``{"provider", "runs", "requests"}``, so that a process that
  did not submit the job knows which runs it serves (to cancel it with them).

Entries are read back from a store, so they are checked, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import re
import weakref
from typing import Any, Final

from .._errors import CheckpointError
from .._records import RunStatus
from ._base import where

__all__ = [
    "JOB_PREFIX",
    "JOURNAL_PREFIX",
    "custom_id",
    "job_runs",
    "next_call",
    "read_entry",
    "run_cancelled",
    "write_entry",
]

JOURNAL_PREFIX: Final = "llm-batch:"
JOB_PREFIX: Final = "llm-batch-job:"
MAX_CUSTOM_ID: Final = 64


# --- custom ids ----------------------------------------------------------------------------

_PLAIN = re.compile(r"[A-Za-z0-9_]+")


def custom_id(run_id: str, node_id: str, item: Any, call: int) -> str:
    """The ``custom_id`` of a step's *call*-th request: at most 64 characters of
    ``[A-Za-z0-9_-]``, one for each (run, node, item, call).

    Readable (``run-node-call``, or ``run-node-item-call``) when every part is plain and it
    fits; else ``h-`` and a hash.  Plain parts hold no ``-``, so a readable id splits back
    into its parts, and a hashed one (a single ``-``) never equals a readable one (two or
    more).
    """
    parts = [run_id, node_id, *(() if item is None else (str(item),)), str(call)]
    if all(_PLAIN.fullmatch(part) for part in parts):
        text = "-".join(parts)
        if len(text) <= MAX_CUSTOM_ID:
            return text
    digest = hashlib.sha256(json.dumps(parts).encode()).hexdigest()
    return f"h-{digest[: MAX_CUSTOM_ID - 2]}"


_CALLS: weakref.WeakKeyDictionary[Any, list[int]] = weakref.WeakKeyDictionary()


def next_call(scope: Any) -> int:
    """The index of this request among the requests of the step's current attempt."""
    slot = _CALLS.get(scope)
    if slot is None or slot[0] != scope.attempt:
        slot = [scope.attempt, 0]
        _CALLS[scope] = slot
    slot[1] += 1
    return slot[1] - 1


# --- the journal -----------------------------------------------------------------------------


async def read_entry(store: Any, cid: str) -> dict[str, Any] | None:
    text = await store.get_cached(JOURNAL_PREFIX + cid)
    if text is None:
        return None
    try:
        entry = json.loads(text)
        if not isinstance(entry, dict):
            raise ValueError("not an object")
        job, digest, round_ = entry.get("job"), entry.get("digest"), entry.get("round", 0)
        if not (job is None or isinstance(job, str)) or not isinstance(digest, str):
            raise ValueError("no job or digest")
        if not isinstance(round_, int) or isinstance(round_, bool):
            raise ValueError("a round that is not a number")
    except ValueError as exc:
        raise CheckpointError(
            f"the journal entry of batch request {cid!r} in {store.url} is corrupted: {exc}",
            **where(),
            hint=f"Delete the cache entry {JOURNAL_PREFIX + cid!r} to send the request again",
        ) from None
    return entry


async def write_entry(
    store: Any, cid: str, provider: str, job_id: str | None, digest: str, round_: int
) -> None:
    entry = {"provider": provider, "job": job_id, "digest": digest, "round": round_}
    await store.put_cached(JOURNAL_PREFIX + cid, json.dumps(entry))


async def job_runs(store: Any, job_id: str) -> frozenset[str] | None:
    if store is None:
        return None
    text = await store.get_cached(JOB_PREFIX + job_id)
    try:
        about = json.loads(text) if text is not None else None
        runs = about.get("runs") if isinstance(about, dict) else None
    except ValueError:
        return None
    if not isinstance(runs, list) or not all(isinstance(r, str) for r in runs):
        return None
    return frozenset(runs)


async def run_cancelled(store: Any, run_id: str) -> bool:
    record = await store.get_run(run_id)
    return record is not None and record.status is RunStatus.CANCELLED
