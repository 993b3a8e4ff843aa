"""The ``flowdsl`` command: run flows, draw their graphs, list, inspect and resume runs.

Conventions every command follows:

- Data goes to stdout as JSON (a result, one JSON line per run, ``--json`` listings); what is
  for a person (the live view of a run, progress bars, tables) is drawn with rich, on stderr
  while a run lasts, and only a terminal gets the live parts.
- An error is one line on stderr, ``Error: <message>``, with flowdsl's message as it is.
  Exit codes: 0 success; 1 a run that failed (``StepFailed``, ``CheckpointError``,
  ``CodecError``), or any failed run of ``--inputs``; 2 a usage or configuration error
  (bad arguments, a TARGET that names no flow, bad JSON, ``ConfigError``, ``TracingError``);
  130 interrupted.  ``flowdsl --traceback ...`` adds the full traceback of an error.

TARGET is ``path/to/file.py:flow`` or ``package.module:flow``; see :mod:`flowdsl.cli.load`
for the module name a file gets (the one ``flowdsl resume`` imports again).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import json
import os
import sys
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn, TypeVar

import anyio
import attrs
import click

from .. import __version__, _codec
from .._context.context import Context
from .._define.dsl import Flow
from .._define.graph import Graph, NodeKind
from .._errors import CodecError, ConfigError, FlowError, StepFailed, TracingError
from .._records import NodeRecord, RunRecord, RunStatus, add_usage
from .._urls import hide_credentials
from .live import LiveView, StepTable, format_duration
from .load import TargetError, add_to_path, load_flow, module_name_for_file
from .progress import dynamic_progress
from .ui import ui as ui_command

__all__ = ["call_of", "cli", "derive_run_id", "main", "node_rows", "run_to_json"]

T = TypeVar("T")

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
PREVIEW = 60  # characters of a node's result shown by `runs show`


# --- errors: one line each --------------------------------------------------------------------


class CommandFailed(click.ClickException):
    """An error already worded for the user, with its exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _exit_code_of(exc: FlowError) -> int:
    # Configuration and definition errors are the caller's to fix before anything runs.
    return EXIT_USAGE if isinstance(exc, ConfigError | TracingError) else EXIT_FAILED


class _FlowdslGroup(click.Group):
    """Turns every error into one line on stderr and an exit code (see the module doc)."""

    show_traceback = False

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        _FlowdslGroup.show_traceback = bool(os.environ.get("FLOWDSL_TRACEBACK"))
        try:
            try:
                code = super().main(args, prog_name, complete_var, False, **extra)
            except BaseExceptionGroup as group:
                only = _only_error(group)
                raise only from only.__cause__  # `from None` would erase the leaf's cause
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "flowdsl"
            message = exc.format_message().rstrip(".")
            _fail(f"{message} (see '{where} --help')", EXIT_USAGE, exc)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code, exc)
        except click.Abort as exc:
            _fail("interrupted", EXIT_INTERRUPTED, exc)  # click turns Ctrl-C into Abort
        except FlowError as exc:
            _fail(str(exc), _exit_code_of(exc), exc)
        except KeyboardInterrupt as exc:
            _fail("interrupted", EXIT_INTERRUPTED, exc)
        sys.exit(code if isinstance(code, int) else 0)


def _only_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """The one flowdsl error a task group wrapped, or the group itself if there is more."""
    errors, rest = group.split((FlowError, click.ClickException, KeyboardInterrupt))
    if rest is not None or errors is None:
        return group
    leaves: list[BaseException] = []
    stack: list[BaseException] = [errors]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(reversed(exc.exceptions))
        else:
            leaves.append(exc)
    return leaves[0] if len(leaves) == 1 else group


async def _unwrapped(call: Awaitable[T]) -> T:
    """Await *call*; a task group's wrapping of one flowdsl error is taken off."""
    try:
        return await call
    except BaseExceptionGroup as group:
        only = _only_error(group)
        if only is group:
            raise
        raise only from only.__cause__  # `from None` would erase the error's own cause


def _fail(message: str, code: int, exc: BaseException) -> NoReturn:
    if _FlowdslGroup.show_traceback:
        traceback.print_exception(exc, file=sys.stderr)
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def _usage(message: str) -> NoReturn:
    raise CommandFailed(message, EXIT_USAGE)


# --- the command group ------------------------------------------------------------------------


@click.group(
    cls=_FlowdslGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(
    __version__, "-V", "--version", prog_name="flowdsl", message="%(prog)s %(version)s"
)
@click.option(
    "--traceback",
    is_flag=True,
    help="On an error, print the full traceback too (or set FLOWDSL_TRACEBACK=1).",
)
def cli(traceback: bool) -> None:
    """Run flowdsl flows, draw their graphs, and inspect or resume their runs.

    TARGET is path/to/file.py:flow or package.module:flow.  Results are printed as JSON on
    stdout; on a terminal, a live view of the steps is drawn on stderr.
    """
    if traceback:
        _FlowdslGroup.show_traceback = True


from .signal import signal as _signal_command  # noqa: E402 - the group is defined above

cli.add_command(ui_command)
cli.add_command(_signal_command)


def main(argv: Sequence[str] | None = None) -> None:
    """The ``flowdsl`` console script."""
    cli.main(args=argv, prog_name="flowdsl")


def _store_option(required: bool) -> Callable[[Callable[..., T]], Callable[..., T]]:
    if required:
        text = "The store, e.g. sqlite:///runs.db (or set FLOWDSL_STORE)."
    else:
        text = (
            "Keep the run's journal in this store, e.g. sqlite:///runs.db (or set "
            "FLOWDSL_STORE).  [default: in memory]"
        )
    return click.option(
        "--store", metavar="URL", envvar="FLOWDSL_STORE", required=required, help=text
    )


_backend_option = click.option(
    "--backend",
    type=click.Choice(["asyncio", "trio"]),
    default="asyncio",
    show_default=True,
    envvar="FLOWDSL_BACKEND",
    help="The event loop to run on.",
)
_quiet_option = click.option(
    "--quiet", "-q", is_flag=True, help="No live view or progress bar, even on a terminal."
)
_live_option = click.option(
    "--live", is_flag=True, help="Draw the live view (or progress) even when not on a terminal."
)
_path_option = click.option(
    "--path",
    "paths",
    metavar="DIR",
    multiple=True,
    type=click.Path(exists=True, file_okay=False),
    help="Add DIR to the import path (repeatable); the current directory always is.",
)


# --- flowdsl run ------------------------------------------------------------------------------


@cli.command()
@click.argument("target")
@click.option(
    "--input",
    "input_json",
    metavar="JSON",
    help="The flow's input as JSON ('-' reads stdin).  An object gives keyword "
    "arguments (to a one-parameter flow, only if its keys are that parameter's "
    "name); any other value is the single argument.  Omit it for a flow "
    "without parameters.",
)
@click.option(
    "--inputs",
    "inputs_file",
    metavar="FILE.jsonl",
    type=click.File("r"),
    help="Run once per line of FILE (JSON, as for --input; '-' reads stdin).",
)
@click.option(
    "--output",
    "-o",
    "output",
    metavar="FILE",
    type=click.File("w", lazy=True),
    default="-",
    help="Write the result (JSON lines with --inputs) here.  [default: stdout]",
)
@_store_option(required=False)
@click.option(
    "--run-id",
    metavar="ID",
    help="The run's id; a finished run of that id is not run again.  [default: a new id]",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    metavar="N",
    help="With --inputs: at most N runs at once.",
)
@click.option("--batch", is_flag=True, help="Run in batch mode (a durable queue and workers).")
@click.option(
    "--broker",
    metavar="URL",
    envvar="FLOWDSL_BROKER",
    help="Batch mode's broker: redis://... or nats://... (with --batch).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    metavar="N",
    help="In-process batch workers (with --batch; 0 leaves the steps to "
    "`flowdsl worker` processes).",
)
@_quiet_option
@_live_option
@_backend_option
def run(
    target: str,
    input_json: str | None,
    inputs_file: IO[str] | None,
    output: IO[str],
    store: str | None,
    run_id: str | None,
    concurrency: int | None,
    batch: bool,
    broker: str | None,
    workers: int | None,
    quiet: bool,
    live: bool,
    backend: str,
) -> None:
    """Run the flow TARGET and print its result as JSON.

    \b
    Examples:
      flowdsl run examples/support_triage.py:support_triage \\
          --input '{"id": "T-1", "text": "I was charged twice"}'
      flowdsl run app.flows:triage --inputs tickets.jsonl --store sqlite:///runs.db \\
          -o results.jsonl

    With --inputs, each output line is {"input": ..., "run_id": ..., "result": ...} or
    {"input": ..., "run_id": ..., "error": "..."}; the run ids derive from the flow's name
    and the input, so running the same file again with a durable --store gives the stored
    results instead of running anything twice.
    """
    if input_json is not None and inputs_file is not None:
        _usage("give --input or --inputs, not both")
    if inputs_file is not None and run_id is not None:
        _usage("--run-id names one run; with --inputs each run's id derives from its input")
    flow = load_flow(target)
    options = _ContextOptions(store, batch, broker, workers)
    if inputs_file is not None:
        lines = _read_jsonl(inputs_file)
        show = False if quiet else (True if live else None)
        failed = anyio.run(
            _run_many, flow, lines, options, output, concurrency, show, backend=backend
        )
        if failed:
            raise CommandFailed(f"{failed} of {len(lines)} runs failed", EXIT_FAILED)
        return
    value = (
        _parse_json(sys.stdin.read() if input_json == "-" else input_json, "--input")
        if input_json is not None
        else _NO_INPUT
    )
    args, kwargs = fit_input(flow, value, "--input")
    run_id = run_id or uuid.uuid4().hex[:16]
    show_live = not quiet and (live or sys.stdout.isatty() or sys.stderr.isatty())
    result = anyio.run(_run_one, flow, args, kwargs, run_id, options, show_live, backend=backend)
    _write_json(output, result)


_NO_INPUT: Any = object()


@attrs.frozen
class _ContextOptions:
    """What `flowdsl run` passes to :class:`~flowdsl.Context`."""

    store: str | None
    batch: bool
    broker: str | None
    workers: int | None

    def context(self, on_event: Callable[[Any], None] | None = None) -> Context:
        extra: dict[str, Any] = {}
        if self.broker is not None:
            extra["broker"] = self.broker
        if self.workers is not None:
            extra["workers"] = self.workers
        return Context(store=self.store, batch=self.batch, on_event=on_event, **extra)


def call_of(flow: Flow[..., Any], value: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call a JSON input stands for (see ``flowdsl run --help``).

    A JSON object gives keyword arguments, except to a flow of one parameter when the
    object's keys are not that parameter's name: then the object is the argument itself
    (``{"id": ..., "text": ...}`` for ``triage(ticket: Ticket)``).  Any other value is the
    single positional argument.
    """
    if value is _NO_INPUT:
        return (), {}
    params = flow.signature.parameters
    if isinstance(value, dict) and (len(params) != 1 or value.keys() <= params.keys()):
        return (), value
    return (value,), {}


async def _run_one(
    flow: Flow[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    run_id: str,
    options: _ContextOptions,
    show_live: bool,
) -> Any:
    table = StepTable(flow.graph, run_id) if show_live else None
    ctx = options.context(on_event=table.handle if table is not None else None)
    try:
        with LiveView(table, sys.stderr) if table is not None else contextlib.nullcontext():
            result = await _unwrapped(ctx.run(flow, *args, run_id=run_id, **kwargs))
    except StepFailed as exc:
        raise CommandFailed(_with_resume_hint(str(exc), run_id, ctx.store.url)) from exc
    return _codec.to_data(result, what="the flow's result")


def _with_resume_hint(message: str, run_id: str, store_url: str) -> str:
    if store_url.startswith("memory:") or store_url.endswith(":memory:"):
        return message  # the journal ends with this process: nothing to resume
    return f"{message} (run {run_id!r}: `flowdsl resume {run_id} --store {store_url}`)"


def derive_run_id(flow_name: str, value: Any) -> str:
    """A run id that is the same for the same flow and the same input, in any process."""
    canonical = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    digest = hashlib.sha256(f"{flow_name}\0{canonical}".encode()).hexdigest()
    return digest[:20]


async def _run_many(
    flow: Flow[..., Any],
    lines: list[Any],
    options: _ContextOptions,
    output: IO[str],
    concurrency: int | None,
    show: bool | None,
) -> int:
    """Run every input through ``ctx.map``; write one JSON line each; return the failures."""
    ctx = options.context()
    run_ids = [derive_run_id(flow.name, value) for value in lines]
    # Inputs that do not fit the flow fail alone, as their own line, without a run.
    items: list[Any] = []
    misfits: dict[int, str] = {}
    for i, value in enumerate(lines):
        try:
            items.append(_map_item(flow, value, "input"))
        except CommandFailed as exc:
            misfits[i] = exc.message
    fitting = [i for i in range(len(lines)) if i not in misfits]
    results = await ctx.map(
        flow,
        items,
        concurrency=concurrency,
        return_exceptions=True,
        run_ids=[run_ids[i] for i in fitting],
        progress=show,
    )
    outcome: dict[int, Any] = dict(zip(fitting, results, strict=True))
    failed = 0
    for i, value in enumerate(lines):
        line: dict[str, Any] = {"input": value, "run_id": run_ids[i]}
        result = outcome.get(i)
        if i in misfits:
            line["error"] = misfits[i]
        elif isinstance(result, BaseException):
            line["error"] = str(result)
        else:
            try:
                line["result"] = _codec.to_data(result, what="the flow's result")
            except CodecError as exc:
                line["error"] = str(exc)
        failed += "error" in line
        output.write(json.dumps(line, ensure_ascii=False) + "\n")
    output.flush()
    return failed


def fit_input(
    flow: Flow[..., Any], value: Any, what: str
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call *value* stands for, checked against the flow's signature and annotations
    before anything runs: an input that cannot fit is the caller's mistake (exit 2)."""
    args, kwargs = call_of(flow, value)
    try:
        flow.bind(args, kwargs)
        given = flow.signature.bind(*args, **kwargs).arguments  # without defaults
        types = flow.input_types
        for name, data in given.items():
            _codec.from_data(data, types.get(name, Any), what=f"input {name!r}")
    except (ConfigError, CodecError) as exc:
        raise CommandFailed(
            f"{what} does not fit flow {flow.name!r}: {exc.problem} "
            f"(the flow takes {flow.name}{_signature_text(flow)})",
            EXIT_USAGE,
        ) from exc
    return args, kwargs


def _signature_text(flow: Flow[..., Any]) -> str:
    import inspect

    try:  # `from __future__ import annotations` leaves strings; show the types themselves
        return str(inspect.signature(flow.fn, eval_str=True))
    except Exception:
        return str(flow.signature)


def _map_item(flow: Flow[..., Any], value: Any, what: str) -> Any:
    """*value* as ``ctx.map`` takes it: the single argument, or a dict of keyword arguments."""
    args, kwargs = fit_input(flow, value, what)
    bound = flow.bind(args, kwargs)
    if len(flow.signature.parameters) == 1:
        return next(iter(bound.values()))
    return bound


def _read_jsonl(file: IO[str]) -> list[Any]:
    name = getattr(file, "name", "<stdin>")
    values = []
    for number, line in enumerate(file, 1):
        if line.strip():
            values.append(_parse_json(line, f"{name} line {number}"))
    if not values:
        _usage(f"{name} holds no inputs: write one JSON value per line")
    return values


def _parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        _usage(f"{what} is not valid JSON: {exc}")


def _write_json(output: IO[str], data: Any) -> None:
    indent = 2 if output.isatty() else None
    output.write(json.dumps(data, ensure_ascii=False, indent=indent) + "\n")
    output.flush()


# --- flowdsl graph ----------------------------------------------------------------------------


@cli.command()
@click.argument("target")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["mermaid", "dot"]),
    default="mermaid",
    show_default=True,
    help="Mermaid flowchart or Graphviz DOT.",
)
def graph(target: str, fmt: str) -> None:
    """Print the graph of the flow TARGET.

    \b
    Examples:
      flowdsl graph examples/support_triage.py:support_triage
      flowdsl graph app.flows:triage --format dot | dot -Tsvg > triage.svg
    """
    flow_graph: Graph = load_flow(target).graph
    text = flow_graph.to_mermaid() if fmt == "mermaid" else flow_graph.to_dot()
    click.echo(text, nl=False)


# --- flowdsl runs list / show -----------------------------------------------------------------


@cli.group()
def runs() -> None:
    """List the runs a store keeps, or show one of them node by node."""


@contextlib.asynccontextmanager
async def _opened_store(url: str) -> AsyncIterator[Any]:
    from ..backends import open_store

    store = open_store(url)
    if store.url.startswith("memory:"):
        _usage(
            f"{url} keeps runs only inside one process; name a durable store, "
            "e.g. --store sqlite:///runs.db"
        )
    await store.open()
    try:
        yield store
    finally:
        with anyio.CancelScope(shield=True):
            await store.close()


@runs.command("list")
@_store_option(required=True)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    metavar="N",
    help="Show the N newest runs.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
def runs_list(store: str, limit: int, as_json: bool) -> None:
    """List the newest runs in a store: id, flow, status, started, duration.

    \b
    Example:
      flowdsl runs list --store sqlite:///runs.db --limit 20
    """

    async def fetch() -> list[RunRecord]:
        async with _opened_store(store) as opened:
            found: list[RunRecord] = await opened.list_runs(limit=limit)
            return found

    records = anyio.run(fetch)
    if as_json:
        _write_json(sys.stdout, [run_to_json(r) for r in records])
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(f"runs in {store}"), title_justify="left")
    for column in ("run id", "flow", "status", "started", "duration"):
        table.add_column(
            column, justify="right" if column == "duration" else "left", no_wrap=column == "run id"
        )
    for record in records:
        table.add_row(
            Text(record.run_id),
            Text(record.flow),
            _status_text(record.status),
            _local_time(record.created_at),
            format_duration(_run_duration(record)),
        )
    if not records:
        table.caption = "no runs yet"
    _stdout_console().print(table)


@runs.command("show")
@click.argument("run_id")
@_store_option(required=True)
@click.option(
    "--broker",
    metavar="URL",
    envvar="FLOWDSL_BROKER",
    help="The queue whose dead letters to list.  [default: the store's URL]",
)
@_path_option
@click.option(
    "--json", "as_json", is_flag=True, help="Print the run and its nodes as one JSON object."
)
def runs_show(
    run_id: str, store: str, broker: str | None, paths: tuple[str, ...], as_json: bool
) -> None:
    """Show the run RUN_ID: its record, a table of its nodes, and its dead letters.

    Nodes not run yet (or skipped by a branch) are listed when the run's flow can be
    imported here; otherwise the table lists the nodes the journal holds.  Tasks of a
    batch run that were handed out more times than their step's retries allow are listed
    as dead letters, from the broker (by default the store's URL, for a store that is
    also a queue: sqlite, redis, nats).

    \b
    Example:
      flowdsl runs show 3f9a0c1d2b7e4a55 --store sqlite:///runs.db
    """

    async def fetch() -> tuple[RunRecord, dict[str, NodeRecord], list[dict[str, Any]]]:
        async with _opened_store(store) as opened:
            record = await opened.get_run(run_id)
            if record is None:
                raise CommandFailed(f"no run {run_id!r} in {store} (see `flowdsl runs list`)")
            journal = await opened.load_nodes(run_id)
        return record, journal, await _dead_letters(broker or store, run_id)

    record, journal, dead = anyio.run(fetch)
    for path in paths:
        add_to_path(path)
    graph_ = _graph_or_none(record)
    nodes = node_rows(record, journal, graph_)
    if as_json:
        _write_json(sys.stdout, {"run": run_to_json(record), "nodes": nodes, "dead_letters": dead})
        return
    _print_run(record, nodes, graph_ is not None)
    if dead:
        _print_dead_letters(dead)


async def _dead_letters(url: str, run_id: str) -> list[dict[str, Any]]:
    """The run's dead-lettered tasks, when *url* names a queue; else none."""
    from ..backends import open_broker

    if url.split(":", 1)[0].lower() not in ("sqlite", "redis", "rediss", "nats", "tls"):
        return []
    try:
        queue = open_broker(url)
        await queue.open()
    except FlowError:
        return []
    try:
        letters = await queue.dead_letters(run_id)
    finally:
        await queue.close()
    return [{k: v for k, v in letter.items() if k != "payload"} for letter in letters]


def _print_dead_letters(dead: list[dict[str, Any]]) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text("dead letters", style="red"), title_justify="left")
    for column in ("node", "when", "reason"):
        table.add_column(column, overflow="fold")
    for letter in dead:
        at = letter.get("at")
        table.add_row(
            Text(str(letter.get("node_id", "?"))),
            _local_time(float(at)) if isinstance(at, int | float) else "",
            Text(str(letter.get("reason", ""))),
        )
    _stdout_console().print(table)


def _graph_or_none(record: RunRecord) -> Graph | None:
    """The run's graph, if its flow imports here (any failure only shortens the table)."""
    if record.flow_ref.startswith("__main__:"):
        return None
    try:
        return load_flow(record.flow_ref).graph
    except Exception:
        return None


def node_rows(
    record: RunRecord, journal: dict[str, NodeRecord], graph_: Graph | None
) -> list[dict[str, Any]]:
    """One dict per node: its status, attempts, timings, result and usage."""
    if graph_ is not None:
        order = [n for n in graph_.order if graph_[n].kind is not NodeKind.JOIN]
        order += [n for n in journal if n not in graph_.nodes_by_id]
    else:
        order = sorted(journal, key=lambda n: journal[n].started_at)
        if record.failed_node is not None and record.failed_node not in journal:
            order.append(record.failed_node)
    rows = []
    progress = dynamic_progress(record, journal, graph_)
    for node_id in order:
        node = journal.get(node_id)
        row: dict[str, Any] = {
            "node_id": node_id,
            "status": _node_status(node_id, node, record, journal, graph_),
        }
        if node_id in progress:  # a map's items, a loop's iterations, a wait's signal
            row["progress"] = progress[node_id]
            if node is None and record.status is RunStatus.WAITING:
                row["status"] = "waiting" if "signal" in progress[node_id] else row["status"]
        if node is not None:
            row.update(
                attempts=node.attempts,
                started_at=_iso(node.started_at),
                finished_at=_iso(node.finished_at),
                duration=node.duration,
                result=_json_or_text(node.value),
                usage=node.usage,
            )
        rows.append(row)
    return rows


def _node_status(
    node_id: str,
    node: NodeRecord | None,
    record: RunRecord,
    journal: dict[str, NodeRecord],
    graph_: Graph | None,
) -> str:
    if node is not None:
        return "cached" if node.attempts == 0 else "done"
    if node_id == record.failed_node:
        return "failed"
    if graph_ is not None and node_id in graph_.nodes_by_id:
        for branch, case in graph_[node_id].guard:
            taken = journal.get(branch)
            if taken is not None and _json_or_text(taken.value) != case:
                return "skipped"
    return "not run" if record.status.ended else "pending"


def _print_run(record: RunRecord, nodes: list[dict[str, Any]], complete: bool) -> None:
    from rich.table import Table
    from rich.text import Text

    # Every value is Text, never a str: stored data is shown as it is, not read as markup.
    console = _stdout_console()
    about = [
        ("run", Text(record.run_id)),
        ("flow", Text(f"{record.flow} ({record.flow_ref})")),
        ("status", _status_text(record.status)),
        ("started", Text(_local_time(record.created_at))),
        ("duration", Text(format_duration(_run_duration(record)))),
        ("inputs", Text(_preview(record.inputs, 200))),
    ]
    if record.result is not None:
        about.append(("result", Text(_preview(record.result, 200))))
    if record.error is not None:
        about.append(("error", Text(record.error, style="red")))
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
    for column in columns:
        table.add_column(
            column,
            justify="right" if column in ("attempts", "duration") else "left",
            overflow="fold",
        )
    for row in nodes:
        cells: list[Any] = [
            Text(row["node_id"]),
            _status_text(row["status"]),
            str(row.get("attempts", "")),
            format_duration(row.get("duration")),
            Text(_preview(json.dumps(row["result"], ensure_ascii=False), PREVIEW))
            if "result" in row
            else Text(row.get("progress", ""), style="dim"),
        ]
        if with_usage:
            cells.append(Text(_usage_text(row.get("usage"))))
        table.add_row(*cells)
    if not complete:
        table.caption = "the flow does not import here: only journaled nodes are listed"
    console.print(table)


def run_to_json(record: RunRecord) -> dict[str, Any]:
    """A run record as JSON data (values decoded from their JSON text)."""
    return {
        "run_id": record.run_id,
        "flow": record.flow,
        "flow_ref": record.flow_ref,
        "status": record.status.value,
        "started_at": _iso(record.created_at),
        "updated_at": _iso(record.updated_at),
        "duration": _run_duration(record),
        "inputs": _json_or_text(record.inputs),
        "result": _json_or_text(record.result) if record.result is not None else None,
        "error": record.error,
        "failed_node": record.failed_node,
        "fingerprint": record.fingerprint,
    }


def _run_duration(record: RunRecord) -> float | None:
    # A running run's updated_at says when it last changed, not when it will end.
    return record.updated_at - record.created_at if record.status.ended else None


def _json_or_text(text: str) -> Any:
    try:
        return _codec.loads(text)
    except CodecError:
        return text  # shown as stored; a corrupt record is for `resume` to refuse


def _iso(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, tz=datetime.UTC).isoformat()


def _local_time(at: float) -> str:
    return datetime.datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M:%S")


def _preview(text: str, width: int) -> str:
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


def _status_text(status: RunStatus | str) -> Any:
    from rich.text import Text

    name = status.value if isinstance(status, RunStatus) else status
    return Text(name, style=_STATUS_STYLES.get(name, ""))


def _stdout_console() -> Any:
    from rich.console import Console

    # Off a terminal rich would wrap at 80 columns; a pipe gets whole rows instead.
    width = None if sys.stdout.isatty() else 200
    return Console(file=sys.stdout, width=width)


# --- flowdsl resume ---------------------------------------------------------------------------


@cli.command()
@click.argument("run_id")
@_store_option(required=True)
@click.option(
    "--strict",
    is_flag=True,
    help="Refuse to resume if any step's code or the graph changed since the run.",
)
@click.option(
    "--flow",
    "target",
    metavar="TARGET",
    help="The flow to resume with, when the one the run names does not import "
    "(e.g. a run started from a script run as __main__).",
)
@_path_option
@_quiet_option
@_live_option
@_backend_option
def resume(
    run_id: str,
    store: str,
    strict: bool,
    target: str | None,
    paths: tuple[str, ...],
    quiet: bool,
    live: bool,
    backend: str,
) -> None:
    """Finish the failed, cancelled or crashed run RUN_ID and print its result as JSON.

    Finished nodes are read back from the store and never run again.  The flow is imported
    from the module the run recorded (for a run started with `flowdsl run path/to/file.py:f`,
    that is the file's module name: run from the same directory, or add it with --path).

    \b
    Example:
      flowdsl resume 3f9a0c1d2b7e4a55 --store sqlite:///runs.db
    """
    add_to_path(os.getcwd())
    for path in paths:
        add_to_path(path)
    flow = load_flow(target) if target is not None else None
    show_live = not quiet and (live or sys.stdout.isatty() or sys.stderr.isatty())
    result = anyio.run(_resume, run_id, store, strict, flow, show_live, backend=backend)
    _write_json(sys.stdout, result)


async def _resume(
    run_id: str, store: str, strict: bool, flow: Flow[..., Any] | None, show_live: bool
) -> Any:
    if flow is None:
        async with _opened_store(store) as opened:
            record: RunRecord | None = await opened.get_run(run_id)
        if record is None:
            raise CommandFailed(f"no run {run_id!r} in {store} (see `flowdsl runs list`)")
        flow = _flow_of(record)
    table = StepTable(flow.graph, run_id) if show_live else None
    ctx = Context(store=store, on_event=table.handle if table is not None else None)
    resume_run = getattr(ctx, "resume", None)
    if resume_run is None:
        raise ConfigError("this version of flowdsl cannot resume runs")
    try:
        with LiveView(table, sys.stderr) if table is not None else contextlib.nullcontext():
            result = await _unwrapped(resume_run(run_id, strict=strict, flow=flow))
    except StepFailed as exc:
        raise CommandFailed(
            f"{exc} (fix it, then `flowdsl resume {run_id} --store {store}` again)"
        ) from exc
    return _codec.to_data(result, what="the flow's result")


def _flow_of(record: RunRecord) -> Flow[..., Any]:
    if record.flow_ref.startswith("__main__:"):
        raise TargetError(
            f"run {record.run_id!r} was started by a script run as __main__, so its flow "
            f"{record.flow!r} cannot be imported by name",
            flow=record.flow,
            hint="Name it: `flowdsl resume RUN_ID --flow path/to/script.py:flow`",
        )
    try:
        return load_flow(record.flow_ref)
    except TargetError as exc:
        raise TargetError(
            f"cannot import the flow of run {record.run_id!r} ({record.flow_ref}): {exc.problem}",
            flow=record.flow,
            hint="Run from the directory the run was started in, add it with --path DIR, "
            "or name the flow with --flow TARGET",
        ) from exc


# --- flowdsl worker ---------------------------------------------------------------------------


@cli.command()
@click.option(
    "--broker",
    metavar="URL",
    envvar="FLOWDSL_BROKER",
    required=True,
    help="The queue to take steps from: sqlite:///path.db (the embedded queue), "
    "redis://... or nats://... (or set FLOWDSL_BROKER).",
)
@click.option(
    "--import",
    "imports",
    metavar="MODULE",
    multiple=True,
    required=True,
    help="A module (or path/to/file.py) defining the steps to run (repeatable).",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    metavar="N",
    help="Steps this worker runs at once.",
)
@click.option(
    "--lease",
    type=click.FloatRange(min=0.1),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="How long a task stays this worker's if it stops renewing it (it dies).",
)
@click.option(
    "--store",
    metavar="URL",
    envvar="FLOWDSL_STORE",
    help="The store the runs journal to.  [default: the broker's file, for the "
    "embedded SQLite queue]",
)
@_path_option
def worker(
    broker: str,
    imports: tuple[str, ...],
    concurrency: int,
    lease: float,
    store: str | None,
    paths: tuple[str, ...],
) -> None:
    """Run a batch worker: take ready steps off the broker's queue and run them.

    The worker runs until it is interrupted (Ctrl-C or SIGTERM), then stops taking tasks;
    steps it had taken and not finished go back to the queue when their leases expire.

    \b
    Example:
      flowdsl worker --broker sqlite:///runs.db --import app.flows --concurrency 32
      flowdsl run app.flows:triage --inputs tickets.jsonl --batch --workers 0 \\
          --store sqlite:///runs.db
    """
    add_to_path(os.getcwd())
    for path in paths:
        add_to_path(path)
    modules = tuple(_module_of(name) for name in imports)
    serve = _batch_serve()
    anyio.run(_serve_until_stopped, serve, broker, store, modules, concurrency, lease)


def _module_of(name: str) -> str:
    """An --import value as a module name; a file path is named as `flowdsl run` names it."""
    if not (name.endswith(".py") or "/" in name or os.sep in name):
        return name
    path = Path(name).resolve()
    if not path.is_file():
        _usage(f"--import {name}: no such file")
    module, root = module_name_for_file(path)
    add_to_path(root)
    return module


def _batch_serve() -> Callable[..., Any]:
    try:
        from .._executors import batch
    except ImportError:
        batch = None  # type: ignore[assignment]
    serve: Callable[..., Any] | None = getattr(batch, "serve", None)
    if serve is None:
        raise ConfigError(
            "batch workers are not available yet",
            hint="Run flows in real time with `flowdsl run TARGET` for now",
        )
    return serve


async def _serve_until_stopped(
    serve: Callable[..., Any],
    broker: str,
    store: str | None,
    modules: tuple[str, ...],
    concurrency: int,
    lease: float = 30.0,
) -> None:
    import signal

    # The receiver stays open until the worker has wound down, so that a second Ctrl-C (or
    # the terminal's SIGINT to the whole process group) cannot interrupt the clean-up.
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:
            await tg.start(
                functools.partial(
                    serve,
                    broker,
                    store=store,
                    imports=modules,
                    concurrency=concurrency,
                    lease=lease,
                )
            )
            click.echo(
                f"flowdsl worker: serving {hide_credentials(broker)} ({', '.join(modules)}); "
                "Ctrl-C stops it",
                err=True,
            )
            async for signum in signals:
                click.echo(f"flowdsl worker: {signal.Signals(signum).name}, stopping", err=True)
                tg.cancel_scope.cancel()
                break


from .serve import serve as _serve  # noqa: E402  (a module of its own; registered here)

cli.add_command(_serve)
