"""``flowdsl serve``: the run service over gRPC, until SIGINT or SIGTERM.

grpc is imported when the command runs, not when the ``flowdsl`` command loads, so the
other commands work without the ``serve`` extra.
"""

from __future__ import annotations

import gc
import os
import signal
from typing import Any

import anyio
import click

from .._errors import ConfigError
from .._urls import hide_credentials
from .load import add_to_path
from .main import signing_keys, signing_options
from .providers import llm_option, provider_of

__all__ = ["serve"]


@click.command()
@click.option(
    "--store",
    metavar="URL",
    envvar="FLOWDSL_STORE",
    required=True,
    help="The store the runs journal to, e.g. sqlite:///runs.db (or set FLOWDSL_STORE).",
)
@click.option(
    "--broker",
    metavar="URL",
    envvar="FLOWDSL_BROKER",
    help="Drive runs in batch mode through this broker: sqlite:///..., redis://... or "
    "nats://... (or set FLOWDSL_BROKER).  [default: real time, in this process]",
)
@click.option(
    "--import",
    "imports",
    metavar="MODULE",
    multiple=True,
    required=True,
    help="A module (or path/to/file.py) whose flows to serve (repeatable).  Requests name "
    "flows by module:qualname; no other module is ever imported.",
)
@click.option(
    "--listen",
    metavar="HOST:PORT",
    default="127.0.0.1:50051",
    show_default=True,
    help="Where to listen (port 0: any free port, printed at start).",
)
@click.option(
    "--token-env",
    metavar="VAR",
    help="Require `authorization: Bearer <token>` on every call, the token being the "
    "value of the environment variable VAR.",
)
@click.option(
    "--tls-cert",
    metavar="FILE",
    type=click.Path(exists=True, dir_okay=False),
    help="Serve TLS with this certificate chain (PEM); needs --tls-key.",
)
@click.option(
    "--tls-key",
    metavar="FILE",
    type=click.Path(exists=True, dir_okay=False),
    help="The certificate's private key (PEM).",
)
@click.option(
    "--max-message-bytes",
    type=click.IntRange(min=64 * 1024),
    default=4 * 1024 * 1024,
    show_default=True,
    metavar="N",
    help="The largest request or reply; larger ones fail with RESOURCE_EXHAUSTED.",
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    metavar="SECONDS",
    help="On SIGINT/SIGTERM, how long runs may take to end before they are handed back "
    "(left running, for the next service to take up).",
)
@click.option(
    "--take-over-every",
    type=click.FloatRange(min=0, min_open=True),
    default=2.0,
    show_default=True,
    metavar="SECONDS",
    help="How often to look for unfinished runs whose driver is gone (another service "
    "that died) and take them up; the run lease keeps replicas from both driving a run.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    metavar="N",
    help="With --broker: in-process batch workers (0 leaves the steps to `flowdsl worker`).",
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
def serve(
    store: str,
    broker: str | None,
    imports: tuple[str, ...],
    listen: str,
    token_env: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    max_message_bytes: int,
    grace: float,
    take_over_every: float,
    workers: int | None,
    paths: tuple[str, ...],
    llm_ref: str | None,
    signing_key_env: str | None,
    old_signing_key_envs: tuple[str, ...],
) -> None:
    """Serve the flows of MODULEs over gRPC (flowdsl.v1.Flows, health, reflection).

    The service runs the runs it starts and, when it starts, takes up the runs the store
    has as running.  Stop it with Ctrl-C or SIGTERM.  Its runs' LLM provider is --llm
    MODULE:ATTR, an object of one of the --import modules: cancelling a run (CancelRun)
    cancels the provider batch jobs that hold only its requests.

    \b
    Example:
      FLOWDSL_TOKEN=s3cret flowdsl serve --store sqlite:///runs.db \\
          --import app.flows --listen 127.0.0.1:50051 --token-env FLOWDSL_TOKEN
    """
    add_to_path(os.getcwd())
    for path in paths:
        add_to_path(path)
    token = _token(token_env)
    tls = _tls(tls_cert, tls_key)
    keys = signing_keys(signing_key_env, old_signing_key_envs)
    try:
        from ..service._flows import FlowRegistry
        from ..service.server import open_service
    except ImportError as exc:
        raise ConfigError(
            f"flowdsl serve needs grpcio ({exc})", hint="Install it: pip install 'flowdsl[serve]'"
        ) from exc
    from .worker import _module_of

    flows = FlowRegistry.from_modules(imports)
    llm = provider_of(llm_ref, tuple(_module_of(name) for name in imports))
    options: dict[str, Any] = {
        "store": store,
        "broker": broker,
        "listen": listen,
        "token": token,
        "tls": tls,
        "max_message_bytes": max_message_bytes,
        "grace": grace,
        "take_over_every": take_over_every,
        "workers": workers,
        "llm": llm,
        **keys,
    }
    anyio.run(_serve_until_stopped, open_service, flows, options, backend="asyncio")


async def _serve_until_stopped(open_service: Any, flows: Any, options: dict[str, Any]) -> None:
    # The receiver stays open until the service has wound down, so a second Ctrl-C cannot
    # interrupt the hand-back of the runs still going.
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_service(flows, **options) as serving:
            # What start-up made (modules, flows, grpc) lives as long as the process: out
            # of the collector's way, a full collection stops the service for a fraction of
            # the time (70 ms at the worst before, under the benchmark's load).
            gc.freeze()
            scheme = "grpcs" if options["tls"] else "grpc"
            taken = serving.runs.driving
            click.echo(
                f"flowdsl serve: listening on {scheme}://{serving.address} "
                f"(store {hide_credentials(options['store'])}; flows {', '.join(flows.refs)}"
                + (f"; took up {len(taken)} running run(s)" if taken else "")
                + "); Ctrl-C stops it",
                err=True,
            )
            async for signum in signals:
                click.echo(f"flowdsl serve: {signal.Signals(signum).name}, stopping", err=True)
                break
    click.echo("flowdsl serve: stopped", err=True)


def _token(var: str | None) -> str | None:
    if var is None:
        return None
    token = os.environ.get(var, "")
    if not token:
        raise ConfigError(
            f"--token-env {var}: the environment variable {var} is not set or empty",
            hint=f"Set {var} to the token clients must send",
        )
    return token


def _tls(cert: str | None, key: str | None) -> tuple[bytes, bytes] | None:
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ConfigError(
            "--tls-cert and --tls-key go together", hint="Give both, or neither for plain text"
        )
    with open(cert, "rb") as c, open(key, "rb") as k:
        return c.read(), k.read()
