"""``fd.wait_for``: a run waits for a value sent from outside, durably.

Signals are kept in the store per run and name; each is consumed once, by the wait that
journals it.  A waiting run's status is ``waiting``; it holds no task and no worker; its
context neither waits for it nor cancels it when it ends; a resume from any process
finishes it once its signal is there."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest

import flowdsl as fd
from flowdsl import _codec
from flowdsl import events as ev
from flowdsl._define.graph import NodeKind

pytestmark = pytest.mark.anyio


@attrs.frozen
class Approval:
    ok: bool
    by: str = ""


@fd.step
async def draft(topic: str) -> str:
    return f"draft about {topic}"


@fd.step
async def publish(text: str, approval: Approval) -> str:
    verdict = "approved" if approval.ok else "rejected"
    return f"{text}: {verdict} by {approval.by}"


@fd.flow
async def reviewed(topic: str) -> str:
    text = await draft(topic)
    approval = await fd.wait_for("approval", Approval, timeout=3600, after=text)
    return await publish(text, approval)


async def wait_for_event(run: fd.Run, cls: type) -> Any:
    async with contextlib.aclosing(run.events()) as events:
        async for event in events:
            if isinstance(event, cls):
                return event
    raise AssertionError(f"the run ended without a {cls.__name__}")


async def test_a_wait_is_one_node_and_takes_a_signal_sent_while_it_waits(sqlite_url: str) -> None:
    assert [reviewed.graph[n].kind for n in reviewed.graph.nodes] == [
        NodeKind.STEP,
        NodeKind.WAIT,
        NodeKind.STEP,
    ]
    async with fd.Context(store=sqlite_url) as ctx:
        run = await ctx.start(reviewed, "cats", run_id="r")
        waiting = await wait_for_event(run, ev.RunWaiting)
        assert waiting.waits == ("approval",)
        record = await ctx.store.get_run("r")
        assert record is not None
        assert record.status is fd.RunStatus.WAITING
        await ctx.signal("r", "approval", Approval(True, "ann"))
        assert await run.result() == "draft about cats: approved by ann"
        record = await ctx.store.get_run("r")
        assert record is not None
        assert record.status is fd.RunStatus.FINISHED
    received = [e async for e in run.events() if isinstance(e, ev.SignalReceived)]
    assert [(e.node_id, e.name, e.index) for e in received] == [("approval", "approval", 0)]


async def test_a_signal_sent_before_the_wait_is_kept() -> None:
    async with fd.Context() as ctx:
        run = await ctx.start(reviewed, "dogs", run_id="early")
        await ctx.signal("early", "approval", {"ok": False, "by": "bob"})  # any encodable value
        assert await run.result() == "draft about dogs: rejected by bob"
        events = [type(e) async for e in run.events()]
    assert ev.RunWaiting not in events  # it never had to wait


async def test_signalling_an_unknown_or_ended_run_is_an_error() -> None:
    async with fd.Context() as ctx:
        with pytest.raises(fd.FlowError, match=r"^no run 'nope' in store memory://\. "):
            await ctx.signal("nope", "approval", True)
        run = await ctx.start(reviewed, "x", run_id="done")
        await ctx.signal("done", "approval", Approval(True))
        await run.result()
        with pytest.raises(fd.FlowError, match=r"run 'done' has finished; a signal cannot reach"):
            await ctx.signal("done", "approval", Approval(True))


@fd.flow
async def hurried(topic: str) -> str:
    text = await draft(topic)
    approval = await fd.wait_for("approval", Approval, timeout=0.2, after=text)
    return await publish(text, approval)


async def test_a_wait_that_times_out_fails_the_run_naming_the_wait(sqlite_url: str) -> None:
    async with fd.Context(store=sqlite_url) as ctx:
        with pytest.raises(
            fd.StepFailed,
            match=r"node 'approval': no signal 'approval' came within the wait's timeout of 0\.2 s",
        ):
            await ctx.run(hurried, "x", run_id="late")
        # Sent after the deadline, it is still taken by a resume, which does not wait again.
        await ctx.signal("late", "approval", Approval(True, "eve"))
        assert await ctx.resume("late") == "draft about x: approved by eve"


@fd.flow
async def patient(topic: str) -> str:
    text = await draft(topic)
    approval = await fd.wait_for("approval", Approval, timeout=0.5, after=text)
    return await publish(text, approval)


async def test_the_deadline_holds_across_a_restart(sqlite_url: str) -> None:
    async with fd.Context(store=sqlite_url) as ctx:
        await ctx.start(patient, "x", run_id="d")
    # The process that started it is gone (its context ended); the deadline is journaled.
    async with fd.Context(store=sqlite_url) as ctx:
        first = (await ctx.store.load_nodes("d"))["approval#deadline"].value
        with pytest.raises(fd.StepFailed, match=r"timeout of 0\.5 s"):
            await ctx.resume("d", flow=patient)
        assert (await ctx.store.load_nodes("d"))["approval#deadline"].value == first


async def test_leaving_the_context_leaves_a_waiting_run_waiting(sqlite_url: str) -> None:
    async with fd.Context(store=sqlite_url) as ctx:
        run = await ctx.start(reviewed, "birds", run_id="left")
    # The block ended without blocking on the run or cancelling it.
    assert run.status is fd.RunStatus.WAITING
    with pytest.raises(
        fd.FlowError, match=r"the run is waiting for a signal, and its context ended"
    ):
        await run.result()
    async with fd.Context(store=sqlite_url) as ctx:
        record = await ctx.store.get_run("left")
        assert record is not None
        assert record.status is fd.RunStatus.WAITING
        await ctx.signal("left", "approval", Approval(True, "cli"))
        assert await ctx.resume("left", flow=reviewed) == "draft about birds: approved by cli"


@fd.step
async def count(n: int) -> int:
    return n + 1


@fd.flow
async def busy_and_waiting(topic: str) -> list[Any]:
    # The wait has no input: it waits from the start while the steps run; the run only
    # parks once they are done.
    approval = await fd.wait_for("approval", Approval)
    total = await count(await count(await count(0)))
    return [total, await publish(topic, approval)]


async def test_a_run_parks_only_when_all_it_does_is_wait() -> None:
    async with fd.Context() as ctx:
        run = await ctx.start(busy_and_waiting, "t", run_id="p")
        events: list[Any] = []
        async with contextlib.aclosing(run.events()) as stream:
            async for event in stream:
                events.append(event)
                if isinstance(event, ev.RunWaiting):
                    break
        finished = [e.node_id for e in events if isinstance(e, ev.StepFinished)]
        assert {"count", "count-2", "count-3"} <= set(finished)
        await ctx.signal("p", "approval", Approval(True, "z"))
        assert await run.result() == [3, "t: approved by z"]


# --- waits in loops and maps, and bad values ------------------------------------------------


@fd.step
async def ask(state: list[str]) -> str:
    return f"question {len(state)}"


@fd.step
async def record_answer(
    state: list[str], answer: str
) -> fd.Continue[list[str]] | fd.Done[list[str]]:
    state = [*state, answer]
    return fd.Done(state) if answer == "stop" else fd.Continue(state)


@fd.flow
async def interview_turn(state: list[str]) -> Any:
    question = await ask(state)
    answer = await fd.wait_for("answer", str, after=question)
    return await record_answer(state, answer)


@fd.flow
async def interview(first: str) -> list[str]:
    return await fd.loop(interview_turn, [first], max_iterations=5)


async def test_a_wait_in_a_loop_takes_one_signal_per_iteration(sqlite_url: str) -> None:
    async with fd.Context(store=sqlite_url) as ctx:
        run = await ctx.start(interview, "hi", run_id="i")
        await ctx.signal("i", "answer", "a")  # kept for the first iteration's wait
        for answer in ("b", "stop"):
            await wait_for_event(run, ev.RunWaiting)
            await ctx.signal("i", "answer", answer)
        assert await run.result() == ["hi", "a", "b", "stop"]
        journal = await ctx.store.load_nodes("i")
    answers = {n: r.value for n, r in journal.items() if n.endswith("/answer")}
    assert sorted(answers) == [
        "interview_turn@0/answer",
        "interview_turn@1/answer",
        "interview_turn@2/answer",
    ]


@fd.flow
async def vote(voter: str) -> str:
    ballot = await fd.wait_for("ballot", str)
    return await join_vote(voter, ballot)


@fd.step
async def join_vote(voter: str, ballot: str) -> str:
    return f"{voter}:{ballot}"


@fd.flow
async def election(voters: list[str]) -> list[str]:
    return await vote.map(voters)


async def test_waits_in_map_items_each_take_their_own_signal() -> None:
    async with fd.Context() as ctx:
        run = await ctx.start(election, ["a", "b", "c"], run_id="e")
        for ballot in ("x", "y", "z"):
            await ctx.signal("e", "ballot", ballot)
        result = await run.result()
    assert sorted(r.split(":")[1] for r in result) == ["x", "y", "z"]  # each consumed once
    assert [r.split(":")[0] for r in result] == ["a", "b", "c"]


async def test_a_signal_that_does_not_decode_fails_the_wait_and_is_skipped(sqlite_url: str) -> None:
    async with fd.Context(store=sqlite_url) as ctx:
        run = await ctx.start(reviewed, "x", run_id="bad")
        await ctx.signal("bad", "approval", {"ok": "maybe"})
        with pytest.raises(
            fd.StepFailed, match=r"node 'approval': signal 'approval' \(number 0\) cannot be read"
        ):
            await run.result()
        await ctx.signal("bad", "approval", {"ok": True, "by": "fixed"})
        assert await ctx.resume("bad") == "draft about x: approved by fixed"


async def test_the_wait_is_journaled_with_the_signal_it_consumed(sqlite_url: str) -> None:
    async with fd.Context(store=sqlite_url) as ctx:
        run = await ctx.start(reviewed, "x", run_id="j")
        await ctx.signal("j", "approval", Approval(True, "a"))
        await ctx.signal("j", "approval", Approval(False, "b"))  # a second one stays unread
        assert await run.result() == "draft about x: approved by a"
        # A resume of the finished run takes nothing more.
        assert await ctx.resume("j") == "draft about x: approved by a"
        record = (await ctx.store.load_nodes("j"))["approval"]
    assert _codec.loads(record.value) == {
        "name": "approval",
        "signal": 0,
        "value": {"ok": True, "by": "a"},
    }


# --- batch mode: a waiting run holds no task and no worker ----------------------------------


async def test_in_batch_mode_a_waiting_run_holds_no_worker(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/batch.db"
    async with fd.Context(batch=True, store=url, workers=1, worker_concurrency=1) as ctx:
        waiting = await ctx.start(reviewed, "w", run_id="w")
        await wait_for_event(waiting, ev.RunWaiting)
        # The only worker slot is free: other runs go through while this one waits.
        for i in range(3):
            run = await ctx.start(busy_and_waiting, f"o{i}", run_id=f"o{i}")
            await ctx.signal(f"o{i}", "approval", Approval(True))
            assert (await run.result())[0] == 3
        await ctx.signal("w", "approval", Approval(True, "q"))
        assert await waiting.result() == "draft about w: approved by q"


def test_wait_for_outside_a_flow_says_where_it_belongs() -> None:
    with pytest.raises(
        fd.TracingError, match=r"fd\.wait_for\('approval'\) was called outside a flow"
    ):
        fd.wait_for("approval", Approval)


def test_graphs_draw_waits_apart() -> None:
    assert '>"approval (wait)"]' in reviewed.graph.to_mermaid()
    assert '"approval" [shape=invhouse, label="approval (wait)"];' in reviewed.graph.to_dot()
    assert "<td>wait</td>" in reviewed.graph._repr_html_()


async def test_a_wait_outlives_its_context_on_trio_and_asyncio(anyio_backend: Any) -> None:
    # Both event loops: the poll, the wake-up from ctx.signal and the parking.
    async with fd.Context() as ctx:
        run = await ctx.start(reviewed, "loop", run_id="t")
        with anyio.fail_after(10):
            await wait_for_event(run, ev.RunWaiting)
            await ctx.signal("t", "approval", Approval(True, "trio"))
            assert await run.result() == "draft about loop: approved by trio"
