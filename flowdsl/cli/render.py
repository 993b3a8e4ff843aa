"""How the commands show runs to a person: rich tables and text on stdout.

Every value drawn is a :class:`rich.text.Text`, never a str: stored data is shown as it is,
not read as markup.
"""

from __future__ import annotations

import datetime
import json
import sys
from typing import Any

from .. import _codec
from .._errors import CodecError
from .._records import RunRecord, RunStatus, add_usage
from .live import format_duration, rerun_reason

__all__ = [
    "iso",
    "json_or_text",
    "local_time",
    "print_dead_letters",
    "print_run",
    "run_duration",
    "status_text",
    "stdout_console",
]

PREVIEW = 60  # characters of a node's result shown by `runs show`


def print_dead_letters(dead: list[dict[str, Any]]) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text("dead letters", style="red"), title_justify="left")
    for column in ("node", "when", "reason"):
        table.add_column(column, overflow="fold")
    for letter in dead:
        at = letter.get("at")
        table.add_row(
            Text(str(letter.get("node_id", "?"))),
            local_time(float(at)) if isinstance(at, int | float) else "",
            Text(str(letter.get("reason", ""))),
        )
    stdout_console().print(table)


def print_batch_jobs(jobs: list[dict[str, Any]]) -> None:
    """The provider batch jobs holding a run's requests, as the store last saw them."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text("provider batch jobs (batch price)"), title_justify="left")
    for column in ("provider", "job", "status", "requests", "counts"):
        table.add_column(column, overflow="fold")
    for job in jobs:
        mine, total = job["run_requests"], job["requests"]
        counts = " ".join(f"{k}={n}" for k, n in job["counts"].items() if n)
        table.add_row(
            Text(job["provider"]),
            Text(job["job_id"]),
            Text(job["status"], style="" if job["ended"] else "cyan"),
            Text(f"{mine} of {total}" if job["shared"] else str(total)),
            Text(counts),
        )
    stdout_console().print(table)


def print_run(
    record: RunRecord, nodes: list[dict[str, Any]], complete: bool, *, traceback: bool = False
) -> None:
    from rich.table import Table
    from rich.text import Text

    # Every value is Text, never a str: stored data is shown as it is, not read as markup.
    console = stdout_console()
    about = [
        ("run", Text(record.run_id)),
        ("flow", Text(f"{record.flow} ({record.flow_ref})")),
        ("status", status_text(record.status)),
        ("started", Text(local_time(record.created_at))),
        ("duration", Text(format_duration(run_duration(record)))),
        ("inputs", Text(preview(record.inputs, 200))),
    ]
    if record.result is not None:
        about.append(("result", Text(preview(record.result, 200))))
    if record.error is not None:
        about.append(("error", Text(record.error, style="red")))
    if record.traceback is not None and not traceback:
        about.append(("traceback", Text("kept: add --traceback to see it", style="dim")))
    total = _total_usage(nodes)
    if total:
        about.append(("usage", Text(_usage_text(total))))
    for key, value in about:
        console.print(Text.assemble((f"{key:<10}", "bold"), value), soft_wrap=True)
    table = Table(title_justify="left")
    columns = ["node", "status", "attempts", "duration", "result"]
    with_usage = any(row.get("usage") for row in nodes)
    if with_usage:  # LLM token counts and costs, when a step reported any
        columns.append("usage")
    with_notes = any("rerun" in row for row in nodes)
    if with_notes:  # nodes a resume ran again, and why
        columns.append("note")
    for column in columns:
        table.add_column(
            column,
            justify="right" if column in ("attempts", "duration") else "left",
            overflow="fold",
        )
    for row in nodes:
        cells: list[Any] = [
            Text(row["node_id"]),
            status_text(row["status"]),
            str(row.get("attempts", "")),
            format_duration(row.get("duration")),
            Text(preview(json.dumps(row["result"], ensure_ascii=False), PREVIEW))
            if "result" in row
            else Text(row.get("progress", ""), style="dim"),
        ]
        if with_usage:
            cells.append(Text(_usage_text(row.get("usage"))))
        if with_notes:
            rerun = row.get("rerun")
            cells.append(Text(f"re-ran on resume: {rerun_reason(rerun)}" if rerun else ""))
        table.add_row(*cells)
    if not complete:
        table.caption = "the flow does not import here: only journaled nodes are listed"
    console.print(table)
    if traceback and record.traceback is not None:
        where = f" of node {record.failed_node}" if record.failed_node else ""
        console.print(Text(f"traceback{where}:", style="bold"))
        console.print(Text(record.traceback.rstrip("\n"), style="red"), soft_wrap=True)


def run_duration(record: RunRecord) -> float | None:
    # A running run's updated_at says when it last changed, not when it will end.
    return record.updated_at - record.created_at if record.status.ended else None


def json_or_text(text: str) -> Any:
    try:
        return _codec.loads(text)
    except CodecError:
        return text  # shown as stored; a corrupt record is for `resume` to refuse


def iso(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, tz=datetime.UTC).isoformat()


def local_time(at: float) -> str:
    return datetime.datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M:%S")


def preview(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _total_usage(nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's LLM usage: every node's numbers summed per key."""
    total: dict[str, Any] = {}
    for row in nodes:
        add_usage(total, row.get("usage") or {})
    # Costs are floats: sums like 0.1 + 0.2 read better rounded.
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in total.items()}


def _usage_text(usage: dict[str, Any] | None) -> str:
    if not usage:
        return ""
    return " ".join(f"{key}={value}" for key, value in usage.items())


_STATUS_STYLES = {
    "finished": "green",
    "done": "green",
    "cached": "green",
    "failed": "bold red",
    "cancelled": "yellow",
    "running": "cyan",
    "waiting": "magenta",
    "pending": "dim",
    "not run": "dim",
    "skipped": "dim",
}


def status_text(status: RunStatus | str) -> Any:
    from rich.text import Text

    name = status.value if isinstance(status, RunStatus) else status
    return Text(name, style=_STATUS_STYLES.get(name, ""))


def stdout_console() -> Any:
    from rich.console import Console

    # Off a terminal rich would wrap at 80 columns; a pipe gets whole rows instead.
    width = None if sys.stdout.isatty() else 200
    return Console(file=sys.stdout, width=width)
