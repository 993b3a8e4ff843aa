"""Provider batch APIs: ``fd.llm.OpenAI(batch_api=True)`` sends a batch run's calls as jobs.

How one call travels, when the provider has ``batch_api`` and the step runs in batch mode
(its scope has a :attr:`~flowdsl._engine.runner.StepScope.batch_store`):

1. The request gets a ``custom_id`` derived from (run, node, item, call index within the
   step's attempt), so a step run again (a retry, a worker that died, a resumed run) asks
   for the same ids in the same order.
2. The journal is read (the store's cache, ``llm-batch:<custom_id>``): a request already in
   a job waits for that job and is never submitted again.
3. Otherwise it joins the process's open group for its (model, endpoint); a group becomes
   one job when it holds ``max_requests`` (or nearly the provider's size limit) or when
   ``flush_after`` seconds have passed since its first request, whichever comes first.
   Whichever waiting step notices first submits it (there is no background task: every
   piece of work is done by a step that waits for it, and taken over by another when that
   step is cancelled).  The job id and its custom ids are journaled before anyone waits.
4. One waiting step per job and process polls it every ``poll_every`` seconds; when the
   job ends its results are read once, and each step takes its own line, by custom id.

A line that expired or was cancelled before it ran is submitted again, once, in a later
job; an errored line fails its step (the step's retries decide), and is forgotten by the
journal so that a retry sends it afresh.  What the journal holds is in ``_batch_journal``;
the guide is ``docs/llm.md``.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import anyio
import anyio.lowlevel
import attrs

from .._define.graph import split_item
from .._engine.runner import current_scope
from .._engine.slots import lent_slot
from .._errors import ConfigError
from ._base import Exchange, Turn, where
from ._batch_journal import (
    JOURNAL_PREFIX,
    custom_id,
    job_runs,
    line_digest,
    line_size,
    next_call,
    note_job_state,
    read_entry,
    run_cancelled,
    write_entry,
    write_job,
)
from ._errors import LLMError

__all__ = [
    "BatchAPI",
    "Collector",
    "JobState",
    "Jobs",
    "Line",
    "batch_option",
    "collector_for",
    "running_collector",
]

log = logging.getLogger("flowdsl.llm.batch")


@attrs.frozen
class BatchAPI:
    """How a provider collects a batch run's calls into provider batch jobs.

    *flush_after*: seconds after a job's first request that the job is submitted, however
    few requests it holds; *poll_every*: seconds between two looks at a submitted job;
    *max_requests*: requests per job (``None``: the provider's own limit, 50,000 for
    OpenAI and 100,000 for Anthropic).
    """

    flush_after: float = 30.0
    poll_every: float = 60.0
    max_requests: int | None = None

    def __attrs_post_init__(self) -> None:
        for name in ("flush_after", "poll_every"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0:
                raise ConfigError(
                    f"BatchAPI({name}={value!r}): give a number of seconds, 0 or more"
                )
        if self.max_requests is not None and self.max_requests < 1:
            raise ConfigError(f"BatchAPI(max_requests={self.max_requests!r}) must be at least 1")


def batch_option(value: Any, provider: str) -> BatchAPI | None:
    """A provider's ``batch_api=`` argument as a :class:`BatchAPI` (``None``: live calls)."""
    if value is None or value is False:
        return None
    if value is True:
        return BatchAPI()
    if isinstance(value, BatchAPI):
        return value
    raise ConfigError(
        f"batch_api= takes True, False or an fd.llm.BatchAPI, not {value!r}",
        hint=f"Write fd.llm.{provider}(batch_api=fd.llm.BatchAPI(flush_after=30.0))",
    )


# --- what a provider's jobs look like --------------------------------------------------------


@attrs.frozen
class Line:
    """One request's outcome in an ended job: an answer, an error, or neither (it expired
    or was cancelled before it ran: ``missing``)."""

    custom_id: str
    body: Any = None
    error: str | None = None
    status_code: int | None = None
    retryable: bool = False

    @property
    def missing(self) -> bool:
        return self.body is None and self.error is None


@attrs.frozen
class JobState:
    """A job as the provider reports it: still running, or ended.  ``failed`` is what the
    provider said when the job as a whole failed (every line errored)."""

    ended: bool
    status: str
    failed: str | None = None
    files: tuple[str, ...] = ()  # where the results are (OpenAI's output and error files)
    counts: dict[str, int] = attrs.field(factory=dict)  # the provider's request counts


class Jobs(Protocol):
    """A provider's batch API, as the collector uses it (``_batch_openai``,
    ``_batch_anthropic``).  Methods raise :class:`LLMError` for what the provider answers."""

    endpoint: str
    max_requests: int
    max_bytes: int

    def line(self, custom_id: str, exchange: Exchange) -> tuple[dict[str, Any], str]:
        """The request line for *exchange*, and the model it goes to."""

    async def create(self, lines: list[dict[str, Any]], model: str) -> str:
        """Submit a job of *lines*; its id."""

    async def state(self, job_id: str) -> JobState: ...

    async def results(self, job_id: str, state: JobState, wanted: set[str]) -> dict[str, Line]:
        """The lines of an ended job whose custom ids are in *wanted*."""

    async def cancel(self, job_id: str) -> None: ...

    def turn(self, body: Any, exchange: Exchange) -> Turn:
        """A succeeded line's answer as a :class:`Turn`."""


# --- the collector ---------------------------------------------------------------------------


@attrs.define(eq=False)
class _Request:
    custom_id: str
    run_id: str
    line: dict[str, Any]
    size: int
    digest: str
    round: int
    holders: int = 1


@attrs.define(eq=False)
class _Group:
    """Requests collected for one job, not yet submitted."""

    key: tuple[str, str]
    deadline: float
    requests: dict[str, _Request] = attrs.field(factory=dict)
    size: int = 0
    full: bool = False
    state: str = "open"  # open, submitting, submitted, failed
    job_id: str | None = None
    error: BaseException | None = None
    dropped: set[str] = attrs.field(factory=set)  # custom ids of cancelled runs
    changed: anyio.Event = attrs.field(factory=anyio.Event)

    def poke(self) -> None:
        event, self.changed = self.changed, anyio.Event()
        event.set()

    def release(self, request: _Request) -> None:
        """A step no longer waits for *request* (it was cancelled before submission)."""
        request.holders -= 1
        if request.holders == 0 and self.requests.get(request.custom_id) is request:
            del self.requests[request.custom_id]
            self.size -= request.size


@attrs.define(eq=False)
class _Job:
    """A submitted job that steps of this process wait for."""

    id: str
    next_poll: float
    runs: frozenset[str] | None = None  # None: not known here (submitted elsewhere)
    store: Any = None  # where its state is noted, for `flowdsl runs show`
    waiters: int = 0
    polling: bool = False
    ended: bool = False
    status: str = ""
    failed: str | None = None  # the job as a whole failed
    error: LLMError | None = None  # it cannot be followed (the provider refuses to say)
    lines: dict[str, Line] = attrs.field(factory=dict)
    wanted: set[str] = attrs.field(factory=set)
    fetched: frozenset[str] = frozenset()
    changed: anyio.Event = attrs.field(factory=anyio.Event)
    nudge: anyio.Event = attrs.field(factory=anyio.Event)  # look now, not at next_poll

    def poke(self) -> None:
        event, self.changed = self.changed, anyio.Event()
        event.set()


class Collector:
    """One provider's batch jobs in one event loop (one per process, as a rule): the open
    groups, per (model, endpoint), and the jobs its steps wait for."""

    def __init__(self, provider: Any, jobs: Jobs, options: BatchAPI) -> None:
        self.provider = provider
        self.name: str = provider.name
        self.jobs = jobs
        self.options = options
        limit = jobs.max_requests
        self.max_requests = min(options.max_requests or limit, limit)
        self._groups: dict[tuple[str, str], _Group] = {}  # open, per (model, endpoint)
        self._submitting: set[_Group] = set()
        self._jobs: dict[str, _Job] = {}

    # --- one call -----------------------------------------------------------------------

    async def send(self, exchange: Exchange) -> tuple[Turn, str]:
        """Send *exchange* through a job (or find it in one); its answer and the job id."""
        scope = current_scope()
        assert scope is not None
        assert scope.batch_store is not None
        store = scope.batch_store
        node_id, item = split_item(scope.node_id)
        cid = custom_id(scope.run_id, node_id, item, next_call(scope))
        line, model = self.jobs.line(cid, exchange)
        digest = line_digest(line)
        entry = await read_entry(store, cid)
        job_id: str | None = None
        round_ = 0
        if entry is not None and entry.get("digest") == digest:
            job_id, round_ = entry.get("job"), int(entry.get("round", 0))
        elif entry is not None:
            log.info("request %s changed since it was journaled; sending the new one", cid)
        while True:
            # The step's worker slot is free for other steps (which add their requests to
            # the job) while this one waits for the job to be sent and to end.
            async with lent_slot():
                if job_id is None:
                    request = _Request(cid, scope.run_id, line, line_size(line), digest, round_)
                    job_id = await self._submit(store, (model, self.jobs.endpoint), request)
                    fresh = True
                else:
                    fresh = False
                outcome, status = await self._wait(store, job_id, cid, fresh=fresh)
            if outcome.body is not None:
                return self.jobs.turn(outcome.body, exchange), job_id
            if outcome.missing:
                if await run_cancelled(store, scope.run_id):
                    raise LLMError(
                        f"the run was cancelled, and with it batch job {job_id}",
                        **where(),
                        provider=self.name,
                        hint="Resume the run to send the request again",
                    )
                if round_ >= 1:
                    # Final for this attempt: a resume of the run sends the request afresh.
                    await write_entry(store, cid, self.name, None, digest, 0)
                    raise LLMError(
                        f"{self.name} did not run the request in batch job {job_id} "
                        f"(status {status}), nor in the job before it",
                        **where(),
                        provider=self.name,
                        hint="The provider's batch queue is behind: resume the run later to "
                        "send it again, or run it in real time",
                    )
                log.info("request %s did not run in job %s; sending it again", cid, job_id)
                round_, job_id = round_ + 1, None
                continue
            # The retry of this step (if its policy allows one) sends the request afresh.
            await write_entry(store, cid, self.name, None, digest, 0)
            raise LLMError(
                f"{self.name} answered the request with an error in batch job {job_id}: "
                f"{self.provider._redact(outcome.error or '')}",
                **where(),
                provider=self.name,
                status_code=outcome.status_code,
                retryable=outcome.retryable,
                hint="Retry the step (retries=), or check the request"
                if outcome.retryable
                else "The provider refused the request; check the messages, model and options",
            )

    # --- collecting and submitting ------------------------------------------------------

    async def _submit(self, store: Any, key: tuple[str, str], request: _Request) -> str:
        """Add *request* to the open group for *key*; wait until the group is a job."""
        group = self._group_for(key, request)
        held = group.requests.get(request.custom_id)
        if held is not None:
            if held.digest != request.digest:
                # Two calls claim one id: sharing the answer would hand one the other's.
                raise LLMError(
                    f"two different requests of one step have the same batch custom_id "
                    f"{request.custom_id!r}",
                    **where(),
                    provider=self.name,
                    hint="The step runs twice at once with different inputs (the same run "
                    "and node); run its items as separate nodes, or leave batch_api out",
                )
            held.holders += 1  # the same request from a second copy of the step
            request = held
        else:
            group.requests[request.custom_id] = request
            group.size += request.size
        if len(group.requests) >= self.max_requests:
            self._close(group)
        try:
            while group.state in ("open", "submitting"):
                if request.custom_id in group.dropped:
                    raise LLMError(
                        "the run was cancelled before its batch job was submitted",
                        **where(),
                        provider=self.name,
                    )
                if group.state == "submitting":
                    await group.changed.wait()
                    continue
                now = anyio.current_time()
                if group.full or now >= group.deadline:
                    await self._flush(store, group)
                    continue
                with anyio.move_on_after(group.deadline - now):
                    await group.changed.wait()
        except BaseException:
            if group.state == "open":
                group.release(request)
            raise
        if group.error is not None:
            raise _again(group.error, self.name)
        assert group.job_id is not None
        return group.job_id

    def _group_for(self, key: tuple[str, str], request: _Request) -> _Group:
        group = self._groups.get(key)
        if group is not None and (group.size + request.size > self.jobs.max_bytes):
            self._close(group)
            group = None
        if group is None:
            group = _Group(key, anyio.current_time() + self.options.flush_after)
            self._groups[key] = group
        return group

    def _close(self, group: _Group) -> None:
        """No more requests join *group*: it is submitted as soon as a waiter sees this."""
        group.full = True
        if self._groups.get(group.key) is group:
            del self._groups[group.key]
        group.poke()

    async def _flush(self, store: Any, group: _Group) -> None:
        if self._groups.get(group.key) is group:
            del self._groups[group.key]
        group.state = "submitting"
        self._submitting.add(group)
        requests = [r for r in group.requests.values() if r.custom_id not in group.dropped]
        try:
            if not requests:
                raise LLMError("every request of the batch job was withdrawn", provider=self.name)
            # Shielded: once the provider has the job (and our money), the journal must
            # learn of it, or a resumed step would submit its request again.
            with anyio.CancelScope(shield=True):
                job_id = await self.jobs.create([r.line for r in requests], group.key[0])
                log.info("%s batch job %s: %d requests", self.name, job_id, len(requests))
                runs = frozenset(r.run_id for r in requests)
                job = self._jobs.setdefault(job_id, self._new_job(job_id, fresh=True, runs=runs))
                job.store = store
                await self._journal(store, job_id, requests)
                if all(r.custom_id in group.dropped for r in requests):
                    # Its runs were cancelled while it was being submitted.
                    await self._cancel(job, "its runs were")
        except Exception as exc:
            group.error, group.state = exc, "failed"
        else:
            group.job_id, group.state = job_id, "submitted"
        finally:
            self._submitting.discard(group)
            group.poke()

    async def _journal(self, store: Any, job_id: str, requests: list[_Request]) -> None:
        try:
            runs: dict[str, int] = {}
            for r in requests:
                runs[r.run_id] = runs.get(r.run_id, 0) + 1
            about = {"provider": self.name, "runs": runs, "requests": len(requests)}
            await write_job(store, job_id, {**about, "status": "submitted", "ended": False})
            for r in requests:
                await write_entry(store, r.custom_id, self.name, job_id, r.digest, r.round)
            for run_id in runs:
                await store.add_batch_job(run_id, job_id)
        except Exception as exc:
            # The steps wait for the job all the same; only a crash before it ends would
            # send these requests again.
            log.error("cannot journal %s batch job %s: %s", self.name, job_id, exc)

    # --- waiting for a job --------------------------------------------------------------

    def _new_job(self, job_id: str, *, fresh: bool, runs: frozenset[str] | None) -> _Job:
        # A job just submitted cannot have ended: the first look waits a full period.
        delay = self.options.poll_every if fresh else 0.0
        return _Job(job_id, anyio.current_time() + delay, runs)

    async def _wait(self, store: Any, job_id: str, cid: str, *, fresh: bool) -> tuple[Line, str]:
        """*cid*'s line in job *job_id* once the job has ended, and the job's status."""
        job = self._jobs.get(job_id)
        if job is None or (job.ended and cid not in job.fetched):
            job = self._new_job(job_id, fresh=fresh, runs=None if job is None else job.runs)
            self._jobs[job_id] = job
        if job.store is None:
            job.store = store
        job.wanted.add(cid)
        job.waiters += 1
        try:
            while not job.ended:
                if job.polling:
                    await job.changed.wait()
                    continue
                job.polling = True
                try:
                    await self._poll(job)
                finally:
                    job.polling = False
                    job.poke()
        finally:
            job.waiters -= 1
            if job.waiters == 0 and job.ended and self._jobs.get(job_id) is job:
                del self._jobs[job_id]
        if job.error is not None:
            # The journal keeps the job: a retry of the step waits for it again.
            raise LLMError(
                f"cannot follow batch job {job_id}: {job.error.problem}",
                **where(),
                provider=self.name,
                status_code=job.error.status_code,
                retryable=True,
                hint=f"Retry the step once the provider answers again; to send the request "
                f"in a new job instead, delete the cache entry {JOURNAL_PREFIX + cid!r}",
            )
        if job.failed is not None:
            return Line(cid, error=f"the whole job failed: {job.failed}"), job.status
        return job.lines.get(cid) or Line(cid), job.status

    async def _poll(self, job: _Job) -> None:
        """Look at *job* every ``poll_every`` seconds until it ends; then read its lines."""
        while True:
            delay = job.next_poll - anyio.current_time()
            if delay > 0:
                with anyio.move_on_after(delay):
                    await job.nudge.wait()
                job.nudge = anyio.Event()
            job.next_poll = anyio.current_time() + self.options.poll_every
            try:
                state = await self.jobs.state(job.id)
                if state.status != job.status or state.ended:
                    await self._note(job, state)
                job.status = state.status
                if not state.ended:
                    continue
                if state.failed is None:
                    wanted = set(job.wanted)
                    job.lines = await self.jobs.results(job.id, state, wanted)
                    job.fetched = frozenset(wanted)
            except LLMError as exc:
                if not exc.retryable:
                    job.error, job.ended = exc, True
                    return
                log.warning("%s batch job %s: %s; looking again later", self.name, job.id, exc)
                continue
            job.failed = state.failed
            job.ended = True
            return

    async def _note(self, job: _Job, state: JobState) -> None:
        if job.store is None:
            return
        try:
            await note_job_state(job.store, job.id, state.status, state.ended, state.counts)
        except Exception as exc:
            # Only what `flowdsl runs show` says is behind.
            log.warning("cannot note how %s batch job %s stands: %s", self.name, job.id, exc)

    # --- cancelling -----------------------------------------------------------------------

    async def cancel_run(self, run_id: str, store: Any = None) -> list[str]:
        """Withdraw *run_id*'s requests not yet submitted, and cancel the submitted jobs
        that hold only its requests; the ids of the jobs cancelled.

        Only jobs known to this process are seen: those its steps submitted or wait for
        (the others are ``_batch_runs``'s).
        """
        for group in [*self._groups.values(), *self._submitting]:
            mine = {cid for cid, r in group.requests.items() if r.run_id == run_id}
            if mine:
                group.dropped |= mine  # a group being submitted cancels its job if it can
                group.poke()
        cancelled: list[str] = []
        for job in list(self._jobs.values()):
            if job.ended:
                continue
            runs = job.runs if job.runs is not None else await job_runs(store, job.id)
            if runs == frozenset({run_id}) and await self._cancel(job, f"run {run_id} was"):
                cancelled.append(job.id)
        return cancelled

    def known_jobs(self) -> list[str]:
        """The jobs this collector follows (their cancellation is :meth:`cancel_run`'s)."""
        return list(self._jobs)

    async def _cancel(self, job: _Job, why: str) -> bool:
        try:
            await self.jobs.cancel(job.id)
        except LLMError as exc:
            log.warning("cannot cancel %s batch job %s: %s", self.name, job.id, exc)
            return False
        log.info("%s batch job %s cancelled: %s cancelled", self.name, job.id, why)
        job.next_poll = anyio.current_time()  # let its waiters see it end soon
        job.nudge.set()
        return True


def collector_for(provider: Any) -> Collector:
    """The provider's collector in the running event loop, made on first use."""
    var = provider.__dict__.get("_batch_collector")
    if var is None:
        var = anyio.lowlevel.RunVar[Collector | None]("flowdsl_llm_batch", default=None)
        provider._batch_collector = var
    collector: Collector | None = var.get()
    if collector is None:
        jobs = provider._batch_jobs()
        if jobs is None:
            raise ConfigError(
                f"{type(provider).__name__} has no provider batch API",
                **where(),
                hint="Use fd.llm.OpenAI or fd.llm.Anthropic with batch_api=, or leave "
                "batch_api out",
            )
        collector = Collector(provider, jobs, provider.batch_api)
        var.set(collector)
    return collector


def running_collector(provider: Any) -> Collector | None:
    """The provider's collector in the running event loop, if it has one."""
    var = provider.__dict__.get("_batch_collector")
    return None if var is None else var.get()


# --- helpers ---------------------------------------------------------------------------------


def _again(error: BaseException, provider: str) -> BaseException:
    """A submission's failure, as this step's own error (each waiting step raises one)."""
    if isinstance(error, LLMError):
        return LLMError(
            f"the batch job could not be submitted: {error.problem}",
            **where(),
            hint=error.hint,
            provider=provider,
            status_code=error.status_code,
            retryable=error.retryable,
        )
    return LLMError(
        f"the batch job could not be submitted: {type(error).__name__}: {error}",
        **where(),
        provider=provider,
        retryable=True,
    )
