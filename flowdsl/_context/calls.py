"""What a caller hands ``Context.run``, ``start``, ``map`` and ``fd.run``, made into calls.

The flow comes first, its positional arguments after it, and every option is a keyword
(``run_id=``, ``backend=``, ...).  The flow's keyword arguments may follow as further
keywords, which is short and reads like a call of the flow, or come as one mapping,
``inputs={"name": value}``, which can hold any name at all.  A keyword that is both an
option of the call and a parameter of the flow is ambiguous, and refused rather than
guessed at: :func:`flow_arguments` says to use ``inputs=``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import anyio

from .._define.dsl import Flow
from .._errors import ConfigError

__all__ = [
    "as_call",
    "check_flow",
    "flow_arguments",
    "given_options",
    "only_besides_cancellations",
]


def check_flow(flow: Any) -> None:
    if not isinstance(flow, Flow):
        name = getattr(flow, "__name__", type(flow).__name__)
        raise ConfigError(
            f"{name!r} is not a flow",
            hint="Pass a function decorated with @fd.flow; a step runs by calling it directly",
        )


def given_options(**options: Any) -> list[str]:
    """The options a call was given: those not left at their default, None."""
    return [name for name, value in options.items() if value is not None]


def flow_arguments(
    flow: Flow[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    inputs: Mapping[str, Any] | None,
    *,
    given: Iterable[str],
    call: str,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The flow's own arguments, from a call of *call* that also took options.

    *kwargs* are the keywords that were not options; *given* names the options the caller
    actually passed (an option left at its default cannot be mistaken for anything).
    """
    params = flow.signature.parameters
    if inputs is not None:
        if not isinstance(inputs, Mapping) or not all(isinstance(k, str) for k in inputs):
            raise ConfigError(
                f"inputs= must map the flow's parameter names to values, not "
                f"{type(inputs).__name__}",
                flow=flow.name,
                hint=f"Write `{call}({flow.name}, inputs={{'name': value, ...}})`",
            )
        if kwargs:
            raise ConfigError(
                f"the flow's keyword arguments are given twice: as keywords "
                f"({', '.join(kwargs)}) and in inputs=",
                flow=flow.name,
                hint="Put them all in inputs={...}",
            )
        kwargs = dict(inputs)
    positional = list(params)[: len(args)]
    for name in given:
        if name not in params or name in positional:
            continue
        if name == "inputs" and "inputs" in kwargs:
            continue  # inputs={"inputs": ...}: the mapping holds the flow's own `inputs`
        if name != "inputs" and inputs is not None:
            continue  # the flow's arguments are all in inputs=, so this keyword is the option
        raise ConfigError(
            f"`{name}=` is ambiguous: {call}() takes it as an option, and the flow has a "
            f"parameter of that name",
            flow=flow.name,
            hint=f"Give the flow's keyword arguments in one mapping: "
            f"`{call}({flow.name}, ..., inputs={{{name!r}: ...}})`; "
            f"`{name}=` beside it is then the option",
        )
    return args, kwargs


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


def only_besides_cancellations(group: BaseExceptionGroup[Any], exc: BaseException) -> bool:
    """Whether *group* holds *exc* and nothing else but cancellations."""
    mine, rest = group.split(lambda e: e is exc)
    if mine is None:
        return False
    if rest is None:
        return True
    _, other = rest.split(anyio.get_cancelled_exc_class())
    return other is None
