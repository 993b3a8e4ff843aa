"""Batch mode on NATS JetStream (issue 6): the raw floor and flowdsl, in one run.

Against a nats-server this benchmark starts itself (``-js``, file storage in a temporary
directory) on a free port:

- the floor: raw nats-py JetStream on a work-queue stream with a durable pull consumer,
  1 KB messages: one at a time (publish and wait for its ack, fetch one, ack it), and
  batched (publish 100 without waiting, then their acks; fetch 100; ack each);
- flowdsl, trivial steps: W2 with ``delay=0`` (22 steps a run, 100 runs at once) through
  ``fd.Context(batch=True, broker=nats://..., store=nats://..., workers=0)`` and 1 or 2
  worker processes (``flowdsl._executors.batch.serve``, as ``flowdsl worker`` runs it):
  steps per second per worker process, against 40 % of the one-at-a-time floor;
- W2 as it is (20 leaves that sleep 50 ms, a stand-in for an LLM call), ``--runs`` runs
  (1,000) at once on 2 worker processes of bounded concurrency: runs per second against
  the bound that latency alone sets (slots / (leaves x 50 ms)).

    python -m benchmarks.nats_bench [--quick] [--runs N] [--rounds N] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console

from ._brokers import report, trivial_and_w2, trivial_rounds
from ._harness import Config, Section, run_section

__all__ = ["main", "measure", "run"]

MESSAGE = b"x" * 1024
BATCH = 100

# A worker process: serves the URL (broker and store) until terminated.


# --- the server and the workers -------------------------------------------------------------


@contextmanager
def nats_server() -> Iterator[str]:
    """A nats-server with JetStream on file storage, on a free loopback port."""
    binary = shutil.which("nats-server") or shutil.which(
        "nats-server", path="/usr/local/sbin:/usr/sbin:/sbin"
    )
    if binary is None:
        raise RuntimeError("nats-server is not installed (on Debian: apt-get install nats-server)")
    directory = Path(tempfile.mkdtemp(prefix="flowdsl-nats-bench-"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [binary, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(directory / "js")]
    log = (directory / "server.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while b"Server is ready" not in (directory / "server.log").read_bytes():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nats-server did not start: see {directory}")
            time.sleep(0.02)
        yield f"nats://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()
        shutil.rmtree(directory, ignore_errors=True)


# --- the floor ------------------------------------------------------------------------------


async def _queue(url: str) -> tuple[Any, Any, Any, str]:
    """A connection, its JetStream context, a pull subscription and the subject of a fresh
    work-queue stream (as flowdsl's tasks stream, minus flowdsl)."""
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StreamConfig

    nc = await nats.connect(url)
    js = nc.jetstream()
    name = f"floor{time.monotonic_ns()}"
    await js.add_stream(
        StreamConfig(name=name, subjects=[f"{name}.>"], retention=RetentionPolicy.WORK_QUEUE)
    )
    await js.add_consumer(
        name, ConsumerConfig(durable_name="w", ack_policy=AckPolicy.EXPLICIT, ack_wait=30)
    )
    sub = await js.pull_subscribe_bind("w", name)
    return nc, js, sub, name


async def floor_one_at_a_time(url: str, messages: int) -> float:
    """Messages per second: publish and wait for the ack, fetch one, ack it."""
    nc, js, sub, name = await _queue(url)
    try:
        start = time.perf_counter()
        for i in range(messages):
            await js.publish(f"{name}.{i}", MESSAGE)
            [msg] = await sub.fetch(1, timeout=5)
            await msg.ack()
        elapsed = time.perf_counter() - start
        await js.delete_stream(name)
    finally:
        await nc.close()
    return messages / elapsed


async def floor_batched(url: str, messages: int) -> float:
    """Messages per second in batches: BATCH publishes, then their acks; one fetch of
    BATCH; an ack each."""
    nc, js, sub, name = await _queue(url)
    try:
        start = time.perf_counter()
        for b in range(messages // BATCH):
            acks = [await js.publish_async(f"{name}.{b}.{i}", MESSAGE) for i in range(BATCH)]
            await asyncio.gather(*acks)
            got = 0
            while got < BATCH:
                msgs = await sub.fetch(BATCH - got, timeout=5)
                for msg in msgs:
                    await msg.ack()
                got += len(msgs)
        elapsed = time.perf_counter() - start
        await js.delete_stream(name)
    finally:
        await nc.close()
    return (messages // BATCH) * BATCH / elapsed


# --- flowdsl --------------------------------------------------------------------------------


async def _trivial(urls: dict[str, str], rounds: int, messages: int) -> dict[str, list[Any]]:
    """Interleaved rounds: the two floors and flowdsl on 1 and 2 worker processes."""
    base = next(iter(urls.values())).partition("?")[0]
    floors: dict[str, Callable[[], Coroutine[Any, Any, Any]]] = {
        "floor, one at a time": lambda: floor_one_at_a_time(base, messages),
        f"floor, batched x{BATCH}": lambda: floor_batched(base, messages * 5),
    }
    return await trivial_rounds(urls, rounds, floors)


def run(config: Config) -> Section:
    """For ``python -m benchmarks``: the suite's options."""
    rounds = config.pick(default=3, quick=1)
    runs = 1000 if not config.quick else 100
    return measure(rounds=rounds, runs=runs, messages=500 if config.quick else 2000)


def measure(*, rounds: int, runs: int, messages: int) -> Section:
    section = Section(
        "nats",
        f"Batch mode on NATS JetStream: the raw nats-py floor, trivial steps on 1 and 2 "
        f"worker processes (medians of {rounds} interleaved rounds), and W2 with {runs} runs",
    )
    with nats_server() as server:
        trivial, w2 = trivial_and_w2(
            server, functools.partial(_trivial, rounds=rounds, messages=messages), runs
        )

    data = report(
        section,
        trivial,
        w2,
        runs=runs,
        floors=(
            ("floor, one at a time", "raw nats-py JetStream, one at a time", "floor_one_at_a_time"),
            (
                f"floor, batched x{BATCH}",
                f"raw nats-py JetStream, batched x{BATCH}",
                "floor_batched",
            ),
        ),
    )
    section.notes += [
        "nats-server -js, file storage, on loopback, started by the benchmark; the client, "
        "the workers and the server share the machine's cores",
        "floor, one at a time: one client; a publish waits for its ack, a fetch of one, an "
        "ack without waiting (nats-py's msg.ack()): two round trips per message; flowdsl per "
        "step: the client publishes the task (siblings pipelined), a worker pulls (batched), "
        "runs, commits the node (KV create: a round trip), publishes the completion (a round "
        "trip) and acks; the client's consumer pushes completions to it",
    ]
    section.data.update(data, rounds=rounds)
    return section


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.nats_bench")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per measurement")
    parser.add_argument("--runs", type=int, default=None, help="W2 runs (default 1000)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    config = Config(quick=args.quick, rounds=args.rounds)
    rounds = config.pick(default=3, quick=1)
    runs = args.runs or (1000 if not args.quick else 100)
    messages = 500 if args.quick else 2000

    def run_it(_: Config) -> Section:
        return measure(rounds=rounds, runs=runs, messages=messages)

    section = run_section(run_it, config)
    section.show(Console())
    if args.json is not None:
        args.json.write_text(json.dumps(section.to_json(), indent=2, default=str))


if __name__ == "__main__":
    main()
