"""``flowdsl runs list``, ``show``, ``cancel`` and ``prune``: what a store keeps about runs.

None of them imports anything a store names: a run's flow is looked up among the modules
given with ``--import`` (``runs show``), never imported because its record says so.
"""

from __future__ import annotations

import sys
from typing import Any

import anyio
import attrs
import click

from .._define.dsl import Flow
from .._define.graph import Graph, NodeKind
from .._define.units import find_ref
from .._errors import FlowError
from .._records import NodeRecord, RunRecord, RunStatus
from .._urls import hide_credentials
from ..backends import open_broker
from ..backends._retention import ENDED, parse_duration
from ..llm._batch_runs import run_jobs
from .live import format_duration
from .load import add_to_path
from .main import (
    CommandFailed,
    import_modules,
    import_option,
    opened_store,
    path_option,
    seal_of,
    signing_options,
    store_option,
    usage_error,
    write_json,
)
from .progress import dynamic_progress
from .providers import llm_option, provider_of
from .remote import check_server_use, records_from_service, run_from_service, server_options
from .render import (
    iso,
    json_or_text,
    local_time,
    print_batch_jobs,
    print_dead_letters,
    print_run,
    run_duration,
    status_text,
    stdout_console,
)
from .stores import STATUSES, runs_with_status, store_or_default

__all__ = ["node_rows", "run_to_json", "runs"]


@click.group()
def runs() -> None:
    """List the runs a store keeps, or show one of them node by node."""


@runs.command("list")
@store_option(required=True)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    metavar="N",
    help="Show the N newest runs.",
)
@click.option(
    "--status",
    "statuses",
    type=click.Choice(STATUSES),
    multiple=True,
    help="Only runs of this status (repeatable).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
@signing_options
@server_options
def runs_list(
    store: str | None,
    limit: int,
    statuses: tuple[str, ...],
    as_json: bool,
    signing_key_env: str | None,
    old_signing_key_envs: tuple[str, ...],
    server: str | None,
    token_env: str | None,
    tls_ca: str | None,
) -> None:
    """List the newest runs in a store (or that a service reports): id, flow, status,
    started, duration.

    \b
    Examples:
      flowdsl runs list --store sqlite:///runs.db --limit 20
      flowdsl runs list --status failed
      flowdsl runs list --server grpc://127.0.0.1:50051 --token-env FLOWDSL_TOKEN
    """
    token = check_server_use(
        server,
        token_env,
        tls_ca,
        store_given=_given("store"),
        signing=_given("signing_key_env") or _given("old_signing_key_envs"),
    )
    if server is not None:
        where = server
        records = records_from_service(
            server, token=token, ca_cert=tls_ca, statuses=statuses, limit=limit
        )
    else:
        store = where = store_or_default(store)
        seal = seal_of(signing_key_env, old_signing_key_envs, reading=True)

        async def fetch() -> list[RunRecord]:
            async with opened_store(store, seal) as opened:
                return await runs_with_status(opened, statuses, limit)

        records = anyio.run(fetch)
    if as_json:
        write_json(sys.stdout, [run_to_json(r) for r in records])
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(f"runs in {hide_credentials(where)}"), title_justify="left")
    for column in ("run id", "flow", "status", "started", "duration"):
        table.add_column(
            column, justify="right" if column == "duration" else "left", no_wrap=column == "run id"
        )
    for record in records:
        table.add_row(
            Text(record.run_id),
            Text(record.flow),
            status_text(record.status),
            local_time(record.created_at),
            format_duration(run_duration(record)),
        )
    if not records:
        table.caption = f"no {' or '.join(statuses)} runs" if statuses else "no runs yet"
    stdout_console().print(table)


@runs.command("show")
@click.argument("run_id")
@store_option(required=True)
@click.option(
    "--broker",
    metavar="URL",
    envvar="FLOWDSL_BROKER",
    help="The queue whose dead letters to list.  [default: the store's URL]",
)
@path_option
@import_option
@click.option(
    "--json", "as_json", is_flag=True, help="Print the run and its nodes as one JSON object."
)
@click.option(
    "--traceback",
    "show_traceback",
    is_flag=True,
    help="Print the traceback of the step that failed the run (kept in its record).",
)
@signing_options
@server_options
def runs_show(
    run_id: str,
    store: str | None,
    broker: str | None,
    paths: tuple[str, ...],
    imports: tuple[str, ...],
    as_json: bool,
    show_traceback: bool,
    signing_key_env: str | None,
    old_signing_key_envs: tuple[str, ...],
    server: str | None,
    token_env: str | None,
    tls_ca: str | None,
) -> None:
    """Show the run RUN_ID: its record, a table of its nodes, its provider batch jobs and
    its dead letters (with --traceback, the traceback of the step that failed it).

    Nodes not run yet (or skipped by a branch) are listed when the run's flow is in a
    module given with --import; otherwise the table lists the nodes the journal holds (the
    module a run record names is never imported).  Tasks of a
    batch run that were handed out more times than their step's retries allow are listed
    as dead letters, from the broker (by default the store's URL, for a store that is
    also a queue: sqlite, redis, nats).  The run's provider batch jobs (batch_api=) are
    listed as the store last saw them: the provider, the job id, its status and request
    counts; the usage's cost is at the batch price.

    With --server, the run is asked of a service: its nodes are the ones its events
    tell (once the run has ended), and no dead letters are listed.

    \b
    Examples:
      flowdsl runs show 3f9a0c1d2b7e4a55 --store sqlite:///runs.db
      flowdsl runs show 3f9a0c1d2b7e4a55 --server grpc://127.0.0.1:50051
    """
    token = check_server_use(
        server,
        token_env,
        tls_ca,
        store_given=_given("store"),
        signing=_given("signing_key_env") or _given("old_signing_key_envs"),
        broker=broker if _given("broker") else None,
    )
    dead: list[dict[str, Any]] = []
    jobs: list[dict[str, Any]] = []
    if server is not None:
        record, journal = run_from_service(server, run_id, token=token, ca_cert=tls_ca)
    else:
        record, journal, dead, jobs = _from_store(
            store_or_default(store), broker, run_id, signing_key_env, old_signing_key_envs
        )
    for path in paths:
        add_to_path(path)
    import_modules(imports)
    graph_ = _graph_or_none(record)
    nodes = node_rows(record, journal, graph_)
    if as_json:
        run = {**run_to_json(record), "traceback": record.traceback}
        shown = {"run": run, "nodes": nodes, "batch_jobs": jobs}
        write_json(sys.stdout, {**shown, "dead_letters": dead})
        return
    print_run(record, nodes, graph_ is not None, traceback=show_traceback)
    if jobs:
        print_batch_jobs(jobs)
    if dead:
        print_dead_letters(dead)


def _given(option: str) -> bool:
    """Whether *option* was given on the command line (not from the environment)."""
    from click.core import ParameterSource

    source = click.get_current_context().get_parameter_source(option)
    return source is ParameterSource.COMMANDLINE


def _from_store(
    store: str,
    broker: str | None,
    run_id: str,
    signing_key_env: str | None,
    old_signing_key_envs: tuple[str, ...],
) -> tuple[RunRecord, dict[str, NodeRecord], list[dict[str, Any]], list[dict[str, Any]]]:
    seal = seal_of(signing_key_env, old_signing_key_envs, reading=True)

    async def fetch() -> tuple[RunRecord, dict[str, NodeRecord], list[dict[str, Any]], Any]:
        async with opened_store(store, seal) as opened:
            record = await opened.get_run(run_id)
            if record is None:
                raise CommandFailed(
                    f"no run {run_id!r} in {hide_credentials(store)} (see `flowdsl runs list`)"
                )
            journal = await opened.load_nodes(run_id)
            jobs = [attrs.asdict(job) for job in await run_jobs(opened, run_id)]
        return record, journal, await _dead_letters(broker or store, run_id), jobs

    return anyio.run(fetch)


async def _dead_letters(url: str, run_id: str) -> list[dict[str, Any]]:
    """The run's dead-lettered tasks, when *url* names a queue; else none."""
    try:  # the scheme table says which URLs name a queue: any other is refused here
        queue = open_broker(url)
        await queue.open()
    except FlowError:
        return []
    try:
        letters = await queue.dead_letters(run_id)
    finally:
        await queue.close()
    return [{k: v for k, v in letter.items() if k != "payload"} for letter in letters]


def _graph_or_none(record: RunRecord) -> Graph | None:
    """The run's graph, if its flow is in a module imported here (by --import): what the
    record names is looked up, never imported.  Not found, the table is only shorter."""
    try:
        flow = find_ref(record.flow_ref, what="the flow", otherwise="")
    except FlowError:
        return None
    return flow.graph if isinstance(flow, Flow) else None


@runs.command("cancel")
@click.argument("run_id")
@store_option(required=True)
@path_option
@import_option
@llm_option
@signing_options
def runs_cancel(
    run_id: str,
    store: str | None,
    paths: tuple[str, ...],
    imports: tuple[str, ...],
    llm_ref: str | None,
    signing_key_env: str | None,
    old_signing_key_envs: tuple[str, ...],
) -> None:
    """Cancel the run RUN_ID, and the provider batch jobs that hold only its requests.

    The run is marked cancelled in the store (`flowdsl resume` takes it up again); a
    process still driving it is not interrupted, but its steps waiting on the cancelled
    jobs fail.  The jobs are cancelled through --llm MODULE:ATTR, the provider object of
    an --import module (whichever process submitted them); jobs other runs share are left
    to run.

    \b
    Example:
      flowdsl runs cancel 3f9a0c1d2b7e4a55 --store sqlite:///runs.db \\
          --import app.flows --llm app.flows:llm
    """
    from .._context.cancel import cancel_run

    store = store_or_default(store)
    seal = seal_of(signing_key_env, old_signing_key_envs)
    for path in paths:
        add_to_path(path)
    llm = provider_of(llm_ref, import_modules(imports))

    async def cancel() -> tuple[list[str], list[str]]:
        async with opened_store(store, seal) as opened:
            cancelled = await cancel_run(opened, llm, run_id)
            left = [j.job_id for j in await run_jobs(opened, run_id) if not j.ended]
        return cancelled, [j for j in left if j not in cancelled]

    cancelled, running = anyio.run(cancel)
    click.echo(f"run {run_id} cancelled", err=True)
    if cancelled:
        click.echo(f"provider batch jobs cancelled: {', '.join(cancelled)}", err=True)
    if running:
        hint = "" if llm is not None else " (pass --llm MODULE:ATTR to cancel its own)"
        click.echo(
            f"provider batch jobs still running: {', '.join(running)}"
            f"{hint}; jobs other runs share are left to run",
            err=True,
        )


@runs.command("prune")
@store_option(required=True)
@click.option(
    "--older-than",
    "older_than",
    metavar="DURATION",
    required=True,
    help="Delete ended runs last updated longer ago than this: 90s, 15m, 12h, 30d, 2w.",
)
@click.option(
    "--status",
    "statuses",
    type=click.Choice(sorted(s.value for s in ENDED)),
    multiple=True,
    help="Only runs that ended so (repeatable).  [default: finished, failed and cancelled]",
)
@click.option("--json", "as_json", is_flag=True, help="Print the pruned run ids as JSON.")
@signing_options
def runs_prune(
    store: str | None,
    older_than: str,
    statuses: tuple[str, ...],
    as_json: bool,
    signing_key_env: str | None,
    old_signing_key_envs: tuple[str, ...],
) -> None:
    """Delete the ended runs of a store older than DURATION, with their journals.

    A run still running (or waiting) is never deleted, however old.  Stores can also
    delete ended runs by themselves: ?ttl=7d on a Redis or NATS URL.

    \b
    Example:
      flowdsl runs prune --store sqlite:///runs.db --older-than 30d --status finished
    """
    store = store_or_default(store)
    try:
        seconds = parse_duration(older_than)
    except ValueError as exc:
        usage_error(f"--older-than: {exc}")
    wanted = frozenset(RunStatus(s) for s in statuses) if statuses else None
    seal = seal_of(signing_key_env, old_signing_key_envs, reading=True)

    async def prune() -> list[str]:
        async with opened_store(store, seal) as opened:
            return await opened.prune(older_than=seconds, statuses=wanted)

    pruned = anyio.run(prune)
    if as_json:
        write_json(sys.stdout, pruned)
        return
    click.echo(
        f"pruned {len(pruned)} run(s) from {hide_credentials(store)}"
        + (f": {', '.join(pruned)}" if pruned else ""),
        err=True,
    )


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
            if node is None and "signal" in progress[node_id]:
                row["status"] = "waiting"
        if node is not None:
            row.update(
                attempts=node.attempts,
                started_at=iso(node.started_at),
                finished_at=iso(node.finished_at),
                duration=node.duration,
                result=json_or_text(node.value),
                usage=node.usage,
            )
        if node_id in record.code:  # a resume ran it again after a code change
            row["rerun"] = record.code[node_id]
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
            if taken is not None and json_or_text(taken.value) != case:
                return "skipped"
    return "not run" if record.status.ended else "pending"


def run_to_json(record: RunRecord) -> dict[str, Any]:
    """A run record as JSON data (values decoded from their JSON text)."""
    return {
        "run_id": record.run_id,
        "flow": record.flow,
        "flow_ref": record.flow_ref,
        "status": record.status.value,
        "started_at": iso(record.created_at),
        "updated_at": iso(record.updated_at),
        "duration": run_duration(record),
        "inputs": json_or_text(record.inputs),
        "result": json_or_text(record.result) if record.result is not None else None,
        "error": record.error,
        "failed_node": record.failed_node,
        "fingerprint": record.fingerprint,
    }
