"""The live view of one run on a terminal: a table of its steps, updated from its events.

``on_event`` is called synchronously in the run's event loop, while rich's ``Live`` redraws
from its own thread several times a second; a lock keeps the redraw from reading a row
halfway through an update.  Rendering reads only this module's state, never the run.
"""

from __future__ import annotations

import threading
import time
from typing import IO, Any

import attrs

from .. import events as ev
from .._define.graph import Graph, NodeKind

__all__ = ["LiveView", "StepTable", "rerun_reason"]

_STYLES = {
    "waiting": "dim",
    "running": "cyan",
    "retrying": "yellow",
    "done": "green",
    "reused": "green",
    "skipped": "dim",
    "failed": "bold red",
}
TOKEN_TAIL = 400  # characters of streamed LLM text kept per node for display


@attrs.define
class Row:
    node_id: str
    status: str = "waiting"
    attempt: int = 0
    started: float | None = None
    duration: float | None = None
    detail: str = ""
    tokens: str = ""
    rerun: str = ""  # why a resume runs the node again: "changed" or "upstream"

    @property
    def note(self) -> str:
        if self.detail or not self.rerun:
            return self.detail
        verb = "re-ran" if self.status == "done" else "runs again"
        return f"{verb}: {rerun_reason(self.rerun)}"


def rerun_reason(reason: str) -> str:
    """What a ``StepInvalidated`` reason means, for a person."""
    return {
        "changed": "its code changed",
        "upstream": "a node it depends on changed",
    }.get(reason, reason)


class StepTable:
    """The state of a run's steps as its events report it; renders as a rich table."""

    def __init__(self, graph: Graph, run_id: str) -> None:
        self.flow = graph.flow
        self.run_id = run_id
        self.status = "running"
        self.rows: dict[str, Row] = {
            node_id: Row(node_id)
            for node_id in graph.order
            if graph[node_id].kind is not NodeKind.JOIN  # joins run no code: nothing to show
        }
        self._lock = threading.Lock()

    def handle(self, event: Any) -> None:
        """Update from one event (``fd.Context(on_event=table.handle)``)."""
        with self._lock:
            self._apply(event)

    def _row(self, node_id: str) -> Row:
        row = self.rows.get(node_id)
        if row is None:  # a node the graph did not list; show it anyway
            row = self.rows[node_id] = Row(node_id)
        return row

    def _apply(self, event: Any) -> None:
        if isinstance(event, ev.RunFinished):
            self.status = "done"
        elif isinstance(event, ev.RunFailed):
            self.status = "cancelled" if event.cancelled else "failed"
        elif isinstance(event, ev.RunStarted):
            self.status = "resuming" if event.resumed else "running"
        elif event.node_id is not None:
            self._apply_step(self._row(event.node_id), event)

    def _apply_step(self, row: Row, event: Any) -> None:
        if isinstance(event, ev.StepStarted):
            if row.started is None:
                row.started = event.at
            row.status, row.attempt, row.detail = "running", event.attempt, ""
        elif isinstance(event, ev.StepFinished):
            row.status, row.attempt, row.duration = "done", event.attempt, event.duration
        elif isinstance(event, ev.StepRetrying):
            row.status, row.attempt = "retrying", event.attempt
            row.detail = f"{event.error} (again in {event.delay:.1f}s)"
        elif isinstance(event, ev.StepFailed):
            row.status, row.attempt, row.detail = "failed", event.attempt, event.error
            if row.started is not None:
                row.duration = event.at - row.started
        elif isinstance(event, ev.StepSkipped):
            row.status = "skipped"
        elif isinstance(event, ev.StepReused):
            row.status, row.detail = "reused", f"from the {event.reason}"
        elif isinstance(event, ev.StepInvalidated):
            row.status, row.rerun = "waiting", event.reason
        elif isinstance(event, ev.BranchTaken):
            row.detail = f"case {event.case!r}"
        elif isinstance(event, ev.TokenDelta):
            row.tokens = (row.tokens + event.text)[-TOKEN_TAIL:]

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        with self._lock:
            rows = [attrs.evolve(row) for row in self.rows.values()]
            status = self.status
        rerun = sum(1 for row in rows if row.rerun)
        if rerun:
            status += f" · {rerun} node{'s' * (rerun > 1)} ran again after code changes"
        now = time.time()
        table = Table(
            title=Text.assemble("flow ", (self.flow, "bold"), f" · run {self.run_id} · {status}"),
            title_justify="left",
            expand=False,
        )
        width = max((len(row.node_id) for row in rows), default=4)
        table.add_column("node", no_wrap=True, min_width=min(width, 48))
        table.add_column("status")
        table.add_column("attempt", justify="right")
        table.add_column("duration", justify="right")
        table.add_column("note", overflow="fold", max_width=60)
        for row in rows:
            duration = row.duration
            if (
                duration is None
                and row.started is not None
                and row.status in ("running", "retrying")
            ):
                duration = now - row.started
            # Text, not str: a node id or an error message is data, never rich markup.
            table.add_row(
                Text(row.node_id),
                Text(row.status, style=_STYLES.get(row.status, "")),
                str(row.attempt) if row.attempt else "",
                format_duration(duration),
                Text(row.note),
            )
        streams = [
            Panel(
                Text(row.tokens), title=Text(row.node_id), title_align="left", border_style="cyan"
            )
            for row in rows
            if row.tokens and row.status in ("running", "retrying")
        ]
        return Group(table, *streams) if streams else table


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"


class LiveView:
    """A :class:`StepTable` redrawn on *file* (stderr) while the run lasts."""

    def __init__(
        self, table: StepTable, file: IO[str], *, force_terminal: bool | None = None
    ) -> None:
        self.table = table
        self.file = file
        self.force_terminal = force_terminal

    def __enter__(self) -> StepTable:
        from rich.console import Console
        from rich.live import Live

        console = self._console = Console(file=self.file, force_terminal=self.force_terminal)
        # Live redirects prints made by steps to above the table while it is drawn.
        self._live = Live(self.table, console=console, refresh_per_second=8)
        self._live.__enter__()
        return self.table

    def __exit__(self, *exc_info: Any) -> None:
        self._live.__exit__(*exc_info)
        if not self._console.is_terminal:
            self._console.line()  # off a terminal Live draws once, at the end, unterminated
