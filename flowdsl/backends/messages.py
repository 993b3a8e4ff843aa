"""What crosses a queue in batch mode: tasks, completions and events.

Three kinds of message, all JSON text made by the codec (never pickle):

- a **task**: one ready node of one run, with its encoded arguments; the scheduler (in the
  process that started or resumed the run) puts it on the queue;
- a **completion**: a worker's answer for a task: the node's committed journal record, or
  why it failed; the scheduler waits for it;
- an **event** of an observed run, produced where the step runs (one of
  :mod:`flowdsl.events`, tagged with its class name).

Tasks and completions carry an integrity check (``check``) over the rest of the message,
made and verified with the process's :class:`~flowdsl._integrity.Seal`: a digest without
a signing key, an HMAC with one, so that a worker refuses a task a process without the
key wrote, and a client a completion.  Events are reports and carry none.

A broker only carries these.  The dependency logic stays in the scheduler, the same one
real-time mode runs; the journal stays in the store.  The layout is broker-neutral: the
SQLite queue, Redis Streams and NATS JetStream carry the same messages.
"""

from __future__ import annotations

from typing import Any, Final

import attrs

from .. import _codec
from .. import events as ev
from .._errors import CheckpointError, CodecError
from .._integrity import UNKEYED, Invalid, Seal
from .._records import NodeRecord

__all__ = [
    "Claimed",
    "Completion",
    "Finished",
    "TaskMessage",
    "decode_completion",
    "decode_event",
    "decode_task",
    "encode_completion",
    "encode_event",
    "encode_task",
    "task_text",
]

PROTOCOL = 1


@attrs.frozen
class TaskMessage:
    """One node to run."""

    run_id: str
    node_id: str
    flow: str
    step: str  # ``module:qualname`` of the step or branch function
    kind: str  # "step" or "branch"
    labels: tuple[str, ...]
    args: tuple[Any, ...]  # encoded data
    kwargs: dict[str, Any]  # encoded data
    marker: str
    observed: bool
    # OpenTelemetry context of the run (W3C headers), so a worker's span joins its trace.
    trace: dict[str, str] = attrs.field(factory=dict)
    v: int = PROTOCOL
    # How many times the task may be handed out before it is a poison task; None: as the
    # worker that takes it is configured (``flowdsl worker --max-deliveries``).
    max_deliveries: int | None = None
    check: str = ""  # over the rest of the message (see encode_task); the last field


@attrs.frozen
class Completion:
    """A worker's answer for a task.

    ``error_kind`` says how it failed: ``"step"`` (the step raised after its retries),
    ``"codec"``, ``"config"`` (the step cannot be imported where the worker runs),
    ``"checkpoint"`` (the task or state was malformed) or ``"dead"`` (a poison task: it was
    handed out more than ``max_deliveries`` times, each worker that took it dying or losing
    its lease before it finished).  ``traceback`` is the step's exception's, formatted and
    masked by the worker (see ``flowdsl._tracebacks``), when the step raised.
    """

    run_id: str
    node_id: str
    ok: bool
    record: NodeRecord | None = None
    error: str | None = None
    error_kind: str | None = None
    traceback: str | None = None
    v: int = PROTOCOL
    check: str = ""  # over the rest of the message (see encode_completion)


@attrs.frozen
class Claimed:
    """A task a worker holds under a lease."""

    task_id: str
    deliveries: int  # how many times it was handed out, this time included
    payload: str  # the task's JSON text, decoded by the worker (it may be malformed)
    # What the broker knows of the task apart from its payload, so that a payload too
    # broken to name its run still fails that run instead of leaving it waiting.
    run_id: str | None = None
    node_id: str | None = None


@attrs.frozen
class Finished:
    """A task a worker is done with, for :meth:`~flowdsl.backends.base.Broker.complete_many`
    (or ``commit_and_complete_many``) to complete along with others in one round trip.

    *payload* is its completion message; *events* the node's events, published before
    it; *record*, when set, the node's record to commit first (``commit_and_complete``);
    *dead*, when set, why the task is dead-lettered instead of completed.
    """

    task_id: str
    run_id: str
    node_id: str
    payload: str
    events: tuple[tuple[str, str], ...] = ()
    record: NodeRecord | None = None
    dead: str | None = None


_converter = _codec.converter


def _sealed(kind: str, message: object, seal: Seal) -> str:
    """The message's JSON text, its ``check`` (the last field) made over the rest."""
    data = _converter.unstructure(message)
    del data["check"]
    return _seal_data(kind, data, seal)


def _seal_data(kind: str, data: dict[str, Any], seal: Seal) -> str:
    """The JSON text of a message's fields (all but ``check``), with its check last."""
    body = _codec.dumps(data)
    # The check goes last, so the text the check covers is the message's own text up to
    # it: no second encoding of the whole message.
    check = seal.make_text(kind, body)
    return f'{body[:-1]},"check":"{check}"}}'


def _verify(kind: str, data: Any, seal: Seal) -> None:
    """Raise Invalid unless *data* (a parsed message) carries the check of the rest."""
    if not isinstance(data, dict):
        return  # structuring refuses it with a better message
    rest = dict(data)
    check = rest.pop("check", None)
    seal.verify_text(check, kind, _codec.dumps(rest))


_CHECK_FIELD = ',"check":"'


def _verify_text(kind: str, text: str | bytes, seal: Seal) -> bool:
    """Verify the check of a message on its text as :func:`_sealed` wrote it (the check
    last, over the text before it) without re-encoding it: True when the check holds.
    False when the text is not of that shape (the caller verifies the parsed message
    instead); Invalid when it is and the check does not hold."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            return False
    i = text.rfind(_CHECK_FIELD)
    if i < 0 or not text.endswith('"}'):
        return False
    check = text[i + len(_CHECK_FIELD) : -2]
    if '"' in check or "\\" in check:
        return False
    seal.verify_text(check, kind, text[:i] + "}")
    return True


def _hint(seal: Seal) -> str:
    if seal.signed:
        return (
            "Workers and clients must share the signing key; otherwise the message was "
            "not written by flowdsl (docs/security.md)"
        )
    return "The queue holds data flowdsl did not write, or changed after it was written"


def encode_task(task: TaskMessage, seal: Seal = UNKEYED) -> str:
    return task_text(
        task.run_id,
        task.node_id,
        task.flow,
        task.step,
        task.kind,
        task.labels,
        task.args,
        task.kwargs,
        task.marker,
        task.observed,
        task.trace,
        task.max_deliveries,
        seal,
        v=task.v,
    )


def task_text(
    run_id: str,
    node_id: str,
    flow: str,
    step: str,
    kind: str,
    labels: tuple[str, ...],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    marker: str,
    observed: bool,
    trace: dict[str, str],
    max_deliveries: int | None,
    seal: Seal = UNKEYED,
    *,
    v: int = PROTOCOL,
) -> str:
    """The text :func:`encode_task` gives of the :class:`TaskMessage` of these fields,
    without the message (a client sends thousands a second)."""
    # The fields by hand, in their order: args and kwargs are encoded data already, and
    # the converter's walk over them cost more than the rest of the encoding.  The same
    # text as _sealed("task", task, seal).
    data = {
        "run_id": run_id,
        "node_id": node_id,
        "flow": flow,
        "step": step,
        "kind": kind,
        "labels": labels,
        "args": args,
        "kwargs": kwargs,
        "marker": marker,
        "observed": observed,
        "trace": trace,
        "v": v,
        "max_deliveries": max_deliveries,
    }
    return _seal_data("task", data, seal)


def _verified_data(kind: str, text: str | bytes, seal: Seal) -> Any:
    """*text* parsed, its check verified on the text as it came when it has the usual
    shape, else on the parsed message (which says why it fails); raises Invalid."""
    try:
        verified = _verify_text(kind, text, seal)
    except Invalid:
        verified = False  # verified below on the parsed message, which says why
    data = _codec.loads(text)
    if not verified:
        _verify(kind, data, seal)
    return data


def decode_task(text: str | bytes, seal: Seal = UNKEYED) -> TaskMessage:
    """A task message from untrusted text; malformed input, or a check that does not hold
    under *seal*, raises CheckpointError.  The check is verified on the text as it came (a
    worker reads thousands a second), as for completions."""
    try:
        data = _verified_data("task", text, seal)
        task = _task_of(data) or _converter.structure(data, TaskMessage)
    except Invalid as exc:
        raise CheckpointError(
            f"task message refused: {exc}", node=_peek(text, "node_id"), hint=_hint(seal)
        ) from None
    except (CodecError, Exception) as exc:
        run_id = _peek(text, "run_id")
        raise CheckpointError(
            f"malformed task message: {_short(exc)}",
            node=_peek(text, "node_id"),
            hint=f"The queue holds data flowdsl did not write (run {run_id!r}); the run fails, "
            "others go on",
        ) from exc
    if task.v != PROTOCOL:
        raise CheckpointError(
            f"task message of protocol {task.v}, this worker speaks {PROTOCOL}",
            node=task.node_id,
            hint="Run workers of the same flowdsl version as the clients",
        )
    return task


def encode_completion(completion: Completion, seal: Seal = UNKEYED) -> str:
    return _sealed("completion", completion, seal)


def decode_completion(text: str | bytes, seal: Seal = UNKEYED) -> Completion:
    """A completion from untrusted text; malformed input, or a check that does not hold
    under *seal*, raises CheckpointError.  The check is verified on the text as it came
    (a client reads thousands a second): the message is parsed once, never re-encoded."""
    try:
        data = _verified_data("completion", text, seal)
        completion = _completion_of(data) or _converter.structure(data, Completion)
    except Invalid as exc:
        raise CheckpointError(
            f"completion message refused: {exc}", node=_peek(text, "node_id"), hint=_hint(seal)
        ) from None
    except Exception as exc:
        raise CheckpointError(
            f"malformed completion message: {_short(exc)}",
            node=_peek(text, "node_id"),
            hint="The queue holds data flowdsl did not write",
        ) from exc
    return completion


# --- structuring by hand ---------------------------------------------------------------
#
# A client reads thousands of completions a second, a worker as many tasks: the
# converter's walk over a message cost more than parsing and verifying it.  These take a
# message exactly as flowdsl writes it, with the checks the converter makes (no unknown
# field, every field of its type, ``bool`` no ``int``), and build what it would build;
# anything else gives None, and the converter structures it or says why it cannot.

_TASK_FIELDS: Final = frozenset(a.name for a in attrs.fields(TaskMessage))
_COMPLETION_FIELDS: Final = frozenset(a.name for a in attrs.fields(Completion))
_RECORD_FIELDS: Final = frozenset(a.name for a in attrs.fields(NodeRecord))
_TEXT_OR_NONE: Final = (str, type(None))
_INT_OR_NONE: Final = (int, type(None))


def _task_of(data: Any) -> TaskMessage | None:
    if type(data) is not dict or not data.keys() <= _TASK_FIELDS:
        return None
    get = data.get
    run_id, node_id, flow, step, kind, marker, observed, v, check = (
        get("run_id"),
        get("node_id"),
        get("flow"),
        get("step"),
        get("kind"),
        get("marker"),
        get("observed"),
        get("v", PROTOCOL),
        get("check", ""),
    )
    labels, args, kwargs, trace = get("labels"), get("args"), get("kwargs"), get("trace", {})
    max_deliveries = get("max_deliveries")
    if not (
        type(run_id) is str
        and type(node_id) is str
        and type(flow) is str
        and type(step) is str
        and type(kind) is str
        and type(marker) is str
        and type(observed) is bool
        and type(v) is int
        and type(check) is str
        and type(max_deliveries) in _INT_OR_NONE
        and type(labels) is list
        and all(type(label) is str for label in labels)
        and type(args) is list
        and type(kwargs) is dict
        and type(trace) is dict
        and all(type(key) is str and type(value) is str for key, value in trace.items())
        and all(type(key) is str for key in kwargs)
    ):
        return None
    return TaskMessage(
        run_id,
        node_id,
        flow,
        step,
        kind,
        tuple(labels),
        tuple(args),
        dict(kwargs),
        marker,
        observed,
        dict(trace),
        v,
        max_deliveries,
        check,
    )


def _completion_of(data: Any) -> Completion | None:
    if type(data) is not dict or not data.keys() <= _COMPLETION_FIELDS:
        return None
    get = data.get
    run_id, node_id, ok, record = get("run_id"), get("node_id"), get("ok"), get("record")
    error, error_kind, traceback = get("error"), get("error_kind"), get("traceback")
    v, check = get("v", PROTOCOL), get("check", "")
    if not (
        type(run_id) is str
        and type(node_id) is str
        and type(ok) is bool
        and type(error) in _TEXT_OR_NONE
        and type(error_kind) in _TEXT_OR_NONE
        and type(traceback) in _TEXT_OR_NONE
        and type(v) is int
        and type(check) is str
    ):
        return None
    if record is not None:
        record = _record_of(record)
        if record is None:
            return None
    return Completion(run_id, node_id, ok, record, error, error_kind, traceback, v, check)


def _record_of(data: Any) -> NodeRecord | None:
    if type(data) is not dict or not data.keys() <= _RECORD_FIELDS:
        return None
    get = data.get
    node_id, value, attempts = get("node_id"), get("value"), get("attempts")
    started_at, finished_at = get("started_at"), get("finished_at")
    code, usage = get("code", ""), get("usage")
    # Times as a worker writes them (floats); an integer is left to the converter.
    if not (
        type(node_id) is str
        and type(value) is str
        and type(attempts) is int
        and type(started_at) is float
        and type(finished_at) is float
        and type(code) is str
    ):
        return None
    if usage is not None:
        if type(usage) is not dict or not all(type(key) is str for key in usage):
            return None
        usage = dict(usage)
    return NodeRecord(node_id, value, attempts, started_at, finished_at, code, usage)


def peek_run_id(text: str | bytes) -> str | None:
    return _peek(text, "run_id")


def _peek(text: str | bytes, key: str) -> str | None:
    try:
        data = _codec.loads(text)
    except CodecError:
        return None
    value = data.get(key) if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) < 300 else text[:300] + "..."


_EVENTS = {cls.__name__: cls for cls in ev.EVENT_TYPES}


def encode_event(event: Any) -> str:
    """An event as JSON text, its class named under ``type``."""
    data = _codec.converter.unstructure(event)
    data["type"] = type(event).__name__
    return _codec.dumps(data)


def decode_event(text: str) -> Any:
    """An event from untrusted text: only the known event classes can come out."""
    data = _codec.loads(text)
    if not isinstance(data, dict):
        raise CodecError("an event must be a JSON object")
    cls = _EVENTS.get(data.pop("type", None))
    if cls is None:
        raise CodecError("unknown event type")
    return _codec.converter.structure(data, cls)
