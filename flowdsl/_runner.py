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
import time
from collections.abc import Callable
from typing import Any, Protocol

import anyio
import attrs

from . import _codec
from . import events as ev
from ._errors import CodecError, StepCodecFailed, StepFailed
from ._graph import Node, NodeKind
from ._records import NodeRecord
from ._trace import value_labels

__all__ = ["EventSink", "StepScope", "current_scope", "run_node"]

MAX_BACKOFF = 60.0


class EventSink(Protocol):
    """Where a node's events go: a run in this process, or a broker's event channel."""

    run_id: str
    flow_name: str
    observed: bool  # False: nobody listens, so events are not even built

    def emit(self, event: Any) -> None: ...


@attrs.define(eq=False)
class StepScope:
    """What code inside a step can reach: the run, the node, the attempt, the LLM provider."""

    sink: EventSink
    node_id: str
    attempt: int
    llm: Any = None
    usage: dict[str, Any] | None = None

    @property
    def run_id(self) -> str:
        return self.sink.run_id

    def token(self, text: str) -> None:
        """Report streamed LLM output as a :class:`~flowdsl.events.TokenDelta`."""
        if self.sink.observed:
            self.sink.emit(
                ev.TokenDelta(self.sink.run_id, self.node_id, time.time(), text, self.attempt)
            )

    def add_usage(self, **counts: Any) -> None:
        """Add LLM usage (``input_tokens=``, ``output_tokens=``, ``cost=``, ...) to the node."""
        usage = self.usage if self.usage is not None else {}
        for key, value in counts.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                usage[key] = usage.get(key, 0) + value
            else:
                usage[key] = value
        self.usage = usage


_SCOPE: contextvars.ContextVar[StepScope | None] = contextvars.ContextVar(
    "flowdsl_step_scope", default=None
)


def current_scope() -> StepScope | None:
    """The step being run by this task, or ``None`` outside a run."""
    return _SCOPE.get()


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


async def _call(fn: Callable[..., Any], is_async: bool, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> Any:
    if is_async:
        return await fn(*args, **kwargs)
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
) -> tuple[NodeRecord, Any]:
    """Run *node* through its attempts; return its journal record and decoded value.

    Raises :class:`~flowdsl.StepFailed` (with the step's exception as ``__cause__``) once
    the retries are spent; a codec failure or an unknown case is never retried, since
    another attempt cannot fix it.
    """
    unit = node.fn
    assert unit is not None, "only step and branch nodes run"
    observed = sink.observed
    run_id = sink.run_id
    attempt = first_attempt - 1
    started = time.time()
    is_branch = node.kind is NodeKind.BRANCH
    while True:
        attempt += 1
        if observed:
            sink.emit(ev.StepStarted(run_id, node.id, time.time(), attempt))
        scope = StepScope(sink, node.id, attempt, llm)
        token = _SCOPE.set(scope)
        try:
            if unit.timeout is None:
                raw = await _call(unit.fn, unit.is_async, args, kwargs)
            else:
                with anyio.fail_after(unit.timeout):
                    raw = await _call(unit.fn, unit.is_async, args, kwargs)
            if is_branch:
                label = pick_case(raw, node.labels, node.id)
                data, text, value = label, _codec.dumps(label), label
            else:
                data, text, value = _roundtrip(raw, unit.return_type, node)
        except (CodecError, UnknownCase) as exc:
            _emit_failed(sink, node, attempt, exc)
            raise _failure(sink, node, exc) from exc
        except Exception as exc:
            if attempt - first_attempt < unit.retries and isinstance(exc, unit.retry_on):
                delay = backoff_delay(unit.backoff, attempt - first_attempt + 1)
                if observed:
                    sink.emit(
                        ev.StepRetrying(run_id, node.id, time.time(), _describe(exc), attempt, delay)
                    )
                await anyio.sleep(delay)
                continue
            _emit_failed(sink, node, attempt, exc)
            raise _failure(sink, node, exc) from exc
        finally:
            _SCOPE.reset(token)
        finished = time.time()
        if observed:
            if is_branch:
                sink.emit(ev.BranchTaken(run_id, node.id, finished, label, attempt))
            sink.emit(
                ev.StepFinished(run_id, node.id, finished, data, attempt, finished - started)
            )
        record = NodeRecord(node.id, text, attempt, started, finished, marker, scope.usage)
        return record, value


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
    store: Any,
    sink: EventSink,
    node: Node,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    marker: str = "",
    llm: Any = None,
) -> tuple[NodeRecord, Any]:
    """:func:`run_node`, consulting the store's cache first for ``cache=True`` steps."""
    unit = node.fn
    if unit is None or not unit.cache:
        return await run_node(sink, node, args, kwargs, marker=marker, llm=llm)
    key = cache_key(node, marker, args, kwargs)
    text = await store.get_cached(key)
    if text is not None:
        now = time.time()
        value = _codec.decode(text, unit.return_type, what=f"the cached result of {node.id!r}")
        if sink.observed:
            sink.emit(ev.StepReused(sink.run_id, node.id, now, "cache"))
        return NodeRecord(node.id, text, 0, now, now, marker), value
    record, value = await run_node(sink, node, args, kwargs, marker=marker, llm=llm)
    await store.put_cached(key, record.value)
    return record, value


def _roundtrip(raw: Any, tp: Any, node: Node) -> tuple[Any, str, Any]:
    what = f"the result of {node.id!r}"
    cls = type(raw)
    if cls is str or cls is int or cls is bool or cls is float or raw is None:
        if tp is Any or tp is cls or raw is None:
            return raw, _codec.dumps(raw), raw
    data = _codec.to_data(raw, what=what)
    text = _codec.dumps(data)
    return data, text, _codec.from_data(_codec.loads(text), tp, what=what)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _emit_failed(sink: EventSink, node: Node, attempt: int, exc: BaseException) -> None:
    if sink.observed:
        sink.emit(ev.StepFailed(sink.run_id, node.id, time.time(), _describe(exc), attempt))


def _failure(sink: EventSink, node: Node, exc: BaseException) -> StepFailed:
    cls = StepCodecFailed if isinstance(exc, CodecError) else StepFailed
    hint = None
    if isinstance(exc, TimeoutError) and node.fn is not None and node.fn.timeout is not None:
        hint = f"The step ran longer than its timeout of {node.fn.timeout} s"
    elif isinstance(exc, CodecError):
        hint = exc.hint
    return cls(
        f"step failed: {_describe(exc)}",
        flow=sink.flow_name,
        node=node.id,
        hint=hint,
        run_id=sink.run_id,
    )
