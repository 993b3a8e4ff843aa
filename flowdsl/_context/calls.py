"""What a caller hands ``Context.run``, ``start`` and ``map``, checked and made into calls."""

from __future__ import annotations

from typing import Any

from .._define.dsl import Flow
from .._errors import ConfigError

__all__ = ["as_call", "check_flow"]


def check_flow(flow: Any) -> None:
    if not isinstance(flow, Flow):
        name = getattr(flow, "__name__", type(flow).__name__)
        raise ConfigError(
            f"{name!r} is not a flow",
            hint="Pass a function decorated with @fd.flow; a step runs by calling it directly",
        )


def as_call(flow: Flow[..., Any], item: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call one input of ``ctx.map`` stands for."""
    if len(flow.signature.parameters) == 1:
        return (item,), {}
    if isinstance(item, dict):
        return (), dict(item)
    if isinstance(item, tuple | list):
        return tuple(item), {}
    raise ConfigError(
        f"input {item!r} does not fit a flow of {len(flow.signature.parameters)} parameters",
        flow=flow.name,
        hint="Give a tuple (positional) or a dict (keyword) per input",
    )
