"""What crosses a queue in batch mode, and the broker interface every queue implements.

Three kinds of message, all JSON text made by the codec (never pickle):

- a **task**: one ready node of one run, with its encoded arguments; the scheduler (in the
  process that started or resumed the run) puts it on the queue;
- a **completion**: a worker's answer for a task: the node's committed journal record, or
  why it failed; the scheduler waits for it;
- an **event** of an observed run, produced where the step runs.

A broker only carries these.  The dependency logic stays in the scheduler, the same one
real-time mode runs; the journal stays in the store.  The layout is broker-neutral: the
SQLite queue, Redis Streams and NATS JetStream carry the same messages.
"""

from __future__ import annotations

from typing import Any, Protocol

import attrs

from .. import _codec
from .._errors import CheckpointError, CodecError
from .._records import NodeRecord

__all__ = [
    "Broker",
    "Claimed",
    "Completion",
    "TaskMessage",
    "decode_completion",
    "decode_task",
    "encode_completion",
    "encode_task",
]

PROTOCOL = 1


@attrs.frozen
class TaskMessage:
    """One node to run."""

    run_id: str
    node_id: str
    flow: str
    step: str  # ``module:qualname`` of the step or branch function
    kind: str  # "step" or "branch"
    labels: tuple[str, ...]
    args: tuple[Any, ...]  # encoded data
    kwargs: dict[str, Any]  # encoded data
    marker: str
    observed: bool
    v: int = PROTOCOL


@attrs.frozen
class Completion:
    """A worker's answer for a task.

    ``error_kind`` says how it failed: ``"step"`` (the step raised after its retries),
    ``"codec"``, ``"config"`` (the step cannot be imported where the worker runs),
    ``"checkpoint"`` (the task or state was malformed) or ``"dead"`` (the task was handed
    out more times than the step's retries allow: workers died running it).
    """

    run_id: str
    node_id: str
    ok: bool
    record: NodeRecord | None = None
    error: str | None = None
    error_kind: str | None = None
    v: int = PROTOCOL


@attrs.frozen
class Claimed:
    """A task a worker holds under a lease."""

    task_id: str
    deliveries: int  # how many times it was handed out, this time included
    payload: str  # the task's JSON text, decoded by the worker (it may be malformed)
    # What the broker knows of the task apart from its payload, so that a payload too
    # broken to name its run still fails that run instead of leaving it waiting.
    run_id: str | None = None
    node_id: str | None = None


_converter = _codec.converter


def encode_task(task: TaskMessage) -> str:
    return _codec.dumps(_converter.unstructure(task))


def decode_task(text: str | bytes) -> TaskMessage:
    """A task message from untrusted text; malformed input raises CheckpointError."""
    try:
        data = _codec.loads(text)
        task: TaskMessage = _converter.structure(data, TaskMessage)
    except (CodecError, Exception) as exc:
        run_id = _peek(text, "run_id")
        raise CheckpointError(
            f"malformed task message: {_short(exc)}",
            node=_peek(text, "node_id"),
            hint=f"The queue holds data flowdsl did not write (run {run_id!r}); the run fails, "
            "others go on",
        ) from exc
    if task.v != PROTOCOL:
        raise CheckpointError(
            f"task message of protocol {task.v}, this worker speaks {PROTOCOL}",
            node=task.node_id,
            hint="Run workers of the same flowdsl version as the clients",
        )
    return task


def encode_completion(completion: Completion) -> str:
    return _codec.dumps(_converter.unstructure(completion))


def decode_completion(text: str | bytes) -> Completion:
    try:
        completion: Completion = _converter.structure(_codec.loads(text), Completion)
    except Exception as exc:
        raise CheckpointError(
            f"malformed completion message: {_short(exc)}",
            node=_peek(text, "node_id"),
            hint="The queue holds data flowdsl did not write",
        ) from exc
    return completion


def peek_run_id(text: str | bytes) -> str | None:
    return _peek(text, "run_id")


def _peek(text: str | bytes, key: str) -> str | None:
    try:
        data = _codec.loads(text)
    except CodecError:
        return None
    value = data.get(key) if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) < 300 else text[:300] + "..."


class Broker(Protocol):
    """A durable queue of tasks, with completions and events flowing back."""

    url: str

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def enqueue(self, tasks: list[tuple[str, str, str]]) -> None:
        """Add tasks as ``(run_id, node_id, payload)``; a task for a node that is already
        queued or held is not added twice."""

    async def claim(self, worker: str, limit: int, lease: float) -> list[Claimed]:
        """Up to *limit* tasks, leased to *worker* for *lease* seconds; a task whose lease
        ran out (its worker died) is handed out again."""

    async def extend(self, task_ids: list[str], lease: float) -> None:
        """Renew leases of tasks still being worked on."""

    async def complete(self, task_id: str, run_id: str, node_id: str, payload: str) -> None:
        """Remove the task and publish its completion (JSON text), atomically."""

    async def dead_letter(
        self, task_id: str, run_id: str, node_id: str, payload: str, reason: str
    ) -> None:
        """Move the task to the dead-letter list and publish its failed completion."""

    async def completions(self, cursor: Any) -> tuple[list[str], Any]:
        """Completions published after *cursor* (``None``: from now on), and the new cursor."""

    async def forget_completions(self, upto: Any) -> None:
        """Drop completions up to *upto* that this process has consumed."""

    async def publish_events(self, events: list[tuple[str, str]]) -> None:
        """Publish ``(run_id, event JSON)`` pairs."""

    async def events(self, cursor: Any) -> tuple[list[tuple[str, str]], Any]:
        """Events published after *cursor* (``None``: from now on), and the new cursor."""

    async def forget_events(self, run_id: str) -> None:
        """Drop a finished run's events."""

    async def dead_letters(self, run_id: str) -> list[dict[str, Any]]:
        """The dead-lettered tasks of a run."""

    # Optional, for tidier runs (the executor calls them when present):
    #
    #   async def drop_queued(run_id): remove the run's tasks no worker holds (the run
    #       failed or was cancelled: they would only burn workers' time).
    #   async def redeliver(run_id): make the run's tasks claimable now with their
    #       delivery counts reset (a resume: the run's old workers may have died with it).
    #
    #   carries_events = True: complete(), commit_and_complete() and dead_letter() take an
    #       `events=` list and publish it atomically with the completion, ahead of it.
    #
    # Optional, for a broker that also holds the store (Redis, NATS):
    #
    #   def holds(self, store) -> bool: whether *store* lives on this broker's server.
    #   async def commit_and_complete(task_id, run_id, record, payload) -> bool:
    #       commit the node record and complete the task (publish *payload*) in one
    #       atomic operation, returning True; when the node was already committed, do
    #       nothing and return False (the worker then completes the task with the record
    #       committed first).
