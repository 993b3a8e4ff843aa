"""``flowdsl signal RUN_ID NAME --value JSON``: send a value to a run's ``fd.wait_for``."""

from __future__ import annotations

import json
import sys

import anyio
import click

from .._integrity import Seal
from .._urls import hide_credentials
from .main import seal_of, signing_options, store_option
from .stores import store_or_default

__all__ = ["signal"]


@click.command()
@click.argument("run_id")
@click.argument("name")
@click.option(
    "--value",
    "value",
    metavar="JSON",
    default="null",
    show_default=True,
    help="The signal's value as JSON; it is decoded as the type the wait names.",
)
@store_option(required=True)
@signing_options
def signal(
    run_id: str,
    name: str,
    value: str,
    store: str | None,
    signing_key_env: str | None,
    old_signing_key_envs: tuple[str, ...],
) -> None:
    """Send signal NAME with a JSON value to the run RUN_ID.

    A wait for NAME in the run (`fd.wait_for(NAME, type)`) takes it, now if the run is
    waiting in a live process, or when the run is resumed (`flowdsl resume RUN_ID`); a
    signal sent before the run reaches its wait is kept for it.  Each signal is taken once.

    \b
    Example:
      flowdsl signal 3f9a0c1d2b7e4a55 approval --value '{"ok": true}' --store sqlite:///runs.db
    """
    try:
        json.loads(value)
    except ValueError as exc:
        raise click.UsageError(f"--value is not JSON: {exc}") from None
    store = store_or_default(store)
    seal = seal_of(signing_key_env, old_signing_key_envs, reading=True)
    index = anyio.run(_send, store, run_id, name, value, seal)
    click.echo(json.dumps({"run_id": run_id, "signal": name, "index": index}), file=sys.stdout)


async def _send(url: str, run_id: str, name: str, value: str, seal: Seal) -> int:
    from .._context.signals import send_signal
    from ..backends import open_store

    store = open_store(url)
    if store.url.startswith("memory:"):
        raise click.UsageError(
            f"{hide_credentials(url)} keeps runs only inside one process; name a durable store, "
            "e.g. --store sqlite:///runs.db"
        )
    store.seal = seal
    await store.open()
    try:
        return await send_signal(store, run_id, name, value)
    finally:
        with anyio.CancelScope(shield=True):
            await store.close()
