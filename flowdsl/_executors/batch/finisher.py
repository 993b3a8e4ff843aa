"""A batch worker's finished tasks, committed and completed many at a time.

A worker's tasks end in a :class:`~flowdsl.backends.messages.Finished`: a node's record to
commit and a completion to publish (with the node's events), or a failure to complete or
dead-letter.  :class:`Finisher` collects them and, while the previous batch is in flight,
gathers the next: a worker finishing thousands of trivial steps a second pays one round
trip for a batch of them rather than one or two each, and a worker finishing one step now
and then sends it at once (no timer holds a batch back).

Exactly once, as for one task at a time: a node's record is committed before its task is
acknowledged (in one atomic step each where the broker holds the store:
``commit_and_complete_many``; else ``Store.commit_nodes`` first, ``complete_many``
after), the first commit wins, and a task whose node another worker committed first is
completed with that record.  A crash between any two writes leaves tasks unacknowledged:
they come back when their leases run out, and the journal check of the worker that takes
them finds their records.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Final

import anyio
import attrs

from ..._errors import BackendUnavailable, CheckpointError
from ...backends.base import Broker, Store
from ...backends.messages import Completion, Finished, encode_completion

__all__ = ["MAX_BATCH", "TRANSIENT", "Finisher"]

log = logging.getLogger("flowdsl.batch")

# Errors a broker or store raises when its server is away; loops wait them out.  Never
# CheckpointError (data that is wrong) or ConfigError (a setting that is wrong): waiting
# mends neither.  (BackendUnavailable is an OSError too, as ConnectionError.)
TRANSIENT = (BackendUnavailable, OSError)

#: Finished tasks sent in one round trip at most (a bound on a script's or a
#: transaction's size, not a wait).
MAX_BATCH: Final = 256


class Finisher:
    """Commits and completes the tasks :meth:`put` hands it, in batches, in the order
    they came.

    *on_commit* is called with the (run id, node id) pairs a batch committed first, once
    that write is done and before their tasks are acknowledged (flowdsl's crash tests stop
    the process there);
    *released* with the task ids of a batch once it is finished, or left to its leases
    because the broker or store is away.
    """

    def __init__(
        self,
        broker: Broker,
        store: Store,
        *,
        name: str,
        on_commit: Callable[[Sequence[tuple[str, str]]], None],
        released: Callable[[Sequence[str]], None],
    ) -> None:
        self.broker = broker
        self.store = store
        self.name = name
        self._on_commit = on_commit
        self._released = released
        self._pending: list[Finished] = []
        self._ready = anyio.Event()
        #: How many batches were sent, and how many tasks they held (for benchmarks).
        self.batches = 0
        self.finished = 0

    def put(self, item: Finished) -> None:
        self._pending.append(item)
        self._ready.set()

    async def run(self) -> None:
        """Finish what comes, until cancelled."""
        while True:
            if not self._pending:
                self._ready = anyio.Event()
                await self._ready.wait()
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            try:
                await self.finish(batch)
            except TRANSIENT as exc:
                # Not acknowledged: the tasks come back when their leases run out, and the
                # journal keeps a committed node from running twice.
                log.warning(
                    "worker %s: %d finished tasks left to their leases: %s",
                    self.name,
                    len(batch),
                    exc,
                )
            except CheckpointError as exc:
                # A broker that refuses the writes (a stream changed by hand, a limit
                # reached): waiting does not mend it, but the tasks' other copies or a
                # person may; the worker goes on with the others.
                log.error(
                    "worker %s: %d finished tasks left to their leases: %s",
                    self.name,
                    len(batch),
                    exc,
                )
            finally:
                self._released([item.task_id for item in batch])

    async def finish(self, batch: Sequence[Finished]) -> None:
        """Commit the records of *batch* and complete its tasks."""
        self.batches += 1
        self.finished += len(batch)
        commits = [item for item in batch if item.record is not None]
        rest = [item for item in batch if item.record is None]
        if commits:
            rest += await self._commit(commits)
        if rest:
            await self.broker.complete_many(rest)

    async def _commit(self, items: list[Finished]) -> list[Finished]:
        """Commit *items*' records; what is left to complete: the first commits' tasks
        where the broker does not complete them with the commit, and those of nodes
        committed before, with the records committed then."""
        broker, store = self.broker, self.store
        if broker.holds(store):
            done = await broker.commit_and_complete_many(items)
            left: list[Finished] = []
        else:
            records = [(i.run_id, i.record) for i in items if i.record is not None]
            done = await store.commit_nodes(records)
            left = [
                attrs.evolve(i, record=None) for i, first in zip(items, done, strict=True) if first
            ]
        self._on_commit(
            [(i.run_id, i.node_id) for i, first in zip(items, done, strict=True) if first]
        )
        late = [item for item, first in zip(items, done, strict=True) if not first]
        if late:
            left += await self._committed_before(late)
        return left

    async def _committed_before(self, items: list[Finished]) -> list[Finished]:
        """Completions of *items* with the records committed first (by a worker that
        died before completing, or one holding another copy of the task); without the
        events of this, discarded, run."""
        for item in items:
            log.info(
                "node %s of run %s was already committed; this result is discarded",
                item.node_id,
                item.run_id,
            )
        seal = self.store.seal
        try:
            stored = await self.store.lookup_nodes([(i.run_id, i.node_id) for i in items])
        except CheckpointError as exc:
            failed = [
                Completion(i.run_id, i.node_id, False, None, str(exc), "checkpoint") for i in items
            ]
            return [
                Finished(i.task_id, i.run_id, i.node_id, encode_completion(c, seal))
                for i, c in zip(items, failed, strict=True)
            ]
        out = []
        for item in items:
            record = stored.get((item.run_id, item.node_id), item.record)
            completion = Completion(item.run_id, item.node_id, True, record)
            payload = encode_completion(completion, seal)
            out.append(Finished(item.task_id, item.run_id, item.node_id, payload))
        return out
