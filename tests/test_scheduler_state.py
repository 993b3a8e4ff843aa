"""The scheduler's state machine, driven by hand: no event loop, no I/O."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flowdsl as fd
from flowdsl._define.graph import Node, NodeKind
from flowdsl._engine.scheduler import Plan, RunState

from strategies import (
    build_flow,
    dag_specs,
    flow_inputs,
    labels_by_node,
    recording,
    reference,
    run_sync,
)


@fd.step
async def inc(x: int) -> int:
    return x + 1


@fd.step
async def add(x: int, y: int) -> int:
    return x + y


@fd.branch
async def sign(x: int) -> str:
    return "pos" if x > 0 else "neg"


@fd.flow
async def chain(x: int) -> int:
    a = await inc(x)
    b = await inc(a)
    return await inc(b)


@fd.flow
async def diamond(x: int) -> int:
    a = await inc(x)
    b = await inc(a)
    c = await inc(a)
    return await add(b, c)


@fd.flow
async def routed(x: int) -> int:
    a = await inc(x)
    slow = await inc(x)

    async def pos() -> int:
        p = await inc(a)
        return await add(p, a)

    return await sign(a).cases(pos=pos, neg=lambda: slow)


@fd.flow
async def nested(x: int) -> int:
    a = await inc(x)

    async def pos() -> int:
        return await sign(a).cases(pos=lambda: inc(a), neg=lambda: add(a, a))

    return await sign(x).cases(pos=pos, neg=lambda: add(x, x))


def ids(nodes: list[Node]) -> list[str]:
    return [n.id for n in nodes]


def value_of(state: RunState, node: Node) -> Any:
    """What the executor would return: the step's value, or a branch's case label."""
    assert node.fn is not None
    args, kwargs = state.args_of(node)
    return run_sync(node.fn.fn(*args, **kwargs))


def test_chain_runs_one_node_at_a_time() -> None:
    state = RunState(Plan(chain.graph), {"x": 1})
    assert ids(state.start()) == ["inc"]
    assert state.state_of("inc") == "running"
    assert state.state_of("inc-2") == "waiting"
    assert state.args_of(chain.graph["inc"]) == ((1,), {})
    assert ids(state.complete("inc", 2)) == ["inc-2"]
    assert state.state_of("inc") == "done"
    assert ids(state.complete("inc-2", 3)) == ["inc-3"]
    assert not state.finished
    assert state.complete("inc-3", 4) == []
    assert state.finished
    assert state.output() == 4


def test_diamond_fans_out_and_joins() -> None:
    state = RunState(Plan(diamond.graph), {"x": 0})
    assert ids(state.start()) == ["inc"]
    assert ids(state.complete("inc", 1)) == ["inc-2", "inc-3"]
    assert state.complete("inc-3", 2) == []  # add still waits for inc-2
    assert state.state_of("add") == "waiting"
    assert ids(state.complete("inc-2", 2)) == ["add"]
    assert state.args_of(diamond.graph["add"]) == ((2, 2), {})
    state.complete("add", 4)
    assert state.finished
    assert state.output() == 4


def test_complete_twice_or_before_start_is_refused() -> None:
    state = RunState(Plan(chain.graph), {"x": 1})
    with pytest.raises(RuntimeError, match=r"^node 'inc-2' completed while waiting$"):
        state.complete("inc-2", 0)
    state.start()
    state.complete("inc", 2)
    with pytest.raises(RuntimeError, match=r"^node 'inc' completed while done$"):
        state.complete("inc", 2)


def test_branch_skips_the_other_case_and_evaluates_its_join() -> None:
    graph = routed.graph
    state = RunState(Plan(graph), {"x": 1})
    assert ids(state.start()) == ["inc", "inc-2"]
    assert ids(state.complete("inc", 2)) == ["sign"]
    assert ids(state.complete("sign", "pos")) == ["sign.pos/inc"]
    assert state.skipped == []  # the `neg` case holds no node: it hands `slow` on
    assert ids(state.complete("sign.pos/inc", 3)) == ["sign.pos/add"]
    state.complete("sign.pos/add", 5)
    assert state.state_of("sign.join") == "done"
    assert not state.finished  # inc-2 still runs, though nothing needs it any more
    state.complete("inc-2", 2)
    assert state.finished
    assert state.output() == 5


def test_join_waits_for_an_outer_value_its_case_hands_on() -> None:
    state = RunState(Plan(routed.graph), {"x": -5})
    state.start()
    state.complete("inc", -4)
    assert ids(state.complete("sign", "neg")) == []
    assert set(state.skipped) == {"sign.pos/inc", "sign.pos/add"}
    assert state.state_of("sign.pos/add") == "skipped"
    assert state.state_of("sign.join") == "waiting"  # for inc-2, which is still running
    state.complete("inc-2", -4)
    assert state.state_of("sign.join") == "done"
    assert state.finished
    assert state.output() == -4


def test_unchosen_outer_case_skips_the_nested_branch_and_its_join() -> None:
    state = RunState(Plan(nested.graph), {"x": -1})
    assert ids(state.start()) == ["inc", "sign"]
    assert ids(state.complete("sign", "neg")) == ["sign.neg/add"]
    assert set(state.skipped) == {
        "sign.pos/sign",
        "sign.pos/sign.pos/inc",
        "sign.pos/sign.neg/add",
        "sign.pos/sign.join",
    }
    state.complete("inc", 0)
    assert not state.finished
    state.complete("sign.neg/add", -2)
    assert state.finished
    assert state.output() == -2


def test_chosen_outer_case_runs_the_nested_branch() -> None:
    state = RunState(Plan(nested.graph), {"x": 1})
    state.start()
    assert state.complete("sign", "pos") == []  # the nested branch waits for `inc`
    assert state.skipped == ["sign.neg/add"]
    assert ids(state.complete("inc", 2)) == ["sign.pos/sign"]
    assert ids(state.complete("sign.pos/sign", "neg")) == ["sign.pos/sign.neg/add"]
    state.complete("sign.pos/sign.neg/add", 4)
    assert state.state_of("sign.pos/sign.pos/inc") == "skipped"
    assert state.state_of("sign.join") == "done"
    assert state.finished
    assert state.output() == 4


@settings(
    max_examples=150,  # no event loop: cheap, so more than the profile's default
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(spec=dag_specs(), inputs=flow_inputs(), data=st.data())
def test_any_completion_order_gives_the_reference_result(
    spec: Any, inputs: tuple[int, str], data: st.DataObject
) -> None:
    flow = build_flow(spec)
    graph = flow.graph
    expected = run_sync(reference(spec, *inputs))
    labels = labels_by_node(graph)
    state = RunState(Plan(graph), dict(zip(graph.inputs, inputs, strict=True)))
    running = state.start()
    completed: list[str] = []
    skipped: list[str] = []
    with recording() as rec:
        while running:
            # Any running node may be the next to finish.
            node = running.pop(data.draw(st.integers(0, len(running) - 1), label="next"))
            assert node.kind is not NodeKind.JOIN
            value = value_of(state, node)
            if node.kind is NodeKind.BRANCH:
                assert value in node.labels
            running.extend(state.complete(node.id, value))
            completed.append(node.id)
            skipped.extend(state.skipped)
            state.skipped = []
    assert state.finished
    assert state.output() == expected.result
    assert rec.counts == expected.ran
    assert sorted(labels[n] for n in completed) == sorted(expected.ran.elements())
    assert {labels[n] for n in skipped if n in labels} == expected.skipped
    assert len(skipped) == len(set(skipped))
    assert set(completed).isdisjoint(skipped)
    joins = {n for n in graph.nodes if graph[n].kind is NodeKind.JOIN}
    assert set(completed) | set(skipped) | joins == set(graph.nodes)
