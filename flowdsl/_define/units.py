"""Units by name: the registry of steps and branches, and lookup by ``module:qualname``.

Every step and branch registers itself here when it is decorated, under its ``ref``
(``module:qualname``); one decorated again under the same ref (its notebook cell run
again, its module reloaded) replaces the older one, and is what flows run from then on, in
every mode: the tracer takes each step by its ref (:func:`current`) and a flow traced
before the change is traced again on its next use (``Flow.graph``).  A worker finds a
task's step in the registry: steps defined in this process (a notebook, a test) or in the
modules the operator told it to import (``flowdsl worker --import MODULE``).  A resume
without a flow finds the run's flow among the modules already imported (:func:`find_ref`).
A ref read from a task or a run record is data: nothing here ever imports the module it
names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

from .._errors import ConfigError
from .graph import Unit

__all__ = [
    "current",
    "find_ref",
    "redefinitions",
    "ref_of",
    "register",
    "registered_unit",
    "superseded",
]

U = TypeVar("U", bound=Unit)

_UNITS: dict[str, Unit] = {}
# How many times a module-level step or branch was decorated again under a ref already
# taken (a notebook cell run again, after a fix): flows traced before then look for
# stale steps in their graph (see Flow.graph).
_REDEFINED = 0


def ref_of(fn: Callable[..., Any]) -> str:
    """Where *fn* can be imported from: ``module:qualname``."""
    return f"{fn.__module__}:{fn.__qualname__}"


def register(unit: Unit) -> None:
    """Make *unit* known under its ref; a unit decorated again replaces the older one."""
    if unit.ref in _UNITS and _by_name(unit):
        global _REDEFINED
        _REDEFINED += 1
    _UNITS[unit.ref] = unit


def redefinitions() -> int:
    """How many module-level units were defined again so far, in this process."""
    return _REDEFINED


def _by_name(unit: Unit) -> bool:
    # A step made inside a function (a factory's) is its own thing, whatever its name.
    return "<locals>" not in unit.ref


def current(unit: U) -> U:
    """The definition in force of *unit*: for a module-level step or branch, the one last
    decorated under its ``module:qualname`` (a cell run again, a module reloaded), which is
    what a batch worker runs; a step made inside a function is itself."""
    if not _by_name(unit):
        return unit
    found = _UNITS.get(unit.ref)
    return cast(U, found) if found is not None else unit


def superseded(unit: Unit) -> bool:
    """Whether *unit* was defined again since: flows using it must be traced again."""
    return current(unit) is not unit


def registered_unit(ref: str) -> Unit | None:
    """The step or branch defined in this process under ``module:qualname``, if any."""
    return _UNITS.get(ref)


def find_ref(
    ref: str, *, what: str, flow: str | None = None, node: str | None = None, otherwise: str
) -> Any:
    """The object ``module:qualname`` names, in a module this process has imported already.

    For refs read from a store or a queue (data, which whoever can write there may have
    edited): unlike :func:`import_ref` this never imports anything.  A ref whose module is
    not loaded raises :class:`ConfigError` saying *otherwise*.
    """
    import sys

    module_name, _, qualname = ref.partition(":")
    if "<locals>" in qualname:
        raise ConfigError(
            f"{what} is defined inside a function ({ref}), so it cannot be found by name",
            flow=flow,
            node=node,
            hint=f"Move it to a module's top level, or {otherwise}",
        )
    obj: Any = sys.modules.get(module_name)
    if obj is None:
        raise ConfigError(
            f"{what} is {ref!r}, and module {module_name!r} is not imported in this process "
            "(what a store or a queue names is never imported)",
            flow=flow,
            node=node,
            hint=otherwise[:1].upper() + otherwise[1:],
        )
    try:
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except AttributeError as exc:
        raise ConfigError(
            f"{what} is not found at {ref!r}: {exc}",
            flow=flow,
            node=node,
            hint=otherwise[:1].upper() + otherwise[1:],
        ) from exc
    return obj
