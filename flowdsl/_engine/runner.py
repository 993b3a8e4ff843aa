"""Running one node: attempts, retries with backoff, timeouts, the codec, and its events.

The same code runs a node in real time (called by the real-time executor) and on a batch
worker (called after a task message is taken off a queue), which is why what a step can
do, and what its failure looks like, cannot differ between the modes.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import json
import random
import threading
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import attrs
import sniffio

from .. import _codec, _otel
from .. import events as ev
from .._define.graph import Node, NodeKind, split_item, value_labels
from .._errors import CodecError, StepCodecFailed, StepFailed
from .._records import NodeRecord, add_usage
from .._secret import redact, scrub
from .._urls import hide_credentials

if TYPE_CHECKING:
    from ..backends.base import Store

__all__ = ["EventSink", "StepScope", "current_scope", "describe", "run_node"]

MAX_BACKOFF = 60.0


class EventSink(Protocol):
    """Where a node's events go: a run in this process, or a broker's event channel."""

    run_id: str
    flow_name: str
    observed: bool  # False: nobody listens, so events are not even built

    def emit(self, event: Any) -> None: ...


@attrs.define(eq=False)
class StepScope:
    """One node being run: what code inside the step can reach (the run, the node, the
    attempt, the LLM provider) and the bookkeeping of its attempts."""

    sink: EventSink
    node: Node
    attempt: int
    llm: Any = None
    marker: str = ""
    first_attempt: int = 1
    started: float = 0.0
    usage: dict[str, Any] | None = None
    # In batch mode, the store keeping the run's journal, for work a step journals on its
    # own (provider batch jobs); ``None`` in real time, which is how a step tells the modes
    # apart.  Keyword-only so that subclasses keep their positional fields.
    batch_store: Any = attrs.field(default=None, kw_only=True)

    @property
    def run_id(self) -> str:
        return self.sink.run_id

    @property
    def node_id(self) -> str:
        return self.node.id

    @property
    def item(self) -> int | None:
        """The map item (``summarize[3]``: 3) or loop iteration (``agent@2``: 2) this node
        runs; ``None`` for any other node.  Read from the node's id, which is what every
        executor carries (a batch task holds nothing else), so it costs a step nothing."""
        return split_item(self.node.id)[1]

    def token(self, text: str) -> None:
        """Report streamed LLM output as a :class:`~flowdsl.events.TokenDelta`."""
        if self.sink.observed:
            self.sink.emit(
                ev.TokenDelta(self.sink.run_id, self.node.id, time.time(), text, self.attempt)
            )

    def add_usage(self, **counts: Any) -> None:
        """Add LLM usage (``input_tokens=``, ``output_tokens=``, ``cost=``, ...) to the node."""
        self.usage = add_usage(self.usage, counts)

    # attempts

    def begin(self) -> None:
        if _otel.tracing:
            _otel.attempt_started(self.attempt)
        if self.sink.observed:
            self.sink.emit(
                ev.StepStarted(self.sink.run_id, self.node.id, time.time(), self.attempt)
            )

    def succeed(self, raw: Any) -> tuple[NodeRecord, Any]:
        """Encode the step's value (or pick the branch's case) and make its record.

        Nothing is reported yet: :meth:`report` follows once the record is committed, so
        that a ``StepFinished`` event always means the result is in the journal.
        """
        node = self.node
        unit = node.fn
        assert unit is not None
        if node.kind is NodeKind.BRANCH:
            label = pick_case(raw, node.labels, node.id)
            text, value = _codec.dumps(label), label
        else:
            _, text, value = _roundtrip(raw, unit.return_type, node)
        record = NodeRecord(
            node.id, text, self.attempt, self.started, time.time(), self.marker, self.usage
        )
        return record, value

    def report(self, record: NodeRecord) -> None:
        """Tell whoever watches that the node finished (after its record is committed)."""
        sink, node = self.sink, self.node
        if not sink.observed:
            return
        data = _codec.loads(record.value)
        if node.kind is NodeKind.BRANCH:
            sink.emit(ev.BranchTaken(sink.run_id, node.id, record.finished_at, data, self.attempt))
        sink.emit(
            ev.StepFinished(
                sink.run_id, node.id, record.finished_at, data, self.attempt, record.duration
            )
        )

    def fail(self, exc: Exception) -> float:
        """After a failed attempt: the delay before the next one, or raise StepFailed."""
        node, sink = self.node, self.sink
        unit = node.fn
        assert unit is not None
        # A secret's value in the error never reaches an event, the store or a traceback.
        scrub(exc)
        # Attempts count across deliveries: a batch task handed out again after its
        # worker died starts at its delivery number, with fewer retries left.
        final = isinstance(exc, CodecError | UnknownCase)
        # An error that says another attempt cannot help (an LLM provider's 401, say)
        # is not retried whatever retry_on allows.
        final = final or getattr(exc, "retryable", True) is False
        if not final and self.attempt <= unit.retries and isinstance(exc, unit.retry_on):
            delay = backoff_delay(unit.backoff, self.attempt)
            if _otel.tracing:
                _otel.attempt_failed(exc, self.attempt, delay)
            if sink.observed:
                sink.emit(
                    ev.StepRetrying(
                        sink.run_id, node.id, time.time(), describe(exc), self.attempt, delay
                    )
                )
            self.attempt += 1
            return delay
        _emit_failed(sink, node, self.attempt, exc)
        raise _failure(sink, node, exc) from exc


_SCOPE: contextvars.ContextVar[StepScope | None] = contextvars.ContextVar(
    "flowdsl_step_scope", default=None
)


def current_scope() -> StepScope | None:
    """The step being run by this task, or ``None`` outside a run."""
    return _SCOPE.get()


@attrs.frozen
class StepInfo:
    """Which run, node and attempt the calling code runs in (see :func:`current_step`)."""

    run_id: str
    node_id: str
    attempt: int
    flow: str


def current_step() -> StepInfo | None:
    """The run, node and attempt of the step this code runs in; ``None`` outside a run
    (a step called directly, as in a unit test)."""
    scope = _SCOPE.get()
    if scope is None:
        return None
    return StepInfo(scope.sink.run_id, scope.node.id, scope.attempt, scope.sink.flow_name)


def backoff_delay(base: float, attempt: int) -> float:
    """Exponential backoff with full jitter: uniform in [0, base * 2**(attempt-1)]."""
    if base <= 0:
        return 0.0
    return random.uniform(0, min(MAX_BACKOFF, base * 2 ** (attempt - 1)))  # noqa: S311


class UnknownCase(LookupError):
    """A branch returned a value that names none of its cases."""


def pick_case(value: Any, labels: tuple[str, ...], branch: str) -> str:
    for label in value_labels(value):
        if label in labels:
            return label
    raise UnknownCase(
        f"branch {branch!r} returned {value!r}, which is none of its cases: "
        f"{', '.join(map(repr, labels))}; return one of those, or add a case for it"
    )


async def _call_sync(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


async def run_node(
    sink: EventSink,
    node: Node,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    marker: str = "",
    llm: Any = None,
    first_attempt: int = 1,
    store: Store | None = None,
    batch_store: Store | None = None,
) -> tuple[NodeRecord, Any]:
    """Run *node* through its attempts; return its journal record and decoded value.

    With *store*, the record is committed before returning, so the caller may count the
    node done.  *batch_store* (batch mode) is the run's store, for the step's scope.

    Raises :class:`~flowdsl.StepFailed` (with the step's exception as ``__cause__``) once
    the retries are spent; a codec failure or an unknown case is never retried, since
    another attempt cannot fix it.
    """
    # This frame stays alive while the step runs, so it is kept small (memory per
    # in-flight run is a target): the bookkeeping lives in the scope's sync methods.
    unit = node.fn
    assert unit is not None, "only step and branch nodes run"
    scope = StepScope(
        sink, node, first_attempt, llm, marker, first_attempt, time.time(), batch_store=batch_store
    )
    while True:
        scope.begin()
        token = _SCOPE.set(scope)
        try:
            if unit.is_async and unit.timeout is None:
                raw = await unit.fn(*args, **kwargs)
            else:
                raw = await _call_slow(unit, args, kwargs)
            outcome = scope.succeed(raw)
        except Exception as exc:
            delay = scope.fail(exc)
        else:
            cancelled = None
            if store is not None:
                cancelled = await _commit(store, sink.run_id, outcome[0])
            scope.report(outcome[0])
            if cancelled is not None:
                raise cancelled
            return outcome
        finally:
            _SCOPE.reset(token)
        await anyio.sleep(delay)


@attrs.define(eq=False)
class FastJob(StepScope):
    """A node whose own coroutine runs as the task, with no runner frame around it.

    For async steps without a timeout, on a store that commits synchronously.  The event
    loop's task runs the step's coroutine directly (in a context where this scope is the
    current one); :meth:`finish` encodes and commits the result from the task's
    done-callback, and a failure that may be retried continues as an ordinary
    :func:`run_node` coroutine.  While a node waits (on an LLM, say) it then costs what a
    bare task costs, which is what keeps memory per in-flight run near plain asyncio's.
    """

    store: Any = None  # a Store that commits_nowait
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = attrs.field(factory=dict)

    @property
    def key(self) -> Node:
        return self.node

    def finish(self, raw: Any) -> tuple[NodeRecord, Any]:
        try:
            outcome = self.succeed(raw)
        except Exception as exc:
            self.fail(exc)  # codec errors and unknown cases are final: this raises
            raise
        self.store.commit_node_nowait(self.sink.run_id, outcome[0])
        self.report(outcome[0])
        return outcome

    def retry(self, exc: Exception) -> Any:
        """The rest of the node's attempts after *exc*, or raise StepFailed."""
        delay = self.fail(exc)
        return _retry_after(
            delay,
            run_node(
                self.sink,
                self.node,
                self.args,
                self.kwargs,
                marker=self.marker,
                llm=self.llm,
                first_attempt=self.attempt,
                store=self.store,
            ),
        )


async def _retry_after(delay: float, attempts: Any) -> Any:
    await anyio.sleep(delay)
    return await attempts


def fast_job(
    sink: EventSink,
    node: Node,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    marker: str,
    llm: Any,
    store: Store,
) -> tuple[FastJob, Coroutine[Any, Any, Any], contextvars.Context] | None:
    """A :class:`FastJob` for *node* with the coroutine to run as its task and the
    context to run it in; ``None`` when the node needs the full runner.

    *store* must commit synchronously (``commit_node_nowait``).  This runs once per
    spawned node, so it takes its arguments by position and does no more than it must.
    """
    unit = node.fn
    if unit is None or not unit.bare or _otel.tracing:  # a traced node needs its span
        return None
    args, kwargs = fresh_arguments(sink, node, args, kwargs)
    job = FastJob(sink, node, 1, llm, marker, 1, time.time(), None, store, args, kwargs)
    if sink.observed:
        job.begin()
    context = contextvars.copy_context()
    context.run(_SCOPE.set, job)
    return job, unit.fn(*args, **kwargs), context


async def _commit(store: Store, run_id: str, record: NodeRecord) -> BaseException | None:
    """Commit a finished node's record, even if the run is being cancelled: the step's
    work (an LLM call, say) is done and paid for, and a resume should find it.

    Returns the cancellation that arrived during the write, for the caller to raise once
    it has reported the node: a committed node is always a reported one.
    """
    if store.commits_nowait:
        store.commit_node_nowait(run_id, record)
        return None
    if sniffio.current_async_library() == "asyncio":
        # Node tasks are cancelled with asyncio's own Task.cancel(), which anyio's shields
        # do not stop: the write runs as a task of its own, and this one waits it out.
        import asyncio

        write = asyncio.ensure_future(store.commit_node(run_id, record))
        cancelled: BaseException | None = None
        while True:
            try:
                await asyncio.shield(write)
                return cancelled
            except asyncio.CancelledError as exc:
                if write.done() and not write.cancelled():
                    write.result()  # a failed write raises its own error
                    return exc
                cancelled = exc
    with anyio.CancelScope(shield=True):
        await store.commit_node(run_id, record)
    return None


async def _call_slow(unit: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A step with a timeout, or a plain ``def`` step (run in a worker thread)."""
    if unit.timeout is None:
        return await _call_sync(unit.fn, args, kwargs)
    with anyio.fail_after(unit.timeout):
        if unit.is_async:
            return await unit.fn(*args, **kwargs)
        return await _call_sync(unit.fn, args, kwargs)


def fresh_arguments(
    sink: EventSink, node: Node, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Arguments as a worker would receive them: encoded, then decoded as the step's
    parameters are annotated.

    In real time this gives each node its own copy of what it takes (a step that mutates
    its argument cannot change what a sibling sees) and the same types batch mode gives
    (a tuple becomes a list unless annotated). Primitives pass as they are.
    """
    unit = node.fn
    assert unit is not None
    primitive = _PRIMITIVE_TYPES
    for a in args:
        if type(a) not in primitive:
            break
    else:
        for v in kwargs.values():
            if type(v) not in primitive:
                break
        else:
            return args, kwargs
    positional, by_name = unit.param_types
    try:
        new_args = tuple(
            _codec.roundtrip(
                a, positional[i] if i < len(positional) else Any, what=f"argument {i + 1}"
            )[1]
            for i, a in enumerate(args)
        )
        new_kwargs = {
            k: _codec.roundtrip(v, by_name.get(k, Any), what=f"argument {k!r}")[1]
            for k, v in kwargs.items()
        }
    except CodecError as exc:
        raise StepCodecFailed(
            f"cannot pass the arguments: {exc.problem}",
            flow=sink.flow_name,
            node=node.id,
            run_id=sink.run_id,
            hint=exc.hint,
        ) from exc
    return new_args, new_kwargs


_PRIMITIVE_TYPES = frozenset({str, int, float, bool, type(None)})


def cache_key(node: Node, marker: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """The key of a ``cache=True`` step's result: its code and its canonical encoded inputs."""
    unit = node.fn
    assert unit is not None
    data = {
        "step": unit.ref,
        "code": marker.split("/", 1)[0],
        "args": [_codec.to_data(a, what="an argument") for a in args],
        "kwargs": {k: _codec.to_data(v, what="an argument") for k, v in kwargs.items()},
    }
    text = json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


async def run_node_cached(
    store: Store,
    sink: EventSink,
    node: Node,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    marker: str = "",
    llm: Any = None,
    first_attempt: int = 1,
    commit: bool = True,
    batch: bool = False,
) -> tuple[NodeRecord, Any]:
    """:func:`run_node`, consulting the store's cache first for ``cache=True`` steps.

    With ``commit=False`` (a batch worker, which commits and completes in one go) the
    record is returned uncommitted.  ``batch=True`` (a batch worker) gives the step's
    scope the store (:attr:`StepScope.batch_store`).
    """
    journal = store if commit else None
    batch_store = store if batch else None
    unit = node.fn
    if unit is None or not unit.cache:
        return await run_node(
            sink,
            node,
            args,
            kwargs,
            marker=marker,
            llm=llm,
            first_attempt=first_attempt,
            store=journal,
            batch_store=batch_store,
        )
    key = cache_key(node, marker, args, kwargs)
    # Two nodes of one run (or of two runs) calling the step with equal arguments at once
    # would both miss the cache: the second waits for the first, then reads its result.
    slot = (id(store), threading.get_ident(), key)
    while True:
        text = await store.get_cached(key)
        if text is not None:
            return await _reuse_cached(journal, sink, node, unit, marker, text)
        running = _CACHE_IN_FLIGHT.get(slot)
        if running is None:
            break
        await running.wait()  # then read the cache again: a failed first call left nothing
    _CACHE_IN_FLIGHT[slot] = done = anyio.Event()
    try:
        record, value = await run_node(
            sink,
            node,
            args,
            kwargs,
            marker=marker,
            llm=llm,
            first_attempt=first_attempt,
            store=journal,
            batch_store=batch_store,
        )
        await store.put_cached(key, record.value)
    finally:
        del _CACHE_IN_FLIGHT[slot]
        done.set()
    return record, value


# (store, thread, cache key) -> set when the call computing that key ends.
_CACHE_IN_FLIGHT: dict[tuple[int, int, str], anyio.Event] = {}


async def _reuse_cached(
    journal: Store | None, sink: EventSink, node: Node, unit: Any, marker: str, text: str
) -> tuple[NodeRecord, Any]:
    now = time.time()
    value = _codec.decode(text, unit.return_type, what=f"the cached result of {node.id!r}")
    record = NodeRecord(node.id, text, 0, now, now, marker)
    if journal is not None:
        await journal.commit_node(sink.run_id, record)
    if sink.observed:
        sink.emit(ev.StepReused(sink.run_id, node.id, now, "cache"))
    return record, value


def _roundtrip(raw: Any, tp: Any, node: Node) -> tuple[Any, str, Any]:
    cls = type(raw)
    # Primitives are their own data and decode as themselves: skip the codec (this runs
    # once per node, so its cost is the engine's cost).
    if cls is int and (tp is int or tp is Any) and raw.bit_length() < 8192:
        return raw, int.__repr__(raw), raw
    if raw is None:
        return None, "null", None
    if (cls is str or cls is bool or cls is float) and (tp is Any or tp is cls):
        return raw, _codec.dumps(raw), raw
    what = f"the result of {node.id!r}"
    data = _codec.to_data(raw, what=what)
    text = _codec.dumps(data)
    return data, text, _codec.from_data(_codec.loads(text), tp, what=what)


def describe(exc: BaseException) -> str:
    """*exc* as a failure's message says it: its type and its masked words."""
    # A step's error may quote a connection URL: its password must not reach the journal.
    text = redact(hide_credentials(str(exc)))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _emit_failed(sink: EventSink, node: Node, attempt: int, exc: BaseException) -> None:
    if sink.observed:
        sink.emit(ev.StepFailed(sink.run_id, node.id, time.time(), describe(exc), attempt))


def _failure(sink: EventSink, node: Node, exc: BaseException) -> StepFailed:
    cls = StepCodecFailed if isinstance(exc, CodecError) else StepFailed
    hint = None
    described = describe(exc)
    if isinstance(exc, TimeoutError) and node.fn is not None and node.fn.timeout is not None:
        hint = f"The step ran longer than its timeout of {node.fn.timeout} s"
    elif isinstance(exc, CodecError):
        # The codec's hint becomes the failure's own; its text must not say it twice.
        hint = exc.hint
        described = f"{type(exc).__name__}: {exc.problem}"
    return cls(
        f"step failed: {described}",
        flow=sink.flow_name,
        node=node.id,
        hint=hint,
        run_id=sink.run_id,
    )
