"""The garbage collector of a worker process, set for serving tasks.

A worker holds hundreds of tasks at once, each a few dozen objects that live until its
step ends: with the interpreter's default thresholds a collection ran every dozen tasks
or so and traversed them all, and a full one also traversed everything the imports left,
each time.  That was a sixth of a busy worker's time.  :func:`tuned_collector` freezes
what exists when the worker starts (it is never garbage the collector could free) and
collects the youngest generation less often; reference counting, which frees almost
everything a task leaves, is unchanged.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import Final

__all__ = ["tuned_collector"]

#: Allocations between two collections of the youngest generation (CPython's default: 700).
YOUNG_THRESHOLD: Final = 5000


@contextlib.contextmanager
def tuned_collector() -> Iterator[None]:
    """Inside the block, the collector is set for a worker (see the module); as it was
    after.  Left alone when the collector is off or something froze objects already."""
    if not gc.isenabled() or gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    threshold = gc.get_threshold()
    gc.set_threshold(max(threshold[0], YOUNG_THRESHOLD), *threshold[1:])
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()
