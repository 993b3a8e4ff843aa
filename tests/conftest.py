"""Fixtures shared by the whole suite.

- ``anyio_backend``: every ``@pytest.mark.anyio`` test runs on asyncio (debug mode on) and on
  trio, as anyio's own suite does.  A module whose code path needs one loop (an asyncio-only
  client library) overrides this fixture.
- Hypothesis profiles: ``dev`` by default, ``ci`` when ``CI=true``; ``HYPOTHESIS_PROFILE``
  picks one by name.
- ``sqlite_url``: a fresh SQLite store URL in the test's ``tmp_path``.
- ``redis_server`` / ``nats_server`` and their ``*_factory`` forms: real server processes
  (see ``_servers.py``); tests that use them are marked ``redis`` / ``nats`` automatically,
  so ``-m "not redis and not nats"`` runs everything else.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from _servers import NatsServer, RedisServer, ServerProcess, is_ci, require_binary

# --- event loops ----------------------------------------------------------------------------


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {"debug": True}), id="asyncio"),
        pytest.param("trio", id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


# --- hypothesis -----------------------------------------------------------------------------

# Fixtures such as anyio_backend and tmp_path are function-scoped: they are shared by the
# examples of one @given test on purpose (a backend, a directory), so the check is noise.
_SUPPRESSED = [HealthCheck.function_scoped_fixture]

settings.register_profile(
    "dev",
    deadline=None,  # timings on a shared 2-core machine are not a property of the code
    max_examples=50,
    suppress_health_check=_SUPPRESSED,
)
settings.register_profile(
    "ci",
    parent=settings.get_profile("dev"),
    # Three times dev's search.  It costs CI little: the suite runs on both cores, and its
    # slowest properties (a real server behind each example) set their own counts.
    max_examples=150,
    print_blob=True,  # a CI failure prints the @reproduce_failure line to replay it
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if is_ci() else "dev"))


# --- stores ---------------------------------------------------------------------------------


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """``sqlite:////abs/path/runs.db``: a store file no other test shares."""
    return f"sqlite:///{tmp_path / 'runs.db'}"


# --- real servers ---------------------------------------------------------------------------

RedisFactory = Callable[..., RedisServer]
NatsFactory = Callable[..., NatsServer]


@pytest.fixture
def _server_reaper() -> Iterator[list[ServerProcess]]:
    """Stops every server a test started, whether the test passed, failed or timed out."""
    servers: list[ServerProcess] = []
    yield servers
    errors: list[BaseException] = []
    for server in reversed(servers):
        try:
            server.stop()
        except BaseException as exc:  # stop the others before reporting
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture
def redis_server_factory(
    tmp_path_factory: pytest.TempPathFactory, _server_reaper: list[ServerProcess]
) -> RedisFactory:
    """``factory(requirepass=None)``: start one more redis-server; stopped at teardown."""
    binary = require_binary("redis-server")

    def start(*, requirepass: str | None = None) -> RedisServer:
        server = RedisServer(binary, tmp_path_factory.mktemp("redis"), password=requirepass)
        _server_reaper.append(server)
        server.start()
        return server

    return start


@pytest.fixture
def redis_server(redis_server_factory: RedisFactory) -> RedisServer:
    """A running redis-server (AOF on, fsync always): ``.url``, ``.kill()``, ``.restart()``."""
    return redis_server_factory()


@pytest.fixture
def nats_server_factory(
    tmp_path_factory: pytest.TempPathFactory, _server_reaper: list[ServerProcess]
) -> NatsFactory:
    """``factory(token=None)``: start one more nats-server with JetStream; stopped at teardown."""
    binary = require_binary("nats-server")

    def start(*, token: str | None = None) -> NatsServer:
        server = NatsServer(binary, tmp_path_factory.mktemp("nats"), token=token)
        _server_reaper.append(server)
        server.start()
        return server

    return start


@pytest.fixture
def nats_server(nats_server_factory: NatsFactory) -> NatsServer:
    """A running nats-server with JetStream on file storage: ``.url``, ``.kill()``, ..."""
    return nats_server_factory()


_SERVER_MARKS = {
    "redis_server": "redis",
    "redis_server_factory": "redis",
    "nats_server": "nats",
    "nats_server_factory": "nats",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names = getattr(item, "fixturenames", ())
        marks = {_SERVER_MARKS[n] for n in names if n in _SERVER_MARKS}
        # A test that takes its server by name (request.getfixturevalue) from a parameter.
        callspec = getattr(item, "callspec", None)
        if callspec is not None:
            marks |= {v for v in callspec.params.values() if v in ("redis", "nats")}
        for mark in sorted(marks):
            item.add_marker(mark)
