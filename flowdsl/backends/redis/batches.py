"""The Redis broker's batch finishing: many tasks completed, dead-lettered or committed
and completed in one script (``scripts.FINISH_MANY``), one round trip for the lot."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ..._integrity import Seal
from ..messages import Finished
from .keys import Layout, encode_node, queued_field, to_bytes

__all__ = ["finish_many_call"]


def finish_many_call(
    layout: Layout,
    seal: Seal,
    fixed: list[str],
    group: str,
    keep: int,
    items: Sequence[Finished],
) -> tuple[list[str], list[Any]]:
    """``(keys, args)`` of one FINISH_MANY call for *items*; *fixed* are the broker's
    tasks, queued, completions, events and dead keys."""
    keys = [*fixed, layout.blobrefs]
    args: list[Any] = [group, keep, repr(time.time())]
    for item in items:
        what = "k" if item.record is not None else ("d" if item.dead is not None else "c")
        args += [
            what,
            item.task_id,
            queued_field(item.run_id, item.node_id),
            to_bytes(item.payload),
            len(item.events),
        ]
        for run_id, text in item.events:
            args += [to_bytes(run_id), to_bytes(text)]
        if item.record is not None:
            field, digest, blob = encode_node(item.record, seal.node(item.run_id, item.record))
            keys += [layout.nodes(item.run_id), layout.blob(digest) if digest else layout.no_blob]
            args += [to_bytes(item.node_id), field, digest, blob]
        elif item.dead is not None:
            args += [to_bytes(item.run_id), to_bytes(item.node_id), to_bytes(item.dead)]
    return keys, args
