"""A finisher batch's completions and events in few log messages (backends/nats/frames):
framing, what a reader refuses, and cursors that stop inside a batch message."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from flowdsl.backends.messages import Finished
from flowdsl.backends.nats import frames
from flowdsl.backends.nats.broker import NATSBroker
from flowdsl.backends.nats.keys import Malformed, to_token

import _nats_fixtures as nf
from _servers import NatsServer


def test_entries_go_framed_in_order_and_come_back_the_same() -> None:
    entries = [
        ("ev", to_token("r1"), b"e 1\n"),
        ("done", to_token("r1"), b'{"a": 1}'),
        ("done", to_token("r\u00e9 2"), b"\xff\x00"),
    ]
    out = frames.messages("p", entries, 10_000)
    assert [subject for subject, _ in out] == ["p.log.batch"]
    assert frames.split(out[0][1]) == entries


def test_one_entry_or_one_too_large_goes_alone_on_its_run_subject() -> None:
    big = b"x" * 500
    entries = [("done", "YQ", b"1"), ("ev", "Yg", big), ("done", "Yg", b"2"), ("done", "Yw", b"3")]
    out = frames.messages("p", entries, 100)
    assert out[0] == ("p.log.done.YQ", b"1")
    assert out[1] == ("p.log.ev.Yg", big)
    assert out[2][0] == "p.log.batch"
    assert frames.split(out[2][1]) == entries[2:]
    assert frames.messages("p", entries[:1], 100) == [("p.log.done.YQ", b"1")]


def test_a_batch_holds_at_most_max_entries() -> None:
    entries = [("done", "YQ", b"1")] * (frames.MAX_ENTRIES + 2)
    out = frames.messages("p", entries, 10**9)
    assert [len(frames.split(body)) for _, body in out] == [frames.MAX_ENTRIES, 2]


@pytest.mark.parametrize(
    "body",
    [
        b"done YQ 5\n{}",  # longer than its message
        b"done YQ\n{}",  # no length
        b"what YQ 2\n{}",  # no such kind
        b"done YQ -2\n{}",
        b"done YQ 2" + b" " * 300,  # no head's end
        b"done \xff 2\n{}",
    ],
)
def test_a_batch_flowdsl_cannot_have_written_is_refused(body: bytes) -> None:
    with pytest.raises(Malformed):
        frames.split(body)


@pytest.fixture
def anyio_backend() -> Any:
    return ("asyncio", {"debug": True})


url, broker = nf.url, nf.broker  # a fresh prefix a test, a broker on it


async def read(broker: NATSBroker, cursor: Any, want: int) -> tuple[list[str], Any]:
    """Completions after *cursor*, at most two at a time, until *want* came."""
    texts: list[str] = []
    with anyio.fail_after(10):
        while len(texts) < want:
            got, cursor = await broker.read_completions(cursor, count=min(2, want - len(texts)))
            assert len(got) <= 2
            texts += got
            if not got:
                await anyio.sleep(0.02)
    return texts, cursor


@pytest.mark.anyio
async def test_a_reader_takes_a_batch_a_few_at_a_time_and_drops_a_forged_one(
    url: str, broker: NATSBroker, nats_server: NatsServer
) -> None:
    import nats

    _, start = await broker.completions(None)
    _, seen = await broker.events(None)
    items = [
        Finished(f"t{i}", f"run{i % 2}", f"n{i}", f'"done {i}"', ((f"run{i % 2}", f'"ev {i}"'),))
        for i in range(5)
    ]
    await broker.complete_many(items[:3])
    nc = await nats.connect(nats_server.url)
    try:  # forged: the reader drops it and reads on
        await nc.publish(f"{broker._prefix}.log.batch", b"done YQ 99\n{}")
        await nc.flush()
    finally:
        await nc.close()
    await broker.complete_many(items[3:])
    texts, done = await read(broker, start, 5)
    assert texts == [f'"done {i}"' for i in range(5)]
    assert await broker.read_completions(done, count=2) == ([], done)
    events, _ = await broker.read_events(seen, count=10)
    assert events == [(f"run{i % 2}", f'"ev {i}"') for i in range(5)]
    # A cursor inside a batch message, given to another reader, resumes right after it.
    one, two = NATSBroker(url), NATSBroker(url)
    await one.open()
    await two.open()
    try:
        first, inside = await read(one, start, 1)
        rest, _ = await read(two, inside, 4)
    finally:
        await one.close()
        await two.close()
    assert first + rest == texts


@pytest.mark.anyio
async def test_a_reader_whose_consumer_the_server_refuses_says_so_each_time(
    nats_server: NatsServer,
) -> None:
    """The log stream allows one consumer, taken already (a real limit of the server's):
    every read says why it cannot read, none returns nothing as if all were read."""
    import uuid

    import nats
    from nats.js.api import ConsumerConfig, StreamConfig

    import flowdsl as fd
    from flowdsl.backends.nats.streams import stream_name

    prefix = f"p{uuid.uuid4().hex[:8]}"
    nc = await nats.connect(nats_server.url)
    broker = NATSBroker(nats_server.url, prefix=prefix)
    try:
        js = nc.jetstream()
        log = stream_name(prefix, "log")
        await js.add_stream(StreamConfig(name=log, subjects=[f"{prefix}.log.>"], max_consumers=1))
        await js.add_consumer(log, ConsumerConfig(durable_name="taken"))
        await broker.open()
        _, cursor = await broker.completions(None)
        for _ in range(2):
            with pytest.raises(fd.CheckpointError, match="maximum consumers limit reached"):
                await broker.read_completions(cursor, count=10)
    finally:
        await broker.close()
        await nc.close()
