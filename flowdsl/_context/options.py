"""What a context's options become: its store and, in batch mode, its queue."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from .._errors import ConfigError
from .._executors.batch.worker import check_max_deliveries
from .._integrity import seal_from
from ..backends import DEFAULT_BATCH_FILE, Broker, Store, link, open_broker, open_store

__all__ = ["check_leases", "check_options", "open_backends"]


def open_backends(
    store: object, broker: str | None, *, batch: bool, keys: tuple[Any, Any] = (None, ())
) -> tuple[Store, Broker | None]:
    """The store and (in batch mode) the queue a context's options name, checking records
    and messages with the seal *keys* (``signing_key=``, ``old_signing_keys=``) make.

    Batch mode with no broker keeps its queue and its store in one SQLite file: the
    store's file if it is SQLite, else ``.flowdsl/flowdsl.db`` in the working directory.
    With a broker and no store, the journal lives on the broker's server.
    """
    seal = seal_from(*keys)
    if not batch:
        journal = open_store(store)
        journal.seal = seal
        return journal, None
    if broker is None:
        if isinstance(store, str) and store.startswith("sqlite:"):
            broker = store
        else:
            broker = f"sqlite:///{DEFAULT_BATCH_FILE}"
    queue = open_broker(broker)
    if store is None:
        # The broker's own server keeps the journal unless told otherwise.
        store = broker
    journal = open_store(store)
    journal.seal = seal
    link(journal, queue)  # the queue takes the store's seal
    return journal, queue


def check_options(
    *,
    on_event: Callable[[Any], None] | None,
    max_concurrency: int | None,
    workers: int | None,
    broker: str | None,
    batch: bool,
) -> None:
    """Refuse, with what to do instead, options that cannot work together."""
    if on_event is not None and inspect.iscoroutinefunction(on_event):
        raise ConfigError(
            "on_event must be a plain function; it is called synchronously for every event",
            hint="Use `run.events()` to consume events asynchronously",
        )
    if max_concurrency is not None and max_concurrency < 1:
        raise ConfigError(f"max_concurrency must be at least 1, not {max_concurrency}")
    if workers is not None and workers < 0:
        raise ConfigError(f"workers must be 0 or more, not {workers}")
    if (broker is not None or workers is not None) and not batch:
        raise ConfigError(
            "broker= and workers= configure batch mode",
            hint="Pass batch=True: fd.Context(batch=True, broker=...)",
        )


def check_leases(*, lease: float, run_lease: float, max_deliveries: int | None) -> None:
    """Refuse lease lengths and delivery limits no run could live with."""
    for name, seconds in (("lease", lease), ("run_lease", run_lease)):
        if not seconds > 0:
            raise ConfigError(f"{name} must be a positive number of seconds, not {seconds}")
    if max_deliveries is not None:
        check_max_deliveries(max_deliveries)
