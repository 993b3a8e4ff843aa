"""Batch mode: ready nodes travel as task messages to workers, results come back.

Two halves over one :class:`~flowdsl.backends.base.Broker`:

:class:`BatchExecutor` is the executor the scheduler talks to in batch mode.  ``execute``
encodes the node's arguments into a task, enqueues it, and waits for the completion; a
listener task reads completions (and the events of observed runs) off the broker and
wakes the waiting nodes.  The scheduler does not know the difference.

:class:`Worker` takes tasks off the broker, runs each node with the same runner real-time
mode uses, commits the node's record to the store (first commit wins), then completes
the task.  A worker that dies leaves its leases to expire; the task goes to another worker
and counts as another attempt; past the step's retries it is dead-lettered and the run
fails with that record.  Workers run inside the context (``workers=N``: they can run steps
defined in a notebook) or as ``flowdsl worker`` processes on any machine.
"""

from __future__ import annotations

from ...backends.messages import decode_event, encode_event
from .client import BatchExecutor, RemoteError, StepCheckpointFailed, StepConfigFailed
from .worker import DEFAULT_ASYNC_CONCURRENCY, DEFAULT_MAX_DELIVERIES, UnknownStep, Worker, serve

__all__ = [
    "DEFAULT_ASYNC_CONCURRENCY",
    "DEFAULT_MAX_DELIVERIES",
    "BatchExecutor",
    "RemoteError",
    "StepCheckpointFailed",
    "StepConfigFailed",
    "UnknownStep",
    "Worker",
    "decode_event",
    "encode_event",
    "serve",
]
