"""The flows a service serves, and a request's arguments decoded for one of them.

A service only ever runs flows from the modules its operator named with ``--import``,
imported once at start-up.  A request names a flow by ``module:qualname`` and that name is
looked up here; it is never imported, so a request cannot make the service load code.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from .. import _codec
from .._define.dsl import Flow
from .._errors import CodecError, ConfigError
from ._errors import ServiceError

__all__ = ["FlowRegistry"]


class FlowRegistry:
    """Flows by ``module:qualname``: every ``@fd.flow`` at the top of the imported modules."""

    def __init__(self, flows: Iterable[Flow[..., Any]] = ()) -> None:
        self._by_ref: dict[str, Flow[..., Any]] = {}
        for flow in flows:
            self.add(flow)

    def add(self, flow: Flow[..., Any], *aliases: str) -> None:
        for ref in (flow.ref, *aliases):
            self._by_ref.setdefault(ref, flow)

    @classmethod
    def from_modules(cls, names: Iterable[str]) -> FlowRegistry:
        """Import each module (a dotted name or a path to a ``.py`` file) and collect its
        flows; :class:`ConfigError` if a module does not import or defines no flow."""
        registry = cls()
        for name in names:
            module = _import(name)
            found = [
                (attr, value)
                for attr, value in vars(module).items()
                if isinstance(value, Flow) and not attr.startswith("_")
            ]
            if not found:
                raise ConfigError(
                    f"--import {name}: the module {module.__name__!r} defines no @fd.flow",
                    hint="Name the modules that define the flows to serve",
                )
            for attr, flow in found:
                # A flow imported from elsewhere is served under both names.
                registry.add(flow, f"{module.__name__}:{attr}")
        return registry

    @property
    def refs(self) -> list[str]:
        return sorted({flow.ref for flow in self._by_ref.values()})

    def get(self, ref: str) -> Flow[..., Any]:
        """The flow *ref* names, or a ``ServiceError`` (``INVALID_ARGUMENT``)."""
        flow = self._by_ref.get(ref)
        if flow is None:
            served = ", ".join(self.refs) or "none"
            raise ServiceError(
                f"this service has no flow {ref!r}",
                code="INVALID_ARGUMENT",
                hint=f"Name one of the flows it serves as module:qualname ({served}); "
                "start the service with --import MODULE to serve more",
            )
        return flow

    def find(self, ref: str) -> Flow[..., Any] | None:
        return self._by_ref.get(ref)

    def decode_call(
        self, flow: Flow[..., Any], input_json: str
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``input_json`` (a JSON object of arguments by name) as call arguments, each
        decoded as its parameter is annotated."""
        text = input_json.strip() or "{}"
        try:
            data = _codec.loads(text)
        except CodecError as exc:
            raise _bad(flow, f"input_json is not JSON: {exc.problem}") from None
        if not isinstance(data, dict):
            raise _bad(flow, f"input_json must be a JSON object, not {_json_kind(data)}")
        parameters = flow.signature.parameters
        unknown = sorted(set(data) - set(parameters))
        if unknown:
            raise _bad(flow, f"unknown argument {', '.join(map(repr, unknown))}")
        types = flow.input_types
        values: dict[str, Any] = {}
        for name, value in data.items():
            try:
                values[name] = _codec.from_data(value, types[name], what=f"argument {name!r}")
            except CodecError as exc:
                raise _bad(flow, exc.problem) from None
        try:
            bound = flow.signature.bind(**values)
        except TypeError as exc:
            raise _bad(flow, str(exc)) from None
        return bound.args, bound.kwargs


def _bad(flow: Flow[..., Any], problem: str) -> ServiceError:
    return ServiceError(
        problem,
        code="INVALID_ARGUMENT",
        flow=flow.name,
        hint=f"Give a JSON object of the arguments of `{flow.name}{flow.signature}`",
    )


def _json_kind(data: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(data), "a number"
    )


def _import(name: str) -> ModuleType:
    """A module by dotted name, or a ``.py`` file imported under the name ``flowdsl run``
    gives it (so that the refs of its flows are the ones a client uses)."""
    from ..cli.load import add_to_path, module_name_for_file

    if name.endswith(".py") or "/" in name or os.sep in name:
        path = Path(name).resolve()
        if not path.is_file():
            raise ConfigError(f"--import {name}: no such file")
        module_name, root = module_name_for_file(path)
        add_to_path(root)
        name = module_name
    else:
        add_to_path(os.getcwd())
    try:
        return sys.modules.get(name) or importlib.import_module(name)
    except Exception as exc:
        raise ConfigError(
            f"--import {name}: importing it failed: {type(exc).__name__}: {exc}",
            hint="Make the module importable here (PYTHONPATH, or a path to the .py file)",
        ) from exc
