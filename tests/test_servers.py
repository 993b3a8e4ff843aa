"""The server fixtures start real servers, survive crashes where they should, and clean up."""

from __future__ import annotations

import socket
from typing import Any

import nats
import pytest
import redis
from nats.aio.client import Client as NatsClient
from nats.errors import Error as NatsError

from _servers import NatsServer, RedisServer, ServerProcess, require_binary

# redis-py's and nats-py's asyncio clients run on asyncio only.
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def anyio_backend() -> Any:
    return ("asyncio", {"debug": True})


def _refuses_connections(server: ServerProcess) -> bool:
    try:
        with socket.create_connection((server.host, server.port), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True


# --- redis ----------------------------------------------------------------------------------


def test_redis_answers_ping_set_and_get(redis_server: RedisServer) -> None:
    with redis.Redis.from_url(redis_server.url) as client:
        assert client.ping() is True
        assert client.set("greeting", "hello") is True
        assert client.get("greeting") == b"hello"
        assert client.config_get("appendfsync") == {"appendfsync": "always"}


@pytest.mark.anyio
async def test_redis_serves_the_asyncio_client(redis_server: RedisServer) -> None:
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        await client.xadd("tasks", {"node": "classify"})
        entries = await client.xrange("tasks")
    finally:
        await client.aclose()
    assert [fields for _, fields in entries] == [{b"node": b"classify"}]


def test_redis_keeps_acknowledged_writes_across_a_sigkill(redis_server: RedisServer) -> None:
    with redis.Redis.from_url(redis_server.url) as client:
        client.set("journal", "node-1")
        client.rpush("queue", "a", "b")
    pid = redis_server.process.pid if redis_server.process else None

    redis_server.kill()
    assert not redis_server.running
    assert _refuses_connections(redis_server)

    redis_server.restart()
    assert redis_server.process is not None
    assert redis_server.process.pid != pid
    with redis.Redis.from_url(redis_server.url) as client:
        assert client.get("journal") == b"node-1"
        assert client.lrange("queue", 0, -1) == [b"a", b"b"]


def test_redis_requirepass_accepts_the_password_and_refuses_others(
    redis_server_factory: Any,
) -> None:
    server = redis_server_factory(requirepass="s3cret")
    with redis.Redis.from_url(server.url) as client:
        assert client.ping() is True
    with (
        redis.Redis.from_url(server.make_url(password="wrong")) as client,
        pytest.raises(redis.AuthenticationError),
    ):
        client.ping()
    with (
        redis.Redis.from_url(server.make_url()) as client,
        # The message depends on the protocol redis-py speaks (RESP2 or RESP3): check the type.
        pytest.raises(redis.AuthenticationError),
    ):
        client.ping()


def test_two_redis_servers_get_distinct_ports_and_dirs(redis_server_factory: Any) -> None:
    first, second = redis_server_factory(), redis_server_factory()
    assert first.port != second.port
    assert first.directory != second.directory


def test_stop_ends_the_process_and_frees_the_port(redis_server: RedisServer) -> None:
    redis_server.stop()
    assert redis_server.process is not None
    assert redis_server.process.returncode is not None
    assert _refuses_connections(redis_server)
    redis_server.stop()  # idempotent: teardown calls it again


# --- nats -----------------------------------------------------------------------------------


async def _connect(url: str) -> Any:
    return await nats.connect(
        url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2
    )


@pytest.mark.anyio
async def test_nats_jetstream_publish_and_consume_round_trip(nats_server: NatsServer) -> None:
    nc = await _connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="TASKS", subjects=["tasks.>"])
        ack = await js.publish("tasks.run", b"classify")
        assert (ack.stream, ack.seq) == ("TASKS", 1)
        sub = await js.pull_subscribe("tasks.run", durable="workers")
        [msg] = await sub.fetch(1, timeout=5)
        assert msg.data == b"classify"
        await msg.ack()
    finally:
        await nc.close()


@pytest.mark.anyio
async def test_nats_file_storage_survives_a_sigkill(nats_server: NatsServer) -> None:
    nc = await _connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="JOURNAL", subjects=["journal"])
        await js.publish("journal", b"node-1")
    finally:
        await nc.close()

    nats_server.kill()
    assert _refuses_connections(nats_server)
    nats_server.restart()

    nc = await _connect(nats_server.url)
    try:
        msg = await nc.jetstream().get_msg("JOURNAL", 1)
        assert msg.data == b"node-1"
    finally:
        await nc.close()


@pytest.mark.anyio
async def test_nats_token_accepts_the_token_and_refuses_others(nats_server_factory: Any) -> None:
    server = nats_server_factory(token="t0ken")
    nc = await _connect(server.url)
    try:
        info = await nc.jetstream().account_info()
        assert info.streams == 0
    finally:
        await nc.close()
    # nats.connect() leaks its socket when the server refuses it; our own client we can close.
    refused = NatsClient()

    async def quiet(exc: Exception) -> None:
        pass  # the default callback logs a traceback for an outcome this test expects

    try:
        with pytest.raises(NatsError, match=r"Authorization Violation"):
            await refused.connect(
                server.make_url(token="wrong"),
                allow_reconnect=False,
                max_reconnect_attempts=0,
                connect_timeout=2,
                error_cb=quiet,
            )
    finally:
        await refused.close()


# --- missing binaries -------------------------------------------------------------------------


def test_a_missing_binary_skips_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"^no-such-server is not installed"):
        require_binary("no-such-server")


def test_a_missing_binary_fails_on_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"CI must run every backend's tests$"):
        require_binary("no-such-server")
