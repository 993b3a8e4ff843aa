"""The NATS store's watch of the journal (``backends/nats/watch.py``): a batch client checks
each completion against the record its worker committed, taking the records pushed by a
watch of the bucket's writes instead of reading each one.

What is taken from the watch must be what a read finds: a record deleted, replaced or
never written is never taken from it; a hypothesis property runs random writes, deletes
and tamperings and compares the watched lookup with plain reads.  Against a real
nats-server; waits are on the watch's position, never on time.
"""

from __future__ import annotations

import uuid
from typing import Any

import anyio
import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowdsl._executors.batch.client import BatchExecutor, _Waiter
from flowdsl._records import NodeRecord
from flowdsl.backends.messages import Completion
from flowdsl.backends.nats.keys import node_key
from flowdsl.backends.nats.store import WATCHED, NATSStore
from flowdsl.backends.nats.watch import Watch

from _servers import NatsServer

pytestmark = [pytest.mark.anyio, pytest.mark.nats]
DEADLINE = 20.0


@pytest.fixture
def anyio_backend() -> Any:
    return ("asyncio", {"debug": False})


def record(node_id: str, value: str = '"v"') -> NodeRecord:
    return NodeRecord(node_id, value, 1, 10.0, 11.0, "code", None)


async def watched(store: NATSStore) -> Watch:
    """The store's watch, started as a client starts it: by a lookup with expectations."""
    await store.lookup_nodes([("none", "none")], expected={("none", "none"): record("none")})
    return store._bucket.watch(WATCHED)


async def last_sequence(store: NATSStore) -> int:
    info = await store.link.js.stream_info(f"KV_{store.bucket}")
    return int(info.state.last_seq)


async def caught_up(store: NATSStore, watch: Watch, since: int) -> None:
    """Until the watch has seen every write after stream sequence *since* (all of them
    under its keys)."""
    last = await last_sequence(store)
    with anyio.fail_after(DEADLINE):
        while last > since and watch.position < last:  # noqa: ASYNC110 (the watch is polled)
            await anyio.sleep(0.005)


def counting_reads(store: NATSStore, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    reads: list[list[str]] = []
    bucket = store._bucket
    read = bucket.get_many

    async def get_many(keys: list[str], *args: Any, **kwargs: Any) -> Any:
        if keys:
            reads.append(list(keys))
        return await read(keys, *args, **kwargs)

    monkeypatch.setattr(bucket, "get_many", get_many)
    return reads


@pytest.fixture
async def store(nats_server: NatsServer) -> Any:
    store = NATSStore(nats_server.url, prefix=f"w{uuid.uuid4().hex[:8]}")
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def test_records_committed_while_watched_are_checked_without_a_read(
    store: NATSStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    watch = await watched(store)
    since = await last_sequence(store)
    a, b = record("a", '"x"'), record("b", '"y"')
    await store.commit_nodes([("r", a), ("r", b)])
    await caught_up(store, watch, since)
    reads = counting_reads(store, monkeypatch)
    found = await store.lookup_nodes(
        [("r", "a"), ("r", "b")], expected={("r", "a"): a, ("r", "b"): b}
    )
    assert found[("r", "a")] is a
    assert found[("r", "b")] is b
    assert reads == []
    # Taken once: a second check of the same node reads it.
    again = await store.lookup_nodes([("r", "a")], expected={("r", "a"): a})
    assert again == {("r", "a"): a}
    assert reads == [[node_key("r", "a")]]


async def test_a_forgotten_or_rewritten_record_is_never_taken_from_the_watch(
    store: NATSStore,
) -> None:
    watch = await watched(store)
    since = await last_sequence(store)
    a, b = record("a", '"x"'), record("b", '"y"')
    await store.commit_nodes([("r", a), ("r", b)])
    await store.forget_nodes("r", ["a"])
    # Written by hand over the committed record, its check made right (no key is set).
    other = record("b", '"changed"')
    await store._bucket.put(node_key("r", "b"), await store._node_data("r", other), "tamper")
    await caught_up(store, watch, since)
    assert node_key("r", "a") not in watch
    found = await store.lookup_nodes(
        [("r", "a"), ("r", "b")], expected={("r", "a"): a, ("r", "b"): b}
    )
    assert found == {("r", "b"): other}


async def test_the_client_refuses_completions_the_watched_journal_does_not_hold(
    store: NATSStore,
) -> None:
    watch = await watched(store)
    since = await last_sequence(store)
    agreeing, committed = record("ok", "14"), record("lie", "14")
    await store.commit_nodes([("r", agreeing), ("r", committed)])
    await caught_up(store, watch, since)
    executor = BatchExecutor(broker=None, store=store)  # type: ignore[arg-type]
    completions = [
        Completion("r", "ok", True, agreeing),
        Completion("r", "lie", True, attrs.evolve(committed, value="15")),
        Completion("r", "never", True, record("never")),  # forged: nothing committed
    ]
    checked = await executor._agreeing([(_Waiter(anyio.Event()), c) for c in completions])
    by_node = {c.node_id: c for _, c in checked}
    assert by_node["ok"].ok
    assert by_node["ok"].record == agreeing
    assert not by_node["lie"].ok
    assert "disagrees with the journal" in (by_node["lie"].error or "")
    assert "never" not in by_node  # refused: the node goes on waiting for its worker


@attrs.frozen
class Pushed:
    """A message as the watch's consumer pushes it (for the cases a real server does not
    produce on demand: a lagging or gapped watch)."""

    subject: str
    reply: str
    data: bytes = b"{}"
    headers: dict[str, str] | None = None


def pushed(store: NATSStore, watch: Watch, key: str, data: bytes, *, gap: int = 0) -> Pushed:
    cseq = watch._cseq + 1 + gap
    seq = watch.position + 1 + gap
    return Pushed(f"$KV.{store.bucket}.{key}", f"$JS.ACK.s.c.1.{seq}.{cseq}.0.0", data)


async def test_a_gap_in_the_watch_empties_it(store: NATSStore) -> None:
    watch = await watched(store)
    since = await last_sequence(store)
    await store.commit_node("r", record("a"))
    await caught_up(store, watch, since)
    assert node_key("r", "a") in watch
    watch._on_msg(pushed(store, watch, node_key("x", "y"), b"{}", gap=5))
    assert node_key("r", "a") not in watch  # a delete may have been dropped: nothing kept
    # The next use starts it afresh, and it holds what is written from then on.
    assert await watch.take([node_key("r", "a")]) == [None]
    since = await last_sequence(store)
    await store.commit_node("r", record("b"))
    await caught_up(store, watch, since)
    assert node_key("r", "b") in watch


async def test_a_node_this_process_forgets_leaves_the_watch_before_it_is_deleted(
    store: NATSStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    watch = await watched(store)
    since = await last_sequence(store)
    old = record("a", '"old"')
    await store.commit_node("r", old)
    await caught_up(store, watch, since)
    assert node_key("r", "a") in watch
    watched_at_delete: list[bool] = []
    delete = store._bucket.delete

    async def deleting(key: str, *args: Any, **kwargs: Any) -> Any:
        watched_at_delete.append(key in watch)
        return await delete(key, *args, **kwargs)

    monkeypatch.setattr(store._bucket, "delete", deleting)
    await store.forget_nodes("r", ["a"])  # a resume after a code change, say
    assert watched_at_delete == [False]
    assert node_key("r", "a") not in watch
    # A late completion of the forgotten record is refused: the journal has none.
    assert await store.lookup_nodes([("r", "a")], expected={("r", "a"): old}) == {}


def test_a_lagging_watch_keeps_no_value_from_before_this_process_deleted_the_key() -> None:
    """The values and delete markers come in stream order, possibly long after the
    deletes were made: a value that comes before its key's delete marker is not kept;
    one after it is.  (Pushed by hand: a real server does not lag on demand.)"""
    watch = Watch(None, "KV_b", "$KV.b.", "node.>")  # type: ignore[arg-type]
    watch._sub = object()  # following
    seq = iter(range(1, 100))

    def push(key: str, data: bytes = b"{}", *, delete: bool = False) -> None:
        n = next(seq)
        headers = {"KV-Operation": "DEL"} if delete else None
        watch._on_msg(Pushed(f"$KV.b.{key}", f"$JS.ACK.s.c.1.{n}.{n}.0.0", data, headers))

    push("node.r.a", b"1")
    watch.forget(["node.r.a"])
    assert "node.r.a" not in watch
    watch.forget(["node.r.a"])  # forgotten twice before the watch caught up
    push("node.r.a", b"2")  # written before the first delete: not kept
    push("node.r.a", delete=True)
    push("node.r.a", b"3")  # written before the second delete: not kept
    assert "node.r.a" not in watch
    push("node.r.a", delete=True)
    push("node.r.a", b"4")  # after both: kept
    assert "node.r.a" in watch


async def test_a_watch_showing_another_record_than_expected_decides_nothing(
    store: NATSStore,
) -> None:
    """A lagging watch holding an older record must not make a completion disagree with
    the journal: what the watch shows otherwise than expected is read."""
    watch = await watched(store)
    since = await last_sequence(store)
    new = record("a", '"new"')
    await store.commit_node("r", new)
    await caught_up(store, watch, since)
    stale = await store._node_data("r", record("a", '"old"'))
    watch._on_msg(pushed(store, watch, node_key("r", "a"), stale))
    found = await store.lookup_nodes([("r", "a")], expected={("r", "a"): new})
    assert found[("r", "a")] is new


async def test_a_server_that_refuses_the_watch_leaves_every_check_to_a_read(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The bucket's stream allows one consumer, taken already: the watch's is refused
    (a real limit of the server's), and the checks go on by reads."""
    import nats
    from nats.js.api import ConsumerConfig, DiscardPolicy, StreamConfig

    name = f"w{uuid.uuid4().hex[:8]}"
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(
            StreamConfig(
                name=f"KV_{name}",
                subjects=[f"$KV.{name}.>"],
                max_msgs_per_subject=1,
                discard=DiscardPolicy.NEW,
                allow_rollup_hdrs=True,
                deny_delete=True,
                allow_direct=True,
                max_consumers=1,
            )
        )
        await js.add_consumer(f"KV_{name}", ConsumerConfig(durable_name="taken"))
        store = NATSStore(nats_server.url, prefix=name)
        await store.open()
        try:
            a = record("a")
            await store.commit_node("r", a)
            for _ in range(2):
                found = await store.lookup_nodes([("r", "a")], expected={("r", "a"): a})
                assert found == {("r", "a"): a}
        finally:
            await store.close()
    finally:
        await nc.close()
    refusals = [r for r in caplog.records if "without a watch" in r.getMessage()]
    assert len(refusals) == 1  # said once, not tried again on every check
    assert "maximum consumers limit reached" in refusals[0].getMessage()


# --- a property: the watched lookup is a read ------------------------------------------------

NODES = ["a", "b", "c"]
ops = st.lists(
    st.tuples(
        st.sampled_from(["commit", "forget", "tamper"]), st.sampled_from(NODES), st.integers(0, 2)
    ),
    max_size=8,
)
expectations = st.lists(st.sampled_from(["none", "latest", "other"]), min_size=3, max_size=3)


@settings(max_examples=30)  # each example is a few round trips to a server
@given(steps=ops, expect=expectations)
def _watched_lookups_are_reads(store: NATSStore, watch: Watch, steps: Any, expect: Any) -> None:
    anyio.from_thread.run(_one_example, store, watch, steps, expect)


async def _one_example(
    store: NATSStore, watch: Watch, steps: list[tuple[str, str, int]], expect: list[str]
) -> None:
    run = f"r{uuid.uuid4().hex[:8]}"
    since = await last_sequence(store)
    latest: dict[str, NodeRecord] = {}
    for op, node, n in steps:
        rec = record(node, str(n))
        if op == "commit":
            if await store.commit_node(run, rec):
                latest[node] = rec
        elif op == "forget":
            await store.forget_nodes(run, [node])
            latest.pop(node, None)
        else:  # a record written over the journal's by hand
            data = await store._node_data(run, rec)
            await store._bucket.put(node_key(run, node), data, "tamper")
            latest[node] = rec
    await caught_up(store, watch, since)
    expected = {}
    for node, how in zip(NODES, expect, strict=True):
        if how == "latest" and node in latest:
            expected[(run, node)] = latest[node]
        elif how == "other":
            expected[(run, node)] = record(node, '"other"')
    keys = [(run, node) for node in NODES]
    watched_lookup = await store.lookup_nodes(keys, expected=expected)
    assert watched_lookup == await store.lookup_nodes(keys)  # plain reads
    assert watched_lookup == {(run, node): rec for node, rec in latest.items()}


async def test_what_the_watch_gives_is_what_a_read_finds(store: NATSStore) -> None:
    watch = await watched(store)
    await anyio.to_thread.run_sync(_watched_lookups_are_reads, store, watch)


# --- a property: any interleaving of writes, forgets, deliveries and takes ---------------------

actions = st.lists(
    st.tuples(
        st.sampled_from(["write", "forget", "deliver", "take"]),
        st.sampled_from(["node.r.a", "node.r.b"]),
    ),
    max_size=40,
)


@settings(max_examples=1000)  # pure Python: thousands of interleavings a second
@given(steps=actions)
def test_a_watch_never_hands_out_a_value_older_than_a_delete_of_this_process(
    steps: list[tuple[str, str]],
) -> None:
    """The stream is simulated (what the server stores, in order); the watch receives it
    with any lag.  A value taken must be the key's newest delivered one, written after
    every delete this process made of the key."""
    watch = Watch(None, "KV_b", "$KV.b.", "node.>")  # type: ignore[arg-type]
    watch._sub = object()  # following
    stream: list[tuple[str, bytes | None]] = []  # (key, value; None: a delete marker)
    delivered = 0
    last_forget: dict[str, int] = {}  # key -> index in the stream of its last delete
    for n, (action, key) in enumerate(steps):
        if action == "write":
            stream.append((key, str(n).encode()))
        elif action == "forget":
            watch.forget([key])  # before the delete, as the store does
            last_forget[key] = len(stream)
            stream.append((key, None))
        elif action == "deliver" and delivered < len(stream):
            k, value = stream[delivered]
            delivered += 1
            headers = None if value is not None else {"KV-Operation": "DEL"}
            reply = f"$JS.ACK.s.c.1.{delivered}.{delivered}.0.0"
            watch._on_msg(Pushed(f"$KV.b.{k}", reply, value or b"", headers))
        elif action == "take":
            taken = watch._values.pop(key, None)  # take() without starting a consumer
            if taken is None:
                continue
            puts = [i for i, (k, v) in enumerate(stream[:delivered]) if k == key]
            assert puts, "a value never written"
            newest = puts[-1]
            assert stream[newest][1] == taken  # the newest delivered, not a delete
            assert newest > last_forget.get(key, -1)  # written after this process's delete
