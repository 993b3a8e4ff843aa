"""Progress display for many runs: a rich bar on a terminal, nothing elsewhere."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["progress_for"]


class _Counts:
    """Done, failed and running counts, shown by a bar when there is one."""

    def __init__(self, bar: Any = None, task: Any = None) -> None:
        self.bar = bar
        self.task = task
        self.running = self.done_count = self.failed_count = 0
        self.items_total = self.items_done = 0  # of the maps inside the runs

    def items(self, count: int) -> None:
        """A map inside one of the runs has *count* items."""
        self.items_total += count
        self._refresh()

    def item_done(self) -> None:
        self.items_done += 1
        if self.items_done % 16 == 0 or self.items_done == self.items_total:
            self._refresh()  # not on every item: a map of trivial items is fast

    def _refresh(self, advance: int = 0) -> None:
        if self.bar is not None:
            self.bar.update(
                self.task,
                advance=advance,
                running=self.running,
                done=self.done_count,
                failed=self.failed_count,
                items=f"{self.items_done}/{self.items_total} items" if self.items_total else "",
            )

    def started(self) -> None:
        self.running += 1
        self._refresh()

    def done(self) -> None:
        self.running -= 1
        self.done_count += 1
        self._refresh(1)

    def failed(self) -> None:
        self.running -= 1
        self.failed_count += 1
        self._refresh(1)


@contextlib.contextmanager
def progress_for(name: str, total: int, show: bool | None) -> Iterator[_Counts]:
    """Counts for *total* runs; a live bar when *show*, or by default on a terminal."""
    if show is None:
        show = sys.stderr.isatty() or _in_notebook()
    if not show:
        yield _Counts()
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[green]{task.fields[done]} done"),
        TextColumn("[red]{task.fields[failed]} failed"),
        TextColumn("[cyan]{task.fields[running]} running"),
        TextColumn("[dim]{task.fields[items]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(name, total=total, done=0, failed=0, running=0, items="")
        yield _Counts(bar, task)


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    try:
        ip = shell.get_ipython()
    except Exception:
        return False
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"
