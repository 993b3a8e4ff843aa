"""Progress display for many runs: a rich bar on a terminal, a line in a notebook.

In a Jupyter kernel the display is one output line that is replaced in place (IPython's
``display(..., display_id=True)`` and its ``update``), as HTML with a ``<progress>`` bar and
as plain text.  That needs nothing beyond IPython itself, which every kernel has: rich's
own notebook support would need ipywidgets (and a front end with the widget extension),
and without them it shows nothing at all.
"""

from __future__ import annotations

import contextlib
import html
import sys
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["progress_for"]

NOTEBOOK_REFRESH = 0.2  # seconds between two redraws of the notebook line, at most


class _Counts:
    """How many runs are waiting for a slot, running, done and failed.

    A run counts as running from :meth:`started`, which is called once it holds its slot
    (``concurrency=``), not when it was merely handed to the map.
    """

    def __init__(self, total: int = 0) -> None:
        self.total = total
        self.running = self.done_count = self.failed_count = 0
        self.items_total = self.items_done = 0  # of the maps inside the runs

    @property
    def waiting(self) -> int:
        return self.total - self.running - self.done_count - self.failed_count

    def _refresh(self, advance: int = 0) -> None:
        """Redraw, where there is something to draw."""

    @property
    def items_text(self) -> str:
        return f"{self.items_done}/{self.items_total} items" if self.items_total else ""

    def items(self, count: int) -> None:
        """A map inside one of the runs has *count* items."""
        self.items_total += count
        self._refresh()

    def item_done(self) -> None:
        self.items_done += 1
        if self.items_done % 16 == 0 or self.items_done == self.items_total:
            self._refresh()  # not on every item: a map of trivial items is fast

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


class _RichBar(_Counts):
    """The counts drawn by a rich progress bar (on a terminal)."""

    def __init__(self, total: int, bar: Any, task: Any) -> None:
        super().__init__(total)
        self.bar = bar
        self.task = task

    def _refresh(self, advance: int = 0) -> None:
        self.bar.update(
            self.task,
            advance=advance,
            running=self.running,
            waiting=self.waiting,
            done=self.done_count,
            failed=self.failed_count,
            items=self.items_text,
        )


class _NotebookLine(_Counts):
    """The counts as one notebook output, replaced in place as they change."""

    def __init__(self, name: str, total: int) -> None:
        super().__init__(total)
        self.name = name
        self.began = time.monotonic()
        self._last = 0.0
        from IPython.display import display

        # IPython has no type hints: display() with display_id=True returns a handle.
        self.handle: Any = display(self.bundle(), raw=True, display_id=True)  # type: ignore[no-untyped-call]

    def _refresh(self, advance: int = 0) -> None:
        now = time.monotonic()
        if now - self._last >= NOTEBOOK_REFRESH:
            self._last = now
            self.show()

    def show(self) -> None:
        if self.handle is not None:
            self.handle.update(self.bundle(), raw=True)

    def bundle(self) -> dict[str, str]:
        ended = self.done_count + self.failed_count
        elapsed = int(time.monotonic() - self.began)
        counts = (
            f"{ended}/{self.total} · {self.done_count} done · {self.failed_count} failed · "
            f"{self.running} running · {self.waiting} waiting · "
            + (f"{self.items_text} · " if self.items_total else "")
            + f"{elapsed // 60}:{elapsed % 60:02d}"
        )
        width = 30
        filled = width * ended // self.total if self.total else width
        text = f"{self.name} [{'#' * filled}{'.' * (width - filled)}] {counts}"
        page = (
            '<div style="font-family: monospace">'
            f"<b>{html.escape(self.name)}</b> "
            f'<progress value="{ended}" max="{max(self.total, 1)}" style="width: 20em">'
            f"</progress> {html.escape(counts)}</div>"
        )
        return {"text/plain": text, "text/html": page}


@contextlib.contextmanager
def progress_for(name: str, total: int, show: bool | None) -> Iterator[_Counts]:
    """Counts for *total* runs; drawn when *show*, or by default on a terminal or in a
    notebook."""
    notebook = _in_notebook()
    if show is None:
        show = sys.stderr.isatty() or notebook
    if not show:
        yield _Counts(total)
        return
    if notebook:
        line = _NotebookLine(name, total)
        try:
            yield line
        finally:
            line.show()  # the final counts, whatever the last redraw showed
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
        TextColumn("[dim]{task.fields[waiting]} waiting"),
        TextColumn("[dim]{task.fields[items]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(name, total=total, done=0, failed=0, running=0, waiting=total, items="")
        yield _RichBar(total, bar, task)


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    try:
        ip = shell.get_ipython()
    except Exception:
        return False
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"
