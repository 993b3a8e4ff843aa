"""Waits for signals (see _engine/dynamic.py)."""

from __future__ import annotations

from typing import Any


async def wait(scope: Any, run: Any, node: Any, full: str, marker: str) -> tuple[Any, Any]:
    raise NotImplementedError
