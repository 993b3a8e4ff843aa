"""``step.map``, ``flow.map`` and ``fd.loop``: one node each in the graph, expanded at run
time; items and iterations are journaled, retried, cached and resumed one by one."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import attrs
import pytest

import flowdsl as fd
from flowdsl import events as ev
from flowdsl._define.graph import NodeKind

pytestmark = pytest.mark.anyio

calls: Counter[str] = Counter()


@pytest.fixture(autouse=True)
def _clean() -> None:
    calls.clear()


@fd.step
async def split(text: str) -> list[str]:
    return text.split()


@fd.step
async def shout(word: str, suffix: str = "!") -> str:
    calls[word] += 1
    return word.upper() + suffix


@fd.step
async def join(words: list[str]) -> str:
    return " ".join(words)


@fd.flow
async def shouting(text: str) -> str:
    words = await split(text)
    loud = await shout.map(words, suffix="?")
    return await join(loud)


@attrs.frozen
class Doc:
    title: str
    words: int


@fd.step
async def measure(title: str) -> Doc:
    return Doc(title, len(title))


@fd.step
async def describe(doc: Doc, prefix: str) -> str:
    return f"{prefix}{doc.title}:{doc.words}"


@fd.flow
async def review(title: str, prefix: str) -> str:
    doc = await measure(title)
    return await describe(doc, prefix)


@fd.flow
async def reviews(titles: list[str]) -> list[str]:
    return await review.map(titles, prefix="> ")


async def test_a_map_is_one_node_and_gives_results_in_order() -> None:
    assert [shouting.graph[n].kind for n in shouting.graph.nodes] == [
        NodeKind.STEP,
        NodeKind.MAP,
        NodeKind.STEP,
    ]
    async with fd.Context() as ctx:
        assert await ctx.run(shouting, "a bb ccc") == "A? BB? CCC?"
        assert await ctx.run(shouting, "") == ""  # an empty list maps to []
        assert await ctx.run(reviews, ["xy", "abc"]) == ["> xy:2", "> abc:3"]
        assert await ctx.run(reviews, []) == []


async def test_items_are_journaled_under_ids_of_their_own(sqlite_url: str) -> None:
    async with fd.Context(store=sqlite_url) as ctx:
        await ctx.run(shouting, "a b", run_id="s")
        await ctx.run(reviews, ["xy"], run_id="r")
        assert set(await ctx.store.load_nodes("s")) == {
            "split",
            "shout",
            "shout[0]",
            "shout[1]",
            "join",
        }
        assert set(await ctx.store.load_nodes("r")) == {
            "review",
            "review[0]",
            "review[0]/measure",
            "review[0]/describe",
        }


@fd.flow
async def nested(groups: list[list[str]]) -> list[list[str]]:
    return await shout_all.map(groups)


@fd.flow
async def shout_all(words: list[str]) -> list[str]:
    return await shout.map(words)


async def test_maps_nest() -> None:
    events: list[Any] = []
    async with fd.Context(on_event=events.append) as ctx:
        assert await ctx.run(nested, [["a"], [], ["b", "c"]]) == [["A!"], [], ["B!", "C!"]]
    finished = {e.node_id for e in events if isinstance(e, ev.StepFinished)}
    assert {"shout_all[2]/shout[1]", "shout_all[1]/shout", "shout_all"} <= finished
    counts = {e.node_id: e.items for e in events if isinstance(e, ev.MapStarted)}
    assert counts == {
        "shout_all": 3,
        "shout_all[0]/shout": 1,
        "shout_all[1]/shout": 0,
        "shout_all[2]/shout": 2,
    }


async def test_mapping_something_else_than_a_list_fails_the_node() -> None:
    @fd.step
    async def number() -> int:
        return 3

    @fd.flow
    async def bad() -> list[str]:
        return await shout.map(await number())

    with pytest.raises(
        fd.StepFailed, match=r"node 'shout': `shout.map` needs a list, and was given an? int"
    ):
        await fd.Context().run(bad)


# --- items: retries, failures, cache, concurrency -------------------------------------------


@fd.step(retries=2, backoff=0)
async def flaky(n: int) -> int:
    calls[f"flaky{n}"] += 1
    if n % 2 and calls[f"flaky{n}"] < 3:
        raise ConnectionError(f"item {n}, attempt {calls[f'flaky{n}']}")
    return n * 10


@fd.flow
async def flaky_all(ns: list[int]) -> list[int]:
    return await flaky.map(ns)


async def test_retries_apply_per_item() -> None:
    events: list[Any] = []
    async with fd.Context(on_event=events.append) as ctx:
        assert await ctx.run(flaky_all, [0, 1, 2, 3]) == [0, 10, 20, 30]
    retried = Counter(e.node_id for e in events if isinstance(e, ev.StepRetrying))
    assert retried == {"flaky[1]": 2, "flaky[3]": 2}


@fd.step
async def fragile(n: int) -> int:
    if n == 2:
        raise ValueError("two is not allowed")
    return n


@fd.flow
async def fragile_all(ns: list[int]) -> list[int]:
    return await fragile.map(ns)


async def test_a_failed_item_fails_the_run_naming_the_item() -> None:
    with pytest.raises(
        fd.StepFailed, match=r"node 'fragile\[2\]': step failed: ValueError"
    ) as info:
        await fd.Context().run(fragile_all, [0, 1, 2])
    assert info.value.node_id == "fragile[2]"


@fd.step(timeout=0.05)
async def slow(n: int) -> int:
    if n:
        await anyio.sleep(10)
    return n


@fd.flow
async def slow_all(ns: list[int]) -> list[int]:
    return await slow.map(ns)


async def test_timeouts_apply_per_item() -> None:
    with pytest.raises(fd.StepFailed, match=r"node 'slow\[1\]'.*timeout of 0.05 s"):
        await fd.Context().run(slow_all, [0, 1])


@fd.step(cache=True)
async def cached_double(n: int) -> int:
    calls[f"double{n}"] += 1
    return 2 * n


@fd.flow
async def doubles(ns: list[int]) -> list[int]:
    return await cached_double.map(ns)


async def test_cache_applies_per_item(sqlite_url: str) -> None:
    events: list[Any] = []
    async with fd.Context(store=sqlite_url, on_event=events.append) as ctx:
        assert await ctx.run(doubles, [1, 2]) == [2, 4]
        events.clear()
        assert await ctx.run(doubles, [2, 3, 1]) == [4, 6, 2]
    assert calls == {"double1": 1, "double2": 1, "double3": 1}
    hits = {e.node_id for e in events if isinstance(e, ev.StepReused) and e.reason == "cache"}
    assert hits == {"cached_double[0]", "cached_double[2]"}


gate: dict[str, Any] = {}


@fd.step
async def rendezvous(n: int) -> int:
    # Every item waits here until all of them have started: only items that run
    # concurrently get past it (no timing involved).
    gate["started"] += 1
    if gate["started"] == gate["expected"]:
        gate["all"].set()
    await gate["all"].wait()
    return n


@fd.flow
async def together(ns: list[int]) -> list[int]:
    return await rendezvous.map(ns)


async def test_items_run_concurrently() -> None:
    gate.update(started=0, expected=5, all=anyio.Event())
    with anyio.fail_after(10):
        assert await fd.Context().run(together, list(range(5))) == list(range(5))


@fd.step
async def tick(n: int) -> int:
    await anyio.lowlevel.checkpoint()
    return n


@fd.flow
async def ticks(ns: list[int]) -> list[int]:
    return await tick.map(ns)


@pytest.mark.parametrize("limit", [1, 3])
async def test_items_in_flight_are_bounded_by_max_concurrency(limit: int) -> None:
    events: list[Any] = []
    async with fd.Context(max_concurrency=limit, on_event=events.append) as ctx:
        assert await ctx.run(ticks, list(range(12))) == list(range(12))
    in_flight = peak = 0
    for e in events:
        if isinstance(e, ev.StepStarted) and e.node_id.startswith("tick["):
            in_flight += 1
            peak = max(peak, in_flight)
        elif isinstance(e, ev.StepFinished) and e.node_id.startswith("tick["):
            in_flight -= 1
    assert peak == limit


# --- resume, per item -----------------------------------------------------------------------

fail_on: set[str] = set()


@fd.step
async def once(word: str) -> str:
    calls[word] += 1
    if word in fail_on:
        fail_on.discard(word)
        raise RuntimeError(f"{word} fails once")
    return word.upper()


@fd.flow
async def onces(words: list[str]) -> list[str]:
    return await once.map(words)


@fd.flow
async def reviewed(words: list[str]) -> list[str]:
    return await two_steps.map(words)


@fd.flow
async def two_steps(word: str) -> str:
    first = await once(word)
    return await shout(first)


async def test_a_resume_reruns_only_the_items_that_had_not_finished(sqlite_url: str) -> None:
    fail_on.add("c")
    events: list[Any] = []
    async with fd.Context(store=sqlite_url, on_event=events.append) as ctx:
        with pytest.raises(fd.StepFailed, match=r"node 'once\[2\]'"):
            await ctx.run(onces, ["a", "b", "c", "d"], run_id="r")
        assert await ctx.resume("r") == ["A", "B", "C", "D"]
    assert calls == {"a": 1, "b": 1, "c": 2, "d": 1}
    fail_on.add("y")
    calls.clear()
    async with fd.Context(store=sqlite_url) as ctx:
        with pytest.raises(fd.StepFailed, match=r"node 'two_steps\[1\]/once'"):
            await ctx.run(reviewed, ["x", "y", "z"], run_id="f")
        assert await ctx.resume("f") == ["X!", "Y!", "Z!"]
    assert calls == {"x": 1, "X": 1, "y": 2, "Y": 1, "z": 1, "Z": 1}


async def test_a_resume_after_a_code_change_reruns_the_changed_items(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/code.db"

    def build(version: str) -> fd.Flow[..., Any]:
        @fd.step(name="label", version=version)
        async def label(word: str) -> str:
            calls[f"{word}{version}"] += 1
            return f"{word}{version}"

        @fd.step(name="boom")
        async def boom(words: list[str]) -> list[str]:
            if version == "1":
                raise RuntimeError("stop")
            return words

        @fd.flow(name="labels")
        async def labels(words: list[str]) -> list[str]:
            return await boom(await label.map(words))

        return labels

    async with fd.Context(store=url) as ctx:
        with pytest.raises(fd.StepFailed):
            await ctx.run(build("1"), ["a", "b"], run_id="c")
        # The map's items finished with version 1; the code changed: they run again.
        assert await ctx.resume("c", flow=build("2")) == ["a2", "b2"]
    assert calls == {"a1": 1, "b1": 1, "a2": 1, "b2": 1}


async def test_maps_run_in_batch_mode(sqlite_url: str) -> None:
    async with fd.Context(batch=True, store=sqlite_url, workers=2) as ctx:
        assert await ctx.run(shouting, "x yy") == "X? YY?"
        assert await ctx.run(reviews, ["ab"]) == ["> ab:2"]
        assert await ctx.run(reviews, []) == []


# --- loops ----------------------------------------------------------------------------------


@fd.step
async def countdown(n: int, step: int = 1) -> fd.Continue[int] | fd.Done[str]:
    calls[f"n{n}"] += 1
    if n <= 0:
        return fd.Done("liftoff")
    return fd.Continue(n - step)


@fd.flow
async def launch(n: int) -> str:
    return await fd.loop(countdown, n, max_iterations=5, step=1)


@fd.flow
async def turn(n: int) -> fd.Continue[int] | fd.Done[str]:
    return await countdown(n)


@fd.flow
async def launch_flow(n: int) -> str:
    return await fd.loop(turn, n, max_iterations=5)


async def test_a_loop_runs_until_its_body_says_done() -> None:
    assert [launch.graph[n].kind for n in launch.graph.nodes] == [NodeKind.LOOP]
    events: list[Any] = []
    async with fd.Context(on_event=events.append) as ctx:
        assert await ctx.run(launch, 3) == "liftoff"
        assert await ctx.run(launch_flow, 2) == "liftoff"
    finished = [e.node_id for e in events if isinstance(e, ev.StepFinished)]
    assert finished[:5] == ["countdown@0", "countdown@1", "countdown@2", "countdown@3", "countdown"]
    assert "turn@2/countdown" in finished


async def test_an_exhausted_loop_fails_saying_so() -> None:
    with pytest.raises(
        fd.StepFailed,
        match=r"node 'countdown': the loop over 'countdown' reached max_iterations=5 without "
        r"its body returning fd.Done\. Raise max_iterations=",
    ):
        await fd.Context().run(launch, 9)


async def test_a_body_that_returns_something_else_fails() -> None:
    @fd.step
    async def wrong(n: int) -> int:
        return n

    @fd.flow
    async def looping(n: int) -> int:
        return await fd.loop(wrong, n, max_iterations=3)

    with pytest.raises(
        fd.StepFailed, match=r"node 'wrong@0': the loop's body 'wrong' returned an? int"
    ):
        await fd.Context().run(looping, 1)


async def test_a_resumed_loop_continues_after_its_last_finished_iteration(sqlite_url: str) -> None:
    fail_on.add("stop@2")

    @fd.step
    async def walk(state: list[int]) -> fd.Continue[list[int]] | fd.Done[int]:
        label = f"stop@{len(state)}"
        calls[label] += 1
        if label in fail_on:
            fail_on.discard(label)
            raise RuntimeError("crash in iteration 2")
        if len(state) == 4:
            return fd.Done(sum(state))
        return fd.Continue([*state, len(state)])

    @fd.flow
    async def walking(start: int) -> int:
        return await fd.loop(walk, [start], max_iterations=10)

    async with fd.Context(store=sqlite_url) as ctx:
        with pytest.raises(fd.StepFailed, match=r"node 'walk@1'"):
            await ctx.run(walking, 5, run_id="w")
        assert await ctx.resume("w", flow=walking) == 5 + 1 + 2 + 3
    assert calls == {"stop@1": 1, "stop@2": 2, "stop@3": 1, "stop@4": 1}


async def test_loops_run_in_batch_mode(sqlite_url: str) -> None:
    async with fd.Context(batch=True, store=sqlite_url, workers=2) as ctx:
        assert await ctx.run(launch, 2) == "liftoff"
        assert await ctx.run(launch_flow, 1) == "liftoff"


# --- outside a flow, and at definition time -------------------------------------------------


async def test_outside_a_flow_they_are_plain_calls() -> None:
    assert await shout.map(["a", "b"], suffix=".") == ["A.", "B."]
    assert await fd.loop(countdown, 2, max_iterations=3) == "liftoff"
    assert await review.map(["x"], prefix="- ") == ["- x:1"]


def test_definition_errors_say_what_to_write() -> None:
    async def map_literal() -> Any:
        return await shout.map("abc")  # type: ignore[arg-type]

    with pytest.raises(fd.TracingError, match=r"`shout.map` was given a str, not a list"):
        fd.flow(name="bad")(map_literal)

    async def maps_itself(xs: list[int]) -> Any:
        return await self_mapping.map(xs)

    self_mapping = fd.flow(name="self_mapping")(maps_itself)
    with pytest.raises(fd.TracingError, match=r"flow 'self_mapping' maps itself.*fd\.loop"):
        self_mapping.graph  # noqa: B018

    with pytest.raises(fd.TracingError, match=r"max_iterations must be a positive int"):
        fd.loop(countdown, 1, max_iterations=0)

    async def wrong_signature(n: int) -> Any:
        return await shout.map([n], loudness=3)

    with pytest.raises(fd.TracingError, match=r"`shout` called with arguments that do not fit"):
        fd.flow(name="bad")(wrong_signature)


def test_graphs_draw_maps_and_loops_apart() -> None:
    mermaid = shouting.graph.to_mermaid()
    assert '[["shout (map)"]]' in mermaid
    assert '{{"countdown (loop)"}}' in launch.graph.to_mermaid()
    dot = shouting.graph.to_dot()
    assert '"shout" [shape=box3d, label="shout (map)"];' in dot
    assert "shape=hexagon" in launch.graph.to_dot()
    assert "<td>map</td>" in shouting.graph._repr_html_()


def test_fingerprints_see_what_a_map_maps() -> None:
    @fd.flow(name="f")
    async def one(words: list[str]) -> Any:
        return await shout.map(words)

    @fd.flow(name="f")
    async def other(words: list[str]) -> Any:
        return await shout.map(words, suffix="?")

    assert one.graph.fingerprint != other.graph.fingerprint


async def test_ctx_map_progress_counts_the_items_of_maps_inside_the_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import contextlib

    from flowdsl._context import progress

    counts: list[Any] = []

    @contextlib.contextmanager
    def spy(name: str, total: int, show: bool | None) -> Any:
        counts.append(progress._Counts())
        yield counts[-1]

    monkeypatch.setattr(progress, "progress_for", spy)
    async with fd.Context() as ctx:
        assert await ctx.map(shouting, ["a b c", "", "d e"]) == ["A? B? C?", "", "D? E?"]
    assert (counts[0].items_total, counts[0].items_done) == (5, 5)


async def test_the_inspector_shows_items_under_their_map(sqlite_url: str) -> None:
    pytest.importorskip("starlette")
    from flowdsl.ui import views

    async with fd.Context(store=sqlite_url) as ctx:
        await ctx.run(shouting, "a b", run_id="m")
        record = await ctx.store.get_run("m")
        journal = await ctx.store.load_nodes("m")
    assert record is not None
    nodes = {n["id"]: n for n in views.run_view(record, journal, shouting)["nodes"]}
    assert nodes["shout"]["kind"] == "map"
    # One node in the graph; its items are listed in its `dynamic` part.
    assert "shout[1]" not in nodes
    items = nodes["shout"]["dynamic"]["items"]
    assert [(i["id"], i["status"]) for i in items] == [
        ("shout[0]", "finished"),
        ("shout[1]", "finished"),
    ]
    assert nodes["shout"]["dynamic"]["label"] == "map 2/2"
