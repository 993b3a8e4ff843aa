"""The Redis Streams broker, call by call: dedupe, leases, reclaiming, completing,
dead letters, the atomic commit, cursors, trimming, watching a run from elsewhere, and
malformed entries.  Against a real redis-server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import flowdsl as fd
from flowdsl import _codec
from flowdsl._records import NodeRecord, RunRecord, RunStatus
from flowdsl.backends.messages import Finished, decode_completion, decode_task
from flowdsl.backends.redis.broker import GROUP, RedisBroker
from flowdsl.backends.redis.store import INLINE_MAX, RedisStore

from _servers import RedisServer

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> Any:
    """redis-py's client runs on asyncio only (trio is refused: test_redis_store)."""
    return ("asyncio", {"debug": True})


@pytest.fixture
async def broker(redis_server: RedisServer) -> AsyncIterator[RedisBroker]:
    b = RedisBroker(redis_server.url, claim_block=0)
    await b.open()
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[Any]:
    """A plain redis-py client, to look behind the broker's back (or write garbage)."""
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


def payload_of(claimed: Any) -> Any:
    return _codec.loads(claimed.payload)


def task(run_id: str, node_id: str) -> tuple[str, str, str]:
    return run_id, node_id, _codec.dumps({"run_id": run_id, "node_id": node_id})


async def claim_until(broker: RedisBroker, worker: str, lease: float) -> list[Any]:
    """Claim until something comes (a lease must run out first)."""
    with anyio.fail_after(10):
        while True:
            got = await broker.claim(worker, 10, lease)
            if got:
                return got
            await anyio.sleep(0.02)


async def poll_until(condition: Any) -> None:
    """Wait for a condition on the server (nothing there can wake us)."""
    while True:
        if await condition():
            return
        await anyio.sleep(0.01)


# --- enqueue and claim --------------------------------------------------------------------------


async def test_a_node_is_queued_once_while_queued_or_held(broker: RedisBroker) -> None:
    await broker.enqueue([task("r", "a"), task("r", "a"), task("r", "b")])
    await broker.enqueue([task("r", "a")])
    assert await broker.pending() == 2
    claimed = await broker.claim("w1", 10, 30)
    assert [(c.deliveries, _codec.loads(c.payload)["node_id"]) for c in claimed] == [
        (1, "a"),
        (1, "b"),
    ]
    await broker.enqueue([task("r", "a")])  # held: still not added
    assert await broker.claim("w1", 10, 30) == []
    first = claimed[0]
    await broker.complete(first.task_id, "r", "a", "{}")
    assert await broker.pending() == 1
    await broker.enqueue([task("r", "a")])  # done: a resume may queue it again
    assert [c.payload for c in await broker.claim("w1", 10, 30)] == [task("r", "a")[2]]


@settings(max_examples=25)
@given(pairs=st.lists(st.tuples(st.sampled_from("rs"), st.sampled_from("abc")), max_size=12))
async def test_any_enqueue_sequence_queues_each_node_once(
    broker: RedisBroker, pairs: list[tuple[str, str]]
) -> None:
    run_prefix = f"{id(pairs)}-"
    for run_id, node_id in pairs:
        await broker.enqueue([task(run_prefix + run_id, node_id)])
    claimed = await broker.claim("w", 100, 30)
    keys = [
        (_codec.loads(c.payload)["run_id"], _codec.loads(c.payload)["node_id"]) for c in claimed
    ]
    assert sorted(keys) == sorted({(run_prefix + r, n) for r, n in pairs})
    for c, (run_id, node_id) in zip(claimed, keys, strict=True):
        await broker.complete(c.task_id, run_id, node_id, "{}")
    assert await broker.pending() == 0


async def test_a_lapsed_lease_is_claimed_again_as_another_delivery(
    broker: RedisBroker, redis_server: RedisServer
) -> None:
    other = RedisBroker(redis_server.url, claim_block=0)
    await other.open()
    try:
        await broker.enqueue([task("r", "a")])
        (held,) = await broker.claim("dead-worker", 1, 0.2)
        assert held.deliveries == 1
        (again,) = await claim_until(other, "live-worker", 0.2)
        assert (again.task_id, again.deliveries, again.payload) == (held.task_id, 2, held.payload)
        # The dead worker's renewal cannot take it back.
        await broker.extend([held.task_id], 0.2)
        (third,) = await claim_until(broker, "third", 0.2)
        assert third.deliveries == 3
    finally:
        await other.close()


async def test_a_renewed_lease_is_kept(broker: RedisBroker, raw: Any) -> None:
    """A renewal resets the entry's idle time on the server, which is what a lapsed lease
    is measured by (XAUTOCLAIM's min idle), and keeps its owner and delivery count."""
    await broker.enqueue([task("r", "a")])
    (held,) = await broker.claim("w1", 1, 30)

    async def entry() -> Any:
        (pending,) = await raw.xpending_range(broker.tasks_key, GROUP, "-", "+", 10)
        return pending

    async def idle_for_a_while() -> bool:
        return bool((await entry())["time_since_delivered"] >= 1000)

    with anyio.fail_after(10):
        await poll_until(idle_for_a_while)
    before = (await entry())["time_since_delivered"]
    await broker.extend([held.task_id], 30)
    after = await entry()
    assert after["time_since_delivered"] < before
    assert (after["consumer"], after["times_delivered"]) == (b"w1", 1)


async def test_a_claim_blocks_on_the_server_until_a_task_comes(
    redis_server: RedisServer, raw: Any
) -> None:
    waiting = RedisBroker(redis_server.url, claim_block=5.0)
    await waiting.open()
    try:
        got: list[Any] = []

        async def claim() -> None:
            got.extend(await waiting.claim("w", 5, 30))

        async def blocked() -> bool:
            return any("b" in c["flags"] for c in await raw.client_list())

        with anyio.fail_after(4):  # well before the block would end on its own
            async with anyio.create_task_group() as tg:
                tg.start_soon(claim)
                await poll_until(blocked)
                await waiting.enqueue([task("r", "a")])
        assert [c.payload for c in got] == [task("r", "a")[2]]
    finally:
        await waiting.close()


async def test_the_group_comes_back_after_the_stream_is_deleted(
    broker: RedisBroker, raw: Any
) -> None:
    await raw.delete(broker.tasks_key)
    await broker.enqueue([task("r", "a")])
    assert len(await broker.claim("w", 5, 30)) == 1


# --- completing ---------------------------------------------------------------------------------


async def test_completions_are_read_from_now_on_by_cursor(broker: RedisBroker) -> None:
    await broker.enqueue([task("r", "old"), task("r", "a"), task("r", "b")])
    old, a, b = await broker.claim("w", 10, 30)
    await broker.complete(old.task_id, "r", "old", '"old"')
    _, cursor = await broker.completions(None)
    assert await broker.completions(cursor) == ([], cursor)
    await broker.complete(a.task_id, "r", "a", '"a"')
    await broker.complete(b.task_id, "r", "b", '"b"')
    texts, cursor2 = await broker.completions(cursor)
    assert texts == ['"a"', '"b"']
    assert await broker.completions(cursor2) == ([], cursor2)
    # Completing again (a lost reply, or another worker) publishes nothing more.
    await broker.complete(a.task_id, "r", "a", '"a again"')
    assert await broker.completions(cursor2) == ([], cursor2)
    assert await broker.pending() == 0


async def test_dead_letters_keep_the_task_and_publish_the_failure(broker: RedisBroker) -> None:
    await broker.enqueue([task("r", "a"), task("other", "a")])
    a, _ = await broker.claim("w", 10, 30)
    _, cursor = await broker.completions(None)
    await broker.dead_letter(a.task_id, "r", "a", '"failed"', "workers died")
    await broker.dead_letter(a.task_id, "r", "a", '"failed"', "workers died")  # a retry
    assert (await broker.completions(cursor))[0] == ['"failed"']
    (letter,) = await broker.dead_letters("r")
    assert (letter["node_id"], letter["reason"], letter["payload"]) == (
        "a",
        "workers died",
        a.payload,
    )
    assert await broker.dead_letters("other") == []
    assert await broker.pending() == 1


def record(node_id: str, value: object) -> NodeRecord:
    return NodeRecord(node_id, _codec.dumps(value), 1, 1.0, 2.0, "code")


async def test_commit_and_complete_first_commit_wins_and_completes_once(
    broker: RedisBroker, redis_server: RedisServer
) -> None:
    store = RedisStore(redis_server.url)
    other = RedisBroker(redis_server.url, claim_block=0)
    await store.open()
    await other.open()
    try:
        assert broker.holds(store)
        await store.create_run(RunRecord("r", "f", "m:f", "fp", "{}", RunStatus.RUNNING, 1.0, 1.0))
        await broker.enqueue([task("r", "a")])
        (mine,) = await broker.claim("slow", 1, 0.1)
        (theirs,) = await claim_until(other, "fast", 0.1)  # the lease ran out
        _, cursor = await broker.completions(None)
        large = "x" * (INLINE_MAX * 2)
        results: dict[str, bool] = {}

        async def finish(b: RedisBroker, name: str, value: object) -> None:
            done = await b.commit_and_complete(mine.task_id, "r", record("a", value), name)
            results[name] = done
            if not done:  # what the worker does next: complete with the stored record
                await b.complete(mine.task_id, "r", "a", f"{name}-dup")

        async with anyio.create_task_group() as tg:
            tg.start_soon(finish, broker, '"slow"', large)
            tg.start_soon(finish, other, '"fast"', "small")
        assert theirs.task_id == mine.task_id
        assert sorted(results.values()) == [False, True]
        winner = next(name for name, won in results.items() if won)
        texts, _ = await broker.completions(cursor)
        assert texts == [winner]  # one completion, the winner's
        stored = (await store.load_nodes("r"))["a"]
        assert stored == record("a", large if winner == '"slow"' else "small")
        assert await broker.pending() == 0
    finally:
        await store.close()
        await other.close()


async def test_commit_and_complete_over_garbage_fails_the_node(
    broker: RedisBroker, raw: Any
) -> None:
    await broker.enqueue([task("r", "a")])
    (held,) = await broker.claim("w", 1, 30)
    await raw.hset(f"{broker.prefix}:nodes:r", "a", b"{garbage")
    _, cursor = await broker.completions(None)
    assert await broker.commit_and_complete(held.task_id, "r", record("a", 1), "unused") is True
    (text,), _ = await broker.completions(cursor)
    completion = decode_completion(text)
    assert (completion.ok, completion.error_kind, completion.node_id) == (False, "checkpoint", "a")
    assert completion.error is not None
    assert completion.error.startswith("node 'a': run 'r' in redis://")
    assert await broker.pending() == 0


# --- streams stay bounded -----------------------------------------------------------------------


async def test_streams_are_trimmed_and_done_tasks_deleted(
    redis_server: RedisServer, raw: Any
) -> None:
    broker = RedisBroker(redis_server.url + "?keep=100", claim_block=0)
    await broker.open()
    try:
        for batch in range(10):
            await broker.enqueue([task(f"r{batch}", f"n{i}") for i in range(100)])
            claimed = await broker.claim("w", 100, 30)
            for i, c in enumerate(claimed):
                await broker.complete(c.task_id, f"r{batch}", f"n{i}", "{}")
            await broker.publish_events([(f"r{batch}", "{}")] * 100)
        assert await raw.xlen(broker.tasks_key) == 0
        assert await raw.hlen(broker.queued_key) == 0
        # Approximate trimming drops whole stream nodes (100 entries each by default).
        assert await raw.xlen(broker.completions_key) <= 200
        assert await raw.xlen(broker.events_key) <= 200
    finally:
        await broker.close()


# --- events, from anywhere ----------------------------------------------------------------------


async def test_events_by_cursor_and_a_run_watched_from_another_client(
    broker: RedisBroker, redis_server: RedisServer
) -> None:
    await broker.publish_events([("before", '"x"')])
    _, cursor = await broker.events(None)
    await broker.publish_events([("r1", '"a"'), ("r2", '"b"'), ("r1", '"c"')])
    got, cursor = await broker.events(cursor)
    assert got == [("r1", '"a"'), ("r2", '"b"'), ("r1", '"c"')]
    assert await broker.events(cursor) == ([], cursor)

    elsewhere = RedisBroker(redis_server.url)  # another process or machine, same prefix
    await elsewhere.open()
    try:
        texts, mark = await elsewhere.run_events("r1")
        assert texts == ['"a"', '"c"']
        await broker.publish_events([("r1", '"d"')])
        assert (await elsewhere.run_events("r1", mark))[0] == ['"d"']
        seen: list[str] = []
        with anyio.move_on_after(5):
            async for text in elsewhere.watch("r1", poll=0.01):
                seen.append(text)
                if len(seen) == 3:
                    break
        assert seen == ['"a"', '"c"', '"d"']
    finally:
        await elsewhere.close()


# --- entries flowdsl did not write ----------------------------------------------------------------


async def test_malformed_entries_are_handed_out_as_undecodable_tasks(
    broker: RedisBroker, raw: Any
) -> None:
    await raw.xadd(broker.tasks_key, {"junk": "1"})
    await raw.xadd(broker.tasks_key, {"payload": b"not json"})
    await raw.xadd(
        broker.tasks_key, {"run": "r9", "node": "n", "payload": b'{"run_id": "r9", "x": "\xff"}'}
    )
    claimed = await broker.claim("w", 10, 30)
    assert [c.payload for c in claimed[:2]] == ["", "not json"]
    assert [(c.run_id, c.node_id) for c in claimed] == [(None, None), (None, None), ("r9", "n")]
    for c in claimed:
        with pytest.raises(fd.CheckpointError, match=r"malformed task message"):
            decode_task(c.payload)
    for c in claimed:
        await broker.complete(c.task_id, "?", "?", "{}")
    assert await broker.pending() == 0


async def test_a_task_entry_names_its_run_and_node(broker: RedisBroker) -> None:
    await broker.enqueue([task("run-1", "node-1")])
    (claimed,) = await broker.claim("w", 1, 30)
    assert (claimed.run_id, claimed.node_id) == ("run-1", "node-1")


# --- runs that end or resume --------------------------------------------------------------------


async def test_drop_queued_removes_only_the_runs_tasks_not_yet_taken(
    broker: RedisBroker, raw: Any
) -> None:
    await broker.enqueue([task("r", "held"), task("other", "a")])
    held, other = await broker.claim("w", 2, 30)
    assert (held.run_id, other.run_id) == ("r", "other")
    await broker.enqueue([task("r", "x"), task("r", "y"), task("other", "b")])
    await broker.drop_queued("r")
    assert await broker.pending() == 3  # r/held (taken), other/a (taken), other/b
    claimed = await broker.claim("w2", 10, 30)
    assert [payload_of(c)["node_id"] for c in claimed] == ["b"]
    assert await raw.hlen(broker.queued_key) == 3
    await broker.enqueue([task("r", "x")])  # dropped: a resume may queue it again
    assert [payload_of(c)["node_id"] for c in await broker.claim("w2", 10, 30)] == ["x"]


async def test_redeliver_hands_a_runs_taken_tasks_out_afresh(
    broker: RedisBroker, redis_server: RedisServer
) -> None:
    await broker.enqueue([task("r", "a"), task("r", "b"), task("other", "c")])
    taken = await broker.claim("dead-client-worker", 3, 30)
    assert [c.deliveries for c in taken] == [1, 1, 1]
    # The resuming process (its own connection: what this one holds is held by the dead).
    resumer = RedisBroker(redis_server.url)
    await resumer.open()
    try:
        await resumer.redeliver("r")
    finally:
        await resumer.close()
    again = await broker.claim("new-worker", 10, 30)  # at once: no lease to wait out
    assert sorted((payload_of(c)["node_id"], c.deliveries) for c in again) == [("a", 1), ("b", 1)]
    assert await broker.pending() == 3
    await broker.enqueue([task("r", "a")])  # still queued under its new entry
    assert await broker.claim("new-worker", 10, 30) == []
    # The old worker's late completion publishes nothing; the new one's does.
    _, cursor = await broker.completions(None)
    await broker.complete(taken[0].task_id, "r", "a", '"late"')
    new_a = next(c for c in again if payload_of(c)["node_id"] == "a")
    await broker.complete(new_a.task_id, "r", "a", '"fresh"')
    assert (await broker.completions(cursor))[0] == ['"fresh"']
    assert await broker.pending() == 2


async def test_chunks_of_a_long_queue(broker: RedisBroker) -> None:
    await broker.enqueue([task("r" if i % 3 else "s", f"n{i}") for i in range(1200)])
    await broker.drop_queued("r")
    assert await broker.pending() == 400


async def test_a_nodes_events_are_published_with_its_commit_and_before_its_completion(
    broker: RedisBroker, raw: Any
) -> None:
    await broker.enqueue([task("r", "a"), task("r", "b")])
    a, b = await broker.claim("w", 2, 30)
    _, events_at = await broker.events(None)
    await raw.hset(f"{broker.prefix}:nodes:r", "b", b"{garbage")  # b cannot commit
    done = await broker.commit_and_complete(
        a.task_id, "r", record("a", 1), '"a done"', events=[("r", '"a finished"')]
    )
    assert done is True
    # Refused commits publish no events (b's place holds garbage: it fails instead).
    assert await broker.commit_and_complete(
        b.task_id, "r", record("b", 2), '"b done"', events=[("r", '"b finished"')]
    )
    entries = await raw.xrange(broker.events_key, min=f"({events_at}")
    assert [e[1][b"payload"] for e in entries] == [b'"a finished"']
    # A failure's events go with its completion too.
    await broker.enqueue([task("r", "c")])
    (c,) = await broker.claim("w", 1, 30)
    await broker.complete(c.task_id, "r", "c", '"c failed"', events=[("r", '"c failed"')])
    texts, _ = await broker.events(events_at)
    assert texts == [("r", '"a finished"'), ("r", '"c failed"')]


# --- commands sent as they are ------------------------------------------------------------------


async def test_scripts_run_after_the_server_forgot_them(broker: RedisBroker, raw: Any) -> None:
    """Scripts go by SHA-1; a server that lost its script cache (restarted, SCRIPT FLUSH)
    gets them whole, in a batch of writes as alone."""
    await broker.enqueue([task("r", "a")])
    await raw.script_flush()
    await broker.enqueue([task("r", "b")])
    [first, second] = await broker.claim("w", 10, 30)
    await raw.script_flush()
    await broker.complete_many(
        [
            Finished(first.task_id, "r", "a", "{}"),
            Finished(second.task_id, "r", "b", "{}"),
        ]
    )
    assert await broker.pending() == 0


async def test_an_error_reply_is_its_commands_alone(broker: RedisBroker, raw: Any) -> None:
    await raw.set("a-string", "x")
    replies = await broker._link.send([[b"HGET", "a-string", b"f"], [b"GET", "a-string"]])
    assert "WRONGTYPE" in str(replies[0])
    assert replies[1] == b"x"
    await raw.delete("a-string")
