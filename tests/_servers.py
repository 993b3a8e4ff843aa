"""Real redis-server and nats-server processes for the tests: no fakes stand in for them.

Each server runs on a free loopback port in its own temporary directory, logs to
``server.log`` there, and can be killed (SIGKILL, as a crash), restarted on the same port
and directory (so Redis' append-only file and JetStream's file store survive), or stopped.
The fixtures in ``conftest.py`` stop every server they started, whatever the test did.

A missing binary skips the test on a developer's machine but fails it on CI (``CI=true``):
there, a silently skipped backend would look like a green one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import IO, Any

import attrs
import pytest

__all__ = [
    "NatsServer",
    "RedisServer",
    "ServerProcess",
    "free_port",
    "is_ci",
    "require_binary",
]

HOST = "127.0.0.1"
READY_TIMEOUT = 20.0  # seconds for a server to answer after it was started
STOP_TIMEOUT = 10.0  # seconds a server gets to exit on SIGTERM before SIGKILL
_POLL = 0.02  # seconds between readiness probes
_START_ATTEMPTS = 4  # a free port can be taken by another process before the server binds it
# Debian installs nats-server under /usr/sbin, which is not on every user's PATH.
_EXTRA_PATH = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def is_ci() -> bool:
    """True when the CI environment variable says so (``CI=true``, as CI systems set it)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def require_binary(name: str) -> str:
    """The path of executable *name*; skip the test without it (fail it on CI)."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *_EXTRA_PATH])
    path = shutil.which(name, path=search)
    if path is not None:
        return path
    message = f"{name} is not installed (on Debian: apt-get install -y {name})"
    if is_ci():
        pytest.fail(f"{message}; CI must run every backend's tests", pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    """A loopback TCP port that nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class ServerNotReady(RuntimeError):
    """A server process exited or did not answer in time; the message holds its log."""


@attrs.define(eq=False)
class ServerProcess:
    """One server process; subclasses say how to start it and how to know it is ready."""

    binary: str
    directory: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = attrs.field(default=None, init=False, repr=False)
    _log: IO[bytes] | None = attrs.field(default=None, init=False, repr=False)

    name = "server"

    @property
    def host(self) -> str:
        return HOST

    @property
    def log_path(self) -> Path:
        return self.directory / "server.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        """Everything the server printed, across restarts."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # --- what subclasses define -----------------------------------------------------------

    def command(self) -> list[str]:
        raise NotImplementedError

    def probe(self) -> bool:
        """One readiness check: True once the server serves requests."""
        raise NotImplementedError

    # --- lifetime -------------------------------------------------------------------------

    def start(self) -> None:
        """Start on a fresh free port (retrying if another process takes it first)."""
        for attempt in range(_START_ATTEMPTS):
            self.port = free_port()
            try:
                self._spawn_and_wait()
                return
            except ServerNotReady:
                address_taken = "address already in use" in self.log().lower()
                if not address_taken or attempt == _START_ATTEMPTS - 1:
                    raise

    def restart(self) -> None:
        """Start again on the same port and directory, so persisted data is read back.

        A server still running is stopped first (gracefully); call :meth:`kill` before
        to restart after a crash.
        """
        if self.running:
            self.stop()
        self._spawn_and_wait()

    def kill(self) -> None:
        """SIGKILL: the server dies at once, as in a crash (no shutdown, no final sync)."""
        self._signal_and_reap(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if the server has not exited within STOP_TIMEOUT."""
        self._signal_and_reap(signal.SIGTERM)

    def _spawn_and_wait(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._close_log()
        self._log = self.log_path.open("ab")
        self._log.write(f"\n--- {self.name} starting on port {self.port} ---\n".encode())
        self._log.flush()
        self.process = subprocess.Popen(
            self.command(),
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Its own session: a Ctrl-C meant for pytest reaches pytest, which then stops
            # the server in teardown, instead of killing the server under a running test.
            start_new_session=True,
        )
        try:
            self._wait_ready()
        except BaseException:
            self._signal_and_reap(signal.SIGKILL)
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise ServerNotReady(
                    f"{self.name} exited with status {self.process.returncode} while starting "
                    f"on port {self.port}; its log:\n{self.log()}"
                )
            if self.probe():
                return
            if time.monotonic() > deadline:
                raise ServerNotReady(
                    f"{self.name} did not answer on port {self.port} within {READY_TIMEOUT} s; "
                    f"its log:\n{self.log()}"
                )
            time.sleep(_POLL)

    def _signal_and_reap(self, sig: signal.Signals) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


@attrs.define(eq=False)
class RedisServer(ServerProcess):
    """``redis-server`` with an append-only file synced on every write."""

    password: str | None = None
    name = "redis-server"

    @property
    def url(self) -> str:
        return self.make_url(password=self.password)

    def make_url(self, *, password: str | None = None, db: int = 0) -> str:
        """A URL for this server with any password (a wrong one, for auth tests)."""
        auth = f":{password}@" if password is not None else ""
        return f"redis://{auth}{HOST}:{self.port}/{db}"

    def command(self) -> list[str]:
        cmd = [
            self.binary,
            "--port", str(self.port),
            "--bind", HOST,
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--daemonize", "no",
            "--protected-mode", "no",
        ]  # fmt: skip
        if self.password is not None:
            cmd += ["--requirepass", self.password]
        return cmd

    def probe(self) -> bool:
        import redis

        client = redis.Redis(
            host=HOST,
            port=self.port,
            password=self.password,
            socket_connect_timeout=1.0,
            socket_timeout=1.0,
        )
        try:
            with client:
                return bool(client.ping())
        except redis.exceptions.AuthenticationError:
            raise  # the server is up and refuses our password: retrying cannot help
        except redis.exceptions.RedisError:
            # Not listening yet, or still loading its append-only file (LOADING).
            return False


@attrs.define(eq=False)
class NatsServer(ServerProcess):
    """``nats-server`` with JetStream on file storage in its directory."""

    token: str | None = None
    name = "nats-server"

    @property
    def url(self) -> str:
        return self.make_url(token=self.token)

    def make_url(self, *, token: str | None = None) -> str:
        """A URL for this server with any token (a wrong one, for auth tests)."""
        auth = f"{token}@" if token is not None else ""
        return f"nats://{auth}{HOST}:{self.port}"

    @property
    def store_dir(self) -> Path:
        return self.directory / "jetstream"

    def command(self) -> list[str]:
        cmd = [
            self.binary,
            "-a", HOST,
            "-p", str(self.port),
            "-js",
            "-sd", str(self.store_dir),
        ]  # fmt: skip
        if self.token is not None:
            cmd += ["--auth", self.token]
        return cmd

    def probe(self) -> bool:
        try:
            return jetstream_answers(HOST, self.port, self.token)
        except OSError:
            return False


def jetstream_answers(host: str, port: int, token: str | None, timeout: float = 1.0) -> bool:
    """Ask JetStream for its account info over the bare NATS protocol.

    A plain socket keeps readiness checks free of any event loop, so the fixtures work the
    same under asyncio and trio tests.  True when the server accepts the connection and
    JetStream replies to ``$JS.API.INFO``.
    """
    with socket.create_connection((host, port), timeout=timeout) as sock:
        stream = sock.makefile("rwb")
        info = stream.readline()
        if not info.startswith(b"INFO "):
            return False
        connect: dict[str, Any] = {"verbose": False, "pedantic": False, "headers": False}
        if token is not None:
            connect["auth_token"] = token
        stream.write(b"CONNECT " + json.dumps(connect).encode() + b"\r\n")
        stream.write(b"SUB _INBOX.flowdsl_ready 1\r\n")
        stream.write(b"PUB $JS.API.INFO _INBOX.flowdsl_ready 0\r\n\r\n")
        stream.flush()
        while True:
            line = stream.readline()
            if not line:
                return False
            if line.startswith(b"-ERR"):
                raise ServerNotReady(f"nats-server refused the probe: {line.decode().strip()}")
            if line.startswith(b"PING"):
                stream.write(b"PONG\r\n")
                stream.flush()
            elif line.startswith(b"MSG "):
                size = int(line.split()[-1])
                payload = stream.read(size + 2)[:size]
                reply = json.loads(payload)
                return isinstance(reply, dict) and "error" not in reply
