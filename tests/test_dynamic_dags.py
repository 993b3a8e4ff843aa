"""Random flows with maps (0-4 items, of steps and of item flows, nested) and loops (of
steps and of flows) agree with plain Python, in real time (asyncio and trio) and batch
mode, and resume after a crash at any node, items and iterations included, as if never
interrupted: every item and iteration that had finished ran exactly once."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flowdsl as fd
from flowdsl import events as ev
from flowdsl.testing import CrashPoint, check_resume

from strategies import (
    DagSpec,
    LoopOp,
    MapOp,
    Signalling,
    build_flow,
    dag_specs,
    flow_inputs,
    recording,
    wait_names,
)
from strategies import reference as reference_of

pytestmark = pytest.mark.anyio

# Each example runs several contexts; a capped count keeps the suite within CI's budget
# (the random DAGs without maps, in test_random_dags.py, take the profile's full count).
SETTINGS = settings(
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
_files = itertools.count()

# A map of 3 step items, a map of an item flow, and a loop of a flow: pinned examples.
ONE_OF_EACH = DagSpec((MapOp("n1", 3, (0,)), LoopOp("n2", 1, True), MapOp("n3", 0, ())))


async def test_one_of_each_matches_plain_python() -> None:
    expected = await reference_of(ONE_OF_EACH, 7, "x")
    with recording() as rec:
        async with fd.Context() as ctx:
            assert await ctx.run(build_flow(ONE_OF_EACH), 7, "x") == expected.result
    assert rec.counts == expected.ran
    assert expected.result[2] == []


@SETTINGS
@given(spec=dag_specs(max_ops=6, dynamic=True), inputs=flow_inputs())
async def test_random_dynamic_dags_match_plain_python(
    spec: DagSpec, inputs: tuple[int, str]
) -> None:
    flow = build_flow(spec)
    expected = await reference_of(spec, *inputs)
    events: list[Any] = []
    with recording() as rec:
        async with fd.Context(on_event=events.append) as ctx:
            assert await ctx.run(flow, *inputs) == expected.result
    # Every step, item and iteration that should run ran exactly once; skipped cases never.
    assert rec.counts == expected.ran
    assert set(rec.counts.values()) <= {1}
    assert expected.skipped.isdisjoint(rec.labels)
    started = Counter(e.node_id for e in events if isinstance(e, ev.StepStarted))
    finished = Counter(e.node_id for e in events if isinstance(e, ev.StepFinished))
    assert started == finished
    assert set(started.values()) <= {1}
    # A map announces its items; each is a node of its own, after the map started.
    at = {id(e): i for i, e in enumerate(events)}
    maps = {e.node_id: (e.items, at[id(e)]) for e in events if isinstance(e, ev.MapStarted)}
    for map_id, (count, when) in maps.items():
        items = [
            e
            for e in events
            if isinstance(e, ev.StepFinished)
            and e.node_id.startswith(map_id + "[")
            and "/" not in e.node_id[len(map_id) :]
        ]
        assert len(items) == count
        assert all(at[id(e)] > when for e in items)


@SETTINGS
@given(spec=dag_specs(max_ops=5, dynamic=True), inputs=flow_inputs())
async def test_one_item_at_a_time_gives_the_same_result(
    spec: DagSpec, inputs: tuple[int, str]
) -> None:
    flow = build_flow(spec)
    expected = await reference_of(spec, *inputs)
    with recording() as rec:
        async with fd.Context(max_concurrency=1) as ctx:
            assert await ctx.run(flow, *inputs) == expected.result
    assert rec.counts == expected.ran


@settings(SETTINGS, max_examples=8)
@given(spec=dag_specs(max_ops=4, max_subflows=1, dynamic=True), inputs=flow_inputs())
async def test_random_dynamic_dags_in_batch_mode(
    tmp_path: Path, spec: DagSpec, inputs: tuple[int, str]
) -> None:
    flow = build_flow(spec)
    expected = await reference_of(spec, *inputs)
    url = f"sqlite:///{tmp_path}/b{next(_files)}.db"
    with recording() as rec:
        async with fd.Context(batch=True, store=url, workers=2) as ctx:
            assert await ctx.run(flow, *inputs, run_id="b") == expected.result
            journal = await ctx.store.load_nodes("b")
    assert rec.counts == expected.ran  # each item ran once, on an in-process worker
    async with fd.Context(store=f"sqlite:///{tmp_path}/r{next(_files)}.db") as ctx:
        await ctx.run(flow, *inputs, run_id="r")
        realtime = await ctx.store.load_nodes("r")
    # The same journal in both modes: same ids (items and iterations included), values.
    assert {n: r.value for n, r in journal.items()} == {n: r.value for n, r in realtime.items()}


def _context(kind: str, directory: Path) -> Any:
    def make(**kwargs: Any) -> fd.Context:
        url = f"sqlite:///{directory}/runs-{next(_files)}.db"
        if kind == "batch":
            return fd.Context(batch=True, store=url, workers=2, **kwargs)
        if kind == "memory":
            return fd.Context(**kwargs)
        return fd.Context(store=url, **kwargs)

    return make


async def _executed_ids(flow: fd.Flow[..., Any], inputs: tuple[int, str]) -> list[str]:
    """Every id an uninterrupted run starts: nodes, items, iterations, sub-graph nodes."""
    events: list[Any] = []
    async with fd.Context(on_event=events.append) as ctx:
        await ctx.run(flow, *inputs)
    return sorted({e.node_id for e in events if isinstance(e, ev.StepStarted)})


@pytest.mark.parametrize("store", ["memory", "sqlite"])
@SETTINGS
@given(
    spec=dag_specs(max_ops=5, max_subflows=1, dynamic=True),
    inputs=flow_inputs(),
    point=st.integers(0, 1000),
    kind=st.sampled_from(["exception", "cancel"]),
)
async def test_random_dynamic_dags_resume_as_if_never_interrupted(
    tmp_path: Path,
    store: str,
    spec: DagSpec,
    inputs: tuple[int, str],
    point: int,
    kind: str,
) -> None:
    flow = build_flow(spec)
    ids = await _executed_ids(flow, inputs)
    crash = CrashPoint(ids[point % len(ids)], kind)  # type: ignore[arg-type]
    with recording() as rec:
        report = await check_resume(flow, *inputs, crash=crash, context=_context(store, tmp_path))
    assert report.ok, report.explain()
    expected = await reference_of(spec, *inputs)
    assert report.result == expected.result
    # The uninterrupted run ran each label once; across the crash and the resume, each
    # ran at most twice (a label in flight at the crash runs again: at-least-once).
    assert set(expected.ran) == set(rec.counts)
    assert all(1 <= n - expected.ran[label] <= 2 for label, n in rec.counts.items())


@settings(SETTINGS, max_examples=6)
@given(
    spec=dag_specs(max_ops=4, max_subflows=1, dynamic=True),
    inputs=flow_inputs(),
    point=st.integers(0, 1000),
)
async def test_random_dynamic_dags_resume_in_batch_mode(
    tmp_path: Path, spec: DagSpec, inputs: tuple[int, str], point: int
) -> None:
    flow = build_flow(spec)
    ids = await _executed_ids(flow, inputs)
    crash = CrashPoint(ids[point % len(ids)], "exception")
    report = await check_resume(flow, *inputs, crash=crash, context=_context("batch", tmp_path))
    assert report.result == report.expected == (await reference_of(spec, *inputs)).result
    assert not report.rerun


# --- with waits ---------------------------------------------------------------------------


@SETTINGS
@given(spec=dag_specs(max_ops=5, dynamic=True, waits=True), inputs=flow_inputs())
async def test_random_dags_with_waits_match_plain_python(
    spec: DagSpec, inputs: tuple[int, str]
) -> None:
    flow = build_flow(spec)
    expected = await reference_of(spec, *inputs)
    with recording() as rec:
        async with Signalling(wait_names(spec)) as ctx:
            assert await ctx.run(flow, *inputs) == expected.result
    assert rec.counts == expected.ran


@settings(SETTINGS, max_examples=6)
@given(spec=dag_specs(max_ops=4, max_subflows=1, dynamic=True, waits=True), inputs=flow_inputs())
async def test_random_dags_with_waits_in_batch_mode(
    tmp_path: Path, spec: DagSpec, inputs: tuple[int, str]
) -> None:
    flow = build_flow(spec)
    expected = await reference_of(spec, *inputs)
    url = f"sqlite:///{tmp_path}/w{next(_files)}.db"
    async with Signalling(wait_names(spec), batch=True, store=url, workers=2) as ctx:
        assert await ctx.run(flow, *inputs) == expected.result


@pytest.mark.parametrize("store", ["memory", "sqlite"])
@SETTINGS
@given(
    spec=dag_specs(max_ops=5, max_subflows=1, dynamic=True, waits=True),
    inputs=flow_inputs(),
    point=st.integers(0, 1000),
    kind=st.sampled_from(["exception", "cancel"]),
)
async def test_random_dags_with_waits_resume_as_if_never_interrupted(
    tmp_path: Path,
    store: str,
    spec: DagSpec,
    inputs: tuple[int, str],
    point: int,
    kind: str,
) -> None:
    flow = build_flow(spec)
    names = wait_names(spec)

    def make(**kwargs: Any) -> fd.Context:
        if store == "memory":
            return Signalling(names, **kwargs)
        return Signalling(names, store=f"sqlite:///{tmp_path}/s{next(_files)}.db", **kwargs)

    events: list[Any] = []
    async with make(on_event=events.append) as ctx:
        await ctx.run(flow, *inputs)
    ids = sorted({e.node_id for e in events if isinstance(e, ev.StepStarted)})
    crash = CrashPoint(ids[point % len(ids)], kind)  # type: ignore[arg-type]
    report = await check_resume(flow, *inputs, crash=crash, context=make)
    assert report.ok, report.explain()
    assert report.result == (await reference_of(spec, *inputs)).result
