"""Flows the service tests serve (``flowdsl serve --import service_flows``).

Steps that must be held mid-run wait for a file to appear (``FD_SERVICE_GATE``, set by the
test) and log ``start``/``done`` lines to ``FD_SERVICE_LOG``, which every process appends
to: the test reads it to count which steps ran, in which process.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import attrs

import flowdsl as fd


@attrs.frozen
class Greeting:
    name: str
    times: int = 1


def _log(kind: str, label: str) -> None:
    path = os.environ.get("FD_SERVICE_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as file:
            file.write(f"{os.getpid()} {kind} {label}\n")


async def _gate(name: str) -> None:
    folder = os.environ.get("FD_SERVICE_GATE")
    if not folder:
        return
    gate = Path(folder) / name
    # A file the test creates when it wants the step to finish: another process may make
    # it, so there is no event to wait on.
    while not gate.exists():  # noqa: ASYNC110
        await anyio.sleep(0.02)


@fd.step
async def shout(greeting: Greeting) -> str:
    return (greeting.name.upper() + "! ") * greeting.times


@fd.flow
async def hello(greeting: Greeting) -> str:
    return await shout(greeting)


@fd.step
async def plus(a: int, b: int) -> int:
    return a + b


@fd.flow
async def add(a: int, b: int = 1) -> int:
    return await plus(a, b)


@fd.step
async def noop(x: int) -> int:
    return x


@fd.flow
async def trivial(x: int) -> int:
    return await noop(x)


@fd.step
async def first(x: int) -> int:
    _log("start", "first")
    _log("done", "first")
    return x + 1


@fd.step
async def held(x: int) -> int:
    _log("start", "held")
    await _gate("held")
    _log("done", "held")
    return x * 10


@fd.step
async def last(x: int) -> int:
    _log("start", "last")
    _log("done", "last")
    return x + 2


@fd.flow
async def gated(x: int) -> int:
    """first -> held (waits for the gate file "held") -> last."""
    return await last(await held(await first(x)))


@fd.step
async def boom(x: int) -> int:
    raise ValueError(f"boom {x}")


@fd.flow
async def failing(x: int) -> int:
    return await boom(x)


@fd.step
async def big(n: int) -> str:
    return "x" * n


@fd.flow
async def large(n: int) -> str:
    return await big(n)


@fd.step
async def verdict(topic: str, approved: bool) -> str:
    return f"{topic}: {'yes' if approved else 'no'}"


@fd.flow
async def approved(topic: str) -> str:
    approval = await fd.wait_for("approval", bool)
    return await verdict(topic, approval)


@fd.step
async def stage_one(x: int) -> int:
    _log("done", f"one:{x}")
    return x + 1


@fd.step
async def stage_held(x: int, y: int) -> int:
    _log("start", f"held:{x}")
    await _gate("held")
    _log("done", f"held:{x}")
    return y * 10


@fd.step
async def stage_two(x: int, y: int) -> int:
    _log("done", f"two:{x}")
    return y + 2


@fd.flow
async def counted(x: int) -> int:
    """one -> two; each step logs the run's x when it runs, so a test counts them."""
    return await stage_two(x, await stage_one(x))


@fd.flow
async def counted_gated(x: int) -> int:
    """one -> held (waits for the gate file "held") -> two, logging as ``counted``."""
    return await stage_two(x, await stage_held(x, await stage_one(x)))
