"""Units by name: the registry of steps and branches, and import by ``module:qualname``.

Every step and branch registers itself here when it is decorated, under its ``ref``
(``module:qualname``).  An in-process worker finds a task's step in the registry, so steps
defined in a notebook or a test run too; a worker in another process imports the module
the ref names (:func:`import_unit`), and a resume without a flow imports the run's flow
the same way (:func:`import_ref`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from .._errors import ConfigError
from .graph import Unit

__all__ = [
    "find_ref",
    "import_ref",
    "import_unit",
    "redefinitions",
    "ref_of",
    "register",
    "registered_unit",
]

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
    if unit.ref in _UNITS and "<locals>" not in unit.ref:
        global _REDEFINED
        _REDEFINED += 1
    _UNITS[unit.ref] = unit


def redefinitions() -> int:
    """How many module-level units were defined again so far, in this process."""
    return _REDEFINED


def registered_unit(ref: str) -> Unit | None:
    """The step or branch defined in this process under ``module:qualname``, if any."""
    return _UNITS.get(ref)


def import_ref(
    ref: str,
    *,
    what: str,
    flow: str | None = None,
    node: str | None = None,
    otherwise: str,
    main: bool = False,
) -> Any:
    """The object ``module:qualname`` names, importing its module if need be.

    *what* names the object in messages (``"the flow of run 'x'"``), *otherwise* says what
    the caller can do instead (``"pass the flow: ..."``); both end up in the
    :class:`ConfigError` raised when the ref cannot be imported in this process.  A ref in
    ``__main__`` is refused unless *main* is true: only the process that ran that script
    has that ``__main__``.
    """
    module_name, _, qualname = ref.partition(":")
    if "<locals>" in qualname:
        raise ConfigError(
            f"{what} is defined inside a function ({ref}), which cannot be imported",
            flow=flow,
            node=node,
            hint=f"Move it to a module's top level, or {otherwise}",
        )
    if module_name == "__main__" and not main:
        raise ConfigError(
            f"{what} is defined in __main__ (a notebook or the script that started the run), "
            "which cannot be imported by name",
            flow=flow,
            node=node,
            hint=f"Move it into a module and import that module, or {otherwise}",
        )
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except Exception as exc:
        raise ConfigError(
            f"{what} cannot be imported from {ref!r}: {type(exc).__name__}: {exc}",
            flow=flow,
            node=node,
            hint=f"Make the module importable here (PYTHONPATH), or {otherwise}",
        ) from exc
    return obj


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


def import_unit(ref: str, *, node: str, flow: str) -> Unit:
    """The step or branch *ref* names, for a worker in another process.

    What the module holds under that name must be the unit registered under *ref* when the
    module was imported: any other object (a function, a flow) is refused.
    """
    obj = import_ref(
        ref,
        what=f"step {ref!r}",
        flow=flow,
        node=node,
        otherwise="run in-process workers: fd.Context(batch=True, workers=N); a worker "
        "imports the modules named by `flowdsl worker --import MODULE`",
    )
    unit = _UNITS.get(ref)
    if unit is None or unit is not obj:
        raise ConfigError(f"{ref!r} is not a step", flow=flow, node=node)
    return unit
