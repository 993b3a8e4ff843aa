"""What a context's options become: its store and, in batch mode, its queue."""

from __future__ import annotations

from typing import Any

from .._integrity import seal_from
from ..backends import DEFAULT_BATCH_FILE, Broker, Store, link, open_broker, open_store

__all__ = ["open_backends"]


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
