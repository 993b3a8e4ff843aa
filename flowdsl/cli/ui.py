"""``flowdsl ui``: serve the run inspector (see :mod:`flowdsl.ui`)."""

from __future__ import annotations

import importlib
import ipaddress
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import click

from .._errors import ConfigError
from .._urls import hide_credentials
from .load import add_to_path, module_name_for_file
from .main import signing_keys, signing_options, store_option
from .providers import llm_option, provider_of
from .stores import store_or_default

__all__ = ["parse_listen", "ui"]

DEFAULT_LISTEN = "127.0.0.1:8765"


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:8765`` for IPv6) as a pair; a usage error otherwise."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(
            f"{text!r} is not HOST:PORT (e.g. {DEFAULT_LISTEN})", param_hint="--listen"
        )
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _import(name: str) -> ModuleType:
    """An --import value: a module name, or a file named as `flowdsl run` names it."""
    if name.endswith(".py") or "/" in name or os.sep in name:
        path = Path(name).resolve()
        if not path.is_file():
            raise click.BadParameter(f"no such file: {name}", param_hint="--import")
        module, root = module_name_for_file(path)
        add_to_path(root)
        name = module
    try:
        return importlib.import_module(name)
    except Exception as exc:
        raise ConfigError(
            f"cannot import {name!r}: {type(exc).__name__}: {exc}",
            hint="Check the module name and the import path (--path DIR)",
        ) from exc


@click.command("ui")
@store_option(required=True)
@click.option(
    "--broker",
    metavar="URL",
    envvar="FLOWDSL_BROKER",
    help="The queue of batch runs: their dead letters, and resumes through its workers.",
)
@click.option(
    "--listen",
    metavar="HOST:PORT",
    default=DEFAULT_LISTEN,
    show_default=True,
    help="Where to serve the page; loopback unless you mean to share it.",
)
@click.option(
    "--token-env",
    metavar="VAR",
    help="Require the token held by environment variable VAR on every request.",
)
@click.option(
    "--import",
    "imports",
    metavar="MODULE",
    multiple=True,
    help="A module (or path/to/file.py) whose flows to know: their runs get a graph and "
    "can be resumed (repeatable).",
)
@click.option(
    "--path",
    "paths",
    metavar="DIR",
    multiple=True,
    type=click.Path(exists=True, file_okay=False),
    help="Add DIR to the import path (repeatable); the current directory always is.",
)
@llm_option
@signing_options
def ui(
    store: str | None,
    broker: str | None,
    listen: str,
    token_env: str | None,
    imports: tuple[str, ...],
    paths: tuple[str, ...],
    llm_ref: str | None,
    signing_key_env: str | None,
    old_signing_key_envs: tuple[str, ...],
) -> None:
    """Serve the run inspector: the runs of a store, each run's graph with live node
    statuses, its nodes' arguments, results, errors, timings, tokens and cost; resume,
    cancel and signal from the page.

    Runs of the flows in --import modules show their whole graph; other runs show the
    nodes their journal holds (a flow is never imported because a run record names it).
    With --signing-key-env, records are verified with the key and what a resume writes
    is signed with it (docs/security.md).  With --llm MODULE:ATTR (a provider object of
    an --import module), cancelling a run cancels the provider batch jobs only it holds.

    \b
    Example:
      flowdsl ui --store sqlite:///runs.db --import app.flows
      FLOWDSL_UI_TOKEN=$(openssl rand -hex 16) \\
          flowdsl ui --store redis://127.0.0.1:6379/0 --listen 0.0.0.0:8765 \\
          --token-env FLOWDSL_UI_TOKEN
    """
    import anyio

    from ..ui import create_app, serve
    from ..ui.security import LOOPBACK_HOSTS

    host, port = parse_listen(listen)
    store = store_or_default(store)
    keys = signing_keys(signing_key_env, old_signing_key_envs)
    if store.split(":", 1)[0].lower() == "memory":
        raise click.BadParameter(
            f"{store} keeps runs only inside one process; name a durable store, e.g. "
            "sqlite:///runs.db",
            param_hint="--store",
        )
    token = None
    if token_env is not None:
        token = os.environ.get(token_env, "")
        if not token:
            raise click.BadParameter(
                f"environment variable {token_env} is not set (or empty)", param_hint="--token-env"
            )
    add_to_path(os.getcwd())
    for path in paths:
        add_to_path(path)
    modules: list[Any] = [_import(name) for name in imports]
    llm = provider_of(llm_ref, [module.__name__ for module in modules])
    loopback = is_loopback(host)
    app = create_app(
        store,
        broker,
        token,
        flows=modules,
        # On loopback, answer to loopback names only (a DNS-rebinding page cannot read it).
        allowed_hosts=LOOPBACK_HOSTS if loopback else None,
        llm=llm,
        **keys,
    )
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/"
    click.echo(f"flowdsl ui: {hide_credentials(store)} at {url} (Ctrl-C stops it)", err=True)
    if token_env is not None:
        click.echo(f"  log in at {url}?token=<the value of ${token_env}>", err=True)
    elif not loopback:
        click.echo(
            "  warning: listening beyond loopback without --token-env: anyone who can reach "
            "this port can see the runs and act on them",
            err=True,
        )
    anyio.run(serve, app, host, port)
