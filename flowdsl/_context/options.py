"""What a context's options become: its store and, in batch mode, its queue."""

from __future__ import annotations

from ..backends import DEFAULT_BATCH_FILE, Broker, Store, link, open_broker, open_store

__all__ = ["open_backends"]


def open_backends(store: object, broker: str | None, *, batch: bool) -> tuple[Store, Broker | None]:
    """The store and (in batch mode) the queue a context's options name.

    Batch mode with no broker keeps its queue and its store in one SQLite file: the
    store's file if it is SQLite, else ``.flowdsl/flowdsl.db`` in the working directory.
    With a broker and no store, the journal lives on the broker's server.
    """
    if not batch:
        return open_store(store), None
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
    link(journal, queue)
    return journal, queue
