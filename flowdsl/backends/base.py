"""The store interface: where runs and their node journals are kept.

A store is written through by the scheduler's executors and read back on resume.  It
keeps one :class:`~flowdsl._records.RunRecord` per run and one
:class:`~flowdsl._records.NodeRecord` per finished node; finishing a node writes that
node's record and nothing else.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from .._records import NodeRecord, RunRecord, RunStatus
from .messages import Claimed

__all__ = ["Broker", "Store"]


@runtime_checkable
class Store(Protocol):
    """Durable (or not) storage of runs and node results.  All methods are async."""

    url: str

    async def open(self) -> None:
        """Connect, create tables or keys; idempotent."""

    async def close(self) -> None:
        """Release connections; the store may be opened again."""

    async def create_run(self, record: RunRecord) -> tuple[RunRecord, bool]:
        """Insert *record* unless its run id exists; return the stored record and
        whether it was created now."""

    async def get_run(self, run_id: str) -> RunRecord | None:
        """The run's record, or ``None``."""

    async def update_run(
        self,
        run_id: str,
        *,
        status: RunStatus,
        result: str | None = None,
        error: str | None = None,
        failed_node: str | None = None,
        fingerprint: str | None = None,
        code: dict[str, str] | None = None,
    ) -> None:
        """Change a run's status (and its result, error or resume bookkeeping)."""

    async def commit_node(self, run_id: str, record: NodeRecord) -> bool:
        """Make a node's result durable.  Returns ``False``, keeping the first record, when
        the node was already committed (a duplicate delivery)."""

    async def load_nodes(self, run_id: str) -> dict[str, NodeRecord]:
        """Every committed node of a run."""

    async def forget_nodes(self, run_id: str, node_ids: list[str]) -> None:
        """Drop node records so that those nodes run again on resume."""

    async def list_runs(self, *, limit: int = 50) -> list[RunRecord]:
        """The newest runs first."""

    async def get_cached(self, key: str) -> str | None:
        """A cached step result (JSON text) by cache key."""

    async def put_cached(self, key: str, value: str) -> None:
        """Remember a step result under a cache key."""

    async def put_signal(self, run_id: str, name: str, value: str) -> int:
        """Append *value* (JSON text) to the signals called *name* sent to a run; return
        its index (0 for the first).  Signals are kept until a wait consumes them."""

    async def get_signal(self, run_id: str, name: str, index: int) -> str | None:
        """The *index*-th signal called *name* sent to the run, or ``None`` if not yet."""


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
