"""What a flow body holds while it is traced: symbols and pending calls.

A :class:`Symbol` stands for a value that exists only when the flow runs (a node's result,
a flow input); it refuses everything that would need the value itself, with a message that
says what to write instead, and records attribute and item access as projections.  A
pending call (:class:`StepCall`, :class:`BranchCall`, :class:`CasesCall`,
:class:`FlowCall`) is what calling a step, branch or flow returns inside a flow body; the
tracer records a node when it is awaited.  Both know their tracer only through the
:class:`Recorder` protocol, so this module does not import :mod:`.trace`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from typing import Any, Protocol

from .. import _codec
from .._errors import CodecError, TracingError
from .graph import Guard, Input, Ref, Unit

__all__ = [
    "REAL_AWAIT_HINT",
    "BranchCall",
    "CasesCall",
    "FlowBody",
    "FlowCall",
    "Pending",
    "Recorder",
    "StepCall",
    "Symbol",
]


class FlowBody(Protocol):
    """What the tracer needs of a flow: its name and its ``async def`` body."""

    @property
    def name(self) -> str: ...

    @property
    def fn(self) -> Callable[..., Any]: ...


class Recorder(Protocol):
    """What symbols and pending calls need of the tracer that made them."""

    flow_name: str
    pending: list[Pending]

    def add_step(self, call: StepCall) -> Symbol: ...

    def add_branch(self, call: CasesCall) -> Any: ...

    def add_subflow(self, call: FlowCall) -> Any: ...


# What a flow body that awaits something real is told (here, and by the tracer's drive).
REAL_AWAIT_HINT = (
    "A flow body only wires steps together; move real awaits (sleeps, I/O, "
    "asyncio.gather) into a @fd.step; steps with no data dependency already run "
    "concurrently"
)

_USE_BRANCH = (
    "Inside a flow, step results are placeholders until the flow runs: decide with an "
    "@fd.branch step (`await route(x).cases(...)`), or move the logic into a step"
)


_USE_MAP = (
    "Inside a flow, a step's list result is a placeholder until the flow runs: to run a "
    "step (or a flow) once per element, write `await step.map(values)`; to compute "
    "over the whole list, do it inside a step"
)
_USE_LOOP = (
    _USE_BRANCH + "; for a `while` that repeats steps until a result says stop, write "
    "`await fd.loop(body, state, max_iterations=N)` with a body returning "
    "fd.Continue(next_state) or fd.Done(result)"
)


def _refuse(what: str, hint: str = _USE_BRANCH) -> Callable[..., Any]:
    def method(self: Symbol, *args: Any) -> Any:
        raise TracingError(
            f"{what} on {self._fd_describe()} inside a flow body",
            flow=self._fd_tracer.flow_name,
            hint=hint,
        )

    method.__name__ = what
    return method


class Symbol:
    """A traced value: the future result of a node (or a flow input)."""

    __slots__ = ("_fd_expr", "_fd_guard", "_fd_tracer")

    def __init__(self, expr: Ref | Input, guard: Guard, tracer: Recorder) -> None:
        self._fd_expr = expr
        self._fd_guard = guard
        self._fd_tracer = tracer

    def _fd_describe(self) -> str:
        expr = self._fd_expr
        base = f"input {expr.name!r}" if isinstance(expr, Input) else f"the result of {expr.node!r}"
        if expr.path:
            rendered = "".join(f".{k}" if kind == "attr" else f"[{k!r}]" for kind, k in expr.path)
            base += f" (projected as `{rendered}`)"
        return base

    def _fd_project(self, kind: str, key: Any) -> Symbol:
        expr = self._fd_expr
        if isinstance(expr, Input):
            new: Ref | Input = Input(expr.name, (*expr.path, (kind, key)))
        else:
            new = Ref(expr.node, (*expr.path, (kind, key)))
        return Symbol(new, self._fd_guard, self._fd_tracer)

    def __getattr__(self, name: str) -> Symbol:
        if name.startswith("_"):
            raise AttributeError(name)
        return self._fd_project("attr", name)

    def __getitem__(self, key: Any) -> Symbol:
        if isinstance(key, Symbol):
            raise TracingError(
                "indexing with another step's result inside a flow body",
                flow=self._fd_tracer.flow_name,
                hint="Do the lookup inside a step that takes both values",
            )
        try:
            _codec.to_data(key)
        except CodecError:
            raise TracingError(
                f"index {key!r} cannot be recorded in the graph",
                flow=self._fd_tracer.flow_name,
                hint="Index with a string, a number or another plain value",
            ) from None
        return self._fd_project("item", key)

    def __repr__(self) -> str:
        return f"<flowdsl symbol: {self._fd_describe()}>"

    def __hash__(self) -> int:
        return id(self)

    def __await__(self) -> Generator[Any, None, Any]:
        raise TracingError(
            f"awaiting {self._fd_describe()}, which is already a value",
            flow=self._fd_tracer.flow_name,
            hint="Await the step call itself once: `x = await step(...)`, then use `x`",
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TracingError(
            f"calling {self._fd_describe()} inside a flow body",
            flow=self._fd_tracer.flow_name,
            hint="Make the call inside a step",
        )

    __bool__ = _refuse("bool() (an `if`, `while`, `and`/`or` or `not`)", _USE_LOOP)
    __iter__ = _refuse("iteration", _USE_MAP)
    __len__ = _refuse("len()", _USE_MAP)
    __contains__ = _refuse("`in`")
    __index__ = _refuse("use as an index")
    __int__ = _refuse("int()")
    __float__ = _refuse("float()")
    __str__ = _refuse("str()")
    __format__ = _refuse("string formatting (an f-string or format())")
    __eq__ = _refuse("comparison (==)")
    __ne__ = _refuse("comparison (!=)")
    __lt__ = _refuse("comparison (<)")
    __le__ = _refuse("comparison (<=)")
    __gt__ = _refuse("comparison (>)")
    __ge__ = _refuse("comparison (>=)")


def _install_arithmetic() -> None:
    binary = ["add", "sub", "mul", "matmul", "truediv", "floordiv", "mod", "pow"]
    binary += ["lshift", "rshift", "and", "xor", "or"]
    ops = [*binary, *(f"r{op}" for op in binary), "neg", "pos", "abs", "invert"]
    for op in ops:
        setattr(Symbol, f"__{op}__", _refuse(f"arithmetic (__{op}__)"))


_install_arithmetic()


# --- pending calls ------------------------------------------------------------------------


class Pending:
    """A call made while tracing that has not been awaited yet."""

    __slots__ = ("awaited", "tracer")

    def __init__(self, tracer: Recorder) -> None:
        self.tracer = tracer
        self.awaited = False
        tracer.pending.append(self)

    def describe(self) -> str:
        raise NotImplementedError

    def __bool__(self) -> bool:
        raise TracingError(
            f"{self.describe()} was used as a condition without being awaited",
            flow=self.tracer.flow_name,
            hint=_USE_BRANCH,
        )

    # asyncio takes anything with this attribute for a future: asyncio.gather and
    # ensure_future hand the call back unchanged and ask it for its loop, so the mistake is
    # refused here, before asyncio looks up (or, before 3.14, creates) an event loop.
    _asyncio_future_blocking = False

    def get_loop(self) -> Any:
        raise TracingError(
            f"{self.describe()} was handed to asyncio (asyncio.gather, ensure_future, ...) "
            "inside a flow body",
            flow=self.tracer.flow_name,
            hint=REAL_AWAIT_HINT,
        )


class StepCall(Pending):
    __slots__ = ("args", "kwargs", "step")

    def __init__(self, tracer: Recorder, step: Unit, args: tuple[Any, ...], kwargs: dict[str, Any]):
        super().__init__(tracer)
        self.step = step
        self.args = args
        self.kwargs = kwargs

    def describe(self) -> str:
        return f"`{self.step.name}(...)`"

    def __await__(self) -> Generator[Any, None, Any]:
        self.awaited = True
        return self.tracer.add_step(self)
        yield  # pragma: no cover - makes this a generator that never suspends


class BranchCall(Pending):
    __slots__ = ("args", "branch", "kwargs")

    def __init__(
        self,
        tracer: Recorder,
        branch: Unit,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ):
        super().__init__(tracer)
        self.branch = branch
        self.args = args
        self.kwargs = kwargs

    def describe(self) -> str:
        return f"`{self.branch.name}(...)`"

    def cases(
        self,
        mapping: Mapping[Any, Callable[[], Any]] | None = None,
        /,
        **by_name: Callable[[], Any],
    ) -> CasesCall:
        """Choose what runs by the branch's value: ``.cases(a=lambda: ..., b=...)``."""
        self.awaited = True  # the CasesCall takes over the obligation to be awaited
        table: dict[Any, Callable[[], Any]] = dict(mapping or {})
        for key, thunk in by_name.items():
            if key in table:
                raise TracingError(
                    f"case {key!r} given twice", flow=self.tracer.flow_name, node=self.branch.name
                )
            table[key] = thunk
        return CasesCall(self.tracer, self, table)

    def __await__(self) -> Generator[Any, None, Any]:
        raise TracingError(
            f"{self.describe()} is a branch; awaiting it alone does nothing",
            flow=self.tracer.flow_name,
            node=self.branch.name,
            hint=f"Write `await {self.branch.name}(...).cases(name=lambda: step(...), ...)`",
        )


class CasesCall(Pending):
    __slots__ = ("call", "table")

    def __init__(self, tracer: Recorder, call: BranchCall, table: dict[Any, Callable[[], Any]]):
        super().__init__(tracer)
        self.call = call
        self.table = table

    def describe(self) -> str:
        return f"`{self.call.branch.name}(...).cases(...)`"

    def __await__(self) -> Generator[Any, None, Any]:
        self.awaited = True
        return self.tracer.add_branch(self)
        yield  # pragma: no cover


class FlowCall(Pending):
    __slots__ = ("args", "flow", "kwargs")

    def __init__(
        self, tracer: Recorder, flow: FlowBody, args: tuple[Any, ...], kwargs: dict[str, Any]
    ):
        super().__init__(tracer)
        self.flow = flow
        self.args = args
        self.kwargs = kwargs

    def describe(self) -> str:
        return f"`{self.flow.name}(...)`"

    def __await__(self) -> Generator[Any, None, Any]:
        self.awaited = True
        return self.tracer.add_subflow(self)
        yield  # pragma: no cover
