"""Steps and flows for tests/test_security.py, importable by worker processes."""

from __future__ import annotations

import os
from typing import Any

import anyio

import flowdsl as fd

__all__ = ["CALLS", "GATE", "add", "double", "pair", "shout", "triple"]

CALLS: dict[str, int] = {}
GATE: dict[str, anyio.Event] = {}


@fd.step
async def double(x: int) -> int:
    CALLS["double"] = CALLS.get("double", 0) + 1
    gate = GATE.get("double")
    if gate is not None:
        await gate.wait()
    return 2 * x


@fd.step
async def triple(x: int) -> int:
    CALLS["triple"] = CALLS.get("triple", 0) + 1
    return 3 * x


@fd.step
async def add(a: int, b: int) -> int:
    return a + b


@fd.flow
async def pair(x: int) -> int:
    """double(x) + triple(x): two integer results a tamperer could swap."""
    return await add(await double(x), await triple(x))


@fd.step
async def shout(text: str) -> str:
    return text.upper() + "!"


@fd.flow
async def loud(text: str) -> str:
    return await shout(text)


@fd.step(retries=3)
async def leaks(x: int) -> int:
    CALLS["leaks"] = CALLS.get("leaks", 0) + 1
    key = fd.Secret("SECURITY_TEST_KEY").reveal()
    raise RuntimeError(f"the provider refused the key {key} for {x}")


@fd.flow
async def leaky(x: int) -> int:
    return await leaks(x)


@fd.step
async def connects(x: int) -> int:
    raise ConnectionError(f"cannot reach redis://app:pw-{x}-hunter2@10.0.0.1:6379/0 (refused)")


@fd.flow
async def connecting(x: int) -> int:
    return await connects(x)


@fd.step(retries=3)
async def huge(x: int) -> int:
    CALLS["huge"] = CALLS.get("huge", 0) + 1
    return 10**5000 + x


@fd.flow
async def too_big(x: int) -> int:
    return await huge(x)


@fd.step(retries=3)
async def loop(x: int) -> list[Any]:
    CALLS["loop"] = CALLS.get("loop", 0) + 1
    items: list[Any] = [x]
    items.append(items)
    return items


@fd.flow
async def recursive(x: int) -> list[Any]:
    return await loop(x)


def pid() -> int:
    return os.getpid()
