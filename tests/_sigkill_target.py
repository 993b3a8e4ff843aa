"""A durable chain flow for the SIGKILL tests, run in a subprocess and resumed elsewhere.

    python -c "import _sigkill_target; _sigkill_target.main()" DB RUN_ID [--long] [--resume]

runs :data:`chain` (``LENGTH`` steps, each fed by the one before; ``--long``:
:data:`long_chain`, ``LONG`` steps) on the SQLite store in file DB as run RUN_ID, or
resumes RUN_ID with ``--resume``.  The module is imported by
name, not run as ``__main__``, so the run record names ``_sigkill_target:chain`` and any
process with this directory on its path can resume it.

Environment:

- ``FD_SIGKILL_LOG`` (required): every step appends ``start LABEL`` when it begins and
  ``done LABEL`` when its body has computed the result (before the record is committed),
  with the pid, so the test can tell which process ran what, and how often.
- ``FD_SIGKILL_ECHO=1``: also print each log line to stdout (flushed), for the parent to
  watch without polling the file.
- ``FD_SIGKILL_STOP_AT=LABEL``: that step logs its start, then blocks forever: the kill
  then lands with every earlier step committed and that one in flight.

Results alternate between short strings (stored inline in the journal row) and long ones
(stored in the ``blobs`` table), so that kills land in both kinds of store write.
"""

from __future__ import annotations

import hashlib
import os
import sys

import anyio

import flowdsl as fd

__all__ = [
    "LENGTH",
    "LONG",
    "SEED",
    "advance",
    "chain",
    "expected",
    "label_of",
    "long_chain",
    "main",
]

LENGTH = 40
LONG = 1000  # long enough that a kill at a random instant lands mid-run
SEED = "seed"


def label_of(i: int) -> str:
    return f"s{i:04d}"


def advance(label: str, prev: str) -> str:
    """What step *label* returns given the previous value: pure, the same in any process."""
    digest = hashlib.sha256(f"{label}:{prev}".encode()).hexdigest()
    index = int(label[1:])
    return digest[:12] if index % 2 == 0 else digest * 12  # 12 chars, or 768 (a blob)


def expected(length: int = LENGTH) -> str:
    value = SEED
    for i in range(length):
        value = advance(label_of(i), value)
    return value


def _log(line: str) -> None:
    text = f"{os.getpid()} {line}\n"
    # One write(2) per line on an O_APPEND descriptor: whole lines, in order, and in the
    # kernel (so surviving SIGKILL) as soon as the call returns.
    fd_ = os.open(os.environ["FD_SIGKILL_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd_, text.encode())
    finally:
        os.close(fd_)
    if os.environ.get("FD_SIGKILL_ECHO") == "1":
        print(line, flush=True)


@fd.step
async def link(label: str, prev: str) -> str:
    _log(f"start {label}")
    if os.environ.get("FD_SIGKILL_STOP_AT") == label:
        await anyio.sleep_forever()
    value = advance(label, prev)
    _log(f"done {label}")
    return value


async def _links(value: str, length: int) -> str:
    for i in range(length):
        value = await link(label_of(i), value)
    return value


@fd.flow
async def chain(seed: str) -> str:
    return await _links(seed, LENGTH)


@fd.flow
async def long_chain(seed: str) -> str:
    return await _links(seed, LONG)


async def _main(db: str, run_id: str, resume: bool, long: bool) -> None:
    async with fd.Context(store=f"sqlite:///{db}") as ctx:
        if resume:
            result = await ctx.resume(run_id)
        else:
            result = await ctx.run(long_chain if long else chain, SEED, run_id=run_id)
    print(f"result {result}", flush=True)


def main() -> None:
    options = {a for a in sys.argv[1:] if a.startswith("--")}
    db, run_id = [a for a in sys.argv[1:] if not a.startswith("--")]
    anyio.run(_main, db, run_id, "--resume" in options, "--long" in options)
