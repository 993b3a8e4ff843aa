"""Two properties, written once and checked on every backend, over random flows
(``strategies.dag_specs``: fan-in, fan-out, nested branches and sub-flows):

- **Batch mode gives what real time gives**: the same result, each node run exactly once,
  the same journal (node ids and values) and the same events, on the embedded SQLite queue,
  Redis and NATS.
- **A crashed run resumes as if never interrupted**: crashed at a random node (a failing
  node, or the whole run cancelled as it starts) and resumed, it gives the uninterrupted
  run's result and journal, and no node that finished before the crash runs again; in
  real time on every store, in batch mode on every broker.

Each target is one test: a backend, a mode and an event loop (the Redis and NATS clients
run on asyncio only).  Hypothesis draws the examples in a worker thread and runs each on
the test's event loop, so that one parametrized test can give every target the example
budget it had when each backend kept its own copy: the hypothesis profile's (conftest.py)
for SQLite and memory, fewer for batch mode and for the servers, where an example costs
round trips.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import flowdsl as fd
from flowdsl._define.graph import NodeKind
from flowdsl.backends import MemoryStore, Store, open_store
from flowdsl.testing import CrashPoint, ResumeReport, check_resume

from strategies import (
    Call,
    DagSpec,
    build_flow,
    dag_specs,
    flow_inputs,
    labels_by_node,
    recording,
    reference,
)

pytestmark = pytest.mark.anyio

SETTINGS = settings(suppress_health_check=[HealthCheck.too_slow])
PROFILE = object()  # a target's example count: the hypothesis profile's

# Two independent steps, the first crashing: its sibling's task is already spawned.
SIBLINGS = DagSpec((Call("n1", "int", ()), Call("n2", "int", ())))


@attrs.frozen
class Target:
    """Where a property is checked: a backend, a mode, an event loop, an example budget."""

    backend: str  # "memory", "sqlite", "redis" or "nats"
    batch: bool
    loop: str = "asyncio"
    examples: Any = PROFILE
    small: bool = False  # smaller flows: at most 5 operations and one sub-flow
    # Whether batch mode's events are checked against real time's (every target does since
    # the batch listener reads a poll's events before it wakes the poll's waiters).
    events: bool = True

    def settings(self) -> settings:
        count = settings().max_examples if self.examples is PROFILE else self.examples
        return settings(SETTINGS, max_examples=count)

    def specs(self) -> st.SearchStrategy[DagSpec]:
        return dag_specs(max_ops=5, max_subflows=1) if self.small else dag_specs()

    def check(self, prop: Callable[[], None]) -> Awaitable[None]:
        """Run the hypothesis test *prop* in a worker thread (see :func:`on_the_loop`)."""
        return anyio.to_thread.run_sync(prop)


def on_the_loop(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """From hypothesis's thread: run one example, ``fn(*args)``, on the test's event loop."""
    return anyio.from_thread.run(fn, *args)


@pytest.fixture
def anyio_backend(t: Target) -> Any:
    """The test's event loop: the target's."""
    return ("asyncio", {"debug": True}) if t.loop == "asyncio" else "trio"


def target(t: Target) -> Any:
    name = f"{t.backend}-{'batch' if t.batch else 'realtime'}-{t.loop}"
    marks = [getattr(pytest.mark, t.backend)] if t.backend in ("redis", "nats") else []
    return pytest.param(t, id=name, marks=marks)


class Stores:
    """Fresh stores of one backend: each URL (or memory store) no other context shares."""

    def __init__(self, backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        self.backend = backend
        self.files = itertools.count()
        self.tmp_path = tmp_path
        # A server per test, shared by its examples; each example gets a key prefix.
        self.server = (
            request.getfixturevalue(f"{backend}_server") if backend in ("redis", "nats") else None
        )

    def fresh(self) -> Any:
        if self.backend == "memory":
            return MemoryStore()
        if self.backend == "sqlite":
            return f"sqlite:///{self.tmp_path / f'runs-{next(self.files)}.db'}"
        assert self.server is not None
        return f"{self.server.url}?prefix=t{uuid.uuid4().hex[:12]}"

    @staticmethod
    def context(store: Any, *, batch: bool, **options: Any) -> fd.Context:
        if batch:  # the broker on the store's own server (SQLite: the same file)
            return fd.Context(batch=True, broker=store, store=store, workers=2, **options)
        return fd.Context(store=store, **options)


def signature(event: Any) -> tuple[str, str]:
    """An event without what differs between two runs: its time, duration and run id."""
    data = attrs.asdict(event)
    for key in ("at", "duration", "run_id"):
        data.pop(key, None)
    return type(event).__name__, json.dumps(data, sort_keys=True, default=str)


async def journal(store: Store, run_id: str) -> dict[str, str]:
    """A run's journal as node id -> committed value."""
    return {n: r.value for n, r in (await store.load_nodes(run_id)).items()}


async def stored_journal(store: Any, run_id: str) -> dict[str, str]:
    """The same, of a context that is gone: through a fresh connection to its store."""
    opened: Store = store if isinstance(store, MemoryStore) else open_store(store)
    await opened.open()
    try:
        return await journal(opened, run_id)
    finally:
        await opened.close()


# --- batch mode gives what real time gives ----------------------------------------------------

MODES = [
    target(Target("sqlite", batch=True, loop="asyncio")),
    target(Target("sqlite", batch=True, loop="trio")),
    target(Target("redis", batch=True, examples=15)),
    target(Target("nats", batch=True, examples=6)),
]


async def modes_agree(t: Target, store: Any, spec: DagSpec, inputs: tuple[int, str]) -> None:
    flow = build_flow(spec)
    expected = await reference(spec, *inputs)
    heard: dict[bool, list[Any]] = {False: [], True: []}
    counts: dict[bool, Counter[str]] = {}
    journals: dict[bool, dict[str, str]] = {}
    with anyio.fail_after(30):
        for batch in (False, True):
            run_id = uuid.uuid4().hex  # the examples of a test share one store
            # Entered before the context, so that its in-process workers inherit it.
            with recording() as rec:
                async with Stores.context(store, batch=batch, on_event=heard[batch].append) as ctx:
                    assert await ctx.run(flow, *inputs, run_id=run_id) == expected.result
                    journals[batch] = await journal(ctx.store, run_id)
            counts[batch] = rec.counts
    assert counts[False] == counts[True] == expected.ran  # each node ran once, in both
    assert journals[True] == journals[False]
    if t.events:
        assert Counter(map(signature, heard[True])) == Counter(map(signature, heard[False]))


@pytest.mark.parametrize("t", MODES)
async def test_batch_mode_gives_what_real_time_gives(
    t: Target, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    store = Stores(t.backend, request, tmp_path).fresh()

    @t.settings()
    @given(spec=dag_specs(max_ops=6), inputs=flow_inputs())
    def check(spec: DagSpec, inputs: tuple[int, str]) -> None:
        on_the_loop(modes_agree, t, store, spec, inputs)

    await t.check(check)


# --- a crashed run resumes as if never interrupted --------------------------------------------

RESUMES = [
    target(Target("memory", batch=False, loop="asyncio")),
    target(Target("memory", batch=False, loop="trio")),
    target(Target("sqlite", batch=False, loop="asyncio")),
    target(Target("sqlite", batch=False, loop="trio")),
    target(Target("sqlite", batch=True, loop="asyncio", examples=5, small=True)),
    target(Target("sqlite", batch=True, loop="trio", examples=5, small=True)),
    target(Target("redis", batch=False, examples=10, small=True)),
    target(Target("redis", batch=True, examples=10, small=True)),
    target(Target("nats", batch=False, examples=6, small=True)),
    target(Target("nats", batch=True, examples=6, small=True)),
]


def crash_point(flow: fd.Flow[..., Any], point: int, kind: str) -> CrashPoint:
    """The *point*-th step or branch node (modulo their number): a draw that, unlike
    ``crash_points(flow)``, can be pinned in an ``@example``."""
    nodes = [n for n in flow.graph.order if flow.graph[n].kind is not NodeKind.JOIN]
    return CrashPoint(nodes[point % len(nodes)], kind)  # type: ignore[arg-type]


async def resumes_as_if_never_interrupted(
    t: Target, stores: Stores, spec: DagSpec, inputs: tuple[int, str], crash: CrashPoint
) -> None:
    flow = build_flow(spec)
    made: list[Any] = []  # the uninterrupted run's store, then the crashed run's

    def context(**options: Any) -> fd.Context:
        made.append(stores.fresh())
        return Stores.context(made[-1], batch=t.batch, **options)

    with anyio.fail_after(30), recording() as rec:
        report: ResumeReport = await check_resume(flow, *inputs, crash=crash, context=context)
    assert report.result == report.expected == (await reference(spec, *inputs)).result
    assert not report.rerun, report.explain()
    # The resumed run committed what the uninterrupted run did, with the same values.
    assert await stored_journal(made[1], "crashed") == await stored_journal(
        made[0], "uninterrupted"
    )
    # Counted by the steps themselves (in-process workers inherit the recorder): a node
    # that finished before the crash ran twice in all, uninterrupted and crashed.
    labels = labels_by_node(flow.graph)
    for node_id in report.before_crash:
        assert rec.counts[labels[node_id]] == 2, node_id
    if t.batch:
        # The report is built from events, and batch mode drops the events of nodes in
        # flight at the crash (the executor stops watching the run): it may miss a node.
        return
    assert report.ok, report.explain()
    if report.crashed:
        assert crash.node_id not in report.before_crash  # it never got to finish
        if crash.node_id in report.uninterrupted:
            assert crash.node_id in report.on_resume


@pytest.mark.parametrize("t", RESUMES)
async def test_a_crashed_run_resumes_as_if_never_interrupted(
    t: Target, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    stores = Stores(t.backend, request, tmp_path)

    @t.settings()
    @given(
        spec=t.specs(),
        inputs=flow_inputs(),
        point=st.integers(0, 100),
        kind=st.sampled_from(["exception", "cancel"]),
    )
    @example(spec=SIBLINGS, inputs=(0, ""), point=0, kind="exception")
    @example(spec=SIBLINGS, inputs=(0, ""), point=0, kind="cancel")
    def check(spec: DagSpec, inputs: tuple[int, str], point: int, kind: str) -> None:
        crash = crash_point(build_flow(spec), point, kind)
        on_the_loop(resumes_as_if_never_interrupted, t, stores, spec, inputs, crash)

    await t.check(check)


# --- two drivers: a crashed run resumed by two contexts at once ------------------------------

TWO_DRIVERS = [
    target(Target("memory", batch=False, loop="asyncio")),
    target(Target("memory", batch=False, loop="trio")),
    target(Target("sqlite", batch=False, loop="asyncio", examples=25)),
    target(Target("sqlite", batch=False, loop="trio", examples=25)),
    target(Target("sqlite", batch=True, loop="asyncio", examples=5, small=True)),
    target(Target("redis", batch=False, examples=6, small=True)),
    target(Target("redis", batch=True, examples=4, small=True)),
    target(Target("nats", batch=False, examples=4, small=True)),
    target(Target("nats", batch=True, examples=3, small=True)),
]


async def two_drivers_resume_once(
    t: Target, stores: Stores, spec: DagSpec, inputs: tuple[int, str], crash: CrashPoint
) -> None:
    """Crash a run, then resume it from two contexts at once (two processes, as far as
    the store can tell): one drives, the other waits for it; both get the uninterrupted
    result, and no node runs more often than it would have uninterrupted."""
    from flowdsl._context.run import before_each_node
    from flowdsl.testing import InjectedCrash
    from flowdsl.testing._crash import _Crash

    flow = build_flow(spec)
    expected = await reference(spec, *inputs)
    store = stores.fresh()
    with anyio.fail_after(60):
        async with Stores.context(store, batch=t.batch) as ctx:
            with anyio.CancelScope() as scope:
                crashing = _Crash(crash, scope)
                try:
                    with before_each_node(ctx, crashing):
                        await ctx.run(flow, *inputs, run_id="crashed")
                except fd.StepFailed as exc:
                    if not isinstance(exc.__cause__, InjectedCrash):
                        raise
        if not crashing.fired:
            return  # the crash point lies in a case the inputs do not take
        committed = set(await stored_journal(store, "crashed"))
        results: list[Any] = []
        with recording() as rec:
            async with (
                Stores.context(store, batch=t.batch) as first,
                Stores.context(store, batch=t.batch) as second,
            ):

                async def resume(ctx: fd.Context) -> None:
                    results.append(await ctx.resume("crashed", flow=flow))

                async with anyio.create_task_group() as tg:
                    tg.start_soon(resume, first)
                    tg.start_soon(resume, second)
    assert results == [expected.result, expected.result]
    labels = labels_by_node(flow.graph)
    left = expected.ran - Counter(labels[n] for n in committed if n in labels)
    if t.batch:
        # A node a worker ran when the crash stopped it before its commit runs again:
        # at least what was left, never more than an uninterrupted run's.
        assert left <= rec.counts <= expected.ran, (rec.counts, left)
    else:
        assert rec.counts == left  # what was left, once: the two drivers shared nothing


@pytest.mark.parametrize("t", TWO_DRIVERS)
async def test_a_crashed_run_resumed_by_two_drivers_runs_each_node_once(
    t: Target, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    stores = Stores(t.backend, request, tmp_path)

    @t.settings()
    @given(
        spec=t.specs(),
        inputs=flow_inputs(),
        point=st.integers(0, 100),
        kind=st.sampled_from(["exception", "cancel"]),
    )
    @example(spec=SIBLINGS, inputs=(0, ""), point=0, kind="exception")
    @example(spec=SIBLINGS, inputs=(0, ""), point=0, kind="cancel")
    def check(spec: DagSpec, inputs: tuple[int, str], point: int, kind: str) -> None:
        crash = crash_point(build_flow(spec), point, kind)
        on_the_loop(two_drivers_resume_once, t, stores, spec, inputs, crash)

    await t.check(check)
