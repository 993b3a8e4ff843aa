"""The scheduler: which node may run next, and the one loop that runs them.

Two halves, kept apart so a test can drive the first without any I/O:

:class:`RunState` is plain data with explicit transitions.  Every node is in one state::

    WAITING --(all inputs done, guard chosen)--> READY --(dispatched)--> RUNNING --> DONE
       \\--(its branch chose another case)--> SKIPPED

A node waits on its data inputs and on the branch whose case it sits in.  When a branch
finishes, the nodes of the cases it did not choose become SKIPPED at once (nested ones too),
and its JOIN node starts waiting on the chosen case's result.  JOIN nodes are evaluated by
the state itself: they run no user code.

:func:`drive` is the I/O loop, written once for every mode.  It hands READY nodes to an
:class:`Executor` (which runs the step in this process, or ships it to a queue and waits for
a worker's answer) and feeds the results back into the state.  A chain whose next node is
the only one made ready continues in the same task: spawning costs far more than a trivial
step, so the loop spawns only where the graph really fans out.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from typing import Any, Protocol

import anyio

from .._define.graph import DYNAMIC_KINDS, Graph, Node, NodeKind, evaluate, refs_of
from .._errors import FlowError, StepFailed, first_leaf
from .._records import NodeRecord
from .spawn import NodeGroup, open_node_group

__all__ = ["Executor", "NodeHook", "Plan", "RunState", "drive"]

WAITING, READY, RUNNING, DONE, SKIPPED = range(5)
_NO_KWARGS: dict[str, Any] = {}  # shared: callees receive it as **kwargs, a copy
STATE_NAMES = ("waiting", "ready", "running", "done", "skipped")


class Plan:
    """What the scheduler precomputes once per graph."""

    __slots__ = (
        "_fingerprint",
        "_markers",
        "case_members",
        "dependents",
        "dynamic",
        "graph",
        "guard_dependents",
        "initial",
        "joins",
        "nodes",
        "roots",
    )

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.nodes: Mapping[str, Node] = graph.nodes_by_id
        initial: dict[str, int] = {}
        dependents: dict[str, list[str]] = {n: [] for n in graph.order}
        guard_dependents: dict[str, list[str]] = {n: [] for n in graph.order}
        case_members: dict[tuple[str, str], list[str]] = {}
        joins: dict[str, str] = {}
        for node_id in graph.order:
            node = self.nodes[node_id]
            count = 0
            if node.kind is NodeKind.JOIN:
                joins[node.name] = node_id
                count = 1  # its branch; the chosen case's inputs are added when it is known
            else:
                for dep in node.data_deps:
                    dependents[dep].append(node_id)
                    count += 1
            for pair in node.guard:
                case_members.setdefault(pair, []).append(node_id)
            # A join needs no guard edge: its branch only runs once the guard is chosen.
            if node.guard and node.kind is not NodeKind.JOIN:
                guard_dependents[node.guard[-1][0]].append(node_id)
                count += 1
            initial[node_id] = count
        self.initial = initial
        self.dependents = {k: tuple(v) for k, v in dependents.items()}
        self.guard_dependents = {k: tuple(v) for k, v in guard_dependents.items()}
        self.case_members = {k: tuple(v) for k, v in case_members.items()}
        self.joins = joins
        self.roots = tuple(n for n in graph.order if initial[n] == 0)
        # Whether a node expands at run time (map, loop, wait): the driver then hands
        # those to _engine/dynamic.py, and runs with no such node pay nothing for it.
        self.dynamic = any(n.kind in DYNAMIC_KINDS for n in self.nodes.values())
        self._fingerprint: str | None = None
        self._markers: dict[str, str] | None = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self.graph.fingerprint
        return self._fingerprint

    @property
    def markers(self) -> dict[str, str]:
        """Per step and branch node: its code and wiring marker (see :mod:`._resume`)."""
        if self._markers is None:
            from .resume import node_marker

            self._markers = {
                n: node_marker(node)
                for n, node in self.nodes.items()
                if node.kind is not NodeKind.JOIN
            }
        return self._markers


class RunState:
    """The mutable state of one run over a :class:`Plan`.  No I/O, no awaits."""

    __slots__ = (
        "extra_dependents",
        "inputs",
        "plan",
        "remaining",
        "results",
        "skipped",
        "status",
        "unresolved",
    )

    def __init__(self, plan: Plan, inputs: Mapping[str, Any]) -> None:
        self.plan = plan
        self.inputs = inputs
        self.remaining = dict(plan.initial)
        self.status = dict.fromkeys(plan.graph.order, WAITING)
        self.results: dict[str, Any] = {}
        self.unresolved = len(self.status)
        self.skipped: list[str] = []  # newly skipped ids, drained by the driver for events
        self.extra_dependents: dict[str, list[str]] = {}

    @property
    def finished(self) -> bool:
        return self.unresolved == 0

    def start(self) -> list[Node]:
        """The nodes ready at the start; each becomes RUNNING."""
        ready: list[Node] = []
        for node_id in self.plan.roots:
            self._make_ready(node_id, ready)
        return ready

    def args_of(self, node: Node) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The argument values of a ready node."""
        inputs, results = self.inputs, self.results
        args = tuple([evaluate(e, inputs, results) for e in node.args])
        if not node.kwargs:
            return args, _NO_KWARGS
        return args, {k: evaluate(e, inputs, results) for k, e in node.kwargs}

    def complete(self, node_id: str, value: Any) -> list[Node]:
        """Record *node_id*'s result (a case label for a branch); return newly ready nodes."""
        if self.status[node_id] is not RUNNING:
            raise RuntimeError(f"node {node_id!r} completed while {self.state_of(node_id)}")
        ready: list[Node] = []
        self._finish(node_id, value, ready)
        return ready

    def state_of(self, node_id: str) -> str:
        return STATE_NAMES[self.status[node_id]]

    def output(self) -> Any:
        """The flow's result, once :attr:`finished`."""
        return evaluate(self.plan.graph.output, self.inputs, self.results)

    # transitions

    def _finish(self, node_id: str, value: Any, ready: list[Node]) -> None:
        self.status[node_id] = DONE
        self.results[node_id] = value
        self.unresolved -= 1
        plan = self.plan
        if plan.nodes[node_id].kind is NodeKind.BRANCH:
            self._decide(node_id, value, ready)
        for dep in plan.dependents[node_id]:
            self._satisfy(dep, ready)
        extra = self.extra_dependents.pop(node_id, None)
        if extra:
            for dep in extra:
                self._satisfy(dep, ready)

    def _decide(self, branch_id: str, case: str, ready: list[Node]) -> None:
        plan = self.plan
        others: set[str] = set()
        for member in plan.guard_dependents[branch_id]:
            member_case = plan.nodes[member].guard[-1][1]
            if member_case == case:
                self._satisfy(member, ready)
            else:
                others.add(member_case)
        for other in sorted(others):
            self._skip_case(branch_id, other)
        join_id = plan.joins[branch_id]
        join = plan.nodes[join_id]
        for ref in refs_of(join.case_expr(case)):
            if self.status[ref] is not DONE:
                self.remaining[join_id] += 1
                self.extra_dependents.setdefault(ref, []).append(join_id)
        self._satisfy(join_id, ready)

    def _skip_case(self, branch_id: str, case: str) -> None:
        for member in self.plan.case_members.get((branch_id, case), ()):
            if self.status[member] is WAITING:
                self.status[member] = SKIPPED
                self.unresolved -= 1
                self.skipped.append(member)

    def _satisfy(self, node_id: str, ready: list[Node]) -> None:
        remaining = self.remaining[node_id] - 1
        self.remaining[node_id] = remaining
        if remaining == 0 and self.status[node_id] is WAITING:
            self._make_ready(node_id, ready)

    def _make_ready(self, node_id: str, ready: list[Node]) -> None:
        node = self.plan.nodes[node_id]
        if node.kind is NodeKind.JOIN:
            self.status[node_id] = RUNNING
            case = self.results[node.name]
            value = evaluate(node.case_expr(case), self.inputs, self.results)
            self._finish(node_id, value, ready)
        else:
            self.status[node_id] = RUNNING
            ready.append(node)


class RunLike(Protocol):
    """What the driver needs of a run: its id, flow name and state."""

    run_id: str
    flow_name: str


class Executor:
    """How a context carries a node to where it runs and its result back.

    ``execute`` runs *node* with *args* (in this process, or by shipping a task to a
    queue and waiting for a worker), makes its result durable, and returns the node's
    journal record and its decoded result: the step's value, or the chosen case's label
    for a branch.  It raises :class:`~flowdsl.StepFailed` when the node failed for good.

    The other methods are what an executor *may* do, declared here with what an executor
    that does not do them means: no bare jobs, nothing to watch, nothing to tidy.
    """

    def execute(
        self, run: Any, node: Node, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Awaitable[tuple[NodeRecord, Any]]:
        raise NotImplementedError

    def job(
        self, run: Any, node: Node, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Any, ...] | None:
        """The node as a bare task ``(job, coroutine, key)`` for the task group, or None to
        send it through :meth:`execute` (the real-time fast path offers one)."""
        return None

    def watch(self, run: Any) -> None:
        """A run starts whose events this executor must deliver (batch: off the broker)."""

    def unwatch(self, run: Any) -> None:
        """The run ended: its events are no longer wanted."""

    async def resuming(self, run: Any, reused: Collection[str] = ()) -> None:
        """A run resumes; *reused* are the nodes its journal already holds."""

    async def ended(self, run: Any, ok: bool) -> None:
        """A run ended (``ok`` False: failed or cancelled)."""


NodeHook = Callable[[Any, Node], Awaitable[None]]
"""Awaited with the run and the node as each node is dispatched, before the executor has it.

:mod:`flowdsl.testing` injects crashes this way: a hook that raises fails the node as its
step would, one that cancels stops the run where it stands.
"""


async def drive(
    run: Any,
    state: RunState,
    ready: Iterable[Node],
    executor: Executor,
    *,
    limiter: anyio.CapacityLimiter | None = None,
    on_skipped: Callable[[list[str]], None] | None = None,
    before: NodeHook | None = None,
    store: Any = None,
    scope: Any = None,
) -> Any:
    """Run the nodes of *state* to the end; return the flow's output.

    *ready* are the nodes to dispatch first (``state.start()``, or what a resume left).
    The first chain runs in the calling task; every other ready node gets a task of its
    own.  The first failure cancels every node still in flight and is raised once they
    are gone.  *before*, if given, is awaited as each node is dispatched.

    Map, loop and wait nodes are carried by a :class:`~._engine.dynamic.Scope` (made
    here, over *store*, when the plan has any), which runs their items and iterations
    through the same *executor* (and *before*), and a mapped or looped flow's sub-graph
    through this very function, with *scope* naming where in the run that sub-graph sits.
    """
    top = scope is None  # the run's own drive, not a map item's or a loop's sub-graph
    if top and state.plan.dynamic:
        from .dynamic import Dynamic

        dynamic = Dynamic(run, state.plan, store, executor, limiter, on_skipped, before)
        scope, executor = dynamic.root, dynamic.executor
    execute = executor.execute
    prefix = scope.prefix if scope is not None else ""

    if scope is None:

        def dispatch(node: Node) -> Awaitable[tuple[NodeRecord, Any]]:
            args, kwargs = state.args_of(node)
            if before is not None:
                return _hooked(before, limiter, execute, run, node, args, kwargs)
            if limiter is None:
                return execute(run, node, args, kwargs)
            return _limited(limiter, execute, run, node, args, kwargs)

    else:

        def dispatch(node: Node) -> Awaitable[tuple[NodeRecord, Any]]:
            args, kwargs = state.args_of(node)
            if node.kind in DYNAMIC_KINDS:
                # Never under the limiter: a map holds no slot while its items wait for one.
                return scope.execute(run, node, args, kwargs)  # type: ignore[no-any-return]
            if prefix:
                node = scope.named(node)
            if before is not None:
                return _hooked(before, limiter, execute, run, node, args, kwargs)
            if limiter is None:
                return execute(run, node, args, kwargs)
            return _limited(limiter, execute, run, node, args, kwargs)

    def report_skipped() -> None:
        if state.skipped and on_skipped is not None:
            skipped, state.skipped = state.skipped, []
            on_skipped(skipped)

    # A bare job skips dispatch(): only without a limiter or a hook to go through, and not
    # for a sub-graph's nodes, which run under ids of their own (`map[2]/node`).
    make_job = executor.job if limiter is None and before is None and not prefix else None

    def spawn(group: NodeGroup, node: Node) -> None:
        """Give *node* a task of its own: a bare job when the executor offers one."""
        if (
            make_job is not None
            and group.supports_jobs
            and (scope is None or node.kind not in DYNAMIC_KINDS)
        ):
            args, kwargs = state.args_of(node)
            job = make_job(run, node, args, kwargs)
            if job is not None:
                group.spawn_job(*job)
                return
        group.spawn(dispatch(node), node)

    first = list(ready)
    report_skipped()
    if first:

        def finish(node: Node, outcome: tuple[NodeRecord, Any]) -> None:
            if outcome[0].usage:
                run.add_usage(outcome[0].usage)
            newly = state.complete(node.id, outcome[1])
            report_skipped()
            for other in newly:
                spawn(group, other)

        try:
            async with open_node_group(finish) as group:
                if top:
                    run.node_group = group  # what ctx.cancel(run_id) fails
                for other in first[1:]:
                    spawn(group, other)
                node: Node | None = first[0]
                while node is not None:
                    # A chain continues in this task: the next node is awaited here, and
                    # only its siblings get tasks of their own.
                    record, value = await dispatch(node)
                    if record.usage:
                        run.add_usage(record.usage)
                    newly = state.complete(node.id, value)
                    report_skipped()
                    node = newly[0] if newly else None
                    for other in newly[1:]:
                        spawn(group, other)
        except BaseExceptionGroup as group_exc:
            failure = _first_failure(group_exc)
            if failure is not None:
                raise failure from failure.__cause__
            cancelled, rest = group_exc.split(anyio.get_cancelled_exc_class())
            if cancelled is not None and rest is None:
                # The caller was cancelled: raise that as such, not as a group.
                raise first_leaf(cancelled) from None
            raise
        finally:
            if top:
                run.node_group = None
    if not state.finished:  # pragma: no cover - a scheduler bug, never a user error
        stuck = [n for n, s in state.status.items() if s in (WAITING, READY)]
        raise RuntimeError(f"run {run.run_id!r} stalled with nodes waiting: {stuck[:10]}")
    return state.output()


async def _limited(
    limiter: anyio.CapacityLimiter,
    execute: Callable[..., Awaitable[tuple[NodeRecord, Any]]],
    *args: Any,
) -> tuple[NodeRecord, Any]:
    async with limiter:
        return await execute(*args)


async def _hooked(
    before: NodeHook,
    limiter: anyio.CapacityLimiter | None,
    execute: Callable[..., Awaitable[tuple[NodeRecord, Any]]],
    run: Any,
    node: Node,
    *args: Any,
) -> tuple[NodeRecord, Any]:
    await before(run, node)
    if limiter is None:
        return await execute(run, node, *args)
    return await _limited(limiter, execute, run, node, *args)


def _first_failure(group: BaseExceptionGroup[Any]) -> FlowError | None:
    """The first StepFailed (else the first other FlowError, such as a queue that is away)
    when the rest of *group* is only flowdsl errors and the cancellations they caused: a
    run fails with one error that names its flow and node, not with a group."""
    cancelled = anyio.get_cancelled_exc_class()
    failures, rest = group.split(FlowError)
    if failures is None:
        return None
    if rest is not None:
        _, other = rest.split(cancelled)
        if other is not None:
            return None
    steps, _ = failures.split(StepFailed)
    exc = first_leaf(steps if steps is not None else failures)
    assert isinstance(exc, FlowError)
    return exc
