"""The store interface: where runs and their node journals are kept.

A store is written through by the scheduler's executors and read back on resume.  It
keeps one :class:`~flowdsl._records.RunRecord` per run and one
:class:`~flowdsl._records.NodeRecord` per finished node; finishing a node writes that
node's record and nothing else.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .._records import NodeRecord, RunRecord, RunStatus

__all__ = ["Store"]


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
