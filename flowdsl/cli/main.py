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

One module per command (:mod:`.run`, :mod:`.resume`, :mod:`.runs`, :mod:`.graph`,
:mod:`.worker`, :mod:`.ui`, :mod:`.serve`); this one holds the group, the options several
commands share and the error handling every command gets.  ``flowdsl.cli`` adds the
commands to the group.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import IO, Any, NoReturn, TypeVar

import anyio
import click

from .._errors import ConfigError, FlowError, TracingError, leaves
from .._integrity import Seal, seal_from
from .._secret import Secret, redact
from .._urls import hide_credentials
from .._version import __version__
from ..backends import Store, open_store
from .hints import cli_message
from .stores import check_backend

__all__ = ["CommandFailed", "cli", "main"]

T = TypeVar("T")

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

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
            _fail(cli_message(exc), _exit_code_of(exc), exc)
        except KeyboardInterrupt as exc:
            _fail("interrupted", EXIT_INTERRUPTED, exc)
        sys.exit(code if isinstance(code, int) else 0)


def _only_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """The one flowdsl error a task group wrapped, or the group itself if there is more."""
    errors, rest = group.split((FlowError, click.ClickException, KeyboardInterrupt))
    if rest is not None or errors is None:
        return group
    found = leaves(errors)
    return found[0] if len(found) == 1 else group


async def unwrapped(call: Awaitable[T]) -> T:
    """Await *call*; a task group's wrapping of one flowdsl error is taken off."""
    try:
        return await call
    except BaseExceptionGroup as group:
        only = _only_error(group)
        if only is group:
            raise
        raise only from only.__cause__  # `from None` would erase the error's own cause


def shown(text: str) -> str:
    """*text* as it may be printed: credentials in URLs and known secret values masked."""
    return redact(hide_credentials(text))


def _fail(message: str, code: int, exc: BaseException) -> NoReturn:
    if _FlowdslGroup.show_traceback:
        # A traceback quotes messages and source lines: a URL or a secret in one is masked.
        sys.stderr.write(shown("".join(traceback.format_exception(exc))))
    click.echo(f"Error: {shown(message)}", err=True)
    sys.exit(code)


def usage_error(message: str) -> NoReturn:
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


def main(argv: Sequence[str] | None = None) -> None:
    """The ``flowdsl`` console script."""
    cli.main(args=argv, prog_name="flowdsl")


def store_option(required: bool) -> Callable[[Callable[..., T]], Callable[..., T]]:
    # "required" stores are read (runs list/show, resume): without one, the default batch
    # file is read if it exists (see stores.store_or_default).
    if required:
        text = (
            "The store, e.g. sqlite:///runs.db (or set FLOWDSL_STORE).  [default: "
            ".flowdsl/flowdsl.db, where `flowdsl run --batch` keeps its runs, if it exists]"
        )
    else:
        text = (
            "Keep the run's journal in this store, e.g. sqlite:///runs.db (or set "
            "FLOWDSL_STORE).  [default: in memory]"
        )
    return click.option("--store", metavar="URL", envvar="FLOWDSL_STORE", help=text)


backend_option = click.option(
    "--backend",
    type=click.Choice(["asyncio", "trio"]),
    default="asyncio",
    show_default=True,
    envvar="FLOWDSL_BACKEND",
    callback=lambda ctx, param, value: check_backend(value),
    help="The event loop to run on.",
)
quiet_option = click.option(
    "--quiet", "-q", is_flag=True, help="No live view or progress bar, even on a terminal."
)
live_option = click.option(
    "--live", is_flag=True, help="Draw the live view (or progress) even when not on a terminal."
)
path_option = click.option(
    "--path",
    "paths",
    metavar="DIR",
    multiple=True,
    type=click.Path(exists=True, file_okay=False),
    help="Add DIR to the import path (repeatable).",
)
import_option = click.option(
    "--import",
    "imports",
    metavar="MODULE",
    multiple=True,
    help="A module (or path/to/file.py) to import first, defining the run's flow "
    "(repeatable).  Nothing a store holds is ever imported.",
)


def import_modules(names: Sequence[str]) -> tuple[str, ...]:
    """Import the modules the operator named with ``--import`` (a file path is named as
    `flowdsl run` names it, its directory joining the import path)."""
    import importlib

    from .load import module_name_for_file

    modules = []
    for name in names:
        if name.endswith(".py") or "/" in name or os.sep in name:
            from pathlib import Path

            path = Path(name).resolve()
            if not path.is_file():
                usage_error(f"--import {name}: no such file")
            module, root = module_name_for_file(path)
            add_to_path(root)
        else:
            module = name
        try:
            importlib.import_module(module)
        except Exception as exc:
            raise ConfigError(
                f"--import {name}: importing {module!r} failed: {type(exc).__name__}: {exc}",
                hint="Check the module name and the import path (--path DIR, PYTHONPATH)",
            ) from exc
        modules.append(module)
    return tuple(modules)


def add_to_path(directory: str | os.PathLike[str]) -> None:
    from .load import add_to_path as add

    add(directory)


def signing_options(command: Callable[..., T]) -> Callable[..., T]:
    """``--signing-key-env VAR`` and ``--old-signing-key-env VAR`` (see docs/security.md)."""
    command = click.option(
        "--old-signing-key-env",
        "old_signing_key_envs",
        metavar="VAR",
        multiple=True,
        help="An environment variable holding a previous signing key, accepted to verify "
        "what it signed (repeatable; for rotating the key).",
    )(command)
    return click.option(
        "--signing-key-env",
        metavar="VAR",
        envvar="FLOWDSL_SIGNING_KEY_ENV",
        help="The environment variable holding the key that signs and verifies records "
        "and messages (HMAC); workers and clients need the same.",
    )(command)


def signing_keys(env: str | None, old_envs: Sequence[str]) -> dict[str, Any]:
    """The ``signing_key=``/``old_signing_keys=`` of a context, from the variables named."""
    for name in (env, *old_envs):
        if name is not None and not os.environ.get(name):
            usage_error(f"the environment variable {name} (a signing key) is not set")
    if env is None:
        if old_envs:
            usage_error("--old-signing-key-env needs --signing-key-env (the current key)")
        return {}
    return {"signing_key": Secret(env), "old_signing_keys": [Secret(n) for n in old_envs]}


def seal_of(env: str | None, old_envs: Sequence[str], *, reading: bool = False) -> Seal:
    """The seal the signing options make; *reading* (a display) accepts signed records it
    has no key for rather than refuse them."""
    keys = signing_keys(env, old_envs)
    if not keys:
        return Seal(trust_signed=reading)
    return seal_from(keys["signing_key"], keys["old_signing_keys"])


def parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        usage_error(f"{what} is not valid JSON: {exc}")
    except RecursionError:
        usage_error(f"{what} is nested too deeply")


def write_json(output: IO[str], data: Any) -> None:
    indent = 2 if output.isatty() else None
    output.write(json.dumps(data, ensure_ascii=False, indent=indent) + "\n")
    output.flush()


@contextlib.asynccontextmanager
async def opened_store(url: str, seal: Seal | None = None) -> AsyncIterator[Store]:
    store = open_store(url)
    if store.url.startswith("memory:"):
        usage_error(
            f"{hide_credentials(url)} keeps runs only inside one process; name a durable "
            "store, e.g. --store sqlite:///runs.db"
        )
    if seal is not None:
        store.seal = seal
    await store.open()
    try:
        yield store
    finally:
        with anyio.CancelScope(shield=True):
            await store.close()
