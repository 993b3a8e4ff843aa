"""Random flows run by the real-time context agree with plain Python, on asyncio and trio."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

import flowdsl as fd
from flowdsl import events as ev
from flowdsl._define.graph import Graph, NodeKind

from strategies import (
    DagSpec,
    build_flow,
    dag_specs,
    flow_inputs,
    labels_by_node,
    recording,
    reference,
)

pytestmark = pytest.mark.anyio

# Example counts come from the profile in conftest.py (more on CI).
SETTINGS = settings(
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def expected_skips(graph: Graph, chosen: dict[str, str]) -> set[str]:
    """Nodes inside a case whose branch ran and chose another case (nested ones too)."""
    labels = labels_by_node(graph)
    out = set()
    for node_id in graph.nodes:
        for branch, case in graph[node_id].guard:
            taken = chosen.get(labels[branch])
            if taken is not None and taken != case:
                out.add(node_id)
    return out


async def run_with_events(flow: fd.Flow[..., Any], *args: Any) -> tuple[Any, list[Any]]:
    events: list[Any] = []
    async with fd.Context(on_event=events.append) as ctx:
        result = await ctx.run(flow, *args)
    return result, events


@SETTINGS
@given(spec=dag_specs(), inputs=flow_inputs())
async def test_random_dag_matches_plain_python(spec: DagSpec, inputs: tuple[int, str]) -> None:
    flow = build_flow(spec)
    graph = flow.graph
    expected = await reference(spec, *inputs)
    with recording() as rec:
        result, events = await run_with_events(flow, *inputs)
    assert result == expected.result

    # Each node that should run ran exactly once; nothing in a skipped case ran.
    assert rec.counts == expected.ran
    assert set(rec.counts.values()) <= {1}
    assert expected.skipped.isdisjoint(rec.labels)

    labels = labels_by_node(graph)
    started = [e.node_id for e in events if isinstance(e, ev.StepStarted)]
    finished = [e.node_id for e in events if isinstance(e, ev.StepFinished)]
    assert Counter(labels[n] for n in started) == expected.ran
    assert sorted(finished) == sorted(started)

    # The skipped events name exactly the nodes of the cases not chosen.
    skipped = [e.node_id for e in events if isinstance(e, ev.StepSkipped)]
    assert len(skipped) == len(set(skipped))
    assert set(skipped) == expected_skips(graph, expected.chosen)
    assert {labels[n] for n in skipped if n in labels} == expected.skipped
    taken = {labels[e.node_id]: e.case for e in events if isinstance(e, ev.BranchTaken)}
    assert taken == expected.chosen

    # Every node started only after the nodes it takes values from had finished.
    at = {id(e): i for i, e in enumerate(events)}
    done_at = {e.node_id: at[id(e)] for e in events if isinstance(e, ev.StepFinished)}
    for e in events:
        if isinstance(e, ev.StepStarted):
            node = graph[e.node_id]
            deps = node.data_deps + tuple(b for b, _ in node.guard[-1:])
            for dep in deps:
                if graph[dep].kind is not NodeKind.JOIN:
                    assert done_at[dep] < at[id(e)], (dep, e.node_id)

    assert isinstance(events[0], ev.RunStarted)
    assert isinstance(events[-1], ev.RunFinished)


@SETTINGS
@given(spec=dag_specs(max_ops=5), inputs=flow_inputs())
async def test_awaiting_the_flow_in_a_context_gives_the_same_result(
    spec: DagSpec, inputs: tuple[int, str]
) -> None:
    flow = build_flow(spec)
    expected = await reference(spec, *inputs)
    async with fd.Context():
        assert await flow(*inputs) == expected.result


@SETTINGS
@given(spec=dag_specs(max_ops=6), inputs=flow_inputs())
async def test_serialized_run_gives_the_same_result(spec: DagSpec, inputs: tuple[int, str]) -> None:
    flow = build_flow(spec)
    expected = await reference(spec, *inputs)
    with recording() as rec:
        async with fd.Context(max_concurrency=1) as ctx:
            assert await ctx.run(flow, *inputs) == expected.result
    assert rec.counts == expected.ran
