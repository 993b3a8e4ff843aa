"""What a batch worker refuses, and how it says so: tasks naming steps it does not know,
arguments it cannot decode, a ``max_deliveries`` that is not a count."""

from __future__ import annotations

from typing import Any, Final

from ... import _codec
from ..._errors import CheckpointError, CodecError, ConfigError, FlowError
from ...backends.messages import TaskMessage

__all__ = [
    "DEFAULT_MAX_DELIVERIES",
    "UnknownStep",
    "bare",
    "check_max_deliveries",
    "decode_arg",
    "decode_args",
    "unknown_step",
]

#: How many times a task may be handed out (its workers dying or losing its lease each
#: time) before it is dead-lettered as a poison task.
DEFAULT_MAX_DELIVERIES: Final = 5


class UnknownStep(ConfigError):
    """A task naming a step this worker has not registered: refused, dead-lettered."""


def unknown_step(task: TaskMessage) -> UnknownStep:
    module, _, qualname = task.step.partition(":")
    where = f"step {task.step!r}"
    in_process = "in-process workers: fd.Context(batch=True, workers=N)"
    if "<locals>" in qualname:
        problem = f"{where} is defined inside a function, which a worker process cannot import"
        hint = f"Move the step to a module's top level, or run {in_process}"
    elif module == "__main__":
        problem = (
            f"{where} is defined in __main__ (a notebook or the script that started the "
            "run), which a worker process cannot import"
        )
        hint = (
            "Move the step into a module and start workers with `--import MODULE`, or run "
            + in_process
        )
    else:
        problem = f"the task names {where}, which this worker does not know"
        hint = (
            "Start the worker with `--import MODULE` for the module that defines the step "
            f"(workers import only what they are told to), or run {in_process}"
        )
    return UnknownStep(
        f"{problem}; it was refused without importing anything",
        flow=task.flow,
        node=task.node_id,
        hint=hint,
    )


def check_max_deliveries(value: object) -> None:
    if type(value) is not int or value < 1:
        raise ConfigError(
            f"max_deliveries must be a whole number of at least 1, not {value!r}",
            hint="It is how many times a task may be handed out to workers that die "
            f"before it is dead-lettered (default {DEFAULT_MAX_DELIVERIES})",
        )


def check_count(name: str, value: object) -> None:
    if type(value) is not int or value < 1:
        raise ConfigError(f"worker {name} must be a whole number of at least 1, not {value!r}")


def bare(exc: FlowError) -> str:
    """An error's own words, without the flow and node the scheduler's side adds back."""
    return f"{exc.problem.rstrip('.')}. {exc.hint}" if exc.hint else exc.problem


def decode_arg(data: Any, tp: Any, task: TaskMessage, what: str) -> Any:
    try:
        return _codec.from_data(data, tp, what=what)
    except CodecError as exc:
        raise CheckpointError(
            f"{what} cannot be decoded: {exc.problem}", flow=task.flow, node=task.node_id
        ) from exc


_PRIMITIVES: Final = frozenset({str, int, float, bool})


def decode_args(task: TaskMessage, unit: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The task's arguments as the step's parameters are annotated (see
    :func:`decode_arg`).  A plain value of its parameter's very type, or for a parameter
    without one, is taken as it is without a call, as the codec would take it: this runs
    for every argument of every task."""
    positional, by_name = unit.param_types
    count = len(positional)
    args = []
    for i, data in enumerate(task.args):
        tp = positional[i] if i < count else Any
        if tp is Any or (type(data) is tp and tp in _PRIMITIVES):
            args.append(data)
        else:
            args.append(decode_arg(data, tp, task, f"argument {i + 1}"))
    kwargs = {
        k: decode_arg(v, by_name.get(k, Any), task, f"argument {k!r}")
        for k, v in task.kwargs.items()
    }
    return tuple(args), kwargs
