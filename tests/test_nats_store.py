"""The NATS store beyond the shared contract (tests/test_store_conformance.py runs that):
URLs and hidden credentials, key encoding, the lazy import, failing fast, auth (token,
user and password), TLS, trio, tampered keys, large values, races, one connection per
server.  Against real nats-server processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

import flowdsl as fd
from flowdsl import _codec
from flowdsl._records import NodeRecord, RunRecord, RunStatus
from flowdsl.backends import open_broker, open_store
from flowdsl.backends.nats.broker import NATSBroker
from flowdsl.backends.nats.keys import from_token, to_bytes, to_token
from flowdsl.backends.nats.store import NATSStore
from flowdsl.backends.nats.url import NatsURL

import nats_steps as ns
from _servers import HOST, NatsServer, ServerProcess, free_port, require_binary

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> Any:
    """nats-py runs on asyncio only (trio is refused: see the trio test)."""
    return ("asyncio", {"debug": True})


def run_record(run_id: str = "r1", created_at: float = 10.0) -> RunRecord:
    return RunRecord(
        run_id, "fan", "nats_steps:fan", "fp", '{"key":"a"}', RunStatus.RUNNING, created_at, 10.0
    )


def node_record(node_id: str, value: str = '"v"', attempts: int = 1) -> NodeRecord:
    return NodeRecord(node_id, value, attempts, 10.0, 11.0, "code", {"tokens": 3})


async def opened(url: str, **options: Any) -> NATSStore:
    store = NATSStore(url, **options)
    await store.open()
    return store


# --- URLs -------------------------------------------------------------------------------------

secrets = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=20
)


@given(token=secrets)
def test_a_token_is_read_and_never_shown(token: str) -> None:
    url = NatsURL.parse(f"nats://{quote(token, safe='')}@example.org:4333?prefix=x")
    assert (url.token, url.user, url.password) == (token, None, None)
    assert url.servers == ("nats://example.org:4333",)
    assert url.shown == "nats://***@example.org:4333?prefix=x"
    assert url.options.prefix == "x"
    assert "token=" not in repr(url)


@given(user=secrets, password=secrets)
def test_a_user_and_password_are_read_and_never_shown(user: str, password: str) -> None:
    url = NatsURL.parse(f"tls://{quote(user, safe='')}:{quote(password, safe='')}@h")
    assert (url.token, url.user, url.password) == (None, user, password)
    assert url.tls
    assert url.servers == ("tls://h:4222",)
    assert url.shown == "tls://***@h:4222"
    assert "password=" not in repr(url)


def test_a_cluster_is_several_servers_with_one_set_of_credentials() -> None:
    url = NatsURL.parse("nats://tok@a:1,b:2,nats://tok@[::1]:3/?replicas=3&storage=memory")
    assert url.servers == ("nats://a:1", "nats://b:2", "nats://[::1]:3")
    assert url.token == "tok"
    assert url.shown.startswith("nats://***@a:1,b:2,[::1]:3?")
    assert (url.options.replicas, url.options.storage) == (3, "memory")


def test_options_come_from_the_query_and_keywords_override_them() -> None:
    url = NatsURL.parse("nats://h?max_age=60&timeout=2.5&prefix=a", prefix="b", inline_max=100)
    o = url.options
    assert (o.max_age, o.timeout, o.prefix, o.inline_max) == (60.0, 2.5, "b", 100)
    assert NatsURL.parse("nats://h").options.prefix == "flowdsl"


BAD_URLS = {
    "no scheme": ("127.0.0.1:4222", "must start with nats:// or tls://"),
    "another scheme": ("redis://h", "unknown scheme 'redis'"),
    "a path": ("nats://h:4222/db", "no path"),
    "a bad port": ("nats://h:99999", "host:port"),
    "two credentials": ("nats://a@h1,b@h2", "different credentials"),
    "an unknown option": ("nats://h?colour=blue", "unknown option 'colour'"),
    "a bad number": ("nats://h?replicas=0", "replicas='0'"),
    "a bad storage": ("nats://h?storage=tape", "'file' or 'memory'"),
    "a bad prefix": ("nats://h?prefix=a.b", "letters, digits"),
    "a cert without its key": ("tls://h?tls_cert=c.pem", "tls_cert needs tls_key"),
}


@pytest.mark.parametrize(("url", "why"), BAD_URLS.values(), ids=BAD_URLS.keys())
def test_a_bad_url_is_a_config_error_that_says_why(url: str, why: str) -> None:
    with pytest.raises(fd.ConfigError, match=re.escape(why)):
        NatsURL.parse(url)
    if url.startswith(("nats:", "tls:")):  # what open_store and open_broker send here
        with pytest.raises(fd.ConfigError, match=re.escape(why)):
            open_store(url)
        with pytest.raises(fd.ConfigError, match=re.escape(why)):
            open_broker(url)


def test_a_malformed_url_hides_what_may_be_a_credential() -> None:
    with pytest.raises(fd.ConfigError) as info:
        NatsURL.parse("nats://s3cret@h?colour=blue")
    assert "s3cret" not in str(info.value)


# --- keys -------------------------------------------------------------------------------------

NATS_KEY = re.compile(r"^[-/_=.a-zA-Z0-9]+$")


@given(text=st.text())
def test_ids_become_valid_key_tokens_and_come_back(text: str) -> None:
    token = to_token(text)
    assert NATS_KEY.match(token)
    assert "." not in token
    assert from_token(token) == text


@given(text=st.text(st.characters(codec="utf-8")))
def test_lone_surrogates_in_ids_survive(text: str) -> None:
    weird = text + "\udc80"
    assert from_token(to_token(weird)) == weird


# --- the client library -----------------------------------------------------------------------


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


def test_importing_flowdsl_does_not_import_nats() -> None:
    done = run_python(
        "import sys, flowdsl, flowdsl.backends, flowdsl.backends, flowdsl._executors.batch\n"
        "assert not any(m == 'nats' or m.startswith('nats.') for m in sys.modules)\n"
        "print('clean')"
    )
    assert done.stdout.strip() == "clean", done.stderr


def test_a_missing_client_names_the_extra_to_install() -> None:
    done = run_python(
        "import sys\n"
        "sys.modules['nats'] = None  # as if nats-py were not installed\n"
        "import flowdsl as fd\n"
        "for make in (lambda: fd.Context(store='nats://h'),\n"
        "             lambda: fd.Context(batch=True, broker='nats://h', store='nats://h')):\n"
        "    try:\n"
        "        make()\n"
        "    except fd.ConfigError as exc:\n"
        "        print(exc)\n"
    )
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2, done.stderr
    for line in lines:
        assert "pip install 'flowdsl[nats]'" in line


# --- failing fast -----------------------------------------------------------------------------


async def test_an_unreachable_server_fails_fast_naming_the_url() -> None:
    port = free_port()  # nothing listens there
    store = NATSStore(f"nats://s3cret@127.0.0.1:{port},127.0.0.1:{free_port()}")
    start = time.monotonic()
    with pytest.raises(fd.BackendUnavailable, match=r"^cannot reach the NATS server at") as info:
        await store.open()
    assert time.monotonic() - start < 5
    assert f"nats://***@127.0.0.1:{port}" in str(info.value)
    assert "s3cret" not in str(info.value)
    assert "nats-server -js" in str(info.value)


async def test_a_server_without_jetstream_is_a_config_error(tmp_path: Path) -> None:
    server = PlainNats(require_binary("nats-server"), tmp_path)
    server.start()
    try:
        with pytest.raises(fd.ConfigError, match="JetStream is not enabled"):
            await NATSStore(server.url).open()
    finally:
        server.stop()


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_the_store_under_trio_is_refused_clearly(nats_server: NatsServer) -> None:
    store = NATSStore(nats_server.url)
    with pytest.raises(fd.ConfigError, match=r"asyncio only.*this is trio"):
        await store.open()


# --- auth and TLS -----------------------------------------------------------------------------


async def test_the_right_token_works_and_a_wrong_one_fails_clearly(
    nats_server_factory: Any,
) -> None:
    server: NatsServer = nats_server_factory(token="s3cret-token")
    store = await opened(server.url)
    try:
        assert await store.create_run(run_record()) == (run_record(), True)
    finally:
        await store.close()
    for wrong in (server.make_url(token="not-it"), server.make_url(token=None)):
        with pytest.raises(fd.ConfigError) as info:
            await NATSStore(wrong).open()
        message = str(info.value)
        assert "refused the credentials" in message
        assert "s3cret-token" not in message
        assert "not-it" not in message


async def test_user_and_password(tmp_path: Path) -> None:
    server = UserNats(require_binary("nats-server"), tmp_path, user="ann", password="p@ss:w")
    server.start()
    try:
        good = f"nats://ann:{quote('p@ss:w', safe='')}@{HOST}:{server.port}"
        async with fd.Context(store=good) as ctx:
            assert await ctx.run(ns.fan, "u") == ns.expected_fan("u")
        with pytest.raises(fd.ConfigError, match="refused the credentials") as info:
            await NATSStore(f"nats://ann:nope@{HOST}:{server.port}").open()
        assert "nope" not in str(info.value)
    finally:
        server.stop()


async def test_tls(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    command = [
        "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-days", "1", "-subj", "/CN=flowdsl test", "-addext",
        f"subjectAltName=IP:{HOST}", "-keyout", str(key), "-out", str(cert),
    ]  # fmt: skip
    try:
        await anyio.run_process(command)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"openssl cannot make a certificate here: {exc}")
    server = TlsNats(require_binary("nats-server"), tmp_path / "server", cert=cert, key=key)
    server.start()
    try:
        url = f"tls://{HOST}:{server.port}?tls_ca={cert}"
        async with fd.Context(batch=True, broker=url, store=url, workers=1) as ctx:
            assert await ctx.run(ns.fan, "t") == ns.expected_fan("t")
        # Without the CA the server's certificate is not trusted.
        with pytest.raises(fd.ConfigError, match="cannot connect") as info:
            await NATSStore(f"tls://{HOST}:{server.port}?connect_timeout=0.5").open()
        assert "TLS" in str(info.value)
    finally:
        server.stop()


# --- what is read back is checked -------------------------------------------------------------


async def test_a_forgotten_node_is_committed_again_in_a_batch(nats_server: NatsServer) -> None:
    """A deleted key keeps a marker as its last value: a batch's create must take it (the
    node of a resumed run, forgotten for its changed code, run again by a worker)."""
    store = await opened(nats_server.url)
    try:
        assert await store.commit_nodes([("r", node_record("a")), ("r", node_record("b"))]) == [
            True,
            True,
        ]
        await store.forget_nodes("r", ["a"])
        again = [("r", node_record("a", '"w"')), ("r", node_record("b", '"w"'))]
        assert await store.commit_nodes(again) == [True, False]
        assert (await store.load_nodes("r"))["a"].value == '"w"'
    finally:
        await store.close()


async def test_garbage_at_a_runs_key_is_a_checkpoint_error_naming_the_run(
    nats_server: NatsServer,
) -> None:
    store = await opened(nats_server.url)
    try:
        kv = store._bucket.kv
        for garbage in (b"\xff\xfe", b"[1, 2]", json.dumps({"v": 1, "run_id": "r"}).encode()):
            await kv.put(f"run.{to_token('r')}", garbage)
            with pytest.raises(fd.CheckpointError, match=r"run 'r' in nats://.*corrupted"):
                await store.get_run("r")
        await kv.put(f"run.{to_token('other')}", await store._encode_run(run_record("r")))
        with pytest.raises(fd.CheckpointError, match="the record is of run 'r'"):
            await store.get_run("other")
        with pytest.raises(fd.CheckpointError):
            await store.list_runs()
    finally:
        await store.close()


async def test_a_large_value_that_lost_a_chunk_or_was_altered_is_a_checkpoint_error(
    nats_server: NatsServer,
) -> None:
    store = await opened(nats_server.url, inline_max=1000)
    try:
        big = _codec.dumps("x" * 600_000)  # three chunks
        assert await store.commit_node("r", node_record("n", big))
        assert (await store.load_nodes("r"))["n"].value == big
        kv = store._bucket.kv
        # Named by the value's hash (not listed: nats-py's key listing can end before the
        # keys just written are in, and then says there are none).
        head = f"blob.{hashlib.sha256(to_bytes(big)).hexdigest()}"
        assert await kv.get(head)
        await kv.put(f"{head}.1", b"y" * 10)
        with pytest.raises(fd.CheckpointError, match=r"node 'n'.*does not match its hash"):
            await store.load_nodes("r")
        await kv.delete(f"{head}.1")
        with pytest.raises(fd.CheckpointError, match=r"node 'n'.*lost a chunk"):
            await store.load_nodes("r")
    finally:
        await store.close()


# --- large values, races, connections ---------------------------------------------------------


async def test_values_past_the_servers_max_payload_are_chunked_and_stored_once(
    nats_server: NatsServer,
) -> None:
    store = await opened(nats_server.url)
    try:
        huge = _codec.dumps(["é" * 1_500_000])  # 3 MB of UTF-8
        await store.create_run(attrs.evolve(run_record(), inputs=huge))
        for node_id in ("a", "b"):
            assert await store.commit_node("r1", node_record(node_id, huge))
        await store.put_cached("k", huge)
        nodes = await store.load_nodes("r1")
        assert nodes["a"].value == nodes["b"].value == huge
        assert await store.get_cached("k") == huge
        run = await store.get_run("r1")
        assert run is not None
        assert run.inputs == huge
        # Counted by the server (nats-py's key listing can end before the keys just
        # written are in).
        bucket = store.bucket
        info = await store.link.js.stream_info(
            f"KV_{bucket}", subjects_filter=f"$KV.{bucket}.blob.*"
        )
        heads = list(info.state.subjects or {})
        assert heads == [f"$KV.{bucket}.blob.{hashlib.sha256(to_bytes(huge)).hexdigest()}"]
    finally:
        await store.close()


async def test_two_workers_committing_one_node_commit_it_once(nats_server: NatsServer) -> None:
    # Separate connections (connect_timeout is part of what a connection is shared by).
    stores = [await opened(nats_server.url, connect_timeout=t) for t in (2, 3, 4, 5)]
    try:
        for round_ in range(5):
            results: list[bool] = []

            async def commit(
                store: NATSStore, i: int, round_: int = round_, results: list[bool] = results
            ) -> None:
                record = node_record("n", _codec.dumps(i), attempts=i)
                results.append(await store.commit_node(f"run{round_}", record))

            async with anyio.create_task_group() as tg:
                for i, store in enumerate(stores):
                    tg.start_soon(commit, store, i)
            assert sorted(results) == [False, False, False, True]
            stored = (await stores[0].load_nodes(f"run{round_}"))["n"]
            assert stored.attempts == int(_codec.loads(stored.value))
    finally:
        for store in stores:
            await store.close()


async def test_concurrent_status_updates_are_never_lost_or_mixed(nats_server: NatsServer) -> None:
    stores = [await opened(nats_server.url, connect_timeout=t) for t in (2, 3, 4)]
    try:
        await stores[0].create_run(run_record())

        async def update(store: NATSStore, i: int) -> None:
            for j in range(5):
                await store.update_run(
                    "r1", status=RunStatus.FAILED, error=f"e{i}.{j}", failed_node=f"n{i}.{j}"
                )

        async with anyio.create_task_group() as tg:
            for i, store in enumerate(stores):
                tg.start_soon(update, store, i)
        run = await stores[1].get_run("r1")
        assert run is not None
        # Each update wrote error and failed_node together: never one writer's error with
        # another's node.
        assert run.error is not None
        assert run.failed_node == "n" + run.error[1:]
    finally:
        for store in stores:
            await store.close()


async def test_a_driver_updates_its_run_without_reading_it_unless_another_wrote_since(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = [await opened(nats_server.url, connect_timeout=t) for t in (2, 3)]
    reads: list[str] = []
    read = a._bucket.get

    async def get(key: str, *args: Any, **kwargs: Any) -> Any:
        reads.append(key)
        return await read(key, *args, **kwargs)

    monkeypatch.setattr(a._bucket, "get", get)
    try:
        await a.create_run(run_record())
        await a.update_run("r1", status=RunStatus.RUNNING, fingerprint="fa")
        assert reads == []  # against the revision it wrote
        # Another process writes in between: the compare-and-set refuses the stale
        # revision, and the update is made again on what that process wrote.
        await b.update_run("r1", status=RunStatus.RUNNING, code={"m": "c"})
        await a.update_run("r1", status=RunStatus.FINISHED, result='"ok"')
        assert len(reads) == 1
        run = await b.get_run("r1")
        assert run is not None
        assert (run.status, run.fingerprint, run.code, run.result) == (
            RunStatus.FINISHED,
            "fa",
            {"m": "c"},
            '"ok"',
        )
    finally:
        await a.close()
        await b.close()


async def test_a_journal_read_during_other_writes_sees_every_committed_node(
    nats_server: NatsServer,
) -> None:
    """nats-py's KV watcher may say "all initial values are in" before they are when the
    bucket is written meanwhile (nats-py #842): a journal read short of a record would
    run a finished step again.  Every read here must see all 200 committed nodes (and
    none of the deleted ones), while another connection keeps writing."""
    reader, writer = [await opened(nats_server.url, connect_timeout=t) for t in (2, 3)]
    committed = [node_record(f"n{i}", _codec.dumps(i)) for i in range(200)]
    await reader.commit_nodes([("journal", r) for r in committed])
    await reader.forget_nodes("journal", ["n0", "n7", "n199"])
    live = {r.node_id for r in committed} - {"n0", "n7", "n199"}
    stop = anyio.Event()

    async def keep_writing() -> None:
        i = 0
        while not stop.is_set():
            batch = [("noise", node_record(f"m{i}-{j}")) for j in range(5)]
            await writer.commit_nodes(batch)
            i += 1

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(keep_writing)
            for _ in range(3):
                assert set(await reader.load_nodes("journal")) == live
            stop.set()
    finally:
        await reader.close()
        await writer.close()


async def test_a_store_and_a_broker_on_one_server_share_a_connection(
    nats_server: NatsServer,
) -> None:
    store = await opened(nats_server.url)
    broker = NATSBroker(nats_server.url)
    await broker.open()
    try:
        assert broker.link.nc is store.link.nc
        await broker.close()
        assert await store.create_run(run_record()) == (run_record(), True)
    finally:
        await broker.close()
        await store.close()
    assert store.link.is_open is False


async def test_real_time_runs_on_the_nats_store(nats_server: NatsServer) -> None:
    async with fd.Context(store=nats_server.url) as ctx:
        assert await ctx.run(ns.fan, "rt", run_id="rt") == ns.expected_fan("rt")
        assert len(await ctx.store.load_nodes("rt")) == ns.FAN + 2
        [listed] = await ctx.store.list_runs()
        assert (listed.run_id, listed.status) == ("rt", RunStatus.FINISHED)


# --- servers the fixtures do not start --------------------------------------------------------


@attrs.define(eq=False)
class PlainNats(ServerProcess):
    """nats-server without JetStream."""

    name = "nats-server"

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    def command(self) -> list[str]:
        return [self.binary, "-a", HOST, "-p", str(self.port)]

    def probe(self) -> bool:
        return _probe(self.port, {})


@attrs.define(eq=False)
class UserNats(PlainNats):
    """nats-server with JetStream and a user name and password."""

    user: str = ""
    password: str = ""

    def command(self) -> list[str]:
        return [
            *super().command(),
            "-js", "-sd", str(self.directory / "js"),
            "--user", self.user, "--pass", self.password,
        ]  # fmt: skip

    def probe(self) -> bool:
        return _probe(self.port, {"user": self.user, "pass": self.password})


@attrs.define(eq=False)
class TlsNats(PlainNats):
    """nats-server with JetStream, reachable over TLS only."""

    cert: Path = Path()
    key: Path = Path()

    def command(self) -> list[str]:
        return [
            *super().command(),
            "-js", "-sd", str(self.directory / "js"),
            "--tls", "--tlscert", str(self.cert), "--tlskey", str(self.key),
        ]  # fmt: skip

    def probe(self) -> bool:
        context = ssl.create_default_context(cafile=str(self.cert))
        return _probe(self.port, {}, tls=context)


def _probe(port: int, auth: dict[str, str], tls: ssl.SSLContext | None = None) -> bool:
    """The server answers a PING (the fixtures' probe speaks token auth and no TLS)."""
    connect = {"verbose": False, "pedantic": False, **auth}
    hello = b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n"
    try:
        with contextlib.ExitStack() as stack:
            sock: Any = stack.enter_context(socket.create_connection((HOST, port), timeout=1))
            info = stack.enter_context(sock.makefile("rb")).readline()
            if not info.startswith(b"INFO "):
                return False
            if tls is not None:
                sock = stack.enter_context(tls.wrap_socket(sock, server_hostname=HOST))
            sock.sendall(hello)
            return bool(stack.enter_context(sock.makefile("rb")).readline().startswith(b"PONG"))
    except (OSError, ssl.SSLError):
        return False
