"""The in-memory store: the default for real-time contexts; gone when the process ends."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence

import attrs

from .._records import Lease, NodeRecord, RunRecord, RunStatus
from .base import ExpectedNodes, Store

__all__ = ["MemoryStore"]


class MemoryStore(Store):
    """Keeps runs in a dict.  Ended runs beyond ``max_runs`` are forgotten, oldest first,
    so a long-lived process that runs flows forever does not grow without bound."""

    commits_nowait = True  # a commit is a dict assignment
    process_local = True  # no other process sees it: its leases need no renewal

    def __init__(self, *, max_runs: int = 10_000) -> None:
        self.url = "memory://"
        self.max_runs = max_runs
        self._runs: OrderedDict[str, RunRecord] = OrderedDict()
        self._nodes: dict[str, dict[str, NodeRecord]] = {}
        self._cache: dict[str, str] = {}
        self._signals: dict[tuple[str, str], list[str]] = {}
        self._leases: dict[str, Lease] = {}

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def create_run(self, record: RunRecord) -> tuple[RunRecord, bool]:
        existing = self._runs.get(record.run_id)
        if existing is not None:
            return existing, False
        self._runs[record.run_id] = record
        self._nodes[record.run_id] = {}
        self._evict()
        return record, True

    def _evict(self) -> None:
        excess = len(self._runs) - self.max_runs
        if excess <= 0:
            return
        # Oldest first, ended runs only; stop as soon as enough are found, so a store at
        # its cap costs one short walk per new run, not a copy of every id.
        ended = []
        for run_id, record in self._runs.items():
            if record.status.ended:
                ended.append(run_id)
                if len(ended) == excess:
                    break
        for run_id in ended:
            del self._runs[run_id]
            self._nodes.pop(run_id, None)
            self._leases.pop(run_id, None)

    async def get_run(self, run_id: str) -> RunRecord | None:
        return self._runs.get(run_id)

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
        traceback: str | None = None,
    ) -> None:
        from .._errors import CheckpointError

        record = self._runs.get(run_id)
        if record is None:
            raise CheckpointError(
                f"run {run_id!r} does not exist in {self.url}",
                hint="Create the run before updating it",
            )
        changes: dict[str, object] = {
            "status": status,
            "result": result,
            "error": error,
            "failed_node": failed_node,
            "traceback": traceback,
            "updated_at": time.time(),
        }
        if fingerprint is not None:
            changes["fingerprint"] = fingerprint
        if code is not None:
            changes["code"] = code
        self._runs[run_id] = attrs.evolve(record, **changes)  # type: ignore[arg-type]

    async def commit_node(self, run_id: str, record: NodeRecord) -> bool:
        return self.commit_node_nowait(run_id, record)

    def commit_node_nowait(self, run_id: str, record: NodeRecord) -> bool:
        """:meth:`commit_node` without awaiting: the write is a dict assignment."""
        nodes = self._nodes.setdefault(run_id, {})
        if record.node_id in nodes:
            return False
        nodes[record.node_id] = record
        return True

    async def load_nodes(self, run_id: str) -> dict[str, NodeRecord]:
        return dict(self._nodes.get(run_id, {}))

    async def lookup_nodes(
        self, keys: Sequence[tuple[str, str]], *, expected: ExpectedNodes = None
    ) -> dict[tuple[str, str], NodeRecord]:
        found = {}
        for run_id, node_id in keys:
            record = self._nodes.get(run_id, {}).get(node_id)
            if record is not None:
                found[run_id, node_id] = record
        return found

    async def forget_nodes(self, run_id: str, node_ids: list[str]) -> None:
        nodes = self._nodes.get(run_id, {})
        for node_id in node_ids:
            nodes.pop(node_id, None)

    async def prune(
        self, *, older_than: float, statuses: frozenset[RunStatus] | None = None
    ) -> list[str]:
        from time import time

        cutoff = time() - older_than
        pruned = [
            run_id
            for run_id, record in self._runs.items()
            if record.status.ended
            and record.updated_at < cutoff
            and (statuses is None or record.status in statuses)
        ]
        gone = set(pruned)
        for run_id in pruned:
            del self._runs[run_id]
            self._nodes.pop(run_id, None)
            self._leases.pop(run_id, None)
        for key in [k for k in self._signals if k[0] in gone]:
            del self._signals[key]
        return pruned

    async def list_runs(self, *, limit: int = 50) -> list[RunRecord]:
        # Newest first; among equal times, the later created first (as SQLite orders).
        ordered = sorted(
            enumerate(self._runs.values()), key=lambda p: (p[1].created_at, p[0]), reverse=True
        )
        return [run for _, run in ordered[: max(limit, 0)]]

    # Every method below is one synchronous step on a dict: atomic in a process.

    async def acquire_lease(
        self, run_id: str, owner: str, ttl: float, *, replacing: str | None = None
    ) -> Lease | None:
        now = time.time()
        held = self._leases.get(run_id)
        if held is None or held.owner in (owner, replacing) or held.expires_at <= now:
            self._leases[run_id] = Lease(run_id, owner, now + ttl)
            return None
        return held

    async def renew_leases(self, owner: str, run_ids: Sequence[str], ttl: float) -> list[str]:
        until = time.time() + ttl
        lost = []
        for run_id in run_ids:
            held = self._leases.get(run_id)
            if held is None or held.owner != owner:
                lost.append(run_id)
            else:
                self._leases[run_id] = Lease(run_id, owner, until)
        return lost

    async def release_lease(self, run_id: str, owner: str) -> None:
        held = self._leases.get(run_id)
        if held is not None and held.owner == owner:
            del self._leases[run_id]

    async def get_cached(self, key: str) -> str | None:
        return self._cache.get(key)

    async def put_cached(self, key: str, value: str) -> None:
        self._cache[key] = value

    # --- signals (fd.wait_for) --------------------------------------------------------------

    async def put_signal(self, run_id: str, name: str, value: str) -> int:
        """Append *value* (JSON text) to the run's signals called *name*; its index."""
        queue = self._signals.setdefault((run_id, name), [])
        queue.append(value)
        return len(queue) - 1

    async def get_signal(self, run_id: str, name: str, index: int) -> str | None:
        """The *index*-th signal *name* sent to the run (from 0), or ``None`` if not yet."""
        queue = self._signals.get((run_id, name), ())
        return queue[index] if 0 <= index < len(queue) else None


def open_store(url: str) -> MemoryStore:
    return MemoryStore()
