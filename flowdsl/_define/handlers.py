"""Exception handlers around step calls in a flow body, refused when the flow is defined.

A flow body runs once, when the flow is defined, with symbolic values: it wires steps into a
graph, and the steps run later, outside it.  A ``try``/``except`` (or a ``with
contextlib.suppress(...)``) around a step call in the body could therefore never catch the
step's failure; it would only make the flow look as if it handled one.  So the body's code
is read before it is traced and such a handler is a :class:`~flowdsl.TracingError` that
says why and what to do instead: retries on the step, or the handling inside a step.

The code is read from its bytecode, which every function has (a notebook cell's or an
``exec``'d string's too), not from its source: a handler is an entry of the code's
exception table whose handler begins with ``PUSH_EXC_INFO`` (what ``try`` and ``with``
compile to on Python 3.11 to 3.13), and a step call inside it is an ``await``
(``GET_AWAITABLE``) in the range it covers.  Nested code (the lambdas and ``async def``
blocks of a branch's cases) is read too.
"""

from __future__ import annotations

import dis
import types
from collections.abc import Iterator
from typing import Any

from .._errors import TracingError

__all__ = ["check_handlers"]

_LOADS = frozenset({"LOAD_GLOBAL", "LOAD_NAME", "LOAD_ATTR", "LOAD_METHOD", "LOAD_DEREF"})


def check_handlers(name: str, fn: Any) -> None:
    """Refuse, with a :class:`TracingError`, a handler around step calls in *fn*'s body."""
    code = getattr(fn, "__code__", None)
    if not isinstance(code, types.CodeType):
        return
    for kind, line in _handlers_around_awaits(code):
        where = f" (line {line})" if line else ""
        construct = "a `with contextlib.suppress(...)`" if kind == "suppress" else "a try block"
        raise TracingError(
            f"{construct} around step calls in the flow body{where} would never catch a "
            "step's failure: the body runs once, when the flow is defined, to wire its "
            "steps into a graph, and the steps run later, outside it",
            flow=name,
            hint="Give the step retries (`@fd.step(retries=3, retry_on=(TimeoutError,))`), "
            "or handle the error inside a step: a step whose own body calls the failing "
            "code in a try/except and returns what the flow should go on with",
        )


def _handlers_around_awaits(code: types.CodeType) -> Iterator[tuple[str, int | None]]:
    """``("try" | "suppress", line)`` for each handler whose range holds an ``await``."""
    instructions = list(dis.get_instructions(code))
    by_offset = {i.offset: n for n, i in enumerate(instructions)}
    # The exception table as dis reads it (3.11+; not in typeshed's stubs).
    entries: list[Any] = getattr(dis.Bytecode(code), "exception_entries", [])
    for entry in entries:
        at = by_offset.get(entry.target)
        if at is None or instructions[at].opname != "PUSH_EXC_INFO":
            continue  # the compiler's own handlers (an await's throw, the coroutine's end)
        covered = [i for i in instructions if entry.start <= i.offset < entry.end]
        awaits = [i for i in covered if i.opname == "GET_AWAITABLE"]
        if not awaits:
            continue
        line = _line(awaits[0])
        after = instructions[at + 1] if at + 1 < len(instructions) else None
        if after is not None and after.opname == "WITH_EXCEPT_START":
            if _suppressing(instructions, by_offset.get(entry.start, 0)):
                yield "suppress", line
            continue  # another context manager: its __exit__ runs at definition time too,
            # but what it does there is its own business (timing, logging)
        yield "try", line
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _handlers_around_awaits(const)


def _suppressing(instructions: list[dis.Instruction], start: int) -> bool:
    """Whether the ``with`` whose body starts at index *start* enters a ``suppress(...)``:
    the context manager is called in the few instructions before its ``BEFORE_WITH``."""
    entered = next(
        (
            n
            for n in range(start, max(start - 4, -1), -1)
            if instructions[n].opname == "BEFORE_WITH"
        ),
        None,
    )
    if entered is None:
        return False
    for n in range(entered - 1, max(entered - 12, -1), -1):
        instr = instructions[n]
        if instr.opname in _LOADS and instr.argval == "suppress":
            return True
        if instr.opname in ("STORE_FAST", "STORE_NAME", "STORE_GLOBAL", "POP_TOP"):
            return False  # the statement before the `with`
    return False


def _line(instr: dis.Instruction) -> int | None:
    positions = getattr(instr, "positions", None)
    return getattr(positions, "lineno", None)
