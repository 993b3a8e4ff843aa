"""``flowdsl worker``: a batch worker process."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any

import anyio
import click

from .._executors.batch import DEFAULT_ASYNC_CONCURRENCY, DEFAULT_MAX_DELIVERIES, serve
from .._urls import hide_credentials
from .load import add_to_path, module_name_for_file
from .main import path_option, seal_of, signing_options, usage_error
from .providers import llm_option, provider_of

__all__ = ["worker"]


@click.command()
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
    help="Sync steps (plain functions, run in threads) this worker runs at once.",
)
@click.option(
    "--async-concurrency",
    type=click.IntRange(min=1),
    default=DEFAULT_ASYNC_CONCURRENCY,
    show_default=True,
    metavar="N",
    help="Tasks this worker holds at once: async steps waiting on I/O (LLM calls), "
    "finished tasks being committed, sync steps waiting for a thread.",
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
    "--max-deliveries",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_DELIVERIES,
    show_default=True,
    metavar="N",
    help="How many times a task may be handed out to workers that die (or lose its lease) "
    "before it is dead-lettered as a poison task; a run's own fd.Context(max_deliveries=...) "
    "wins.",
)
@click.option(
    "--store",
    metavar="URL",
    envvar="FLOWDSL_STORE",
    help="The store the runs journal to.  [default: the broker's URL: its file, for the "
    "embedded SQLite queue, or its Redis or NATS server]",
)
@llm_option
@path_option
@signing_options
def worker(
    broker: str,
    imports: tuple[str, ...],
    concurrency: int,
    async_concurrency: int,
    lease: float,
    max_deliveries: int,
    store: str | None,
    llm_ref: str | None,
    paths: tuple[str, ...],
    signing_key_env: str | None,
    old_signing_key_envs: tuple[str, ...],
) -> None:
    """Run a batch worker: take ready steps off the broker's queue and run them.

    The worker runs until it is interrupted (Ctrl-C or SIGTERM), then stops taking tasks;
    steps it had taken and not finished go back to the queue when their leases expire.  A
    step whose record is committed never runs again, however often its task comes back.

    The worker runs only the steps of the modules given with --import: a task naming any
    other step is refused, without importing anything, and dead-lettered.  The current
    directory is not on its import path (a file planted there could shadow a module),
    unless an --import names a file in it; add directories with --path DIR.  Its steps'
    LLM provider is --llm MODULE:ATTR, an object of one of those modules: give it one
    with batch_api= and the worker sends its batch runs' calls as provider batch jobs.

    \b
    Example:
      flowdsl worker --broker sqlite:///runs.db --import app.flows --path . --concurrency 32
      flowdsl run app.flows:triage --inputs tickets.jsonl --batch --workers 0 \\
          --store sqlite:///runs.db
    """
    _leave_current_directory()
    for path in paths:
        add_to_path(path)
    modules = tuple(_module_of(name) for name in imports)
    seal = seal_of(signing_key_env, old_signing_key_envs)
    llm = provider_of(llm_ref, modules)
    options = (lease, seal, max_deliveries, llm, async_concurrency)
    anyio.run(_serve_until_stopped, broker, store, modules, concurrency, options)


def _leave_current_directory() -> None:
    """Take the current directory off the import path (``python -m`` puts it first)."""
    here = os.path.abspath(os.getcwd())
    sys.path[:] = [p for p in sys.path if p and os.path.abspath(p) != here]


def _module_of(name: str) -> str:
    """An --import value as a module name; a file path is named as `flowdsl run` names it."""
    if not (name.endswith(".py") or "/" in name or os.sep in name):
        return name
    path = Path(name).resolve()
    if not path.is_file():
        usage_error(f"--import {name}: no such file")
    module, root = module_name_for_file(path)
    add_to_path(root)
    return module


async def _serve_until_stopped(
    broker: str,
    store: str | None,
    modules: tuple[str, ...],
    concurrency: int,
    options: tuple[Any, ...] = (
        30.0,
        None,
        DEFAULT_MAX_DELIVERIES,
        None,
        DEFAULT_ASYNC_CONCURRENCY,
    ),
) -> None:
    import signal

    lease, seal, max_deliveries, llm, async_concurrency = options

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
                    async_concurrency=async_concurrency,
                    lease=lease,
                    seal=seal,
                    max_deliveries=max_deliveries,
                    llm=llm,
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
