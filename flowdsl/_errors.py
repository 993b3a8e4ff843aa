"""Every error flowdsl raises, rooted at :class:`FlowError`.

The hierarchy::

    FlowError                     anything flowdsl raises on purpose
    ├── TracingError (TypeError)  a flow body that cannot become a graph (definition time)
    ├── StepFailed (RuntimeError) a node failed at run time; the original error is __cause__
    ├── CodecError (TypeError)    a value the codec cannot carry, or data it cannot read back
    ├── CheckpointError (RuntimeError)
    │                             a corrupted store record, or a resume the flow's changes forbid
    ├── ConfigError (ValueError)  a bad URL or option, a missing extra, an unimportable step
    ├── RunBusy (RuntimeError)    a run that another live process drives (asked not to wait)
    └── BackendUnavailable (ConnectionError)
                                  a store or queue server that does not answer (down,
                                  restarting, unreachable): worth waiting for, unlike the rest

Each subclass also inherits the builtin it resembles, so ``except TypeError`` code written
before flowdsl still catches what it used to.  Constructors take the structured parts (the
flow, the node, a hint) and build the message, so every message has the same shape:
``flow 'triage', node 'classify': <what went wrong>. <what to do>``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BackendUnavailable",
    "CheckpointError",
    "CodecError",
    "ConfigError",
    "FlowError",
    "RunBusy",
    "StepFailed",
    "TracingError",
]


class FlowError(Exception):
    """The base of every error flowdsl raises."""

    def __init__(
        self,
        problem: str,
        *,
        flow: str | None = None,
        node: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.problem = problem
        self.flow = flow
        self.node = node
        self.hint = hint
        super().__init__(self._format())

    def _format(self) -> str:
        where = []
        if self.flow is not None:
            where.append(f"flow {self.flow!r}")
        if self.node is not None:
            where.append(f"node {self.node!r}")
        message = self.problem
        if where:
            message = f"{', '.join(where)}: {message}"
        if self.hint:
            message = f"{message.rstrip('.')}. {self.hint}"
        return message

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only constructors break the default exception pickling that
        # multiprocessing and pytest-xdist rely on; rebuild from the parts instead.
        return (_rebuild, (type(self), self.problem, self.flow, self.node, self.hint))


def _rebuild(
    cls: type[FlowError], problem: str, flow: str | None, node: str | None, hint: str | None
) -> FlowError:
    return cls(problem, flow=flow, node=node, hint=hint)


class TracingError(FlowError, TypeError):
    """A flow body that cannot be traced into a graph, raised at definition time."""


class StepFailed(FlowError, RuntimeError):
    """A node failed at run time, after its retries.

    ``node_id`` names the node, ``run_id`` the run; the exception the step raised is
    ``__cause__``.
    """

    def __init__(
        self,
        problem: str,
        *,
        flow: str | None = None,
        node: str | None = None,
        hint: str | None = None,
        run_id: str | None = None,
    ) -> None:
        self.run_id = run_id
        super().__init__(problem, flow=flow, node=node, hint=hint)

    @property
    def node_id(self) -> str | None:
        return self.node

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_step_failed,
            (type(self), self.problem, self.flow, self.node, self.hint, self.run_id),
        )


def _rebuild_step_failed(
    cls: type[StepFailed],
    problem: str,
    flow: str | None,
    node: str | None,
    hint: str | None,
    run_id: str | None,
) -> StepFailed:
    return cls(problem, flow=flow, node=node, hint=hint, run_id=run_id)


class CodecError(FlowError, TypeError):
    """A value the codec cannot encode, or stored data it cannot decode."""


class CheckpointError(FlowError, RuntimeError):
    """A store record that is malformed, or a resume that the flow's changes make unsafe."""


class ConfigError(FlowError, ValueError):
    """A bad URL or option, a missing extra or an unimportable step."""


class RunBusy(FlowError, RuntimeError):
    """Another live process drives the run (it holds the run's lease), and the caller
    asked not to wait for it (``wait=False``): nothing was executed.

    ``run_id`` names the run, ``owner`` the lease's holder, ``expires_at`` when its lease
    runs out unless it renews it (wall-clock seconds).
    """

    def __init__(
        self,
        problem: str,
        *,
        flow: str | None = None,
        node: str | None = None,
        hint: str | None = None,
        run_id: str | None = None,
        owner: str | None = None,
        expires_at: float | None = None,
    ) -> None:
        self.run_id = run_id
        self.owner = owner
        self.expires_at = expires_at
        super().__init__(problem, flow=flow, node=node, hint=hint)

    def __reduce__(self) -> tuple[object, ...]:
        parts = (self.problem, self.flow, self.node, self.hint, self.run_id, self.owner)
        return (_rebuild_busy, (type(self), parts, self.expires_at))


def _rebuild_busy(
    cls: type[RunBusy], parts: tuple[str | None, ...], expires_at: float | None
) -> RunBusy:
    problem, flow, node, hint, run_id, owner = parts
    return cls(
        problem or "",
        flow=flow,
        node=node,
        hint=hint,
        run_id=run_id,
        owner=owner,
        expires_at=expires_at,
    )


class BackendUnavailable(FlowError, ConnectionError):
    """A store's or queue's server that does not answer: down, restarting, unreachable.

    Raised where flowdsl calls the client library, after the backend's calls have waited
    out the server as long as they may (``retry_for``).  Unlike a :class:`CheckpointError`
    (data that is wrong), it says nothing about the data: workers wait and try again.

    ``server`` names the server (its URL's credentials hidden), ``operation`` what was
    being done, ``waited`` how many seconds calls were retried (``None``: the first
    connection failed), ``reason`` the client library's own words.
    """

    def __init__(
        self,
        server: str,
        *,
        operation: str | None = None,
        waited: float | None = None,
        reason: str | None = None,
        run_id: str | None = None,
        flow: str | None = None,
        node: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.server = server
        self.operation = operation
        self.waited = waited
        self.reason = reason
        self.run_id = run_id
        if waited is None:
            problem = f"cannot reach {server}"
        else:
            problem = f"{server} has not answered for {waited:g} s"
        if operation is not None:
            problem += f" ({operation})"
        if run_id is not None:
            problem += f" (run {run_id!r})"
        if reason:
            problem += f": {reason}"
        super().__init__(
            problem,
            flow=flow,
            node=node,
            hint=hint or "Check that the server runs and is reachable from this machine",
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_unavailable,
            (
                type(self),
                self.server,
                (self.operation, self.reason, self.run_id, self.flow, self.node, self.hint),
                self.waited,
            ),
        )


def _rebuild_unavailable(
    cls: type[BackendUnavailable],
    server: str,
    texts: tuple[str | None, ...],
    waited: float | None,
) -> BackendUnavailable:
    operation, reason, run_id, flow, node, hint = texts
    return cls(
        server,
        operation=operation,
        waited=waited,
        reason=reason,
        run_id=run_id,
        flow=flow,
        node=node,
        hint=hint,
    )


class StepCodecFailed(StepFailed, CodecError):
    """A step whose result (or arguments) the codec cannot carry.

    It is both a :class:`StepFailed` (the run failed at that node) and a
    :class:`CodecError` (the reason), so either ``except`` clause catches it.
    """


# --- exception groups -------------------------------------------------------------------------
# Task groups wrap what fails inside them; the scheduler, Context.map and the command line
# each hand the user the error itself, found the same way.


def leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    """The exceptions in *group* and its nested groups, depth first, in order."""
    out: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(reversed(exc.exceptions))
        else:
            out.append(exc)
    return out


def first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first exception in *group* that is not itself a group."""
    return leaves(group)[0]
