"""Crash a flow at a chosen point, resume it, and check it ends as an uninterrupted run.

A user's own hypothesis suite can draw crash points with :func:`crash_points` and hand
each to :func:`check_resume`::

    @given(crash=crash_points(triage))
    async def test_triage_resumes(crash):
        report = await check_resume(triage, "My invoice is wrong!", crash=crash)
        assert report.ok, report.explain()

A crash is injected where the scheduler hands a node to the executor (a node hook, see
:func:`flowdsl._context.context.before_each_node`), so it works the same in real-time and
batch contexts: ``"exception"`` fails that node (as a bug in the
step would), ``"cancel"`` cancels the whole run as the node starts (as a killed notebook
cell or a Ctrl-C would).  Nodes in flight at that moment are lost and run again on resume;
nodes that finished are never run again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import anyio
import attrs

from .. import events as ev
from .._context.calls import flow_arguments, given_options
from .._context.context import Context, before_each_node
from .._define.dsl import Flow
from .._define.graph import Node, NodeKind
from .._errors import StepFailed

__all__ = ["CrashPoint", "InjectedCrash", "ResumeReport", "check_resume", "crash_points"]

CrashKind = Literal["exception", "cancel"]


@attrs.frozen
class CrashPoint:
    """Where and how to crash: as node ``node_id`` is about to run."""

    node_id: str
    kind: CrashKind = "exception"


class InjectedCrash(Exception):
    """The exception an ``"exception"`` crash point raises in place of a node."""


def crash_points(
    flow: Flow[..., Any], *, kinds: tuple[CrashKind, ...] = ("exception", "cancel")
) -> Any:
    """A hypothesis strategy of crash points of *flow*: any step or branch node, any kind.

    A point inside a case that the inputs do not choose never fires; the run then simply
    finishes, which :func:`check_resume` accepts.
    """
    from hypothesis import strategies as st

    nodes = [n for n in flow.graph.nodes if flow.graph[n].kind is not NodeKind.JOIN]
    return st.builds(CrashPoint, st.sampled_from(nodes), st.sampled_from(kinds))


@attrs.frozen
class ResumeReport:
    """What an uninterrupted run did, and what the crashed run and its resume did."""

    expected: Any
    result: Any
    crashed: bool  # the crash point fired
    uninterrupted: frozenset[str]  # nodes the uninterrupted run finished
    before_crash: frozenset[str]  # nodes the crashed run finished before it stopped
    on_resume: frozenset[str]  # nodes the resume ran to their end

    @property
    def rerun(self) -> frozenset[str]:
        """Finished nodes that ran again on resume (always empty when all is well)."""
        return self.before_crash & self.on_resume

    @property
    def ok(self) -> bool:
        return (
            self.result == self.expected
            and not self.rerun
            and (self.before_crash | self.on_resume) == self.uninterrupted
        )

    def explain(self) -> str:
        if self.ok:
            return "the resumed run equals the uninterrupted one"
        lines = []
        if self.result != self.expected:
            lines.append(f"result {self.result!r} != uninterrupted {self.expected!r}")
        if self.rerun:
            lines.append(f"finished nodes ran again: {sorted(self.rerun)}")
        missing = self.uninterrupted - (self.before_crash | self.on_resume)
        extra = (self.before_crash | self.on_resume) - self.uninterrupted
        if missing:
            lines.append(f"nodes never finished: {sorted(missing)}")
        if extra:
            lines.append(f"nodes finished that an uninterrupted run skips: {sorted(extra)}")
        return "; ".join(lines)


class _Crash:
    """A node hook that crashes the run at one node, once."""

    def __init__(self, crash: CrashPoint, scope: anyio.CancelScope) -> None:
        self.crash = crash
        self.scope = scope
        self.fired = False

    async def __call__(self, run: Any, node: Node) -> None:
        if node.id != self.crash.node_id or self.fired:
            return
        self.fired = True
        if self.crash.kind == "cancel":
            self.scope.cancel()
            await anyio.sleep_forever()
        raise StepFailed(
            "crash injected by flowdsl.testing",
            flow=run.flow_name,
            node=node.id,
            run_id=run.run_id,
        ) from InjectedCrash(node.id)


def _finished_by(events: list[Any], run_id: str) -> frozenset[str]:
    return frozenset(
        e.node_id for e in events if isinstance(e, ev.StepFinished) and e.run_id == run_id
    )


async def check_resume(
    flow: Flow[..., Any],
    /,
    *args: Any,
    crash: CrashPoint,
    context: Callable[..., Context] | None = None,
    inputs: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> ResumeReport:
    """Run *flow* uninterrupted, then crashed at *crash* and resumed; report both.

    The flow's arguments are given as to :meth:`flowdsl.Context.run` (``inputs={...}`` for
    a flow with a parameter named ``crash``, ``context`` or ``inputs``).  *context* makes
    each context (called with ``on_event=``; default :class:`flowdsl.Context`); give it a
    factory such as ``lambda **kw: fd.Context(store=f"sqlite:///{tmp}/runs.db", **kw)``
    to check a durable store or batch mode.  A fresh context (and store) is made for each
    of the two runs, the crashed run and its resume sharing one.
    """
    given = given_options(crash=crash, context=context, inputs=inputs)
    args, kwargs = flow_arguments(flow, args, kwargs, inputs, given=given, call="check_resume")
    context = Context if context is None else context
    events: list[Any] = []
    async with context(on_event=events.append) as ctx:
        expected = await ctx.run(flow, *args, run_id="uninterrupted", inputs=kwargs)
    uninterrupted = _finished_by(events, "uninterrupted")

    events.clear()
    run_id = "crashed"
    async with context(on_event=events.append) as ctx:
        with anyio.CancelScope() as scope:
            crashing = _Crash(crash, scope)
            try:
                with before_each_node(ctx, crashing):
                    result = await ctx.run(flow, *args, run_id=run_id, inputs=kwargs)
            except StepFailed as exc:
                if not isinstance(exc.__cause__, InjectedCrash):
                    raise
        before = _finished_by(events, run_id)
        events.clear()
        if crashing.fired:
            result = await ctx.resume(run_id, flow=flow)
        on_resume = _finished_by(events, run_id)
    return ResumeReport(
        expected=expected,
        result=result,
        crashed=crashing.fired,
        uninterrupted=uninterrupted,
        before_crash=before,
        on_resume=on_resume,
    )
