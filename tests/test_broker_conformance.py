"""What every broker must do, checked on each of them: the embedded SQLite queue (on asyncio
and trio), Redis Streams and NATS JetStream (on asyncio only, as their clients are).

A new broker joins by adding one entry to ``_FACTORIES`` and one ``pytest.param`` to
``BROKERS``.  Optional features are checked as their declared capability says: a broker
that ``holds`` a store commits and completes at once; one that does not refuses to.

No test asserts how long anything took: a lease runs out when a second worker's claim,
polled, returns the task; every read of completions or events polls until what it waits
for has come (or a deadline says it never will).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from flowdsl import _codec
from flowdsl._records import NodeRecord
from flowdsl.backends import Broker, Store, link
from flowdsl.backends.messages import Claimed
from flowdsl.backends.sqlite.broker import SQLiteBroker
from flowdsl.backends.sqlite.store import SQLiteStore

from nats_steps import conformance_broker as nats_broker
from nats_steps import conformance_store as nats_store
from redis_steps import conformance_broker as redis_broker
from redis_steps import conformance_store as redis_store

pytestmark = pytest.mark.anyio

_DB = "queue.db"
_FACTORIES: dict[str, tuple[Callable[[Path], Broker], Callable[[Path], Store]]] = {
    "sqlite": (lambda tmp: SQLiteBroker(tmp / _DB), lambda tmp: SQLiteStore(tmp / _DB)),
    "redis": (redis_broker, redis_store),
    "nats": (nats_broker, nats_store),
}
BROKERS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
    pytest.param("nats", id="nats", marks=pytest.mark.nats),
]
DEADLINE = 20.0  # seconds before a wait that should end is a failure


@pytest.fixture(params=BROKERS)
def kind(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def make_broker(kind: str, tmp_path: Path) -> Callable[[], Broker]:
    """A factory of broker objects on one queue (same file, same server and prefix)."""
    return lambda: _FACTORIES[kind][0](tmp_path)


@pytest.fixture
def make_store(kind: str, tmp_path: Path) -> Callable[[], Store]:
    """The store that lives where the broker does."""
    return lambda: _FACTORIES[kind][1](tmp_path)


@pytest.fixture
async def broker(make_broker: Callable[[], Broker]) -> AsyncIterator[Broker]:
    b = make_broker()
    await b.open()
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
async def other(make_broker: Callable[[], Broker], broker: Broker) -> AsyncIterator[Broker]:
    """A second broker object on the same queue: another worker, another process."""
    b = make_broker()
    await b.open()
    try:
        yield b
    finally:
        await b.close()


def task(run_id: str, node_id: str) -> tuple[str, str, str]:
    return run_id, node_id, _codec.dumps({"run_id": run_id, "node_id": node_id})


def node_of(claimed: Claimed) -> str:
    node: str = _codec.loads(claimed.payload)["node_id"]
    return node


async def eventually(probe: Callable[[], Awaitable[Any]]) -> Any:
    """The first truthy result of *probe*, polled (nothing can wake us on every broker)."""
    with anyio.fail_after(DEADLINE):
        while True:
            got = await probe()
            if got:
                return got
            await anyio.sleep(0.01)


async def claim_until(broker: Broker, worker: str, lease: float) -> list[Claimed]:
    got: list[Claimed] = await eventually(lambda: broker.claim(worker, 10, lease))
    return got


async def read_completions(broker: Broker, cursor: Any, n: int) -> tuple[list[str], Any]:
    texts: list[str] = []

    async def more() -> bool:
        nonlocal cursor
        got, cursor = await broker.completions(cursor)
        texts.extend(got)
        return len(texts) >= n

    await eventually(more)
    return texts, cursor


async def read_events(broker: Broker, cursor: Any, n: int) -> tuple[list[tuple[str, str]], Any]:
    seen: list[tuple[str, str]] = []

    async def more() -> bool:
        nonlocal cursor
        got, cursor = await broker.events(cursor)
        seen.extend(got)
        return len(seen) >= n

    await eventually(more)
    return seen, cursor


# --- tasks ----------------------------------------------------------------------------------


async def test_claimed_tasks_carry_payload_run_node_and_first_delivery(broker: Broker) -> None:
    await broker.enqueue([task("r", "a"), task("r", "b")])
    claimed = await claim_until(broker, "w", 30.0)
    if len(claimed) < 2:
        claimed += await claim_until(broker, "w", 30.0)
    assert sorted(node_of(c) for c in claimed) == ["a", "b"]
    assert {(c.run_id, c.node_id, c.deliveries) for c in claimed} == {("r", "a", 1), ("r", "b", 1)}
    assert {c.payload for c in claimed} == {task("r", "a")[2], task("r", "b")[2]}


async def test_a_task_enqueued_twice_is_queued_once_until_it_completes(broker: Broker) -> None:
    await broker.enqueue([task("r", "a"), task("r", "a")])
    await broker.enqueue([task("r", "a")])
    (held,) = await claim_until(broker, "w", 30.0)
    await broker.enqueue([task("r", "a")])  # held: still not twice
    await broker.complete(held.task_id, "r", "a", "{}")

    async def queue_again() -> list[Claimed]:
        # Done: a resume may queue it again (once the broker has let the old one go).
        await broker.enqueue([task("r", "a")])
        return await broker.claim("w", 10, 30.0)

    (again,) = await eventually(queue_again)
    assert (node_of(again), again.deliveries) == ("a", 1)
    # Nothing else was queued: completing it leaves the queue empty.
    await broker.complete(again.task_id, "r", "a", "{}")
    assert await broker.claim("w", 10, 30.0) == []


async def test_a_lapsed_lease_is_claimed_again_as_another_delivery(
    broker: Broker, other: Broker
) -> None:
    await broker.enqueue([task("r", "a")])
    (held,) = await claim_until(broker, "dies", 0.5)
    (again,) = await claim_until(other, "lives", 0.5)
    assert (again.payload, again.deliveries) == (held.payload, 2)
    await other.complete(again.task_id, "r", "a", "{}")


async def test_an_extended_lease_is_kept_past_its_first_term(broker: Broker, other: Broker) -> None:
    await broker.enqueue([task("r", "a")])
    (held,) = await claim_until(broker, "slow", 1.0)
    # Renew often while another worker keeps asking, well past the first term: the other
    # worker never gets the task.  (The first term is 1 s; renewals come every 0.1 s.)
    taken: list[Claimed] = []

    async def renew() -> None:
        while True:
            await broker.extend([held.task_id], 1.0)
            await anyio.sleep(0.1)

    async with anyio.create_task_group() as tg:
        tg.start_soon(renew)
        with anyio.move_on_after(3.0):
            while True:
                taken += await other.claim("eager", 10, 1.0)
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    assert taken == []
    await broker.complete(held.task_id, "r", "a", "{}")


async def test_a_completed_task_is_gone_and_its_completion_published(
    broker: Broker, other: Broker
) -> None:
    _, cursor = await other.completions(None)
    await broker.enqueue([task("r", "a"), task("r", "b")])
    claimed = await claim_until(broker, "w", 30.0)
    if len(claimed) < 2:
        claimed += await claim_until(broker, "w", 30.0)
    for c in sorted(claimed, key=node_of):
        await broker.complete(c.task_id, "r", node_of(c), f'"{node_of(c)}"')
    texts, cursor = await read_completions(other, cursor, 2)
    assert texts == ['"a"', '"b"']
    assert await other.claim("w", 10, 30.0) == []
    # A cursor read to the end reads nothing more.
    assert (await other.completions(cursor))[0] == []


async def test_completions_from_now_on_skip_earlier_ones(broker: Broker) -> None:
    await broker.enqueue([task("r", "old"), task("r", "new")])
    claimed = {node_of(c): c for c in await claim_until(broker, "w", 30.0)}
    if len(claimed) < 2:
        claimed.update({node_of(c): c for c in await claim_until(broker, "w", 30.0)})
    await broker.complete(claimed["old"].task_id, "r", "old", '"old"')
    _, cursor = await broker.completions(None)
    await broker.complete(claimed["new"].task_id, "r", "new", '"new"')
    texts, _ = await read_completions(broker, cursor, 1)
    assert texts == ['"new"']


async def test_a_dead_letter_is_listed_and_its_failure_published(
    broker: Broker, other: Broker
) -> None:
    _, cursor = await other.completions(None)
    await broker.enqueue([task("r", "a")])
    (held,) = await claim_until(broker, "w", 30.0)
    await broker.dead_letter(held.task_id, "r", "a", '"failed"', "handed out 9 times")
    texts, _ = await read_completions(other, cursor, 1)
    assert texts == ['"failed"']
    (letter,) = await eventually(lambda: other.dead_letters("r"))
    assert (letter["node_id"], letter["reason"], letter["payload"]) == (
        "a",
        "handed out 9 times",
        task("r", "a")[2],
    )
    assert isinstance(letter["at"], float)
    assert await other.dead_letters("another run") == []
    assert await broker.claim("w", 10, 30.0) == []


# --- events ---------------------------------------------------------------------------------


async def test_events_are_read_from_now_on_by_cursor(broker: Broker, other: Broker) -> None:
    await broker.publish_events([("r", '{"n": 0}')])
    _, cursor = await other.events(None)
    await broker.publish_events([("r", '{"n": 1}'), ("s", '{"n": 2}')])
    seen, cursor = await read_events(other, cursor, 2)
    assert seen == [("r", '{"n": 1}'), ("s", '{"n": 2}')]
    assert (await other.events(cursor))[0] == []


async def test_a_completions_events_are_readable_once_it_is(broker: Broker, other: Broker) -> None:
    """Events given to ``complete`` come out before (or, where ``carries_events``, with)
    the completion: a reader that has the completion finds them."""
    assert isinstance(broker.carries_events, bool)
    _, done = await other.completions(None)
    _, seen = await other.events(None)
    await broker.enqueue([task("r", "a")])
    (held,) = await claim_until(broker, "w", 30.0)
    await broker.complete(held.task_id, "r", "a", '"a"', events=[("r", '{"step": "a"}')])
    await read_completions(other, done, 1)
    events, _ = await other.events(seen)
    assert events == [("r", '{"step": "a"}')]


# --- tidier runs ----------------------------------------------------------------------------


async def test_drop_queued_removes_a_runs_waiting_tasks_only(broker: Broker) -> None:
    await broker.enqueue([task("a", "n1"), task("b", "n1"), task("a", "n2")])
    await broker.drop_queued("a")
    await broker.drop_queued("nothing queued")
    claimed = await claim_until(broker, "w", 30.0)
    assert [(c.run_id, node_of(c)) for c in claimed] == [("b", "n1")]
    await broker.complete(claimed[0].task_id, "b", "n1", "{}")
    assert await broker.claim("w", 10, 30.0) == []


async def test_redeliver_hands_a_runs_held_tasks_out_afresh(broker: Broker, other: Broker) -> None:
    await broker.enqueue([task("r", "n"), task("s", "n")])
    held = await claim_until(broker, "dies with its client", 30.0)
    if len(held) < 2:
        held += await claim_until(broker, "dies with its client", 30.0)
    await other.redeliver("r")  # claimable now, not after the 30 s lease
    (again,) = await claim_until(other, "w", 30.0)
    assert (again.run_id, again.deliveries) == ("r", 1)
    assert await other.claim("w", 10, 30.0) == []  # the other run's task is still held


async def test_redeliver_drops_the_tasks_of_the_nodes_it_is_told_to_skip(
    broker: Broker, other: Broker
) -> None:
    """A resume reuses committed nodes: their tasks, queued or held, go instead of coming
    back; the others come back afresh."""
    await broker.enqueue([task("r", "done-held"), task("r", "todo-held")])
    held: list[Claimed] = []
    while len(held) < 2:
        held += await claim_until(broker, "dies with its client", 30.0)
    await broker.enqueue([task("r", "done-queued"), task("r", "todo-queued")])
    await other.redeliver("r", skip={"done-held", "done-queued", "never-queued"})
    again: list[Claimed] = []
    while len(again) < 2:
        again += await claim_until(other, "w", 30.0)
    assert sorted((node_of(c), c.deliveries) for c in again) == [
        ("todo-held", 1),
        ("todo-queued", 1),
    ]
    assert await other.claim("w", 10, 30.0) == []
    # A node whose task was dropped can be queued again (a later resume re-runs it).
    await broker.enqueue([task("r", "done-held")])
    (back,) = await claim_until(other, "w", 30.0)
    assert node_of(back) == "done-held"


async def test_redeliver_leaves_a_task_a_live_worker_holds_to_it(
    broker: Broker, other: Broker
) -> None:
    """The resuming process's own workers (or workers known to be alive) keep what they
    hold: handing it out again would run it twice."""
    await broker.enqueue([task("r", "held")])
    (held,) = await eventually(lambda: broker.claim("alive", 1, 30.0))
    await broker.enqueue([task("r", "lost")])
    (lost,) = await eventually(lambda: other.claim("dead", 1, 30.0))
    assert (node_of(held), node_of(lost)) == ("held", "lost")
    await broker.redeliver("r", alive=lambda worker: worker == "alive")
    (back,) = await claim_until(other, "w", 30.0)
    assert (node_of(back), back.deliveries) == ("lost", 1)  # the dead one's came back
    assert await other.claim("w", 10, 30.0) == []  # the live one's did not


# --- optional features, per declared capability ---------------------------------------------


def node_record(node_id: str) -> NodeRecord:
    return NodeRecord(
        node_id=node_id,
        value=_codec.dumps({"node": node_id}),
        attempts=1,
        started_at=1.0,
        finished_at=2.0,
        code="c",
        usage=None,
    )


async def test_commit_and_complete_where_the_broker_holds_the_store(
    make_broker: Callable[[], Broker], make_store: Callable[[], Store]
) -> None:
    store = make_store()
    broker = make_broker()
    link(store, broker)  # the store opens first: a shared SQLite file is the store's
    await store.open()
    await broker.open()
    try:
        record = node_record("a")
        if not broker.holds(store):
            with pytest.raises(NotImplementedError):
                await broker.commit_and_complete("1", "r", record, "{}")
            return
        _, cursor = await broker.completions(None)
        await broker.enqueue([task("r", "a")])
        (held,) = await claim_until(broker, "w", 30.0)
        assert await broker.commit_and_complete(held.task_id, "r", record, '"done"')
        assert (await store.load_nodes("r")) == {"a": record}
        texts, _ = await read_completions(broker, cursor, 1)
        assert texts == ['"done"']
        # A second worker's result for the node: the first commit stays, nothing changes.
        await broker.enqueue([task("r", "a")])
        (dup,) = await claim_until(broker, "w", 30.0)
        later = NodeRecord("a", '"other"', 2, 3.0, 4.0, "c", None)
        assert not await broker.commit_and_complete(dup.task_id, "r", later, '"late"')
        assert (await store.load_nodes("r")) == {"a": record}
    finally:
        await broker.close()
        await store.close()


async def test_the_embedded_queue_shares_only_its_own_files_store(tmp_path: Path) -> None:
    queue = SQLiteBroker(tmp_path / "q.db")
    elsewhere = SQLiteStore(tmp_path / "other.db")
    link(elsewhere, queue)
    assert not queue.holds(elsewhere)
    same = SQLiteStore(tmp_path / "q.db")
    link(same, queue)
    assert queue.holds(same)
