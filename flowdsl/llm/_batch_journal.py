"""What provider batch jobs leave in the store, and under which ids.

Each request of a job has a ``custom_id`` derived from (run, node, item, call index within
the step's attempt), so that a step run again asks for the same ids in the same order.
When the provider accepts a job, the collector (``_batch``) writes, in the run's store's
cache:

- ``llm-batch:<custom_id>``: ``{"provider", "job", "digest", "round"}``: the job holding
  the request (``null`` once its answer was an error, so that a retry sends it afresh),
  what the request asked (a digest: a changed request is sent anew), and whether it is
  the first submission (0) or the one after a job that did not run it (1);
- ``llm-batch-job:<job id>``: ``{"provider", "runs", "requests", "status", "ended",
  "counts"}``: how many of the job's requests are each run's, so that a process that did
  not submit the job knows which runs it serves (to cancel it with them), and how the job
  stood when a process last looked (``status`` as the provider says it, ``counts`` its
  request counts), for ``flowdsl runs show``;
- and, in the store's list of each run's batch jobs (:meth:`Store.add_batch_job
  <flowdsl.backends.base.Store.add_batch_job>`), the job's id, so that any process finds
  a run's jobs from its id.

Entries are read back from a store, so they are checked, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import re
import weakref
from collections.abc import Iterable
from typing import Any, Final

from .._errors import CheckpointError
from .._records import RunStatus
from ._base import where

__all__ = [
    "JOB_PREFIX",
    "JOURNAL_PREFIX",
    "counts",
    "custom_id",
    "encode_lines",
    "job_runs",
    "line_digest",
    "line_size",
    "next_call",
    "note_job_state",
    "read_entry",
    "read_job",
    "run_cancelled",
    "write_entry",
    "write_job",
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


def encode_lines(lines: Iterable[dict[str, Any]]) -> bytes:
    """JSONL: one compact JSON object per line."""
    return b"".join(_encode(line) + b"\n" for line in lines)


def _encode(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def line_size(line: dict[str, Any]) -> int:
    return len(_encode(line)) + 1


def line_digest(line: dict[str, Any]) -> str:
    """What the request asks, without its custom id: a journaled job answers the same
    request only."""
    content = {k: v for k, v in line.items() if k != "custom_id"}
    text = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


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


def counts(reported: Any) -> dict[str, int]:
    """A provider's request counts (an SDK object, or none) as a plain mapping."""
    dump = getattr(reported, "model_dump", None)
    data = dump() if dump is not None else {}
    return {k: n for k, n in data.items() if isinstance(k, str) and type(n) is int}


async def write_job(store: Any, job_id: str, about: dict[str, Any]) -> None:
    await store.put_cached(JOB_PREFIX + job_id, json.dumps(about, sort_keys=True))


async def read_job(store: Any, job_id: str) -> dict[str, Any] | None:
    """The job's record, checked (``None``: none, or one that is not what flowdsl writes,
    which only makes the job unknown: nothing is sent or cancelled on its word)."""
    text = await store.get_cached(JOB_PREFIX + job_id)
    try:
        about = json.loads(text) if text is not None else None
    except ValueError:
        return None
    if not isinstance(about, dict):
        return None
    runs = about.get("runs")
    if isinstance(runs, list):  # as the first version wrote it
        runs = about["runs"] = dict.fromkeys(runs, 0)
    if not isinstance(runs, dict) or not all(
        isinstance(k, str) and type(n) is int for k, n in runs.items()
    ):
        return None
    counts = about.get("counts")
    if not isinstance(counts, dict) or not all(type(n) is int for n in counts.values()):
        about["counts"] = {}
    for field, kind in (("provider", str), ("status", str), ("requests", int)):
        if not isinstance(about.get(field), kind):
            about[field] = kind()
    about["ended"] = about.get("ended") is True
    return about


async def job_runs(store: Any, job_id: str) -> frozenset[str] | None:
    about = None if store is None else await read_job(store, job_id)
    return None if about is None else frozenset(about["runs"])


async def note_job_state(
    store: Any, job_id: str, status: str, ended: bool, counts: dict[str, int]
) -> None:
    """Record how job *job_id* stands, for whoever shows it."""
    about = await read_job(store, job_id)
    if about is None or (about["ended"] and not ended):
        return  # not ours, or a late look of a slower process: the end stands
    about.update(status=status, ended=ended, counts=counts)
    await write_job(store, job_id, about)


async def run_cancelled(store: Any, run_id: str) -> bool:
    record = await store.get_run(run_id)
    return record is not None and record.status is RunStatus.CANCELLED
