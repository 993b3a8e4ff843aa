"""A subprocess for the SQLite store's crash and concurrency tests.

    python _crash_writer.py PATH RUN_ID [--count N] [--wait-go] [--shared RUN_ID]

Opens the store at PATH, creates RUN_ID (idempotently) and checks that the run's journal
is a gap-free prefix ``n0 .. n{m-1}`` with the expected values (exit status 3 if not).
Then it commits ``n{m}``, ``n{m+1}``, ... (forever without ``--count``), printing each
index after its commit returned, so a reader of stdout knows which nodes are durable.
Node ``i`` is written only after node ``i - 1`` is committed: whatever survives a crash
must be a prefix.

``--wait-go`` prints ``ready`` and waits for a line on stdin before opening the store, so
a test can start several writers at the same instant.  ``--shared RUN_ID`` also commits
every node into that run, which all writers share (first commit wins).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time

import anyio

from flowdsl._records import NodeRecord, RunRecord, RunStatus
from flowdsl.backends.sqlite.store import SQLiteStore

SHARED_VALUE = '"' + "shared " * 300 + '"'  # a large value every third node returns


def value_of(run_id: str, i: int) -> str:
    """The JSON text node ``i`` of *run_id* returns: small inline, large distinct, large
    shared, in turn, so that crashes land in every kind of write."""
    if i % 3 == 0:
        return f'{{"i":{i},"run":"{run_id}"}}'
    if i % 3 == 1:
        digest = hashlib.sha256(f"{run_id}/{i}".encode()).hexdigest()
        return '"' + digest * 20 + '"'
    return SHARED_VALUE


def run_record(run_id: str) -> RunRecord:
    now = time.time()
    return RunRecord(run_id, "chain", "tests:chain", "fp", "{}", RunStatus.RUNNING, now, now)


def check_prefix(run_id: str, nodes: dict[str, NodeRecord]) -> int:
    """The length of the journal's prefix; exits with status 3 if there is a gap."""
    for i in range(len(nodes)):
        record = nodes.get(f"n{i}")
        if record is None or record.value != value_of(run_id, i):
            print(f"journal of {run_id} is not a prefix at n{i}", file=sys.stderr)
            sys.exit(3)
    return len(nodes)


async def main(path: str, run_id: str, count: int | None, wait_go: bool, shared: str) -> None:
    if wait_go:
        print("ready", flush=True)
        sys.stdin.readline()
    store = SQLiteStore(path, busy_timeout=30.0)
    await store.open()
    await store.create_run(run_record(run_id))
    if shared:
        await store.create_run(run_record(shared))
    i = check_prefix(run_id, await store.load_nodes(run_id))
    while count is None or i < count:
        now = time.time()
        record = NodeRecord(f"n{i}", value_of(run_id, i), 1, now, now, "code")
        if not await store.commit_node(run_id, record):
            print(f"n{i} of {run_id} was already committed", file=sys.stderr)
            sys.exit(4)
        if shared:
            await store.commit_node(shared, record)
        print(i, flush=True)
        i += 1
    await store.update_run(run_id, status=RunStatus.FINISHED, result="null")
    await store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("run_id")
    parser.add_argument("--count", type=int, default=None)
    parser.add_argument("--wait-go", action="store_true")
    parser.add_argument("--shared", default="")
    args = parser.parse_args()
    anyio.run(main, args.path, args.run_id, args.count, args.wait_go, args.shared)
