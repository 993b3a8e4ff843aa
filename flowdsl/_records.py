"""What a store keeps: one record per run, one per finished node (a journal, not snapshots).

Values inside records are JSON text produced by the codec, so every store (memory, SQLite,
Redis, NATS) holds the same bytes and none of them ever holds a live Python object.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs

__all__ = ["Lease", "NodeRecord", "RunRecord", "RunStatus", "add_usage"]


class RunStatus(enum.Enum):
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"
    WAITING = "waiting"  # for a signal (fd.wait_for): no task, no worker, no process

    @property
    def ended(self) -> bool:
        return self is not RunStatus.RUNNING and self is not RunStatus.WAITING


def add_usage(total: dict[str, Any] | None, counts: dict[str, Any]) -> dict[str, Any]:
    """LLM usage *counts* added to *total*: numbers summed per key, other values replaced."""
    out = total if total is not None else {}
    for key, value in counts.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = out.get(key, 0) + value
        else:
            out[key] = value
    return out


@attrs.frozen
class RunRecord:
    """A run: its flow, inputs, graph fingerprint and how it stands."""

    run_id: str
    flow: str  # the flow's name
    flow_ref: str  # ``module:qualname``, so a resume from the shell can import it
    fingerprint: str
    inputs: str  # JSON text of the bound inputs (secrets redacted)
    status: RunStatus
    created_at: float
    updated_at: float
    result: str | None = None  # JSON text of the flow's result
    error: str | None = None
    failed_node: str | None = None
    # Node id -> why a resume ran its journaled result again: "changed" (its step's code,
    # version or wiring changed) or "upstream" (a node it depends on did).
    code: dict[str, str] = attrs.field(factory=dict)
    # The traceback of the exception that failed the run (a failed node's), as masked
    # and bounded text (see flowdsl._tracebacks); None for a record written before.
    traceback: str | None = None


@attrs.frozen
class NodeRecord:
    """A finished node: its encoded result (the chosen case's label, for a branch)."""

    node_id: str
    value: str  # JSON text
    attempts: int
    started_at: float
    finished_at: float
    code: str = ""  # the step's code hash (or version) when it ran
    usage: dict[str, Any] | None = None

    @property
    def duration(self) -> float:
        return self.finished_at - self.started_at


@attrs.frozen
class Lease:
    """Who drives a run, and until when: *owner* (see ``flowdsl._engine.lease``) holds it
    until *expires_at* (wall-clock seconds, ``time.time()``) unless it renews it."""

    run_id: str
    owner: str
    expires_at: float
