"""LangGraph 1.x: each workload as a ``StateGraph`` (and W1 also in the functional API).

Idiomatic shapes: a chain is a sequence of nodes; the fan-out is the map-reduce pattern
(``Send`` to one node per item, results gathered by an ``operator.add`` reducer); a long
chain is one node that loops on a conditional edge (``recursion_limit`` raised to fit).
Durable runs use ``SqliteSaver`` (synchronous graphs) or ``AsyncSqliteSaver`` as the
checkpointer with their defaults (``durability="async"``, but ``"sync"`` in the long chain;
the connection keeps Python's ``synchronous=FULL``), one ``thread_id`` per run.
``SqliteSaver`` serves synchronous graphs only, whose nodes call the same async step bodies
through :func:`drive`.
"""

from __future__ import annotations

import asyncio
import itertools
import operator
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypedDict

from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from langgraph.func import entrypoint, task
from langgraph.graph import END, START, StateGraph
from langgraph.types import Send

from . import _measure as m
from ._workloads import (
    CHAIN_STEPS,
    CRASH_CHAIN,
    FANOUT,
    Sizes,
    crash_text,
    drive,
    logged_rotate,
    rotated,
    w,
)

__all__ = [
    "crash",
    "long_chain",
    "long_chain_snapshots",
    "resume",
    "w1",
    "w1_functional",
    "w2",
    "w3_steps",
    "w3_steps_async",
    "w3_steps_memory",
]


#: Nodes here take their own state types (and the fan-out's leaf takes a ``Send`` payload),
#: which LangGraph's generic signature cannot express.
Graph = StateGraph[Any, Any, Any, Any]


def config_of(thread: str, limit: int = 25) -> Any:
    return {"configurable": {"thread_id": thread}, "recursion_limit": limit}


# --- W1: a chain of 10 trivial steps -------------------------------------------------------


class Count(TypedDict):
    x: int


async def inc_node(state: Count) -> Count:
    return {"x": await w.inc.fn(state["x"])}


def chain_graph() -> Any:
    graph: Graph = StateGraph(Count)
    names = [f"inc_{k}" for k in range(CHAIN_STEPS)]
    for name in names:
        graph.add_node(name, inc_node)
    graph.add_edge(START, names[0])
    for a, b in itertools.pairwise(names):
        graph.add_edge(a, b)
    graph.add_edge(names[-1], END)
    return graph.compile()


def w1(sizes: Sizes, directory: Path) -> dict[str, Any]:
    app = chain_graph()

    async def one(i: int) -> bool:
        state = await app.ainvoke({"x": i})
        return bool(state["x"] == i + CHAIN_STEPS)

    return asyncio.run(m.sequence(one, sizes.w1_runs))


@task
async def inc_task(x: int) -> int:
    result: int = await w.inc.fn(x)
    return result


@entrypoint()
async def chain_entrypoint(x: int) -> int:
    for _ in range(CHAIN_STEPS):
        x = await inc_task(x)
    return x


def w1_functional(sizes: Sizes, directory: Path) -> dict[str, Any]:
    async def one(i: int) -> bool:
        return bool(await chain_entrypoint.ainvoke(i) == i + CHAIN_STEPS)

    return asyncio.run(m.sequence(one, sizes.w1_runs))


# --- W2: fan-out and reduce (map-reduce with Send) ------------------------------------------


class Fan(TypedDict, total=False):
    x: int
    delay: float
    a: int
    parts: Annotated[list[int], operator.add]
    result: int


class Item(TypedDict):
    a: int
    i: int
    delay: float


async def prepare_node(state: Fan) -> Fan:
    return {"a": await w.prepare.fn(state["x"])}


def fan_out(state: Fan) -> list[Send]:
    return [Send("leaf", {"a": state["a"], "i": i, "delay": state["delay"]}) for i in range(FANOUT)]


async def leaf_node(state: Item) -> Fan:
    return {"parts": [await w.leaf.fn(state["a"], state["i"], state["delay"])]}


async def total_node(state: Fan) -> Fan:
    return {"result": await w.total.fn(state["parts"])}


def fanout_graph() -> Any:
    graph: Graph = StateGraph(Fan)
    graph.add_node("prepare", prepare_node)
    graph.add_node("leaf", leaf_node)
    graph.add_node("total", total_node)
    graph.add_edge(START, "prepare")
    graph.add_conditional_edges("prepare", fan_out, ["leaf"])
    graph.add_edge("leaf", "total")
    graph.add_edge("total", END)
    return graph.compile()


def w2(sizes: Sizes, directory: Path) -> dict[str, Any]:
    app = fanout_graph()

    async def call(x: int, delay: float) -> int:
        state = await app.ainvoke({"x": x, "delay": delay, "parts": []})
        result: int = state["result"]
        return result

    return asyncio.run(m.fanout(call, sizes.w2_runs))


# --- W3: durable chains of 1 KB results ----------------------------------------------------


class Text(TypedDict):
    text: str


def rotate_node(state: Text) -> Text:
    return {"text": drive(w.rotate.fn(state["text"]))}


async def rotate_node_async(state: Text) -> Text:
    return {"text": await w.rotate.fn(state["text"])}


def rotate_graph(node: Callable[..., Text] | Callable[..., Awaitable[Text]]) -> Graph:
    graph: Graph = StateGraph(Text)
    names = [f"rotate_{k}" for k in range(CHAIN_STEPS)]
    for name in names:
        graph.add_node(name, node)
    graph.add_edge(START, names[0])
    for a, b in itertools.pairwise(names):
        graph.add_edge(a, b)
    graph.add_edge(names[-1], END)
    return graph


def w3_steps(sizes: Sizes, directory: Path) -> dict[str, Any]:
    """``SqliteSaver``: a synchronous graph, ``invoke`` per run."""
    texts = m.texts_for(sizes.w3_runs)
    with SqliteSaver.from_conn_string(str(directory / "langgraph.db")) as saver:
        app = rotate_graph(rotate_node).compile(checkpointer=saver)

        def one(i: int) -> bool:
            state = app.invoke({"text": texts[i]}, config_of(f"run-{i}"))
            return bool(state["text"] == rotated(texts[i], CHAIN_STEPS))

        return m.sequence_sync(one, sizes.w3_runs)


def w3_steps_async(sizes: Sizes, directory: Path) -> dict[str, Any]:
    """``AsyncSqliteSaver``: an async graph, ``ainvoke`` per run."""
    texts = m.texts_for(sizes.w3_runs)

    async def main() -> dict[str, Any]:
        async with AsyncSqliteSaver.from_conn_string(str(directory / "langgraph.db")) as saver:
            app = rotate_graph(rotate_node_async).compile(checkpointer=saver)

            async def one(i: int) -> bool:
                state = await app.ainvoke({"text": texts[i]}, config_of(f"run-{i}"))
                return bool(state["text"] == rotated(texts[i], CHAIN_STEPS))

            return await m.sequence(one, sizes.w3_runs)

    return asyncio.run(main())


def w3_steps_memory(sizes: Sizes, directory: Path) -> dict[str, Any]:
    """``InMemorySaver``: the checkpointer's cost without a disk (nothing is durable)."""
    texts = m.texts_for(sizes.w3_runs)
    app = rotate_graph(rotate_node_async).compile(checkpointer=InMemorySaver())

    async def one(i: int) -> bool:
        state = await app.ainvoke({"text": texts[i]}, config_of(f"run-{i}"))
        return bool(state["text"] == rotated(texts[i], CHAIN_STEPS))

    return asyncio.run(m.sequence(one, sizes.w3_runs))


# --- W3: one long chain, a node looping on a conditional edge --------------------------------


class Looping(TypedDict):
    text: str
    n: int


class Snapshots(TypedDict):
    texts: Annotated[list[str], operator.add]
    n: int


def _long(steps: int, path: Path, *, snapshots: bool) -> dict[str, Any]:
    """A chain of *steps* rotations; the state holds the last result, or (*snapshots*) the
    list of every result, which LangGraph checkpoints whole after every step."""

    def last(state: Looping) -> Looping:
        return {"text": drive(w.rotate.fn(state["text"])), "n": state["n"] + 1}

    def every(state: Snapshots) -> Snapshots:
        return {"texts": [drive(w.rotate.fn(state["texts"][-1]))], "n": state["n"] + 1}

    def again(state: Looping | Snapshots) -> str:
        return "rotate" if state["n"] < steps else END

    graph: Graph = StateGraph(Snapshots if snapshots else Looping)
    graph.add_node("rotate", every if snapshots else last)
    graph.add_edge(START, "rotate")
    graph.add_conditional_edges("rotate", again, ["rotate", END])

    def chain(text: str) -> str:
        with SqliteSaver.from_conn_string(str(path)) as saver:
            app = graph.compile(checkpointer=saver)
            state = {"texts": [text], "n": 0} if snapshots else {"text": text, "n": 0}
            # "sync": a step's checkpoint is written before the next step starts, so the time
            # between two steps includes it, as in every other system here (with the default
            # "async" the writes queue behind the steps and the chain's wall time shows them).
            out = app.invoke(state, config_of("long", limit=steps + 10), durability="sync")
        return str(out["texts"][-1] if snapshots else out["text"])

    return m.long_chain_sync(chain, steps, path)


def long_chain(sizes: Sizes, directory: Path) -> dict[str, Any]:
    return _long(sizes.long_chain, directory / "langgraph_long.db", snapshots=False)


def long_chain_snapshots(sizes: Sizes, directory: Path) -> dict[str, Any]:
    return _long(sizes.snapshot_chain, directory / "langgraph_snapshots.db", snapshots=True)


# --- resume: AsyncSqliteSaver, so that the step in flight can wait (async) to be killed ------


def crash_graph() -> Graph:
    graph: Graph = StateGraph(Text)
    names = [f"step_{k}" for k in range(1, CRASH_CHAIN + 1)]
    for k, name in enumerate(names, start=1):
        graph.add_node(name, _crash_node(k))
    graph.add_edge(START, names[0])
    for a, b in itertools.pairwise(names):
        graph.add_edge(a, b)
    graph.add_edge(names[-1], END)
    return graph


def _crash_node(step: int) -> Callable[..., Awaitable[Text]]:
    async def node(state: Text) -> Text:
        return {"text": await logged_rotate.fn(state["text"], step)}

    return node


async def _crash_run(path: Path, first: Text | None) -> str:
    async with AsyncSqliteSaver.from_conn_string(str(path)) as saver:
        app = crash_graph().compile(checkpointer=saver)
        # ``None`` as input continues the thread from its last checkpoint.
        state = await app.ainvoke(first, config_of("crash"))
    return str(state["text"])


def crash(directory: Path) -> dict[str, Any]:
    asyncio.run(_crash_run(directory / "langgraph_crash.db", {"text": crash_text()}))
    return {}


def resume(directory: Path) -> dict[str, Any]:
    start = time.perf_counter()
    result = asyncio.run(_crash_run(directory / "langgraph_crash.db", None))
    return {"resume_s": time.perf_counter() - start, "correct": result == m.crash_expected()}
