"""``flowdsl run``: one run of a flow, or one run per line of an inputs file."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import uuid
from collections.abc import Callable
from typing import IO, Any

import anyio
import attrs
import click

from .. import _codec
from .._context.context import Context
from .._define.dsl import Flow
from .._errors import CodecError, ConfigError, FlowError, StepFailed
from .._urls import hide_credentials
from .hints import cli_message
from .live import LiveView, StepTable
from .load import load_flow
from .main import (
    EXIT_FAILED,
    EXIT_USAGE,
    CommandFailed,
    backend_option,
    live_option,
    parse_json,
    quiet_option,
    signing_keys,
    signing_options,
    store_option,
    unwrapped,
    usage_error,
    write_json,
)

__all__ = ["call_of", "derive_run_id", "fit_input", "run"]


@click.command()
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
    type=click.File("rb"),
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
@store_option(required=False)
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
@quiet_option
@live_option
@backend_option
@signing_options
def run(
    target: str,
    input_json: str | None,
    inputs_file: IO[bytes] | None,
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
    signing_key_env: str | None,
    old_signing_key_envs: tuple[str, ...],
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
        usage_error("give --input or --inputs, not both")
    if inputs_file is not None and run_id is not None:
        usage_error("--run-id names one run; with --inputs each run's id derives from its input")
    flow = load_flow(target)
    keys = signing_keys(signing_key_env, old_signing_key_envs)
    options = _ContextOptions(store, batch, broker, workers, keys, target.rpartition(":")[0])
    if inputs_file is not None:
        lines = _read_jsonl(inputs_file)
        show = False if quiet else (True if live else None)
        failed, url = anyio.run(
            _run_many, flow, lines, options, output, concurrency, show, backend=backend
        )
        if failed:
            message = f"{failed} of {len(lines)} runs failed"
            if not (url.startswith("memory:") or url.endswith(":memory:")):
                message += (
                    f" (once fixed: `flowdsl resume --all-failed --store "
                    f"{hide_credentials(url)} --import {options.module}`)"
                )
            raise CommandFailed(message, EXIT_FAILED)
        return
    value = (
        parse_json(_stdin_text() if input_json == "-" else input_json, "--input")
        if input_json is not None
        else _NO_INPUT
    )
    args, kwargs = fit_input(flow, value, "--input")
    run_id = run_id or uuid.uuid4().hex[:16]
    show_live = not quiet and (live or sys.stdout.isatty() or sys.stderr.isatty())
    result = anyio.run(_run_one, flow, args, kwargs, run_id, options, show_live, backend=backend)
    write_json(output, result)


_NO_INPUT: Any = object()


@attrs.frozen
class _ContextOptions:
    """What `flowdsl run` passes to :class:`~flowdsl.Context`."""

    store: str | None
    batch: bool
    broker: str | None
    workers: int | None
    keys: dict[str, Any]  # signing_key= and old_signing_keys=, if given
    module: str  # TARGET's module or file, which a resume imports again

    def context(self, on_event: Callable[[Any], None] | None = None) -> Context:
        extra: dict[str, Any] = dict(self.keys)
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
            result = await unwrapped(ctx.run(flow, *args, run_id=run_id, **kwargs))
    except StepFailed as exc:
        message = cli_message(exc, resume=False)
        hint = _with_resume_hint(message, run_id, ctx.store.url, options.module)
        raise CommandFailed(hint) from exc
    return _codec.to_data(result, what="the flow's result")


def _with_resume_hint(message: str, run_id: str, store_url: str, module: str) -> str:
    if store_url.startswith("memory:") or store_url.endswith(":memory:"):
        return message  # the journal ends with this process: nothing to resume
    command = f"flowdsl resume {run_id} --store {hide_credentials(store_url)} --import {module}"
    return f"{message} (run {run_id!r}: `{command}`)"


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
) -> tuple[int, str]:
    """Run every input through ``ctx.map``; write one JSON line each; return the failures
    and the store's URL."""
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
        elif isinstance(result, FlowError):
            line["error"] = cli_message(result, ctx.store.url)
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
    return failed, ctx.store.url


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
            # What the run will do with it: a value the codec cannot carry (nested too
            # deeply, say) is the caller's to fix.
            _codec.to_data(data, what=f"input {name!r}")
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


def _stdin_text() -> str:
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        usage_error(
            f"--input - (stdin) is not UTF-8 text: byte {exc.start} is {data[exc.start]:#x}"
        )


def _read_jsonl(file: IO[bytes]) -> list[Any]:
    name = getattr(file, "name", "<stdin>")
    if name in ("-", "<stdin>"):
        name = "stdin"
    values = []
    for number, raw in enumerate(file, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            usage_error(
                f"{name} line {number} is not UTF-8 text (byte {exc.start + 1} of the line)"
            )
        if line.strip():
            values.append(parse_json(line, f"{name} line {number}"))
    if not values:
        usage_error(f"{name} holds no inputs: write one JSON value per line")
    return values
