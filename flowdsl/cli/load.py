"""Finding the flow a command line names: ``path/to/file.py:flow`` or ``package.module:flow``.

A flow loaded from a file must be importable again later, by name, from another process:
``flowdsl resume`` imports the flow a run record names by its ``module:qualname``.  So a
file is never loaded under a throwaway name.  It is imported as the module Python itself
would give it if its directory were on ``sys.path``:

- a plain file ``dir/triage.py`` becomes module ``triage``, and ``dir`` joins ``sys.path``;
- a file inside packages (``dir/app/flows.py`` with ``dir/app/__init__.py``) becomes
  ``app.flows``, and ``dir`` (the first directory above the packages) joins ``sys.path``,
  so that the file's relative imports work as they do in the application.

``flowdsl resume`` then finds the module again with the same directory on ``sys.path``
(``--path DIR``; the current directory is always there).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from .._define.dsl import Branch, Flow, Step
from .._errors import ConfigError, FlowError

__all__ = ["TargetError", "add_to_path", "load_flow", "module_name_for_file"]


class TargetError(ConfigError):
    """A TARGET that names no flow: a usage error of the command line."""


def add_to_path(directory: str | os.PathLike[str]) -> None:
    """Put *directory* first on ``sys.path`` unless it is already there."""
    path = os.path.abspath(directory)
    if path not in (os.path.abspath(p or os.curdir) for p in sys.path):
        sys.path.insert(0, path)


def load_flow(target: str) -> Flow[..., Any]:
    """The flow *target* names; :class:`TargetError` with what to write instead."""
    location, sep, qualname = _split(target)
    try:
        is_file = _is_file(location)
        module = _import_file(location) if is_file else _import_module(target, location)
    except FlowError:
        raise
    except Exception as exc:
        # The user's module raised while it was imported: a usage problem of this command,
        # reported in one line; `flowdsl --traceback` shows the cause.
        raise TargetError(
            f"importing {location} failed: {type(exc).__name__}: {exc}",
            hint="Fix the module so that it imports (run `flowdsl --traceback ...` for details)",
        ) from exc
    if not sep or not qualname:
        raise TargetError(
            f"TARGET {target!r} names no flow",
            hint=f"Add ':name' after the module: {_flows_hint(module, location)}",
        )
    obj: Any = module
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TargetError(
                f"{location} has no flow {qualname!r}",
                hint=f"Check the name after ':': {_flows_hint(module, location)}",
            ) from None
    if not isinstance(obj, Flow):
        raise TargetError(
            f"{location}:{qualname} is {_describe(obj)}, not a flow",
            hint=f"Name a function decorated with @fd.flow: {_flows_hint(module, location)}",
        )
    return obj


def _split(target: str) -> tuple[str, str, str]:
    # A Windows drive letter ('C:\\x.py:flow') has a colon too; the flow name is after the last.
    location, sep, qualname = target.rpartition(":")
    if not sep or "/" in qualname or "\\" in qualname or qualname.endswith(".py"):
        return target, "", ""
    if not location:
        raise TargetError(
            f"TARGET {target!r} names no module or file",
            hint="Write path/to/file.py:flow or package.module:flow",
        )
    return location, sep, qualname.strip()


def _is_file(location: str) -> bool:
    return location.endswith(".py") or os.sep in location or "/" in location


def module_name_for_file(path: Path) -> tuple[str, Path]:
    """The module name of *path* and the directory that must be on ``sys.path`` for it."""
    parts = [path.stem]
    root = path.parent
    while (root / "__init__.py").is_file() and root.parent != root:
        parts.append(root.name)
        root = root.parent
    return ".".join(reversed(parts)), root


def _import_file(location: str) -> ModuleType:
    path = Path(location).resolve()
    if not path.is_file():
        raise TargetError(
            f"no file {location!r}",
            hint="Check the path: TARGET is path/to/file.py:flow or package.module:flow",
        )
    if path.suffix != ".py":
        raise TargetError(f"{location!r} is not a Python file", hint="Name a .py file")
    name, root = module_name_for_file(path)
    if not all(part.isidentifier() for part in name.split(".")):
        raise TargetError(
            f"{location!r} cannot be imported as module {name!r}",
            hint="Rename the file (and its packages) to valid Python identifiers",
        )
    add_to_path(root)
    existing = sys.modules.get(name)
    if existing is not None:
        _check_same_file(existing, path, name, location)
        return existing
    if "." in name:
        module = _import_module(location, name)
        _check_same_file(module, path, name, location)
        return module
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TargetError(f"cannot load {location!r} as Python code")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # registered first, as import does: the flows' refs name it
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _check_same_file(module: ModuleType, path: Path, name: str, location: str) -> None:
    loaded = getattr(module, "__file__", None)
    if loaded is None or Path(loaded).resolve() != path:
        raise TargetError(
            f"{location!r} would be module {name!r}, but {name!r} is already "
            f"{loaded or 'a built-in module'}",
            hint="Rename the file so that its module name is its own",
        )


def _import_module(target: str, name: str) -> ModuleType:
    add_to_path(os.getcwd())  # as `python -m` does, so `flowdsl run app.flows:x` finds ./app
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise TargetError(
                f"no module {name!r} (in TARGET {target!r})",
                hint="Write path/to/file.py:flow or package.module:flow, with the package "
                "importable from here (PYTHONPATH)",
            ) from None
        raise


def _flows_hint(module: ModuleType, location: str) -> str:
    names = sorted(
        name
        for name, value in vars(module).items()
        if isinstance(value, Flow) and not name.startswith("_")
    )
    if not names:
        return f"{location} defines no @fd.flow"
    return f"flows in {location}: {', '.join(names)}"


def _describe(obj: Any) -> str:
    if isinstance(obj, Branch):
        return f"the branch {obj.name!r}"
    if isinstance(obj, Step):
        return f"the step {obj.name!r}"
    return f"a {type(obj).__name__}"
