"""The two backend interfaces: :class:`Store` (where runs and their journals are kept) and
:class:`Broker` (what carries tasks, completions and events in batch mode).

Both are abstract base classes: every backend subclasses them.  What every backend must do
is abstract; what only some can do is declared here with a default, next to a flag (or a
query) that says whether the backend offers it, so that callers branch on a declared
capability rather than probe for attributes:

=====================================  ===================================================
capability                             declared as
=====================================  ===================================================
a commit that does not await           ``Store.commits_nowait`` / ``commit_node_nowait``
leases no other process can see        ``Store.process_local``
commit and completion in one step      ``Broker.holds(store)`` / ``commit_and_complete``
many tasks finished in one round trip  ``Store.commit_nodes``, ``Broker.complete_many``,
                                       ``Broker.commit_and_complete_many`` (one call per
                                       item by default)
events published with the completion   ``Broker.carries_events`` (the ``events=`` argument
                                       is always accepted; without the flag the events are
                                       published just before, not atomically)
tidier runs                            ``drop_queued``, ``redeliver`` (no-ops by default)
reads bounded to a batch               ``read_completions`` / ``read_events`` (``count=``;
                                       by default unbounded: the whole backlog)
one connection for store and queue     ``Broker.share_store`` (a no-op by default)
a run's provider batch jobs            ``add_batch_job`` / ``batch_jobs``: every store,
                                       through its signals (see below)
=====================================  ===================================================

A store keeps one :class:`~flowdsl._records.RunRecord` per run and one
:class:`~flowdsl._records.NodeRecord` per finished node; finishing a node writes that
node's record and nothing else.

It also keeps each run's *lease* (:class:`~flowdsl._records.Lease`): which process drives
the run, until when.  Taking it is one atomic step in every store (a conditional write, a
Lua script, a revision compare-and-set), so that of two processes that resume or start
one run, one drives it and the other waits for its result.  What a store promises:

- :meth:`Store.acquire_lease` takes the lease when no one holds it, when it ran out,
  when the caller holds it already, or when the holder is the one the caller names as
  ``replacing`` (a holder the caller knows is dead); else it returns the lease that
  stands in the way and changes nothing;
- :meth:`Store.renew_leases` extends the caller's leases and reports those it no longer
  holds (another took one over after it ran out): never one another holds as renewed;
- :meth:`Store.release_lease` gives the lease up, only if the caller holds it.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, ClassVar

from .._errors import CheckpointError
from .._integrity import UNKEYED, Invalid, Seal
from .._records import Lease, NodeRecord, RunRecord, RunStatus
from .messages import Claimed, Finished

__all__ = ["Broker", "ExpectedNodes", "Store"]

#: What :meth:`Store.lookup_nodes` may be told to expect: ``(run_id, node_id)`` to the
#: record a verified message (a sealed completion) says was committed.
ExpectedNodes = Mapping[tuple[str, str], NodeRecord] | None

# The signal name a run's provider batch jobs are listed under: not an identifier, so no
# fd.wait_for name (always one) can meet it.
_BATCH_JOBS = "llm-batch-jobs"


class Store(abc.ABC):
    """Durable (or not) storage of runs and node results.  All methods are async."""

    url: str

    #: How records are checked: every record is written with a check made by this seal
    #: and refused on reading when its check does not hold (see :mod:`flowdsl._integrity`).
    #: A context with a signing key sets a keyed seal here.
    seal: Seal = UNKEYED

    #: Whether :meth:`commit_node_nowait` is offered: the store's commit is a synchronous
    #: write (a dict, an embedded file), so a node can be committed without awaiting.
    commits_nowait: ClassVar[bool] = False

    #: Whether only this process can see the store (the memory store): its run leases
    #: need no expiry and no renewal, only the check of which drivers here are alive.
    process_local: ClassVar[bool] = False

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect, create tables or keys; idempotent."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections; the store may be opened again."""

    @abc.abstractmethod
    async def create_run(self, record: RunRecord) -> tuple[RunRecord, bool]:
        """Insert *record* unless its run id exists; return the stored record and
        whether it was created now."""

    @abc.abstractmethod
    async def get_run(self, run_id: str) -> RunRecord | None:
        """The run's record, or ``None``."""

    @abc.abstractmethod
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
        """Change a run's status (and its result, error or resume bookkeeping).  *result*,
        *error*, *failed_node* and *traceback* replace what the record held (``None``
        clears them)."""

    @abc.abstractmethod
    async def commit_node(self, run_id: str, record: NodeRecord) -> bool:
        """Make a node's result durable.  Returns ``False``, keeping the first record, when
        the node was already committed (a duplicate delivery)."""

    async def commit_nodes(self, records: Sequence[tuple[str, NodeRecord]]) -> list[bool]:
        """:meth:`commit_node` for each ``(run_id, record)``, in as few round trips as the
        store can (what a batch worker's finished tasks are committed with); one bool each,
        in order.  By default one call each."""
        return [await self.commit_node(run_id, record) for run_id, record in records]

    def commit_node_nowait(self, run_id: str, record: NodeRecord) -> bool:
        """:meth:`commit_node` without awaiting, where :attr:`commits_nowait` says so."""
        raise NotImplementedError(f"{type(self).__name__} has no synchronous commit")

    @abc.abstractmethod
    async def load_nodes(self, run_id: str) -> dict[str, NodeRecord]:
        """Every committed node of a run."""

    async def load_node(self, run_id: str, node_id: str) -> NodeRecord | None:
        """One committed node of a run, or ``None``.  By default through
        :meth:`load_nodes`; stores that can read one record alone do."""
        return (await self.load_nodes(run_id)).get(node_id)

    @abc.abstractmethod
    async def lookup_nodes(
        self, keys: Sequence[tuple[str, str]], *, expected: ExpectedNodes = None
    ) -> dict[tuple[str, str], NodeRecord]:
        """The committed records among *keys* (``(run_id, node_id)`` pairs), read in one
        round trip where the store can: what a batch worker checks before it runs the
        tasks it has just claimed.  *expected* holds records verified messages say were
        committed: a stored one identical to its expected record may be taken without
        verifying its check again."""

    @abc.abstractmethod
    async def forget_nodes(self, run_id: str, node_ids: list[str]) -> None:
        """Drop node records so that those nodes run again on resume."""

    @abc.abstractmethod
    async def list_runs(self, *, limit: int = 50) -> list[RunRecord]:
        """The newest runs first."""

    async def unfinished_runs(self) -> list[RunRecord]:
        """Every run still running or waiting, in no particular order: the runs a driver
        that died may have left (what a service looks through to take them up).  This
        reads every run; a store that can select by status does."""
        records = await self.list_runs(limit=2**62)
        return [record for record in records if not record.status.ended]

    # --- the run lease (see the module docstring) ----------------------------------------

    @abc.abstractmethod
    async def acquire_lease(
        self, run_id: str, owner: str, ttl: float, *, replacing: str | None = None
    ) -> Lease | None:
        """Take *run_id*'s lease for *owner* until *ttl* seconds from now, atomically:
        ``None`` when taken (or renewed), else the standing lease, unchanged."""

    @abc.abstractmethod
    async def renew_leases(self, owner: str, run_ids: Sequence[str], ttl: float) -> list[str]:
        """Extend *owner*'s leases of *run_ids* to *ttl* seconds from now; return the run
        ids whose lease *owner* no longer holds."""

    @abc.abstractmethod
    async def release_lease(self, run_id: str, owner: str) -> None:
        """Drop *run_id*'s lease if *owner* holds it."""

    @abc.abstractmethod
    async def prune(
        self, *, older_than: float, statuses: frozenset[RunStatus] | None = None
    ) -> list[str]:
        """Delete the ended runs last updated more than *older_than* seconds ago (of the
        given *statuses*; by default every ended status), with their journals; return
        their ids.  A running run is never pruned."""

    @abc.abstractmethod
    async def get_cached(self, key: str) -> str | None:
        """A cached step result (JSON text) by cache key."""

    @abc.abstractmethod
    async def put_cached(self, key: str, value: str) -> None:
        """Remember a step result under a cache key."""

    @abc.abstractmethod
    async def put_signal(self, run_id: str, name: str, value: str) -> int:
        """Append *value* (JSON text) to the signals called *name* sent to a run; return
        its index (0 for the first).  Signals are kept until a wait consumes them."""

    @abc.abstractmethod
    async def get_signal(self, run_id: str, name: str, index: int) -> str | None:
        """The *index*-th signal called *name* sent to the run, or ``None`` if not yet."""

    # --- a run's provider batch jobs (fd.llm batch_api=) -----------------------------------

    async def add_batch_job(self, run_id: str, job_id: str) -> None:
        """Note that provider batch job *job_id* holds requests of run *run_id*, so that
        any process can find the run's jobs (to cancel them with it, to show them).

        Every store keeps them as it keeps signals, an append-only list per run that two
        processes can add to at once and that is pruned with the run: one entry per job,
        whose check binds the job id to the run."""
        check = self.seal.make("batch-job", run_id, job_id)
        await self.put_signal(run_id, _BATCH_JOBS, json.dumps({"job": job_id, "check": check}))

    async def batch_jobs(self, run_id: str) -> list[str]:
        """The ids of the provider batch jobs noted for run *run_id*, oldest first."""
        jobs: list[str] = []
        while (text := await self.get_signal(run_id, _BATCH_JOBS, len(jobs))) is not None:
            try:
                entry = json.loads(text)
                job_id = entry.get("job") if isinstance(entry, dict) else None
                if not isinstance(job_id, str):
                    raise Invalid("it names no job")
                self.seal.verify(entry.get("check"), "batch-job", run_id, job_id)
            except (ValueError, Invalid) as exc:
                raise CheckpointError(
                    f"run {run_id!r} in {self.url} is corrupted: its batch job list, entry "
                    f"{len(jobs)}: {exc}",
                    hint="Restore the store from a backup; the run's batch jobs can still be "
                    "seen and cancelled at the provider",
                ) from None
            jobs.append(job_id)
        return list(dict.fromkeys(jobs))


class Broker(abc.ABC):
    """A durable queue of tasks, with completions and events flowing back."""

    url: str

    #: How records the broker commits (:meth:`commit_and_complete`) are checked; set with
    #: the store's (see :attr:`Store.seal`).
    seal: Seal = UNKEYED

    #: Whether :meth:`complete`, :meth:`commit_and_complete` and :meth:`dead_letter`
    #: publish their ``events`` atomically with the completion, ahead of it.  Without it
    #: they publish them with :meth:`publish_events` just before.
    carries_events: ClassVar[bool] = False

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def enqueue(self, tasks: list[tuple[str, str, str]]) -> None:
        """Add tasks as ``(run_id, node_id, payload)``; a task for a node that is already
        queued or held is not added twice."""

    @abc.abstractmethod
    async def claim(self, worker: str, limit: int, lease: float) -> list[Claimed]:
        """Up to *limit* tasks, leased to *worker* for *lease* seconds; a task whose lease
        ran out (its worker died) is handed out again."""

    @abc.abstractmethod
    async def extend(self, task_ids: list[str], lease: float) -> None:
        """Renew leases of tasks still being worked on."""

    @abc.abstractmethod
    async def complete(
        self,
        task_id: str,
        run_id: str,
        node_id: str,
        payload: str,
        *,
        events: list[tuple[str, str]] | None = None,
    ) -> None:
        """Remove the task and publish its completion (JSON text), atomically; the node's
        *events* go first (see :attr:`carries_events`)."""

    @abc.abstractmethod
    async def dead_letter(
        self,
        task_id: str,
        run_id: str,
        node_id: str,
        payload: str,
        reason: str,
        *,
        events: list[tuple[str, str]] | None = None,
    ) -> None:
        """Move the task to the dead-letter list and publish its failed completion."""

    @abc.abstractmethod
    async def completions(self, cursor: Any) -> tuple[list[str], Any]:
        """Completions published after *cursor* (``None``: from now on), and the new cursor."""

    @abc.abstractmethod
    async def forget_completions(self, upto: Any) -> None:
        """Drop completions up to *upto* that this process has consumed."""

    @abc.abstractmethod
    async def publish_events(self, events: list[tuple[str, str]]) -> None:
        """Publish ``(run_id, event JSON)`` pairs."""

    @abc.abstractmethod
    async def events(self, cursor: Any) -> tuple[list[tuple[str, str]], Any]:
        """Events published after *cursor* (``None``: from now on), and the new cursor."""

    @abc.abstractmethod
    async def forget_events(self, run_id: str) -> None:
        """Drop a finished run's events."""

    @abc.abstractmethod
    async def dead_letters(self, run_id: str) -> list[dict[str, Any]]:
        """The dead-lettered tasks of a run."""

    # --- optional, with defaults ------------------------------------------------------------

    async def read_completions(self, cursor: Any, *, count: int) -> tuple[list[str], Any]:
        """At most *count* completions published after *cursor* (``None``: from now on),
        oldest first, and the cursor after the last one returned: what is left stays for
        the next call.  A client reads its completions in batches of this size, so that
        a backlog is checked against the journal a bounded batch at a time.  By default
        through :meth:`completions`, which a broker that cannot bound its reads returns
        whole."""
        return await self.completions(cursor)

    async def read_events(self, cursor: Any, *, count: int) -> tuple[list[tuple[str, str]], Any]:
        """At most *count* events published after *cursor*, as :meth:`read_completions`;
        by default through :meth:`events`, unbounded."""
        return await self.events(cursor)

    async def drop_queued(self, run_id: str) -> None:
        """Remove the run's tasks no worker holds (the run failed or was cancelled: they
        would only burn workers' time).  By default they stay and are run for nothing."""
        return None

    async def redeliver(
        self,
        run_id: str,
        *,
        skip: Collection[str] = (),
        alive: Callable[[str], bool] | None = None,
    ) -> None:
        """Make the run's tasks claimable now with their delivery counts reset (a resume:
        the run's old workers may have died with it), except those of the nodes in
        *skip* (committed: the resume reuses them), which are removed, and those held by
        a worker that *alive* (given a worker's name) or this process says still runs,
        which are left to it.  By default they wait out their leases (and a worker
        completes a committed node's task unrun)."""
        return None

    def share_store(self, store: Store) -> None:
        """Use *store*'s connection where both live in one place (one SQLite file), so that
        a commit and its completion can be one transaction.  By default: nothing to share."""
        return None

    def holds(self, store: Store) -> bool:
        """Whether *store* lives where this broker does, so that :meth:`commit_and_complete`
        can commit a node and complete its task in one atomic step."""
        return False

    async def complete_many(self, items: Sequence[Finished]) -> None:
        """Complete each task (:meth:`complete`), or dead-letter it where ``item.dead``
        says why (:meth:`dead_letter`), with its events, in as few round trips as the
        broker can; each task's own writes keep their order and atomicity.  By default
        one call each."""
        for item in items:
            events = list(item.events)
            if item.dead is not None:
                await self.dead_letter(
                    item.task_id, item.run_id, item.node_id, item.payload, item.dead, events=events
                )
            else:
                await self.complete(
                    item.task_id, item.run_id, item.node_id, item.payload, events=events
                )

    async def commit_and_complete_many(self, items: Sequence[Finished]) -> list[bool]:
        """:meth:`commit_and_complete` for each item (its ``record`` set), in as few round
        trips as the broker can; one bool each, in order.  By default one call each."""
        out = []
        for item in items:
            assert item.record is not None
            out.append(
                await self.commit_and_complete(
                    item.task_id, item.run_id, item.record, item.payload, events=list(item.events)
                )
            )
        return out

    async def commit_and_complete(
        self,
        task_id: str,
        run_id: str,
        record: NodeRecord,
        payload: str,
        *,
        events: list[tuple[str, str]] | None = None,
    ) -> bool:
        """Commit the node's *record* and complete the task (publish *payload*) in one
        atomic operation, returning True; when the node was already committed, do nothing
        and return False (the worker then completes the task with the record committed
        first).  Offered where :meth:`holds` says so."""
        raise NotImplementedError(f"{type(self).__name__} cannot commit and complete at once")
