"""Which store a command reads, which of its runs it means, and which event loop it runs on.

- A command that reads runs (``runs list``, ``runs show``, ``resume``) without ``--store``
  (or ``FLOWDSL_STORE``) reads the file that ``flowdsl run --batch`` writes by default,
  ``.flowdsl/flowdsl.db``, when it exists.
- ``--status`` picks runs by status.  Stores list the newest runs first, up to a limit, so
  the runs of one status are found by asking for more until enough are found or the store
  has no more.
"""

from __future__ import annotations

import importlib
from collections.abc import Collection
from pathlib import Path
from typing import Any

from .._errors import ConfigError
from .._records import RunRecord, RunStatus
from ..backends import DEFAULT_BATCH_FILE

__all__ = ["STATUSES", "check_backend", "runs_with_status", "store_or_default"]

STATUSES = tuple(status.value for status in RunStatus)


def store_or_default(store: str | None) -> str:
    """*store*, or the default batch file when it exists here."""
    if store:
        return store
    if Path(DEFAULT_BATCH_FILE).is_file():
        return f"sqlite:///{DEFAULT_BATCH_FILE}"
    raise ConfigError(
        f"no --store given, and no {DEFAULT_BATCH_FILE} here (where `flowdsl run --batch` "
        "keeps its runs by default)",
        hint="Name the store: --store sqlite:///runs.db (or set FLOWDSL_STORE)",
    )


async def runs_with_status(
    store: Any, statuses: Collection[str], limit: int | None
) -> list[RunRecord]:
    """The newest runs whose status is one of *statuses* (all of them when empty), at most
    *limit* of them (``None``: every one)."""
    if not statuses and limit is not None:
        found: list[RunRecord] = await store.list_runs(limit=limit)
        return found
    asked = 4 * (limit or 50)
    while True:
        records: list[RunRecord] = await store.list_runs(limit=asked)
        chosen = [r for r in records if not statuses or r.status.value in statuses]
        if len(records) < asked or (limit is not None and len(chosen) >= limit):
            return chosen if limit is None else chosen[:limit]
        asked *= 4


def check_backend(backend: str) -> str:
    """*backend*, if its event loop can be imported here; a one-line error otherwise."""
    if backend == "trio":
        try:
            importlib.import_module("trio")
        except ImportError:
            raise ConfigError(
                "--backend trio needs trio, which is not installed",
                hint="Install it: pip install 'flowdsl[trio]', or use --backend asyncio",
            ) from None
    return backend
