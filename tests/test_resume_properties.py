"""Resume, beyond the random DAGs of test_backend_properties.py (which crashes and resumes
``strategies.dag_specs`` on every store and broker): the sequences it hits at random, step
by step; a family of flows that mixes ``cache=True`` steps with plain ones (the shared
strategies have no cached steps), crashed several times in a row by the steps themselves,
then resumed to the end; and the example users copy.

Example counts come from the hypothesis profile (conftest.py: more on CI).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import flowdsl as fd
from flowdsl import events as ev
from flowdsl._define.graph import NodeKind
from flowdsl.backends import MemoryStore
from flowdsl.testing import CrashPoint, check_resume

from strategies import labels_by_node

pytestmark = pytest.mark.anyio

KINDS = st.sampled_from(["exception", "cancel"])

SETTINGS = settings(
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

ContextFactory = Callable[..., fd.Context]
_files = itertools.count()


def context_factory(kind: str, directory: Path) -> ContextFactory:
    """Contexts as ``check_resume`` wants them: each call a fresh store.

    (``check_resume`` runs the uninterrupted run in one context and the crashed run and
    its resume in another; a shared file would let the second find the first's runs.)
    """
    if kind == "memory":
        return fd.Context

    def make(**kwargs: Any) -> fd.Context:
        url = f"sqlite:///{directory}/runs-{next(_files)}.db"
        if kind == "batch":
            return fd.Context(batch=True, store=url, workers=2, **kwargs)
        return fd.Context(store=url, **kwargs)

    return make


def crash_point(flow: fd.Flow[..., Any], point: int, kind: str) -> CrashPoint:
    """The *point*-th step or branch node (modulo their number): a draw that, unlike
    ``crash_points(flow)``, can be pinned in an ``@example``."""
    nodes = [n for n in flow.graph.order if flow.graph[n].kind is not NodeKind.JOIN]
    return CrashPoint(nodes[point % len(nodes)], kind)  # type: ignore[arg-type]


@attrs.define
class Watched:
    """What the batch executor needs of a run to hand it events."""

    run_id: str
    observed: bool = True
    events: list[Any] = attrs.field(factory=list)

    def emit(self, event: Any) -> None:
        self.events.append(event)


async def test_a_run_resumed_in_the_same_batch_context_gets_its_events(tmp_path: Path) -> None:
    # A sequence the batch-mode resume property hits at random (test_backend_properties),
    # step by step:
    # the crashed run stops being watched, the resume watches the same id again, a
    # worker publishes an event of the resumed run, then the listener drains.
    from flowdsl._executors.batch import BatchExecutor, encode_event
    from flowdsl.backends import open_broker

    broker = open_broker(f"sqlite:///{tmp_path}/q.db")
    await broker.open()
    try:
        executor = BatchExecutor(broker)
        _, executor._cursor = await broker.completions(None)
        _, executor._event_cursor = await broker.events(None)
        run = Watched("crashed")
        executor.watch(run)
        executor.unwatch(run)  # the crashed run ended
        executor.watch(run)  # ctx.resume("crashed") in the same context
        started = ev.StepStarted("crashed", "mix_int", 1.0)
        await broker.publish_events([("crashed", encode_event(started))])
        await executor._drain()
    finally:
        await broker.close()
    assert run.events == [started]


async def test_a_crash_point_in_a_case_not_taken_never_fires() -> None:
    # Found by hand, kept as an example: the crash point sits in a skipped case.
    @fd.step
    async def double(x: int) -> int:
        return 2 * x

    @fd.step
    async def triple(x: int) -> int:
        return 3 * x

    @fd.branch
    async def sign(x: int) -> bool:
        return x >= 0

    @fd.flow
    async def choose(x: int) -> int:
        return await sign(x).cases({True: lambda: double(x), False: lambda: triple(x)})

    (skipped,) = [n for n in choose.graph.nodes if "triple" in n]
    report = await check_resume(choose, 3, crash=CrashPoint(skipped))
    assert report.ok, report.explain()
    assert not report.crashed
    assert report.result == 6


# --- cached and plain steps, crashed several times ----------------------------------------


completed: Counter[str] = Counter()
crash_at: set[str] = set()


class Boom(Exception):
    """A crash injected by the steps below."""


def _value(label: str, values: tuple[Any, ...]) -> int:
    text = json.dumps([label, list(values)], separators=(",", ":"))
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def _finish(label: str, values: tuple[Any, ...]) -> int:
    if label in crash_at:
        crash_at.discard(label)
        raise Boom(label)
    completed[label] += 1
    return _value(label, values)


@fd.step
async def plain(label: str, *values: int) -> int:
    return _finish(label, values)


@fd.step(cache=True)
async def cached(label: str, *values: int) -> int:
    return _finish(label, values)


@attrs.frozen
class Op:
    label: str
    is_cached: bool
    args: tuple[int, ...]  # indices into the values before it (the input is index 0)


@st.composite
def op_lists(draw: st.DrawFn, max_ops: int = 8) -> tuple[Op, ...]:
    """Fan-in (up to three earlier values), fan-out (a value used by several ops)."""
    ops = []
    for i in range(draw(st.integers(1, max_ops))):
        args = draw(st.lists(st.integers(0, i), max_size=3))
        ops.append(Op(f"n{i}", draw(st.booleans()), tuple(args)))
    return tuple(ops)


# A cached step and a plain one, independent: the first crashes, the second is its sibling.
TWO = (Op("n0", True, ()), Op("n1", False, ()))


def build(ops: tuple[Op, ...]) -> fd.Flow[..., list[int]]:
    async def mixed(x: int) -> list[int]:
        values: list[Any] = [x]
        for op in ops:
            step = cached if op.is_cached else plain
            values.append(await step(op.label, *[values[i] for i in op.args]))
        return values[1:]

    built: fd.Flow[..., list[int]] = fd.flow(name="mixed")(mixed)
    return built


def evaluate(ops: tuple[Op, ...], x: int) -> list[int]:
    values: list[Any] = [x]
    for op in ops:
        values.append(_value(op.label, tuple(values[i] for i in op.args)))
    return values[1:]


@pytest.fixture
def _clean() -> Iterator[None]:
    completed.clear()
    crash_at.clear()
    yield
    crash_at.clear()


@pytest.mark.usefixtures("_clean")
@pytest.mark.parametrize("store", ["memory", "sqlite"])
@SETTINGS
@given(ops=op_lists(), x=st.integers(-1000, 1000), points=st.lists(st.integers(0, 7), max_size=3))
@example(ops=TWO, x=0, points=[0])
async def test_cached_and_plain_steps_survive_several_crashes(
    tmp_path: Path,
    store: str,
    ops: tuple[Op, ...],
    x: int,
    points: list[int],
) -> None:
    completed.clear()
    crash_at.clear()
    flow = build(ops)
    labels = [op.label for op in ops]
    crashes = sorted({labels[p % len(labels)] for p in points})
    shared: Any = MemoryStore() if store == "memory" else f"sqlite:///{tmp_path}/m{next(_files)}.db"
    events: list[Any] = []
    async with fd.Context(store=shared, on_event=events.append) as ctx:
        # Each crash point fails its step once; every resume gets past one more of them.
        crash_at.update(crashes)
        failures: list[BaseException | None] = []
        result: Any = None
        while len(failures) <= len(crashes):
            try:
                if failures:
                    result = await ctx.resume("multi", flow=flow)
                else:
                    result = await ctx.run(flow, x, run_id="multi")
            except fd.StepFailed as exc:
                failures.append(exc.__cause__)
            else:
                break
        assert all(isinstance(f, Boom) for f in failures)
        # Concurrent crashes in one attempt end it once: the first failure is raised.
        assert min(1, len(crashes)) <= len(failures) <= len(crashes)
        assert not crash_at  # every crash point fired
        assert result == evaluate(ops, x)
        # Every node finished (was journaled) exactly once across the crashes and resumes.
        finished = Counter(e.node_id for e in events if isinstance(e, ev.StepFinished))
        assert set(finished) == set(flow.graph.nodes)
        assert set(finished.values()) == {1}
        # Bodies: at least once; more only for a node in flight when a crash hit.
        assert set(completed) == set(labels)
        bodies = completed.copy()

        # A second run with the same inputs takes every cached step from the cache.
        events.clear()
        assert await ctx.run(flow, x, run_id="again") == result
    hits = {e.node_id for e in events if isinstance(e, ev.StepReused)}
    label_of = labels_by_node(flow.graph)
    assert {label_of[n] for n in hits} == {op.label for op in ops if op.is_cached}
    assert {e.reason for e in events if isinstance(e, ev.StepReused)} <= {"cache"}
    for op in ops:
        assert completed[op.label] == bodies[op.label] + (0 if op.is_cached else 1)


@pytest.mark.parametrize("store", ["memory", "sqlite"])
@SETTINGS
@given(ops=op_lists(max_ops=6), x=st.integers(-1000, 1000), point=st.integers(0, 7), kind=KINDS)
@example(ops=TWO, x=0, point=0, kind="exception")
async def test_cached_flows_through_check_resume(
    tmp_path: Path,
    store: str,
    ops: tuple[Op, ...],
    x: int,
    point: int,
    kind: str,
) -> None:
    completed.clear()
    flow = build(ops)
    crash = crash_point(flow, point, kind)
    report = await check_resume(flow, x, crash=crash, context=context_factory(store, tmp_path))
    assert report.ok, report.explain()
    assert report.result == evaluate(ops, x)


# --- the example users copy ---------------------------------------------------------------

DOCS = Path(__file__).parent.parent / "docs" / "durability.md"


def test_the_example_test_module_in_the_docs_passes(tmp_path: Path) -> None:
    """docs/durability.md's complete test module, run by pytest as a user would."""
    text = DOCS.read_text()
    after = text[text.index("A complete test module you can copy") :]
    code = after.split("```python\n", 1)[1].split("\n```", 1)[0]
    (tmp_path / "test_triage_resume.py").write_text(code + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_triage_resume.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout
