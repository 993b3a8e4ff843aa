"""Errors as the command line tells them: a hint names a command to type, not a Python call.

flowdsl's errors carry hints written for Python callers (``ctx.resume('r-1')``,
``strict=True``).  On the command line the same advice is a ``flowdsl`` command or option;
:func:`cli_message` rewrites the hint of an error before it is printed.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

from .._errors import FlowError
from .._urls import hide_credentials

__all__ = ["cli_message", "resume_command"]


def resume_command(run_id: str, store: str) -> str:
    """The command that resumes *run_id* from *store* (its credentials hidden)."""
    return f"flowdsl resume {run_id} --store {hide_credentials(store)} --import MODULE"


def cli_message(exc: FlowError, store: str | None = None, *, resume: bool = True) -> str:
    """*exc*'s message with its hint as a command line user needs it.

    *store*, when known, completes the ``flowdsl resume`` commands a hint suggests; with
    ``resume=False`` a hint to resume is left out (the caller says it its own way).
    """
    hint = exc.hint
    if not hint:
        return str(exc)
    if not resume:
        hint = _RESUME.sub("", hint).strip() or None
    for pattern, replace in _REWRITES:
        if hint is not None:
            hint = pattern.sub(functools.partial(_apply, replace, store), hint)
    if hint == exc.hint:
        return str(exc)
    return str(FlowError(exc.problem, flow=exc.flow, node=exc.node, hint=hint))


def _apply(
    replace: Callable[[re.Match[str], str | None], str], store: str | None, match: re.Match[str]
) -> str:
    return replace(match, store)


_RESUME = re.compile(r"Resume it with `ctx\.resume\('([^']*)'\)`")


def _resume(match: re.Match[str], store: str | None) -> str:
    command = resume_command(match[1], store) if store else f"flowdsl resume {match[1]}"
    return f"Resume it: `{command}`"


_REWRITES: list[tuple[re.Pattern[str], Callable[[re.Match[str], str | None], str]]] = [
    (_RESUME, _resume),
    (re.compile(r"without strict=True"), lambda m, s: "without --strict"),
    (
        re.compile(r"`?ctx\.resume\(run_id, flow=my_flow\)`?"),
        lambda m, s: "`flowdsl resume RUN_ID --flow path/to/file.py:flow`",
    ),
    (re.compile(r"fd\.Context\(batch=True, workers=N\)"), lambda m, s: "`--workers N`"),
]
