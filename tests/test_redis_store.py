"""The Redis store beyond the shared contract (tests/test_store_conformance.py runs that):
URLs and hidden passwords, failing fast, auth, trio, the lazy import, tampered keys, one
client per server, and real-time runs on it.  Against real redis-server processes.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import time
from typing import Any
from urllib.parse import quote

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

import flowdsl as fd
from flowdsl import _codec
from flowdsl._records import NodeRecord, RunRecord, RunStatus
from flowdsl.backends import MemoryStore, open_broker, open_store
from flowdsl.backends.redis.broker import RedisBroker
from flowdsl.backends.redis.link import RedisURL
from flowdsl.backends.redis.store import INLINE_MAX, RedisStore

from _servers import RedisServer, free_port
from redis_steps import expected_fan, fan

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> Any:
    """redis-py's client runs on asyncio only (trio is refused: see the trio tests)."""
    return ("asyncio", {"debug": True})


def run_record(run_id: str = "r1") -> RunRecord:
    return RunRecord(
        run_id, "fan", "redis_steps:fan", "fp", '{"key":"a"}', RunStatus.RUNNING, 10.0, 10.0
    )


def node_record(node_id: str, value: str = '"v"') -> NodeRecord:
    return NodeRecord(node_id, value, 1, 10.0, 11.0, "code", {"tokens": 3})


async def raw_client(server: RedisServer) -> Any:
    import redis.asyncio

    return redis.asyncio.Redis.from_url(server.url)


# --- URLs -------------------------------------------------------------------------------------

passwords = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=20
)


@given(user=st.sampled_from(["", "alice", "app-user"]), password=passwords)
def test_the_shown_url_hides_the_password(user: str, password: str) -> None:
    url = f"redis://{user}:{quote(password, safe='')}@db.example:6380/3?prefix=app"
    parsed = RedisURL.parse(url)
    assert parsed.shown == f"redis://{user}:***@db.example:6380/3?prefix=app"
    assert (parsed.host, parsed.port, parsed.db) == ("db.example", 6380, 3)
    assert parsed.options == {"prefix": "app"}
    assert "prefix" not in parsed.connect  # flowdsl's options are not redis-py's
    store = RedisStore(url)
    assert (store.url, store.prefix) == (parsed.shown, "app")
    assert repr(store) == f"<RedisStore {parsed.shown!r} prefix='app' closed>"


def test_defaults_and_options() -> None:
    store = open_store("redis://localhost")
    assert isinstance(store, RedisStore)
    assert (store.prefix, store.url) == ("flowdsl", "redis://localhost")
    broker = open_broker("rediss://localhost:7000/2?prefix=x&keep=500")
    assert isinstance(broker, RedisBroker)
    assert (broker.prefix, broker.keep) == ("x", 500)
    assert RedisStore("redis://h/0?prefix=a", prefix="b").prefix == "b"


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("redis://", r"^malformed Redis URL 'redis://': it needs a redis:// or rediss:// host\."),
        ("redis://h/zero", r"^malformed Redis URL 'redis://h/zero': the database 'zero' is not"),
        ("redis://h:99999/0", r"^malformed Redis URL 'redis://h:99999/0': Port out of range"),
        ("redis://h/0?prefix=", r"^the key prefix '' of redis://h/0\?prefix= must be non-empty"),
        ("redis://:pw@h/0?keep=5", r"^keep=5 for redis://:\*\*\*@h/0\?keep=5: streams must"),
        ("redis://h/0?a", r"^malformed Redis URL 'redis://h/0\?a': cannot read the options"),
    ],
)
def test_malformed_urls_are_config_errors(url: str, match: str) -> None:
    with pytest.raises(fd.ConfigError, match=match):
        RedisBroker(url) if "keep" in url else RedisStore(url)


def test_import_flowdsl_loads_no_redis_and_a_missing_client_says_what_to_install() -> None:
    script = """
import sys
import anyio
import flowdsl as fd
from flowdsl.backends import MemoryStore, open_store
from flowdsl.backends import open_broker
store = open_store("redis://127.0.0.1:1/0")
broker = open_broker("redis://127.0.0.1:1/0")
assert "redis" not in sys.modules, "constructing loaded redis"
sys.modules["redis"] = None  # as if the package were not installed
try:
    anyio.run(store.open)
except fd.ConfigError as exc:
    print(exc)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == (
        "the Redis backend needs the redis package, which is not installed. "
        "Install the Redis client: pip install 'flowdsl[redis]'"
    )


# --- connecting -------------------------------------------------------------------------------


async def test_an_unreachable_server_fails_fast_naming_the_url() -> None:
    url = f"redis://user:s3cret@127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    for backend in (RedisStore(url), RedisBroker(url)):
        with pytest.raises(fd.BackendUnavailable) as info:
            await backend.open()
        message = str(info.value)
        assert message.startswith(
            f"cannot reach the Redis server at redis://user:***@127.0.0.1:{url.split(':')[-1]}"
        )
        assert "s3cret" not in message
        assert "Check that redis-server runs there" in message
    assert time.monotonic() - started < 5


async def test_auth_right_password_works_wrong_one_fails_clearly(redis_server_factory: Any) -> None:
    server: RedisServer = redis_server_factory(requirepass="right horse")
    store = RedisStore(server.make_url(password="right horse"))
    await store.open()
    try:
        await store.create_run(run_record())
        assert (await store.get_run("r1")) == run_record()
    finally:
        await store.close()
    for password in ["wrong", None]:
        url = server.make_url(password=password)
        for backend in (RedisStore(url), RedisBroker(url)):
            with pytest.raises(fd.ConfigError) as info:
                await backend.open()
            message = str(info.value)
            shown = url.replace(":wrong@", ":***@")
            assert message.startswith(f"the Redis server at {shown} refused the credentials")
            assert "wrong" not in message.replace(shown, "")
            assert "Check the user name and password in the URL" in message
    # And through a context: fd.Context opens the store first.
    with pytest.raises(fd.ConfigError, match=r"refused the credentials"):
        async with fd.Context(store=server.make_url(password="nope")):
            pass


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_is_refused_with_a_clear_config_error(redis_server: RedisServer) -> None:
    with pytest.raises(fd.ConfigError, match=r"runs on asyncio only, and this is trio\. Run "):
        await RedisStore(redis_server.url).open()
    with pytest.raises(fd.ConfigError, match=r"runs on asyncio only, and this is trio"):
        await RedisBroker(redis_server.url).open()
    with pytest.raises(fd.ConfigError, match=r"runs on asyncio only"):
        async with fd.Context(store=redis_server.url):
            pass
    with pytest.raises(fd.ConfigError, match=r"runs on asyncio only"):
        async with fd.Context(batch=True, broker=redis_server.url, store=redis_server.url):
            pass


async def test_store_and_broker_share_one_client_per_server(redis_server: RedisServer) -> None:
    url = redis_server.url
    store = RedisStore(url)
    broker = RedisBroker(url + "?keep=1000")  # flowdsl's own options do not split the pool
    other_db = RedisStore(redis_server.make_url(db=1))
    for backend in (store, broker, other_db):
        await backend.open()
    try:
        assert store._link.client is broker._link.client
        assert other_db._link.client is not store._link.client
        assert broker.holds(store)
        assert not broker.holds(other_db)
        assert not broker.holds(RedisStore(url + "?prefix=elsewhere"))
        assert not broker.holds(MemoryStore())
    finally:
        await store.close()
        assert broker._link.client is not None
        await broker.close()
        await other_db.close()


async def test_an_option_redis_py_does_not_take_is_a_config_error(
    redis_server: RedisServer,
) -> None:
    store = RedisStore(redis_server.url + "?bogus=1&max_connections=4")
    with pytest.raises(
        fd.ConfigError, match=r"^malformed Redis URL '.*\?bogus=1&max_connections=4': an option "
    ):
        await store.open()
    tuned = RedisStore(redis_server.url + "?max_connections=4&prefix=tuned")
    await tuned.open()
    try:
        assert tuned._link.client.connection_pool.max_connections == 4
    finally:
        await tuned.close()


async def test_using_a_closed_store_says_to_open_it(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url)
    with pytest.raises(fd.ConfigError, match=r"^the store redis://.* is not open\. Use it inside"):
        await store.get_run("r1")


# --- what is stored, and tampering --------------------------------------------------------------


async def test_layout_under_the_prefix_and_large_values_stored_once(
    redis_server: RedisServer,
) -> None:
    store = RedisStore(redis_server.url, prefix="app")
    await store.open()
    client = await raw_client(redis_server)
    try:
        large = _codec.dumps("x" * (INLINE_MAX * 3))
        await store.create_run(run_record("r1"))
        await store.create_run(run_record("r2"))
        assert await store.commit_node("r1", node_record("a", large))
        assert await store.commit_node("r2", node_record("a", large))
        assert await store.commit_node("r1", node_record("b", '"small"'))
        keys = sorted(k.decode() for k in await client.keys("*"))
        blob = [k for k in keys if k.startswith("app:blob:")]
        assert len(blob) == 1  # one copy of the shared large value
        assert set(keys) == {
            "app:run:r1",
            "app:run:r2",
            "app:runs",
            "app:nodes:r1",
            "app:nodes:r2",
            "app:blobrefs",
            *blob,
        }
        # Forgetting drops the blob with its last use, and only then.
        await store.forget_nodes("r1", ["a"])
        assert await client.exists(*blob) == 1
        await store.forget_nodes("r2", ["a"])
        assert await client.exists(*blob) == 0
        assert set(await store.load_nodes("r1")) == {"b"}
    finally:
        await client.aclose()
        await store.close()


GARBAGE_NODES = [
    (b"not json", r"the stored the record is not valid JSON"),
    (b'{"value": "1"}', r"the record has the fields \['value'\]"),
    (b"\xff\xfe", r"the record is not UTF-8 text"),
    (
        b'{"value":"{oops","attempts":1,"started_at":1,"finished_at":2,"code":"","usage":null}',
        r"the stored value is not valid JSON",
    ),
    (
        b'{"blob":"' + b"0" * 64 + b'","attempts":1,"started_at":1,"finished_at":2,'
        b'"code":"","usage":null}',
        r"the value's blob 0000000000000000\.\.\. is missing",
    ),
]


@pytest.mark.parametrize(("garbage", "match"), GARBAGE_NODES)
async def test_a_tampered_node_is_a_checkpoint_error_naming_run_and_node(
    redis_server: RedisServer, garbage: bytes, match: str
) -> None:
    store = RedisStore(redis_server.url)
    await store.open()
    client = await raw_client(redis_server)
    try:
        await store.create_run(run_record())
        await store.commit_node("r1", node_record("good"))
        await client.hset("flowdsl:nodes:r1", "bad", garbage)
        with pytest.raises(fd.CheckpointError) as info:
            await store.load_nodes("r1")
        assert info.value.node == "bad"
        message = str(info.value)
        assert message.startswith(f"node 'bad': run 'r1' in {store.url} is corrupted: ")
        assert re.search(match, message), message
        assert "Delete the run's keys (flowdsl:run:r1, flowdsl:nodes:r1)" in message
    finally:
        await client.aclose()
        await store.close()


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("status", b"exploded", r"status 'exploded' is not a known run status"),
        ("created_at", b"yesterday", r"created_at is 'yesterday', not a timestamp"),
        ("inputs", b"{", r"the stored inputs is not valid JSON"),
        ("code", b"[1]", r"code is not a mapping of node ids to code hashes"),
        ("surprise", b"1", r"the run hash has unknown fields \['surprise'\]"),
    ],
)
async def test_a_tampered_run_is_a_checkpoint_error_naming_the_run(
    redis_server: RedisServer, field: str, value: bytes, match: str
) -> None:
    store = RedisStore(redis_server.url)
    await store.open()
    client = await raw_client(redis_server)
    try:
        await store.create_run(run_record())
        await client.hset("flowdsl:run:r1", field, value)
        with pytest.raises(fd.CheckpointError, match=rf"^run 'r1' in .* is corrupted: {match}"):
            await store.get_run("r1")
        with pytest.raises(fd.CheckpointError, match=match):
            await store.list_runs()
        # create_run reads the stored record back, so an idempotent start sees it too.
        with pytest.raises(fd.CheckpointError, match=match):
            await store.create_run(run_record())
    finally:
        await client.aclose()
        await store.close()


async def test_a_key_of_the_wrong_type_is_a_checkpoint_error(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url)
    await store.open()
    client = await raw_client(redis_server)
    try:
        await client.set("flowdsl:nodes:r1", "a string, not a hash")
        with pytest.raises(fd.CheckpointError, match=r"refused reading run 'r1': WRONGTYPE"):
            await store.load_nodes("r1")
        await client.hset("flowdsl:cache", "k", "nope")
        with pytest.raises(fd.CheckpointError, match=r"^cache entry 'k' in .* is corrupted"):
            await store.get_cached("k")
    finally:
        await client.aclose()
        await store.close()


# --- real-time mode on the Redis store ----------------------------------------------------------


async def test_real_time_runs_journal_to_redis_and_resume_from_it(
    redis_server: RedisServer,
) -> None:
    url = redis_server.url + "?prefix=rt"
    async with fd.Context(store=url) as ctx:
        assert await ctx.run(fan, "a", run_id="run-a") == expected_fan("a")
        assert isinstance(ctx.store, RedisStore)
    # A new context (a new process, as far as the store can tell) sees the journal.
    async with fd.Context(store=url) as ctx:
        record = await ctx.store.get_run("run-a")
        assert record is not None
        assert record.status is RunStatus.FINISHED
        nodes = await ctx.store.load_nodes("run-a")
        assert len(nodes) == 6  # seed, 4 parts, total: one record per node
        assert await ctx.resume("run-a") == expected_fan("a")
        assert [r.run_id for r in await ctx.store.list_runs()] == ["run-a"]


async def test_garbage_in_the_journal_fails_the_resumed_run_with_a_checkpoint_error(
    redis_server: RedisServer,
) -> None:
    url = redis_server.url
    async with fd.Context(store=url) as ctx:
        await ctx.run(fan, "a", run_id="r")
        await ctx.store.update_run("r", status=RunStatus.FAILED, error="pretend")
    client = await raw_client(redis_server)
    await client.hset("flowdsl:nodes:r", "seed", b"garbage")
    await client.aclose()
    async with fd.Context(store=url) as ctx:
        with pytest.raises(fd.CheckpointError, match=r"^node 'seed': run 'r' in .* is corrupted"):
            await ctx.resume("r", flow=fan)
        record = await ctx.store.get_run("r")
        assert record is not None
        assert (record.status, record.failed_node) == (RunStatus.FAILED, "seed")
        # Other runs go on.
        assert await ctx.run(fan, "b") == expected_fan("b")


class _Retrying(logging.Handler):
    """Sets an event when a Redis call starts retrying."""

    def __init__(self) -> None:
        super().__init__()
        self.event = anyio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying" in record.getMessage():
            self.event.set()


async def test_calls_ride_out_a_server_restart(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url)
    await store.open()
    handler = _Retrying()
    logging.getLogger("flowdsl.redis").addHandler(handler)
    try:
        await store.create_run(run_record())
        redis_server.kill()
        async with anyio.create_task_group() as tg:
            # The write waits (retrying) while the server is down, then lands.
            tg.start_soon(store.commit_node, "r1", node_record("n"))
            await handler.event.wait()
            await anyio.to_thread.run_sync(redis_server.restart)
        assert set(await store.load_nodes("r1")) == {"n"}
        assert await store.get_run("r1") == run_record()
    finally:
        logging.getLogger("flowdsl.redis").removeHandler(handler)
        await store.close()


async def test_a_server_away_too_long_is_backend_unavailable(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, retry_for=0.3)
    await store.open()
    try:
        redis_server.kill()
        with pytest.raises(
            fd.BackendUnavailable, match=r"has not answered for 0\.3 s \(reading run 'r1'\)"
        ):
            await store.get_run("r1")
    finally:
        await store.close()


_NUMBERS = st.one_of(st.floats(), st.integers(-10, 10**12))


@given(
    value=st.text(),
    attempts=st.integers(0, 100),
    started=_NUMBERS,
    finished=_NUMBERS,
    code=st.text(),
    usage=st.one_of(st.none(), st.dictionaries(st.text(), st.integers())),
    check=st.text(),
)
def test_a_record_is_written_as_the_encoder_writes_it(
    value: str,
    attempts: int,
    started: float,
    finished: float,
    code: str,
    usage: dict[str, int] | None,
    check: str,
) -> None:
    """Node records are written out by hand for speed: the same bytes as the encoder's
    (lone surrogates escaped, numbers as JSON writes them), blob or inline."""
    from flowdsl.backends.redis.keys import encode_node, to_bytes

    record = NodeRecord("n", value, attempts, started, finished, code, usage)
    field, digest, _ = encode_node(record, check)
    fields = {"blob": digest} if digest else {"value": value}
    fields |= {"attempts": attempts, "started_at": started, "finished_at": finished}
    fields |= {"code": code, "usage": usage, "check": check}
    assert field == to_bytes(_codec.dumps(fields))
