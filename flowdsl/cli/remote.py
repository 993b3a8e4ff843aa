"""``flowdsl runs list`` and ``runs show`` with ``--server grpc://host:port``: runs as a
``flowdsl serve`` service reports them, through ``fd.Client``.

The service's replies are turned into store records (:class:`RunRecord`,
:class:`NodeRecord`) so that both commands print them as they print a store's.  What the
service does not send is left empty: a run's inputs and graph fingerprint, a node's code
hash and start time (a node's start is its finish less its duration).

grpc is imported when a command asks for a service, not when the ``flowdsl`` command loads.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Collection, Iterator
from typing import Any, TypeVar

import anyio
import click

from .. import _codec
from .._records import NodeRecord, RunRecord, RunStatus
from .main import CommandFailed, usage_error

__all__ = [
    "check_server_use",
    "records_from_service",
    "run_from_service",
    "server_options",
]

T = TypeVar("T")


def server_options(command: Callable[..., T]) -> Callable[..., T]:
    """``--server URL``, ``--token-env VAR`` and ``--tls-ca FILE``."""
    command = click.option(
        "--tls-ca",
        metavar="FILE",
        type=click.Path(exists=True, dir_okay=False),
        help="With --server: the certificate (PEM) to trust for the service's TLS, if not "
        "the system's.  Implies TLS.",
    )(command)
    command = click.option(
        "--token-env",
        metavar="VAR",
        help="With --server: send the token held by the environment variable VAR "
        "(`flowdsl serve --token-env`).",
    )(command)
    return click.option(
        "--server",
        metavar="URL",
        help="Ask a `flowdsl serve` service instead of reading a store: grpc://host:port "
        "(grpcs:// for TLS).  Not with --store.",
    )(command)


def check_server_use(
    server: str | None,
    token_env: str | None,
    tls_ca: str | None,
    *,
    store_given: bool,
    signing: bool,
    broker: str | None = None,
) -> str | None:
    """The token to send; a usage error for options that do not go with ``--server``."""
    if server is None:
        for name, value in (("--token-env", token_env), ("--tls-ca", tls_ca)):
            if value is not None:
                usage_error(f"{name} goes with --server (a service); a store needs neither")
        return None
    if store_given:
        usage_error(
            "--server and --store are mutually exclusive: the service reads its own store "
            "(give one of them)"
        )
    if signing:
        usage_error(
            "--signing-key-env goes with --store: with --server, the service verifies "
            "records with its own key (`flowdsl serve --signing-key-env`)"
        )
    if broker is not None:
        usage_error("--broker goes with --store: dead letters are not listed through --server")
    if token_env is None:
        return None
    token = os.environ.get(token_env, "")
    if not token:
        usage_error(f"--token-env {token_env}: the environment variable {token_env} is not set")
    return token


def records_from_service(
    url: str,
    *,
    token: str | None = None,
    ca_cert: str | None = None,
    statuses: Collection[str] = (),
    limit: int = 50,
) -> list[RunRecord]:
    """The newest *limit* runs a service lists (of one of *statuses*, if any), as store
    records, so that ``flowdsl runs list --server URL`` can print them as it prints a
    store's."""
    # The service filters by one status; by several, the pages are filtered here.
    one = next(iter(statuses)) if len(statuses) == 1 else None

    async def fetch() -> list[Any]:
        runs: list[Any] = []
        page_token = ""
        async with _client(url, token, ca_cert) as client:
            while len(runs) < limit:
                size = min(max(limit - len(runs), 50 if statuses and not one else 1), 1000)
                page = await client.list(status=one, page_size=size, page_token=page_token)
                runs.extend(r for r in page.runs if not statuses or r.status in statuses)
                page_token = page.next_page_token
                if not page_token:
                    break
        return runs[:limit]

    return [_record(info) for info in _ask(url, token, fetch)]


def run_from_service(
    url: str, run_id: str, *, token: str | None = None, ca_cert: str | None = None
) -> tuple[RunRecord, dict[str, NodeRecord]]:
    """The run *run_id* as a service reports it, and its finished nodes.

    The nodes are told by the run's events (``WatchRun``), which end when the run ends:
    for a run still going, only the record is asked for, and the nodes are left empty.
    """

    async def fetch() -> tuple[Any, dict[str, NodeRecord]]:
        async with _client(url, token, ca_cert) as client:
            info = await client.get(run_id)
            nodes: dict[str, NodeRecord] = {}
            if not info.ended:
                return info, nodes
            async for event in client.watch(run_id):
                if event.type == "StepFinished" and event.node_id:
                    nodes[event.node_id] = _node(event.node_id, event.data)
            return info, nodes

    info, nodes = _ask(url, token, fetch)
    return _record(info), nodes


@contextlib.asynccontextmanager
async def _client(url: str, token: str | None, ca_cert: str | None) -> Any:
    from ..service import Client

    async with Client(url, token=token, ca_cert=ca_cert) as client:
        yield client


def _ask(url: str, token: str | None, fetch: Callable[[], Any]) -> Any:
    """Run *fetch* on asyncio (grpc.aio); a failed call as one line for the user."""
    with _worded(url, token):
        return anyio.run(fetch, backend="asyncio")


@contextlib.contextmanager
def _worded(url: str, token: str | None) -> Iterator[None]:
    from ..service import ServiceError

    try:
        yield
    except ServiceError as exc:
        if exc.code == "UNAVAILABLE":
            message = (
                f"cannot reach the service at {url}: {exc.problem} (is `flowdsl serve` "
                "running there, and does it speak TLS exactly when the URL says grpcs:// "
                "or --tls-ca is given?)"
            )
        elif exc.code == "UNAUTHENTICATED":
            fix = (
                "check the token in the variable --token-env names"
                if token
                else "pass the service's token with --token-env VAR"
            )
            message = f"the service at {url} refused the call: {exc.problem} ({fix})"
        else:
            message = f"the service at {url} answered {exc.code}: {exc.problem}"
        raise CommandFailed(message) from exc


def _record(info: Any) -> RunRecord:
    return RunRecord(
        run_id=info.run_id,
        flow=info.flow_name,
        flow_ref=info.flow,
        fingerprint="",
        inputs="",
        status=RunStatus(info.status),
        created_at=info.created_at,
        updated_at=info.updated_at,
        result=None if info.result is None else _codec.dumps(info.result),
        error=info.error,
        failed_node=info.failed_node,
    )


def _node(node_id: str, data: dict[str, Any]) -> NodeRecord:
    finished = float(data.get("at") or 0.0)
    duration = float(data.get("duration") or 0.0)
    return NodeRecord(
        node_id=node_id,
        value=_codec.dumps(data.get("result")),
        attempts=int(data.get("attempt") or 0),
        started_at=finished - duration,
        finished_at=finished,
    )
