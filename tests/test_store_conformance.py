"""What every store must do, checked on each of them, on asyncio and trio.

A new store (Redis, NATS) joins by adding one entry to ``_FACTORIES`` and one
``pytest.param`` to ``STORES`` (with a skip mark when its server is not running).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flowdsl import _codec
from flowdsl._records import NodeRecord, RunRecord, RunStatus
from flowdsl.backends import MemoryStore, Store
from flowdsl.backends.sqlite.store import INLINE_MAX, SQLiteStore

from nats_steps import conformance_store as nats_conformance_store
from redis_steps import conformance_store

pytestmark = pytest.mark.anyio

_FACTORIES: dict[str, Callable[[Path], Store]] = {
    "memory": lambda tmp: MemoryStore(),
    "sqlite": lambda tmp: SQLiteStore(tmp / "deep" / "dir" / "runs.db"),
    "redis": conformance_store,
    "nats": nats_conformance_store,
}
STORES = [
    pytest.param("memory", id="memory"),
    pytest.param("sqlite", id="sqlite"),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
    pytest.param("nats", id="nats", marks=pytest.mark.nats),
]


@pytest.fixture(params=STORES)
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Store]:
    """A factory of store objects on the same backing storage (same file, same server)."""
    kind: str = request.param
    if kind == "memory":
        shared = MemoryStore()  # "the same storage" for memory is the same object
        return lambda: shared
    return lambda: _FACTORIES[kind](tmp_path)


@pytest.fixture
async def store(make_store: Callable[[], Store]) -> AsyncIterator[Store]:
    s = make_store()
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def run_record(run_id: str = "r1", *, created_at: float = 1000.0, **changes: object) -> RunRecord:
    record = RunRecord(
        run_id=run_id,
        flow="triage",
        flow_ref="app.flows:triage",
        fingerprint="f" * 16,
        inputs=_codec.dumps({"ticket": "the printer is on fire", "n": 3}),
        status=RunStatus.RUNNING,
        created_at=created_at,
        updated_at=created_at,
        code={"classify": "abc123", "route": "version:2"},
    )
    return attrs.evolve(record, **changes)  # type: ignore[misc]


def node_record(node_id: str, value: object = None, **changes: object) -> NodeRecord:
    record = NodeRecord(
        node_id=node_id,
        value=_codec.dumps(value if value is not None else {"node": node_id}),
        attempts=1,
        started_at=1000.25,
        finished_at=1001.5,
        code="abc123/wiring",
        usage={"input_tokens": 12, "output_tokens": 34, "model": "gpt-x"},
    )
    return attrs.evolve(record, **changes)  # type: ignore[misc]


LARGE = "é" * (INLINE_MAX * 4)  # well past the inline threshold, in bytes and in characters


# --- runs ------------------------------------------------------------------------------------


async def test_create_run_is_idempotent(store: Store) -> None:
    first = run_record()
    assert await store.create_run(first) == (first, True)
    second = run_record(flow="other", inputs="[]", created_at=2000.0)
    assert await store.create_run(second) == (first, False)
    assert await store.get_run("r1") == first


async def test_get_run_of_an_unknown_run_is_none(store: Store) -> None:
    assert await store.get_run("nope") is None


async def test_update_run_changes_status_and_keeps_what_it_is_not_given(store: Store) -> None:
    await store.create_run(run_record())
    await store.update_run("r1", status=RunStatus.FAILED, error="boom", failed_node="classify")
    failed = await store.get_run("r1")
    assert failed is not None
    assert (failed.status, failed.error, failed.failed_node) == (
        RunStatus.FAILED,
        "boom",
        "classify",
    )
    assert failed.fingerprint == "f" * 16
    assert failed.code == {"classify": "abc123", "route": "version:2"}
    assert failed.updated_at >= failed.created_at

    await store.update_run(
        "r1", status=RunStatus.RUNNING, fingerprint="g" * 16, code={"classify": "def456"}
    )
    await store.update_run("r1", status=RunStatus.FINISHED, result=_codec.dumps([1, "two"]))
    done = await store.get_run("r1")
    assert done is not None
    assert done.status is RunStatus.FINISHED
    assert _codec.loads(done.result or "") == [1, "two"]
    assert (done.error, done.failed_node) == (None, None)
    assert (done.fingerprint, done.code) == ("g" * 16, {"classify": "def456"})
    assert (done.flow, done.flow_ref, done.inputs) == (
        failed.flow,
        failed.flow_ref,
        failed.inputs,
    )


async def test_a_failed_runs_traceback_is_kept_until_the_run_changes_again(
    make_store: Callable[[], Store],
) -> None:
    # Long enough for the stores that keep large text apart (NATS, SQLite blobs).
    text = 'Traceback (most recent call last):\n  File "app.py", line 3, in f\n' * 40 + "E\n"
    store = make_store()
    await store.open()
    try:
        await store.create_run(run_record())
        assert (await store.get_run("r1")).traceback is None  # type: ignore[union-attr]
        await store.update_run(
            "r1", status=RunStatus.FAILED, error="boom", failed_node="classify", traceback=text
        )
    finally:
        await store.close()
    again = make_store()  # read back by another store object: what is stored, not cached
    await again.open()
    try:
        failed = await again.get_run("r1")
        assert failed is not None
        assert (failed.error, failed.failed_node, failed.traceback) == ("boom", "classify", text)
        assert [r.traceback for r in await again.list_runs()] == [text]
        await again.update_run("r1", status=RunStatus.RUNNING)  # a resume clears it
        running = await again.get_run("r1")
        assert running is not None
        assert (running.error, running.traceback) == (None, None)
    finally:
        await again.close()


async def test_list_runs_newest_first_with_a_limit(store: Store) -> None:
    for i, created in enumerate([30.0, 10.0, 50.0, 20.0, 40.0]):
        await store.create_run(run_record(f"r{i}", created_at=created))
    newest = await store.list_runs()
    assert [r.created_at for r in newest] == [50.0, 40.0, 30.0, 20.0, 10.0]
    assert [r.run_id for r in await store.list_runs(limit=2)] == ["r2", "r4"]
    assert await store.list_runs(limit=0) == []


async def test_unfinished_runs_are_the_running_and_waiting_ones(store: Store) -> None:
    for status in RunStatus:
        await store.create_run(run_record(status.value))
        await store.update_run(status.value, status=status)
    unfinished = await store.unfinished_runs()
    assert sorted(r.run_id for r in unfinished) == ["running", "waiting"]
    assert {r.run_id: r.status for r in unfinished} == {
        "running": RunStatus.RUNNING,
        "waiting": RunStatus.WAITING,
    }


# --- the journal -----------------------------------------------------------------------------


async def test_commit_node_first_wins(store: Store) -> None:
    await store.create_run(run_record())
    for node_id, first, second in [("small", 1, 2), ("large", LARGE, LARGE + "!")]:
        assert await store.commit_node("r1", node_record(node_id, first)) is True
        assert await store.commit_node("r1", node_record(node_id, second, attempts=2)) is False
    nodes = await store.load_nodes("r1")
    assert nodes == {
        "small": node_record("small", 1),
        "large": node_record("large", LARGE),
    }


async def test_load_nodes_round_trips_every_field(store: Store) -> None:
    await store.create_run(run_record())
    records = [
        node_record("a", "x"),
        node_record("b", LARGE, attempts=3, usage=None, code=""),
        node_record("c", {"nested": [1, 2.5, None, True, "ü"]}, started_at=5.0, finished_at=5.0),
        node_record("d", "route-label", attempts=0),
    ]
    for record in records:
        assert await store.commit_node("r1", record)
    assert await store.load_nodes("r1") == {r.node_id: r for r in records}
    assert await store.load_nodes("unknown-run") == {}


async def test_runs_keep_separate_journals(store: Store) -> None:
    await store.create_run(run_record("r1"))
    await store.create_run(run_record("r2"))
    assert await store.commit_node("r1", node_record("n", "one"))
    assert await store.commit_node("r2", node_record("n", "two"))
    assert (await store.load_nodes("r1"))["n"].value == '"one"'
    assert (await store.load_nodes("r2"))["n"].value == '"two"'


async def test_forget_nodes_drops_only_the_named_nodes(store: Store) -> None:
    await store.create_run(run_record())
    for node_id in ["a", "b", "c"]:
        await store.commit_node("r1", node_record(node_id, LARGE))
    await store.forget_nodes("r1", ["a", "c", "never-committed"])
    await store.forget_nodes("r1", [])
    assert set(await store.load_nodes("r1")) == {"b"}
    # A forgotten node commits afresh (its shared large value is still readable).
    assert await store.commit_node("r1", node_record("a", LARGE + "v2"))
    nodes = await store.load_nodes("r1")
    assert nodes["a"].value == _codec.dumps(LARGE + "v2")
    assert nodes["b"].value == _codec.dumps(LARGE)


async def test_forgetting_a_node_keeps_values_other_nodes_share(store: Store) -> None:
    await store.create_run(run_record("r1"))
    await store.create_run(run_record("r2"))
    await store.commit_node("r1", node_record("a", LARGE))
    await store.commit_node("r2", node_record("a", LARGE))
    await store.put_cached("k", _codec.dumps(LARGE + "c"))
    await store.commit_node("r1", node_record("b", LARGE + "c"))
    await store.forget_nodes("r1", ["a", "b"])
    assert (await store.load_nodes("r2"))["a"].value == _codec.dumps(LARGE)
    assert await store.get_cached("k") == _codec.dumps(LARGE + "c")


async def test_lone_surrogates_survive(store: Store) -> None:
    """Python strings may hold lone surrogates and the codec's JSON text keeps them; a
    store must give back what it was given (the same text for results, the same data for
    the run's fields)."""
    weird = "bad \udc80 byte"
    await store.create_run(run_record(inputs=_codec.dumps({"t": weird})))
    for node_id, value in [("small", weird), ("large", weird * 100)]:
        assert await store.commit_node("r1", node_record(node_id, value, usage={"u": weird}))
    nodes = await store.load_nodes("r1")
    assert nodes["small"] == node_record("small", weird, usage={"u": weird})
    assert nodes["large"] == node_record("large", weird * 100, usage={"u": weird})
    await store.put_cached("k", _codec.dumps(weird))
    assert await store.get_cached("k") == _codec.dumps(weird)
    await store.update_run(
        "r1", status=RunStatus.FAILED, result=_codec.dumps([weird]), error=f"boom: {weird}"
    )
    run = await store.get_run("r1")
    assert run is not None
    assert _codec.loads(run.inputs) == {"t": weird}
    assert _codec.loads(run.result or "") == [weird]
    assert run.error is not None
    assert run.error.startswith("boom: bad ")


async def test_lookup_nodes_reads_committed_records_of_several_runs(store: Store) -> None:
    await store.create_run(run_record("r1"))
    await store.create_run(run_record("r2"))
    await store.commit_node("r1", node_record("a", "x"))
    await store.commit_node("r1", node_record("b", LARGE))
    await store.commit_node("r2", node_record("a", "y"))
    keys = [("r1", "a"), ("r1", "b"), ("r2", "a"), ("r2", "b"), ("nope", "a"), ("r1", "a")]
    assert await store.lookup_nodes(keys) == {
        ("r1", "a"): node_record("a", "x"),
        ("r1", "b"): node_record("b", LARGE),
        ("r2", "a"): node_record("a", "y"),
    }
    assert await store.lookup_nodes([]) == {}
    many = [("r1", f"n{i}") for i in range(700)] + [("r2", "a")]  # past one SQL chunk
    assert set(await store.lookup_nodes(many)) == {("r2", "a")}


async def test_lookup_nodes_takes_an_expected_record_only_when_the_journal_holds_it(
    store: Store,
) -> None:
    await store.create_run(run_record("r1"))
    await store.commit_node("r1", node_record("a", "x"))
    await store.commit_node("r1", node_record("b", LARGE))
    same = node_record("a", "x")
    other = attrs.evolve(node_record("b", LARGE), value=_codec.dumps("forged"))
    found = await store.lookup_nodes(
        [("r1", "a"), ("r1", "b"), ("r1", "c")],
        expected={("r1", "a"): same, ("r1", "b"): other, ("r1", "c"): node_record("c", "z")},
    )
    # What the journal holds, whatever was expected: a differing or missing record is
    # never taken from the expectation.
    assert found == {("r1", "a"): same, ("r1", "b"): node_record("b", LARGE)}


# --- the run lease ---------------------------------------------------------------------------

TTL = 30.0  # long enough never to run out during a test that does not want it to


async def test_a_lease_is_taken_by_one_owner_and_renewed_by_taking_it_again(store: Store) -> None:
    before = time.time()
    assert await store.acquire_lease("r1", "A", TTL) is None
    held = await store.acquire_lease("r1", "B", TTL)
    assert held is not None
    assert (held.run_id, held.owner) == ("r1", "A")
    assert before + TTL - 1 <= held.expires_at <= time.time() + TTL + 1
    assert await store.acquire_lease("r1", "A", TTL) is None  # its holder takes it again
    assert await store.acquire_lease("r2", "B", TTL) is None  # other runs are apart
    assert (await store.acquire_lease("r2", "A", TTL) or held).owner == "B"


async def test_renew_leases_extends_what_the_owner_holds_and_reports_the_rest(
    store: Store,
) -> None:
    await store.acquire_lease("r1", "A", 5.0)
    await store.acquire_lease("r2", "A", 5.0)
    await store.acquire_lease("r3", "B", TTL)
    first = await store.acquire_lease("r1", "B", TTL)
    assert await store.renew_leases("A", ["r1", "r2", "r3", "r4"], 60.0) == ["r3", "r4"]
    assert await store.renew_leases("A", [], 60.0) == []
    renewed = await store.acquire_lease("r1", "B", TTL)
    assert first is not None
    assert renewed is not None
    assert renewed.owner == "A"
    assert renewed.expires_at > first.expires_at + 30


async def wait_to_take(store: Store, run_id: str, owner: str) -> None:
    """Try to take a lease until it runs out (the ttl is short: this is what expiry is)."""
    with anyio.fail_after(10):
        while True:
            if await store.acquire_lease(run_id, owner, TTL) is None:
                return
            await anyio.sleep(0.01)


async def test_a_lease_that_ran_out_goes_to_the_next_taker(store: Store) -> None:
    assert await store.acquire_lease("r1", "A", 0.05) is None
    await wait_to_take(store, "r1", "B")
    # The first holder learns that it lost the lease, and cannot take it back or drop it.
    assert await store.renew_leases("A", ["r1"], TTL) == ["r1"]
    await store.release_lease("r1", "A")
    held = await store.acquire_lease("r1", "A", TTL)
    assert held is not None
    assert held.owner == "B"


async def test_a_holder_known_dead_is_replaced_at_once(store: Store) -> None:
    assert await store.acquire_lease("r1", "A", TTL) is None
    # Only the holder named: a taker that names someone else gets the standing lease.
    held = await store.acquire_lease("r1", "B", TTL, replacing="C")
    assert held is not None
    assert held.owner == "A"
    assert await store.acquire_lease("r1", "B", TTL, replacing="A") is None
    held = await store.acquire_lease("r1", "C", TTL, replacing="A")
    assert held is not None
    assert held.owner == "B"
    # Naming a dead holder takes a free lease too.
    assert await store.acquire_lease("r2", "B", TTL, replacing="A") is None


async def test_a_released_lease_is_free_and_only_its_holder_releases_it(store: Store) -> None:
    assert await store.acquire_lease("r1", "A", TTL) is None
    await store.release_lease("r1", "B")  # not B's: nothing happens
    held = await store.acquire_lease("r1", "B", TTL)
    assert held is not None
    assert held.owner == "A"
    await store.release_lease("r1", "A")
    await store.release_lease("r1", "A")  # again: nothing left to release
    await store.release_lease("never-leased", "A")
    assert await store.acquire_lease("r1", "B", TTL) is None
    assert await store.renew_leases("A", ["r1"], TTL) == ["r1"]


async def test_of_two_racing_takers_exactly_one_gets_each_lease(
    make_store: Callable[[], Store],
) -> None:
    """Two store objects on the same storage (two connections, as two processes have)
    take the same leases at the same time: one wins each, the other sees the winner."""
    stores = [make_store(), make_store()]
    for s in stores:
        await s.open()
    try:
        for round_ in range(10):
            run_id = f"race-{uuid.uuid4().hex[:8]}-{round_}"
            # A lease that ran out is raced for too, on every other round.
            if round_ % 2:
                assert await stores[0].acquire_lease(run_id, "old", 0.01) is None
                await anyio.sleep(0.05)
            got: dict[str, object] = {}

            async def take(i: int, run_id: str = run_id, got: dict[str, object] = got) -> None:
                got[f"owner-{i}"] = await stores[i % 2].acquire_lease(run_id, f"owner-{i}", TTL)

            async with anyio.create_task_group() as tg:
                for i in range(4):
                    tg.start_soon(take, i)
            winners = [owner for owner, held in got.items() if held is None]
            assert len(winners) == 1, got
            for held in got.values():
                if held is not None:
                    assert getattr(held, "owner", None) == winners[0]
    finally:
        for s in stores:
            await s.close()


# --- the step cache --------------------------------------------------------------------------


async def test_cache(store: Store) -> None:
    assert await store.get_cached("k1") is None
    await store.put_cached("k1", '{"a":1}')
    await store.put_cached("k2", _codec.dumps(LARGE))
    assert await store.get_cached("k1") == '{"a":1}'
    assert await store.get_cached("k2") == _codec.dumps(LARGE)
    await store.put_cached("k1", "[2]")
    assert await store.get_cached("k1") == "[2]"


# --- lifetime --------------------------------------------------------------------------------


async def test_open_and_close_are_idempotent_and_data_outlives_them(
    make_store: Callable[[], Store],
) -> None:
    first = make_store()
    await first.open()
    await first.open()
    await first.create_run(run_record())
    await first.commit_node("r1", node_record("n", LARGE))
    await first.put_cached("k", "1")
    await first.close()
    await first.close()

    again = make_store()
    await again.open()
    try:
        assert await again.get_run("r1") == run_record()
        assert await again.load_nodes("r1") == {"n": node_record("n", LARGE)}
        assert await again.get_cached("k") == "1"
    finally:
        await again.close()


# --- random journals -------------------------------------------------------------------------

json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
large_text = st.text(min_size=INLINE_MAX // 2, max_size=INLINE_MAX * 6)


@st.composite
def commit_sequences(draw: st.DrawFn) -> list[tuple[str, str]]:
    # A small pool of values so that duplicates (shared blobs) are common.
    pool = draw(st.lists(json_values | large_text, min_size=1, max_size=6))
    ids = st.sampled_from(["a", "b", "c", "ü-node", "d/e", "x" * 60])
    return draw(
        st.lists(st.tuples(ids, st.sampled_from(pool).map(_codec.dumps)), min_size=1, max_size=25)
    )


# The store fixture is shared across examples on purpose: each example uses a fresh run id.
@given(commits=commit_sequences())
async def test_random_commits_read_back_equal(store: Store, commits: list[tuple[str, str]]) -> None:
    run_id = f"run-{uuid.uuid4().hex}"
    await store.create_run(run_record(run_id))
    expected: dict[str, NodeRecord] = {}
    for i, (node_id, value) in enumerate(commits):
        record = NodeRecord(node_id, value, i, float(i), float(i) + 0.5, f"code-{i}")
        created = await store.commit_node(run_id, record)
        assert created is (node_id not in expected)
        expected.setdefault(node_id, record)
    assert await store.load_nodes(run_id) == expected


async def test_signals_are_kept_in_order_per_run_and_name(store: Store) -> None:
    await store.create_run(run_record("s1"))
    assert await store.get_signal("s1", "approval", 0) is None
    assert await store.put_signal("s1", "approval", '{"ok":true}') == 0
    assert await store.put_signal("s1", "approval", '{"ok":false}') == 1
    assert await store.put_signal("s1", "other", '"x"') == 0
    assert await store.put_signal("s2", "approval", "[1]") == 0
    assert await store.get_signal("s1", "approval", 0) == '{"ok":true}'
    assert await store.get_signal("s1", "approval", 1) == '{"ok":false}'
    assert await store.get_signal("s1", "approval", 2) is None
    assert await store.get_signal("s1", "other", 0) == '"x"'
    assert await store.get_signal("s2", "approval", 0) == "[1]"
    big = _codec.dumps("x" * (INLINE_MAX * 3))
    assert await store.put_signal("s1", "big", big) == 0
    assert await store.get_signal("s1", "big", 0) == big


async def test_signals_outlive_the_store_object(make_store: Callable[[], Store]) -> None:
    first = make_store()
    await first.open()
    try:
        await first.put_signal("s9", "go", '"now"')
    finally:
        await first.close()
    second = make_store()
    await second.open()
    try:
        assert await second.get_signal("s9", "go", 0) == '"now"'
        assert await second.put_signal("s9", "go", '"again"') == 1
    finally:
        await second.close()


async def test_a_waiting_run_is_not_ended(store: Store) -> None:
    await store.create_run(run_record("w1"))
    await store.update_run("w1", status=RunStatus.WAITING)
    record = await store.get_run("w1")
    assert record is not None
    assert record.status is RunStatus.WAITING
    assert not record.status.ended


# --- retention ---------------------------------------------------------------------------------


async def test_prune_deletes_old_ended_runs_with_their_journals(store: Store) -> None:
    old, recent = 1000.0, 4_000_000_000.0  # 1970 and 2096
    finished = RunStatus.FINISHED
    await store.create_run(run_record("old-done", status=finished, updated_at=old))
    await store.create_run(run_record("old-failed", status=RunStatus.FAILED, updated_at=old))
    await store.create_run(run_record("old-running", updated_at=old))
    await store.create_run(run_record("old-waiting", status=RunStatus.WAITING, updated_at=old))
    await store.create_run(run_record("new-done", status=finished, updated_at=recent))
    for run_id in ("old-done", "old-failed", "old-running", "old-waiting", "new-done"):
        await store.commit_node(run_id, node_record("a", LARGE))
        await store.commit_node(run_id, node_record("b", "small"))
        await store.put_signal(run_id, "go", '"now"')

    # Only the statuses asked for; never a running run, never a recent one.
    pruned = await store.prune(older_than=3600, statuses=frozenset({RunStatus.FAILED}))
    assert pruned == ["old-failed"]
    assert sorted(await store.prune(older_than=3600)) == ["old-done"]
    assert await store.prune(older_than=3600) == []

    for gone in ("old-done", "old-failed"):
        assert await store.get_run(gone) is None
        assert await store.load_nodes(gone) == {}
        assert await store.get_signal(gone, "go", 0) is None
    kept = ["new-done", "old-running", "old-waiting"]
    assert sorted(r.run_id for r in await store.list_runs()) == kept
    # The large value other runs share is still there for them.
    for run_id in kept:
        assert (await store.load_nodes(run_id))["a"] == node_record("a", LARGE)
        assert await store.get_signal(run_id, "go", 0) == '"now"'


async def test_load_node_reads_one_record(store: Store) -> None:
    await store.create_run(run_record())
    await store.commit_node("r1", node_record("a", LARGE))
    await store.commit_node("r1", node_record("b"))
    assert await store.load_node("r1", "a") == node_record("a", LARGE)
    assert await store.load_node("r1", "b") == node_record("b")
    assert await store.load_node("r1", "c") is None
    assert await store.load_node("r2", "a") is None


# --- a run's provider batch jobs ---------------------------------------------------------------


async def test_a_runs_batch_jobs_are_listed_in_order_across_store_objects(
    make_store: Callable[[], Store],
) -> None:
    first, second = make_store(), make_store()
    await first.open()
    await second.open()
    try:
        assert await first.batch_jobs("b1") == []
        # Two processes add jobs of one run at once: none is lost.
        async with anyio.create_task_group() as tg:
            for i in range(6):
                tg.start_soon((first if i % 2 else second).add_batch_job, "b1", f"batch_{i}")
        await first.add_batch_job("b2", "msgbatch_x")
        await first.add_batch_job("b1", "batch_0")  # noted twice, listed once
        jobs = await second.batch_jobs("b1")
        assert sorted(jobs) == [f"batch_{i}" for i in range(6)]
        assert await second.batch_jobs("b2") == ["msgbatch_x"]
    finally:
        await first.close()
        await second.close()


async def test_a_runs_batch_jobs_are_pruned_with_it(store: Store) -> None:
    await store.create_run(run_record("bj", status=RunStatus.CANCELLED, updated_at=1000.0))
    await store.add_batch_job("bj", "batch_1")
    assert await store.prune(older_than=3600) == ["bj"]
    assert await store.batch_jobs("bj") == []


async def test_a_batch_job_entry_moved_to_another_run_is_refused(store: Store) -> None:
    from flowdsl import CheckpointError

    await store.add_batch_job("mine", "batch_1")
    entry = await store.get_signal("mine", "llm-batch-jobs", 0)
    assert entry is not None
    await store.put_signal("theirs", "llm-batch-jobs", entry)  # someone copies it over
    with pytest.raises(CheckpointError, match=r"run 'theirs' .* batch job list, entry 0"):
        await store.batch_jobs("theirs")
    await store.put_signal("bad", "llm-batch-jobs", '{"job": 3}')
    with pytest.raises(CheckpointError, match="names no job"):
        await store.batch_jobs("bad")
