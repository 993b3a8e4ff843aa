"""Batch mode on Redis Streams (issue 5): the raw floor and flowdsl, in one run.

Against a redis-server this benchmark starts itself on a free port, in a temporary
directory (``appendonly yes``, ``appendfsync everysec``: the production default for an
append-only file; both sides pay the same):

- the floor: raw redis-py (asyncio) doing XADD + XREADGROUP + XACK for 1 KB messages,
  one message at a time (three round trips each), and pipelined (batches of 100: one
  XADD pipeline, one XREADGROUP, one XACK of all the ids);
- flowdsl, trivial steps: W2 with ``delay=0`` (22 steps a run, 100 runs at once) through
  ``fd.Context(batch=True, broker=redis://..., store=redis://..., workers=0)`` and 1 or
  2 worker processes (``flowdsl._executors.batch.serve``, as ``flowdsl worker`` runs it);
  steps per second per worker process, against 40 % of the one-at-a-time floor;
- W2 as it is (20 leaves that sleep 50 ms, a stand-in for an LLM call), W2_RUNS runs at
  once on 2 worker processes of bounded concurrency: runs per second against the bound
  that latency alone sets (slots / (leaves x 50 ms)).

    python -m benchmarks.redis_bench [--quick] [--runs N] [--rounds N] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console

from . import workloads as w
from ._brokers import report, trivial_and_w2, trivial_rounds
from ._harness import Config, Section, run_section

__all__ = ["main", "run"]

MESSAGE = b"x" * 1024
PIPELINE = 100


# --- the server -----------------------------------------------------------------------------


@contextmanager
def redis_server() -> Iterator[str]:
    """A redis-server on a free loopback port; yields its URL."""
    import socket

    import redis

    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    directory = Path(tempfile.mkdtemp(prefix="flowdsl-redis-bench-"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        binary,
        *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)),
        *("--save", "", "--appendonly", "yes", "--appendfsync", "everysec"),
        *("--daemonize", "no", "--protected-mode", "no"),
    ]
    log = (directory / "server.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with redis.Redis(port=port, socket_connect_timeout=1) as client:
                    client.ping()
                break
            except redis.RedisError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start: see {directory}") from None
                time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()
        shutil.rmtree(directory, ignore_errors=True)


# --- the floor ------------------------------------------------------------------------------


async def floor_one_at_a_time(url: str, messages: int) -> float:
    """Messages per second: XADD, XREADGROUP COUNT 1, XACK, one message after another."""
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(url)
    stream = f"floor:{time.monotonic_ns()}"
    try:
        await client.xgroup_create(stream, "g", id="0", mkstream=True)
        start = time.perf_counter()
        for _ in range(messages):
            await client.xadd(stream, {"payload": MESSAGE})
            reply = await client.xreadgroup("g", "c", {stream: ">"}, count=1)
            entry_id = reply[0][1][0][0]
            await client.xack(stream, "g", entry_id)
        elapsed = time.perf_counter() - start
        await client.delete(stream)
    finally:
        await client.aclose()
    return messages / elapsed


async def floor_pipelined(url: str, messages: int) -> float:
    """Messages per second in batches: a pipeline of XADDs, one XREADGROUP, one XACK."""
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(url)
    stream = f"floor:{time.monotonic_ns()}"
    try:
        await client.xgroup_create(stream, "g", id="0", mkstream=True)
        start = time.perf_counter()
        for _ in range(messages // PIPELINE):
            pipe = client.pipeline(transaction=False)
            for _ in range(PIPELINE):
                pipe.xadd(stream, {"payload": MESSAGE})
            await pipe.execute()
            reply = await client.xreadgroup("g", "c", {stream: ">"}, count=PIPELINE)
            await client.xack(stream, "g", *(entry_id for entry_id, _ in reply[0][1]))
        elapsed = time.perf_counter() - start
        await client.delete(stream)
    finally:
        await client.aclose()
    return (messages // PIPELINE) * PIPELINE / elapsed


# --- flowdsl --------------------------------------------------------------------------------


async def _trivial(urls: dict[str, str], rounds: int, messages: int) -> dict[str, list[Any]]:
    """Interleaved rounds: the two floors and flowdsl on 1 and 2 worker processes."""
    base = next(iter(urls.values())).partition("?")[0]
    floors: dict[str, Callable[[], Coroutine[Any, Any, Any]]] = {
        "floor, one at a time": lambda: floor_one_at_a_time(base, messages),
        f"floor, pipelined x{PIPELINE}": lambda: floor_pipelined(base, messages * 10),
    }
    return await trivial_rounds(urls, rounds, floors)


def run(config: Config) -> Section:
    rounds = config.pick(default=3, quick=1)
    runs = w.W2_RUNS * 5 if not config.quick else 100
    return measure(rounds=rounds, runs=runs, messages=1000 if config.quick else 3000)


def measure(*, rounds: int, runs: int, messages: int) -> Section:
    section = Section(
        "redis",
        f"Batch mode on Redis Streams: the raw redis-py floor, trivial steps on 1 and 2 "
        f"worker processes (medians of {rounds} interleaved rounds), and W2 with {runs} runs",
    )
    with redis_server() as server:
        trivial, w2 = trivial_and_w2(
            server, functools.partial(_trivial, rounds=rounds, messages=messages), runs
        )

    data = report(
        section,
        trivial,
        w2,
        runs=runs,
        floors=(
            ("floor, one at a time", "raw redis-py, one at a time", "floor_one_at_a_time"),
            (
                f"floor, pipelined x{PIPELINE}",
                f"raw redis-py, pipelined x{PIPELINE}",
                "floor_pipelined",
            ),
        ),
    )
    section.notes += [
        "redis-server: appendonly yes, appendfsync everysec, on loopback, started by the "
        "benchmark; the client, the workers and the server share the machine's cores",
        "floor, one at a time: one client, three round trips per message; flowdsl per step: "
        "the client enqueues (batched per tick), a worker claims (batched), runs, then "
        "commits the record and completes the task in one Lua script; the client reads "
        "completions in batches",
    ]
    section.data.update(data, rounds=rounds)
    return section


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.redis_bench")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per measurement")
    parser.add_argument("--runs", type=int, default=None, help="W2 runs (default 1000)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    config = Config(quick=args.quick, rounds=args.rounds)
    rounds = config.pick(default=3, quick=1)
    runs = args.runs or (1000 if not args.quick else 100)
    messages = 1000 if args.quick else 3000

    def run_it(_: Config) -> Section:
        return measure(rounds=rounds, runs=runs, messages=messages)

    section = run_section(run_it, config)
    section.show(Console())
    if args.json is not None:
        args.json.write_text(json.dumps(section.to_json(), indent=2, default=str))


if __name__ == "__main__":
    main()
