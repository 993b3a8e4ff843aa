"""Running dynamic nodes: the items of a map, the iterations of a loop, a wait's signal.

The traced graph holds ONE node for each (see ``_define/dynamic.py``); the scheduler's
:func:`~._engine.scheduler.drive` hands such a node to the :class:`Scope` it runs in, which
expands it here.  Nothing here decides which node may run: an item or an iteration of a
step goes to the very executor every other node goes to (a task on the broker, in batch
mode), and a mapped or looped flow's sub-graph runs through ``drive`` itself, over a
:class:`RunState` of that flow's plan, in a child scope.

Every piece is journaled under an id derived from the node's, so the store needs nothing
new and a resume reruns only what had not finished:

- ``summarize[3]``: item 3 of a map (for a mapped flow, the item's result), and
  ``review_one[3]/fetch``: node ``fetch`` of item 3's sub-graph;
- ``agent@2``: iteration 2 of a loop (its ``Continue`` or ``Done``), ``agent@2/tool``;
- ``approval``: a wait's consumed signal, ``approval#deadline``: when it times out;
- the map or loop node itself, once every item or the last iteration is journaled: the
  number of items or iterations, which is how a resume knows it ended.

A record is reused when its code marker is the node's (per item: code-hash-aware resume)
and what it took is reused too; see :func:`~._engine.resume.plan_reuse` for the static
part.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import attrs

from .. import _codec
from .. import events as ev
from .._define.dynamic import Done, as_outcome
from .._define.graph import Node, NodeKind
from .._errors import CodecError, StepFailed
from .._records import NodeRecord
from .derived import ConstMarkers, Piece, PrefixMarkers, RunView, journaled_value, plan_of
from .derived import pieces as journal_pieces
from .resume import plan_reuse
from .runner import _commit
from .scheduler import NodeHook, Plan, RunState, _first_failure, _hooked, _limited, drive
from .spawn import open_node_group
from .waits import Signals, counting, has_waits, wait

# Who counts the items of the maps run in this task (ctx.map's progress bar), if anyone.
ITEM_PROGRESS: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "flowdsl_item_progress", default=None
)

__all__ = [
    "ITEM_PROGRESS",
    "Dynamic",
    "RunView",
    "Scope",
    "journaled_value",
]  # the last two: derived.py


# --- the per-run engine ---------------------------------------------------------------------


class Dynamic:
    """What one run's dynamic nodes share: the store, the executor, the concurrency
    limit, and the journal (read once, when the run resumes)."""

    def __init__(
        self,
        run: Any,
        plan: Plan,
        store: Any,
        executor: Any,
        limiter: anyio.CapacityLimiter | None,
        on_skipped: Callable[[list[str]], None] | None,
        before: NodeHook | None = None,
    ) -> None:
        if store is None:
            raise RuntimeError("a flow with map, loop or wait nodes needs drive(store=...)")
        self.run = run.base if isinstance(run, RunView) else run
        self.store = store
        self.executor = executor
        self.limiter = limiter
        self.on_skipped = on_skipped
        self.before = before  # awaited as each item, iteration and sub-graph node starts
        self._journal: dict[str, NodeRecord] | None = None
        self.root = Scope(self, "", None)
        self._signals: Signals | None = None
        self._signals_loaded = False
        if has_waits(plan.graph):
            # Only a run that can wait pays for knowing whether all it does is wait.
            self._signals = Signals(self)
            self.executor = counting(executor, self._signals)

    async def signals(self) -> Signals:
        """The run's waits' bookkeeping, with the signals its journal says were taken."""
        assert self._signals is not None
        if not self._signals_loaded:
            self._signals.load(await self.journal())
            self._signals_loaded = True
        return self._signals

    async def journal(self) -> dict[str, NodeRecord]:
        if self._journal is None:
            resuming = getattr(self.run, "resuming", False)
            self._journal = await self.store.load_nodes(self.run.run_id) if resuming else {}
        return self._journal

    def emit(self, event: Any) -> None:
        self.run.emit(event)

    async def commit(self, record: NodeRecord) -> None:
        cancelled = await _commit(self.store, self.run.run_id, record)
        if cancelled is not None:
            raise cancelled

    async def forget(self, stale: list[str], reason: str = "changed") -> None:
        if not stale:
            return
        if self._signals is not None:
            self._signals.release(stale)
        await self.store.forget_nodes(self.run.run_id, stale)
        if self.run.observed:
            now = time.time()
            for node_id in stale:
                self.emit(ev.StepInvalidated(self.run.run_id, node_id, now, reason))

    def dispatch(
        self, view: RunView, node: Node, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Awaitable[tuple[NodeRecord, Any]]:
        if self.before is not None:
            return _hooked(
                self.before, self.limiter, self.executor.execute, view, node, args, kwargs
            )
        if self.limiter is None:
            return self.executor.execute(view, node, args, kwargs)  # type: ignore[no-any-return]
        return _limited(self.limiter, self.executor.execute, view, node, args, kwargs)

    def failed(self, node_id: str, problem: str, hint: str | None = None) -> StepFailed:
        if self.run.observed:
            self.emit(ev.StepFailed(self.run.run_id, node_id, time.time(), problem))
        return StepFailed(
            problem, flow=self.run.flow_name, node=node_id, run_id=self.run.run_id, hint=hint
        )


class Scope:
    """Where in a run a graph's nodes sit: the run itself (``prefix=""``), or one item's
    or iteration's sub-graph (``prefix="review[2]/"``) with its share of the journal."""

    __slots__ = ("_named", "dyn", "journal", "prefix")

    def __init__(self, dyn: Dynamic, prefix: str, journal: Mapping[str, NodeRecord] | None) -> None:
        self.dyn = dyn
        self.prefix = prefix
        self.journal = journal  # ids inside the sub-graph; None: the run's, read on demand
        self._named: dict[str, Node] = {}

    def named(self, node: Node) -> Node:
        """*node* under the id it runs as in this scope."""
        named = self._named.get(node.id)
        if named is None:
            named = attrs.evolve(node, id=self.prefix + node.id)
            self._named[node.id] = named
        return named

    async def _journal(self) -> Mapping[str, NodeRecord]:
        if self.journal is None:
            return await self.dyn.journal()
        return self.journal

    async def execute(
        self, run: Any, node: Node, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[NodeRecord, Any]:
        """Run a map, loop or wait node of this scope; its final record and value."""
        full = self.prefix + node.id
        marker = run.plan.markers[full]
        dyn = self.dyn
        if dyn.before is not None:  # the node hook sees a map, loop or wait start too
            await dyn.before(run, self.named(node) if self.prefix else node)
        if dyn.run.observed:
            dyn.emit(ev.StepStarted(dyn.run.run_id, full, time.time()))
        started = time.time()
        if node.kind is NodeKind.MAP:
            data, value = await self._map(run, node, full, marker, args, kwargs)
        elif node.kind is NodeKind.LOOP:
            data, value = await self._loop(run, node, full, marker, args, kwargs)
        else:
            data, value = await wait(self, run, node, full, marker)
        record = NodeRecord(full, _codec.dumps(data), 1, started, time.time(), marker)
        await dyn.commit(record)
        if dyn.run.observed:
            dyn.emit(
                ev.StepFinished(dyn.run.run_id, full, record.finished_at, data, 1, record.duration)
            )
        return record, value

    # --- map --------------------------------------------------------------------------------

    async def _map(
        self,
        run: Any,
        node: Node,
        full: str,
        marker: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[Any, list[Any]]:
        dyn = self.dyn
        items = args[0]
        if not isinstance(items, list | tuple):
            raise dyn.failed(
                full,
                f"`{node.name}.map` needs a list, and was given a {type(items).__name__}",
                hint="Map over what a step returned as a list, or over a list input",
            )
        if dyn.run.observed:
            dyn.emit(ev.MapStarted(dyn.run.run_id, full, time.time(), len(items)))
        progress = ITEM_PROGRESS.get()
        if progress is not None:
            progress.items(len(items))
        pieces = journal_pieces(await self._journal(), node.id, "[")
        if node.spec.is_flow:
            results = await self._map_flows(run, node, full, marker, items, kwargs, pieces)
        else:
            results = await self._map_steps(node, full, marker, items, kwargs, pieces)
        return {"items": len(items)}, results

    def _reused(self, full: str, record: NodeRecord, tp: Any) -> Any:
        dyn = self.dyn
        value = _codec.decode(record.value, tp, what=f"the result of {full!r}")
        if record.usage:
            dyn.run.add_usage(record.usage)
        if dyn.run.observed:
            dyn.emit(ev.StepReused(dyn.run.run_id, full, time.time(), "journal"))
        return value

    async def _map_steps(
        self,
        node: Node,
        full: str,
        marker: str,
        items: list[Any] | tuple[Any, ...],
        kwargs: dict[str, Any],
        pieces: dict[int, Piece],
    ) -> list[Any]:
        dyn = self.dyn
        step = node.spec.body
        results: list[Any] = [None] * len(items)
        todo: list[int] = []
        stale: list[str] = []
        for i in range(len(items)):
            record = pieces[i].record if i in pieces else None
            if record is not None and record.code == marker:
                try:
                    results[i] = self._reused(f"{full}[{i}]", record, step.return_type)
                    continue
                except CodecError:
                    pass
            if record is not None:
                stale.append(f"{full}[{i}]")
            todo.append(i)
        await dyn.forget(stale)
        if not todo:
            return results
        view = RunView(dyn.run, ConstMarkers(marker))
        start = len(full) + 1

        progress = ITEM_PROGRESS.get()

        def then(key: Node, outcome: tuple[NodeRecord, Any]) -> None:
            if outcome[0].usage:
                dyn.run.add_usage(outcome[0].usage)
            results[int(key.id[start:-1])] = outcome[1]
            if progress is not None:
                progress.item_done()

        executor, limiter = dyn.executor, dyn.limiter
        make_job = (
            getattr(executor, "job", None) if limiter is None and dyn.before is None else None
        )
        name, guard = node.name, node.guard
        try:
            async with open_node_group(then) as group:
                for i in todo:
                    item = Node(f"{full}[{i}]", NodeKind.STEP, name, guard=guard, fn=step)
                    args = (items[i],)
                    if make_job is not None and group.supports_jobs:
                        job = make_job(view, item, args, kwargs)
                        if job is not None:
                            group.spawn_job(*job)
                            continue
                    group.spawn(dyn.dispatch(view, item, args, kwargs), item)
        except BaseExceptionGroup as group_exc:
            _reraise(group_exc)
        return results

    async def _map_flows(
        self,
        run: Any,
        node: Node,
        full: str,
        marker: str,
        items: list[Any] | tuple[Any, ...],
        kwargs: dict[str, Any],
        pieces: dict[int, Piece],
    ) -> list[Any]:
        dyn = self.dyn
        flow = node.spec.body
        results: list[Any] = [None] * len(items)
        todo: list[int] = []
        stale: list[str] = []
        for i in range(len(items)):
            piece = pieces.get(i)
            record = piece.record if piece is not None else None
            if record is not None and record.code == marker:
                try:
                    results[i] = self._reused(f"{full}[{i}]", record, flow.return_type)
                    continue
                except CodecError:
                    pass
            if record is not None:
                stale.append(f"{full}[{i}]")
            todo.append(i)
        await dyn.forget(stale)

        async def one(i: int) -> None:
            first = {_first_param(flow): items[i]}
            _data, value = await self.subflow(
                flow, f"{full}[{i}]", marker, first, kwargs, pieces.get(i)
            )
            results[i] = value

        if todo:
            try:
                async with open_node_group(_ignore) as group:
                    for i in todo:
                        group.spawn(one(i), i)
            except BaseExceptionGroup as group_exc:
                _reraise(group_exc)
        return results

    async def subflow(
        self,
        flow: Any,
        full: str,
        marker: str,
        first: dict[str, Any],
        kwargs: dict[str, Any],
        piece: Piece | None,
    ) -> tuple[Any, Any]:
        """Run *flow*'s graph as the piece *full* of this scope (an item or an iteration)
        and journal its result under *full*; the result's data and value."""
        dyn = self.dyn
        if dyn.before is not None:  # and each item's (or iteration's) sub-graph
            await dyn.before(dyn.run, Node(full, NodeKind.STEP, flow.name))
        started = time.time()
        if dyn.run.observed:
            dyn.emit(ev.StepStarted(dyn.run.run_id, full, started))
        plan = plan_of(flow)
        inputs = _inputs(dyn, flow, full, {**first, **kwargs})
        state = RunState(plan, inputs)
        ready = state.start()
        prefix = full + "/"
        child = Scope(dyn, prefix, piece.inner if piece is not None else {})
        view = RunView(dyn.run, PrefixMarkers(len(prefix), plan.markers))
        if piece is not None and piece.inner:
            ready = await child.replay(view, plan, state, ready)
        on_skipped = dyn.on_skipped
        output = await drive(
            view,
            state,
            ready,
            dyn.executor,
            limiter=dyn.limiter,
            on_skipped=(lambda ids: on_skipped([prefix + i for i in ids])) if on_skipped else None,
            store=dyn.store,
            scope=child,
            before=dyn.before,
        )
        try:
            data, value = _codec.roundtrip(output, flow.return_type, what=f"the result of {full!r}")
        except CodecError as exc:
            problem = f"the sub-flow's result cannot be encoded: {exc.problem}"
            raise dyn.failed(full, problem) from exc
        record = NodeRecord(full, _codec.dumps(data), 1, started, time.time(), marker)
        await dyn.commit(record)
        if dyn.run.observed:
            dyn.emit(
                ev.StepFinished(dyn.run.run_id, full, record.finished_at, data, 1, record.duration)
            )
        return data, value

    async def replay(
        self, view: RunView, plan: Plan, state: RunState, ready: list[Node]
    ) -> list[Node]:
        """Feed this scope's journal into *state*, as a resume does for the run's own
        graph; the nodes that must still run."""
        dyn = self.dyn
        journal = self.journal or {}
        reuse = plan_reuse(
            flow=dyn.run.flow_name,
            run_id=dyn.run.run_id,
            nodes=plan.nodes,
            order=plan.graph.order,
            markers=plan.markers,
            journal=journal,
            strict=False,
        )
        if reuse.stale:
            stale = set(reuse.stale)
            await dyn.forget([self.prefix + n for n in reuse.stale])
            self.journal = {k: v for k, v in journal.items() if k not in stale}
            journal = self.journal
        pending = list(ready)
        dispatch: list[Node] = []
        now = time.time()
        while pending:
            node = pending.pop(0)
            if node.id not in reuse.reused:
                dispatch.append(node)
                continue
            value = journaled_value(view, node, journal)
            record = journal[node.id]
            if record.usage:
                dyn.run.add_usage(record.usage)
            if dyn.run.observed:
                dyn.emit(ev.StepReused(dyn.run.run_id, self.prefix + node.id, now, "journal"))
            pending.extend(state.complete(node.id, value))
        return dispatch

    # --- loop -------------------------------------------------------------------------------

    async def _loop(
        self,
        run: Any,
        node: Node,
        full: str,
        marker: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[Any, Any]:
        dyn = self.dyn
        spec = node.spec
        body = spec.body
        state = args[0]
        pieces = journal_pieces(await self._journal(), node.id, "@")
        i = 0
        # Iterations already journaled are replayed in order: each took the state the one
        # before it returned, so the first that cannot be reused ends the replay.
        while i < spec.max_iterations:
            piece = pieces.get(i)
            record = piece.record if piece is not None else None
            if record is None or record.code != marker:
                break
            try:
                outcome = as_outcome(self._reused(f"{full}@{i}", record, body.return_type))
            except CodecError:
                break
            if outcome is None:
                break
            if isinstance(outcome, Done):
                return {"iterations": i + 1}, outcome.result
            state = outcome.state
            i += 1
        stale: list[str] = []
        for j, piece in pieces.items():
            if j < i:
                continue
            if piece.record is not None:
                stale.append(f"{full}@{j}")
            if j > i:  # its sub-graph took a state that is about to be computed again
                stale.extend(f"{full}@{j}/{k}" for k in piece.inner)
        await dyn.forget(stale)
        view = RunView(dyn.run, ConstMarkers(marker))
        while i < spec.max_iterations:
            piece = pieces.get(i)
            if spec.is_flow:
                first = {_first_param(body): state}
                _, value = await self.subflow(body, f"{full}@{i}", marker, first, kwargs, piece)
            else:
                item = Node(f"{full}@{i}", NodeKind.STEP, node.name, guard=node.guard, fn=body)
                record, value = await dyn.dispatch(view, item, (state,), kwargs)
                if record.usage:
                    dyn.run.add_usage(record.usage)
            outcome = as_outcome(value)
            if outcome is None:
                raise dyn.failed(
                    f"{full}@{i}",
                    f"the loop's body {body.name!r} returned a {type(value).__name__}, not "
                    "fd.Continue(state) or fd.Done(result)",
                    hint="End every path of the body with `return fd.Continue(next_state)` "
                    "or `return fd.Done(result)`",
                )
            if isinstance(outcome, Done):
                return {"iterations": i + 1}, outcome.result
            state = outcome.state
            i += 1
        raise dyn.failed(
            full,
            f"the loop over {body.name!r} reached max_iterations={spec.max_iterations} "
            "without its body returning fd.Done",
            hint="Raise max_iterations=, or make the body return fd.Done(result) sooner",
        )


def _first_param(flow: Any) -> str:
    return str(next(iter(flow.signature.parameters)))


def _inputs(dyn: Dynamic, flow: Any, full: str, given: dict[str, Any]) -> dict[str, Any]:
    """A sub-flow's inputs as a run's are: bound to its signature, through the codec."""
    try:
        bound = flow.bind((), given)
        types = flow.input_types
        return {
            name: _codec.roundtrip(value, types.get(name, Any), what=f"input {name!r}")[1]
            for name, value in bound.items()
        }
    except (CodecError, Exception) as exc:
        problem = getattr(exc, "problem", str(exc))
        raise dyn.failed(full, f"cannot pass the inputs of flow {flow.name!r}: {problem}") from exc


def _ignore(key: Any, result: Any) -> None:
    pass


def _reraise(group: BaseExceptionGroup[Any]) -> None:
    failure = _first_failure(group)
    if failure is not None:
        raise failure from failure.__cause__
    cancelled, rest = group.split(anyio.get_cancelled_exc_class())
    if cancelled is not None and rest is None:
        exc: BaseException = cancelled
        while isinstance(exc, BaseExceptionGroup):
            exc = exc.exceptions[0]
        raise exc from None
    raise group
