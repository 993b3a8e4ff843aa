"""The batch reads a client makes, checked on every broker: the embedded SQLite queue (on
asyncio and trio), Redis Streams and NATS JetStream (asyncio only, as their clients are).

``read_completions`` and ``read_events`` return at most ``count`` messages, oldest first,
and a cursor from which the next call goes on: nothing is skipped, nothing comes twice.
A hypothesis property drives random batch sizes through the whole path a client and its
workers take (``enqueue`` in batches, ``claim`` in batches, ``complete``, batched reads)
and checks that every task is handed out once and every completion read once.

No test asserts how long anything took; reads are polled until what they wait for came.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowdsl import _codec
from flowdsl._errors import CheckpointError
from flowdsl._integrity import UNKEYED, Seal
from flowdsl._records import NodeRecord
from flowdsl.backends import Broker, messages
from flowdsl.backends.messages import (
    Completion,
    TaskMessage,
    decode_completion,
    decode_task,
    encode_completion,
    encode_task,
)
from flowdsl.backends.sqlite.broker import SQLiteBroker

from nats_steps import conformance_broker as nats_broker
from redis_steps import conformance_broker as redis_broker

pytestmark = pytest.mark.anyio

_FACTORIES: dict[str, Callable[[Path], Broker]] = {
    "sqlite": lambda tmp: SQLiteBroker(tmp / "queue.db"),
    "redis": redis_broker,
    "nats": nats_broker,
}
TARGETS = [
    pytest.param(("sqlite", "asyncio"), id="sqlite-asyncio"),
    pytest.param(("sqlite", "trio"), id="sqlite-trio"),
    pytest.param(("redis", "asyncio"), id="redis", marks=pytest.mark.redis),
    pytest.param(("nats", "asyncio"), id="nats", marks=pytest.mark.nats),
]
DEADLINE = 20.0  # seconds before a wait that should end is a failure


@pytest.fixture(params=TARGETS)
def target(request: pytest.FixtureRequest) -> tuple[str, str]:
    kind, loop = request.param
    return kind, loop


@pytest.fixture
def anyio_backend(target: tuple[str, str]) -> Any:
    return ("asyncio", {"debug": True}) if target[1] == "asyncio" else "trio"


@pytest.fixture
async def broker(target: tuple[str, str], tmp_path: Path) -> AsyncIterator[Broker]:
    b = _FACTORIES[target[0]](tmp_path)
    await b.open()
    try:
        yield b
    finally:
        await b.close()


def _task(run_id: str, node_id: str) -> tuple[str, str, str]:
    return run_id, node_id, _codec.dumps({"run_id": run_id, "node_id": node_id})


async def _claim_all(broker: Broker, n: int, limit: int) -> list[Any]:
    """Claims of at most *limit* tasks each until *n* tasks came (polled)."""
    claimed: list[Any] = []
    with anyio.fail_after(DEADLINE):
        while len(claimed) < n:
            got = await broker.claim("w", limit, 30.0)
            assert len(got) <= limit
            claimed += got
            if not got:
                await anyio.sleep(0.01)
    return claimed


async def _read_batches(
    read: Callable[[Any, int], Any], cursor: Any, n: int, counts: list[int]
) -> tuple[list[Any], Any]:
    """Reads of the given sizes in turn (the last one repeated) until *n* messages came;
    every batch is checked to hold at most its count."""
    out: list[Any] = []
    i = 0
    with anyio.fail_after(DEADLINE):
        while len(out) < n:
            count = counts[min(i, len(counts) - 1)]
            got, cursor = await read(cursor, count)
            assert len(got) <= count
            out += got
            i += 1
            if not got:
                await anyio.sleep(0.01)
    return out, cursor


async def test_completions_are_read_at_most_count_at_a_time_in_order(broker: Broker) -> None:
    run = f"r{uuid.uuid4().hex[:8]}"
    _, cursor = await broker.read_completions(None, count=10)
    await broker.enqueue([_task(run, f"n{i}") for i in range(7)])
    for claimed in await _claim_all(broker, 7, 10):
        node = _codec.loads(claimed.payload)["node_id"]
        await broker.complete(claimed.task_id, run, node, _codec.dumps({"node": node}))

    def read(cursor: Any, count: int) -> Any:
        return broker.read_completions(cursor, count=count)

    texts, cursor = await _read_batches(read, cursor, 7, [3])
    assert sorted(_codec.loads(t)["node"] for t in texts) == sorted(f"n{i}" for i in range(7))
    assert (await broker.read_completions(cursor, count=3))[0] == []


async def test_events_are_read_at_most_count_at_a_time_in_order(broker: Broker) -> None:
    run = f"r{uuid.uuid4().hex[:8]}"
    _, cursor = await broker.read_events(None, count=10)
    published = [(run, _codec.dumps({"n": i})) for i in range(9)]
    await broker.publish_events(published[:4])
    await broker.publish_events(published[4:])

    def read(cursor: Any, count: int) -> Any:
        return broker.read_events(cursor, count=count)

    seen, cursor = await _read_batches(read, cursor, 9, [2, 5])
    assert seen == published  # one publisher: in the order published
    assert (await broker.read_events(cursor, count=4))[0] == []


async def test_reading_a_batch_from_now_on_skips_earlier_completions(broker: Broker) -> None:
    run = f"r{uuid.uuid4().hex[:8]}"
    await broker.enqueue([_task(run, "early")])
    [claimed] = await _claim_all(broker, 1, 1)
    await broker.complete(claimed.task_id, run, "early", '{"node": "early"}')
    _, cursor = await broker.read_completions(None, count=5)
    await broker.enqueue([_task(run, "late")])
    [claimed] = await _claim_all(broker, 1, 1)
    await broker.complete(claimed.task_id, run, "late", '{"node": "late"}')

    def read(cursor: Any, count: int) -> Any:
        return broker.read_completions(cursor, count=count)

    texts, _ = await _read_batches(read, cursor, 1, [5])
    assert texts == ['{"node": "late"}']


sizes = st.integers(min_value=1, max_value=12)


@settings(max_examples=25)  # each example is dozens of round trips to a server
@given(
    n=st.integers(min_value=1, max_value=40),
    enqueue_sizes=st.lists(sizes, min_size=1, max_size=8),
    claim_limit=sizes,
    read_counts=st.lists(sizes, min_size=1, max_size=8),
    duplicate=st.booleans(),
)
def _batches_keep_every_task_once(
    broker: Broker,
    n: int,
    enqueue_sizes: list[int],
    claim_limit: int,
    read_counts: list[int],
    duplicate: bool,
) -> None:
    anyio.from_thread.run(
        _one_example, broker, n, enqueue_sizes, claim_limit, read_counts, duplicate
    )


async def _one_example(
    broker: Broker,
    n: int,
    enqueue_sizes: list[int],
    claim_limit: int,
    read_counts: list[int],
    duplicate: bool,
) -> None:
    run = f"r{uuid.uuid4().hex[:10]}"
    tasks = [_task(run, f"n{i}") for i in range(n)]
    _, cursor = await broker.read_completions(None, count=1)
    start = 0
    i = 0
    while start < n:  # enqueue in batches of the drawn sizes (the last one repeated)
        size = enqueue_sizes[min(i, len(enqueue_sizes) - 1)]
        batch = tasks[start : start + size]
        if duplicate:  # a batch naming a node twice, or one queued already, adds it once
            batch = batch + batch[:1] + tasks[:1]
        await broker.enqueue(batch)
        start += size
        i += 1
    claimed = await _claim_all(broker, n, claim_limit)
    nodes = Counter(_codec.loads(c.payload)["node_id"] for c in claimed)
    assert nodes == Counter(f"n{i}" for i in range(n))  # each task handed out once
    for c in claimed:
        node = _codec.loads(c.payload)["node_id"]
        await broker.complete(c.task_id, run, node, _codec.dumps({"node": node}))

    def read(cursor: Any, count: int) -> Any:
        return broker.read_completions(cursor, count=count)

    texts, cursor = await _read_batches(read, cursor, n, read_counts)
    done = Counter(_codec.loads(t)["node"] for t in texts)
    assert done == nodes  # each completion read once
    assert (await broker.read_completions(cursor, count=max(read_counts)))[0] == []
    assert (await broker.claim("w", 10, 30.0)) == []  # nothing left, no duplicate queued


async def test_batched_enqueue_claim_and_read_keep_every_task_exactly_once(
    broker: Broker,
) -> None:
    await anyio.to_thread.run_sync(_batches_keep_every_task_once, broker)


# --- the messages a client sends and reads ---------------------------------------------------

json_data = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@given(
    args=st.lists(json_data, max_size=3),
    kwargs=st.dictionaries(st.text(), json_data, max_size=3),
    ids=st.tuples(st.text(min_size=1), st.text(min_size=1)),
    labels=st.lists(st.text(), max_size=3),
    max_deliveries=st.none() | st.integers(min_value=1, max_value=9),
    signed=st.booleans(),
)
def test_a_task_is_encoded_as_the_converter_would_and_decodes_back(
    args: list[Any],
    kwargs: dict[str, Any],
    ids: tuple[str, str],
    labels: list[str],
    max_deliveries: int | None,
    signed: bool,
) -> None:
    task = TaskMessage(
        run_id=ids[0],
        node_id=ids[1],
        flow="m:f",
        step="m:s",
        kind="step",
        labels=tuple(labels),
        args=tuple(args),
        kwargs=kwargs,
        marker="mk",
        observed=signed,
        trace={"traceparent": "00-x"},
        max_deliveries=max_deliveries,
    )
    seal = Seal(b"k" * 32) if signed else UNKEYED
    text = encode_task(task, seal)
    assert text == messages._sealed("task", task, seal)
    assert decode_task(text, seal) == attrs.evolve(task, check=decode_task(text, seal).check)


@given(value=json_data, signed=st.booleans(), tamper=st.sampled_from(["", "value", "check"]))
def test_a_completion_is_verified_on_its_text_and_refused_when_changed(
    value: Any, signed: bool, tamper: str
) -> None:
    record = NodeRecord("n", _codec.dumps(value), 1, 1.0, 2.0, "code")
    completion = Completion("r", "n", True, record)
    seal = Seal(b"k" * 32) if signed else UNKEYED
    text = encode_completion(completion, seal)
    if tamper == "value":
        text = text.replace('"attempts":1', '"attempts":2')
    elif tamper == "check":
        text = text[:-6] + ("0" if text[-6] != "0" else "1") + text[-5:]
    if tamper:
        with pytest.raises(
            CheckpointError,
            match=r"^node 'n': completion message refused: its content does not match",
        ):
            decode_completion(text, seal)
    else:
        assert attrs.evolve(decode_completion(text, seal), check="") == completion


_TASK_DATA = {
    "run_id": "r",
    "node_id": "n",
    "flow": "m:f",
    "step": "m:s",
    "kind": "step",
    "labels": ["a", "b"],
    "args": [1, [2, 3], {"a": None}],
    "kwargs": {"k": [1]},
    "marker": "mk",
    "observed": False,
    "trace": {"t": "x"},
    "v": 1,
    "max_deliveries": 3,
    "check": "sd:x",
}
_RECORD_DATA = {
    "node_id": "n",
    "value": "42",
    "attempts": 1,
    "started_at": 1.5,
    "finished_at": 2.5,
    "code": "c",
    "usage": {"tokens": 1, "by": {"x": [1, 2]}},
}
_COMPLETION_DATA = {
    "run_id": "r",
    "node_id": "n",
    "ok": True,
    "record": _RECORD_DATA,
    "error": None,
    "error_kind": None,
    "traceback": None,
    "v": 1,
    "check": "sd:x",
}
_ODD_VALUES = st.sampled_from(
    [None, True, False, 0, 1, 2**70, 1.0, "", "s", [], ["a"], [1], {}, {"a": 1}, {"a": "b"}]
)


@given(
    which=st.sampled_from(["task", "completion", "record"]),
    changes=st.lists(st.tuples(st.text(max_size=12), st.booleans(), _ODD_VALUES), max_size=3),
)
def test_messages_structured_by_hand_are_what_the_converter_makes(
    which: str, changes: list[tuple[str, bool, Any]]
) -> None:
    """The hand-written structuring of the hot messages takes only what the converter
    takes, and builds what it builds; what it leaves (None) goes to the converter."""
    base, cls, by_hand = {
        "task": (_TASK_DATA, TaskMessage, messages._task_of),
        "completion": (_COMPLETION_DATA, Completion, messages._completion_of),
        "record": (_RECORD_DATA, NodeRecord, messages._record_of),
    }[which]
    data = dict(base)
    for name, known, value in changes:
        key = sorted(base)[len(name) % len(base)] if known else name
        if value is None and known and len(name) % 2:
            data.pop(key, None)
        else:
            data[key] = value
    made = by_hand(data)
    if made is None:
        return
    assert repr(made) == repr(_codec.converter.structure(data, cls))
    assert type(made) is cls
