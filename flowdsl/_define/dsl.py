"""The decorators users write: ``@step``, ``@branch`` and ``@flow``.

A decorated function stays what it was outside a flow: calling a step from a test or a
notebook cell runs the function itself.  Inside a flow body being traced, the same call
records a node instead (see :mod:`flowdsl._define.trace`).  Calling a flow outside any flow runs it
in the current context.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import textwrap
import typing
from collections.abc import (
    Awaitable,
    Callable,
    Coroutine,
    Generator,
    Iterable,
    Iterator,
    Mapping,
)
from typing import Any, Generic, ParamSpec, Protocol, TypeVar, overload

from .._errors import ConfigError, TracingError
from . import symbols as _symbols
from . import trace as _trace
from .checks import check_types
from .graph import Graph
from .handlers import check_handlers
from .units import redefinitions, ref_of, register, superseded
from .units import registered_unit as registered_unit  # the batch executor imports it here

__all__ = ["Branch", "Flow", "Step", "branch", "flow", "step"]

P = ParamSpec("P")
R = TypeVar("R")

_UNSET: Any = object()


def code_hash(fn: Callable[..., Any]) -> str:
    """A hash of *fn*'s code: its source when Python can find it, else its bytecode."""
    try:
        material = textwrap.dedent(inspect.getsource(fn)).encode()
    except (OSError, TypeError):
        material = _bytecode_material(fn.__code__)
    return hashlib.sha256(material).hexdigest()[:16]


def _bytecode_material(code: Any) -> bytes:
    parts = [code.co_code, repr(code.co_names).encode(), repr(code.co_varnames).encode()]
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            parts.append(_bytecode_material(const))
        else:
            parts.append(repr(const).encode())
    return b"\0".join(parts)


class _Unit(Generic[P, R]):
    """What steps and branches share: the function, its options, its return type.

    Instances satisfy :class:`flowdsl._define.graph.Unit`, the protocol graph nodes refer to.
    """

    kind: str = "step"

    def __init__(
        self,
        fn: Callable[P, Any],
        *,
        name: str | None,
        retries: int,
        timeout: float | None,
        retry_on: tuple[type[BaseException], ...],
        backoff: float,
        version: str | None,
        cache: bool,
    ) -> None:
        if isinstance(fn, _Unit | Flow):
            raise TracingError(
                f"{fn.name!r} is already decorated", hint="Apply one of @step, @branch, @flow"
            )
        if not callable(fn):
            raise TracingError(f"@fd.{self.kind} needs a function, not {type(fn).__name__}")
        if retries < 0:
            raise TracingError(f"retries must be 0 or more, not {retries}", node=name)
        if timeout is not None and timeout <= 0:
            raise TracingError(f"timeout must be positive seconds, not {timeout}", node=name)
        self.fn = fn
        self.name = _trace.check_name(name or fn.__name__, self.kind)
        self.retries = retries
        self.timeout = timeout
        self.retry_on = retry_on
        self.backoff = backoff
        self.version = version
        self.cache = cache
        self.is_async = inspect.iscoroutinefunction(fn)
        # Runs as a bare task in real time (see _runner.FastJob): nothing to wrap it in.
        self.bare = self.is_async and timeout is None and not cache
        self.ref = ref_of(fn)
        self._return_type: Any = _UNSET
        self._code_hash: str | None = None
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]
        # Hashed now, from the code being decorated: a file edited later must not make
        # the hash describe code that is not the code running.
        self._code_hash = code_hash(fn)
        register(self)

    @property
    def return_type(self) -> Any:
        """The return annotation, resolved on first use (``Any`` when there is none)."""
        if self._return_type is _UNSET:
            try:
                hints = typing.get_type_hints(self.fn)
            except Exception as exc:
                raise TracingError(
                    f"cannot resolve the return annotation of {self.name!r}: {exc}",
                    node=self.name,
                    hint="Import the annotated types at module level",
                ) from exc
            self._return_type = hints.get("return", Any)
        return self._return_type

    @property
    def param_types(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The annotated types of the parameters: by position, and by name.

        Arguments are decoded as these types where a node runs (a batch worker), and
        pass through the same round trip in real time.
        """
        cached: tuple[tuple[Any, ...], dict[str, Any]] | None = getattr(self, "_params", None)
        if cached is None:
            try:
                hints = typing.get_type_hints(self.fn)
            except Exception:
                hints = {}
            names = [
                p.name
                for p in inspect.signature(self.fn).parameters.values()
                if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            ]
            by_name = {name: hints.get(name, Any) for name in names}
            cached = (tuple(by_name[n] for n in names), by_name)
            self._params = cached
        return cached

    @property
    def code_hash(self) -> str:
        if self._code_hash is None:
            self._code_hash = code_hash(self.fn)
        return self._code_hash

    def __repr__(self) -> str:
        return f"<flowdsl {self.kind} {self.name!r} ({self.ref})>"

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        # Steps defined as methods bind like functions.
        if obj is None:
            return self
        return functools.partial(self.__call__, obj)  # type: ignore[operator]


class Step(_Unit[P, R]):
    """A unit of work: an ``async def`` (or plain ``def``, run in a thread) marked ``@fd.step``."""

    kind = "step"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:
        tracer = _trace.current_tracer()
        if tracer is not None:
            return _symbols.StepCall(tracer, self, args, kwargs)  # type: ignore[return-value]
        return self.fn(*args, **kwargs)  # type: ignore[no-any-return]

    def map(self, items: Iterable[Any], /, **shared: Any) -> Coroutine[Any, Any, list[R]]:
        """One call per element of *items* (the first argument), *shared* passed to each;
        the results in input order.  Inside a flow, ONE node whose items are journaled one
        by one; outside a flow, the plain calls, run concurrently."""
        from .dynamic import map_call

        return map_call(self, items, shared)  # type: ignore[no-any-return]


T = TypeVar("T")
R_co = TypeVar("R_co", covariant=True)


class BranchCallType(Protocol[R_co]):
    """What calling a branch gives, for type checkers: inside a flow, something to pick
    cases with; outside one, the function's own awaitable."""

    def cases(
        self,
        mapping: Mapping[Any, Callable[[], Awaitable[T]]] | None = None,
        /,
        **by_name: Callable[[], Awaitable[T]],
    ) -> Awaitable[T]: ...

    def __await__(self) -> Generator[Any, None, R_co]: ...


class Branch(_Unit[P, R]):
    """A step whose value (str, bool, int or Enum) chooses which case runs."""

    kind = "branch"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> BranchCallType[R]:
        tracer = _trace.current_tracer()
        if tracer is not None:
            return _symbols.BranchCall(tracer, self, args, kwargs)
        return self.fn(*args, **kwargs)  # type: ignore[no-any-return]


class Flow(Generic[P, R]):
    """A traced composition of steps.  ``flow.graph`` is its DAG."""

    def __init__(self, fn: Callable[P, Coroutine[Any, Any, R]], *, name: str | None = None):
        if not inspect.iscoroutinefunction(fn):
            raise TracingError(
                f"@fd.flow needs an `async def` function; {getattr(fn, '__name__', fn)!r} is not",
                hint="Write `async def` for the flow body",
            )
        self.fn = fn
        self.name = _trace.check_name(name or fn.__name__, "flow")
        self.ref = ref_of(fn)
        self.signature = inspect.signature(fn)
        self._graph: Graph | None = None
        self._seen = redefinitions()
        self._input_types: dict[str, Any] | None = None
        self._return_type: Any = _UNSET
        functools.update_wrapper(self, fn)

    @property
    def graph(self) -> Graph:
        """The traced DAG (traced on first access if a name was missing at definition).

        A step the graph uses that was defined again since (its notebook cell run again,
        fixed) makes the body be traced again, so that runs and resumes, in real time and
        in batch alike, run the step's current definition, as they would had the flow's
        own cell been run again too.
        """
        graph = self._graph
        if graph is None:
            graph = self._graph = _traced(self)
        elif self._seen != redefinitions():
            self._seen = redefinitions()
            if any(superseded(unit) for unit in _units_of(graph)):
                graph = self._graph = _traced(self)
        return graph

    def try_trace(self) -> None:
        """Trace now; a name defined later in the module defers tracing to first use."""
        try:
            self._graph = _traced(self)
        except NameError:
            self._graph = None

    @property
    def input_types(self) -> dict[str, Any]:
        if self._input_types is None:
            try:
                hints = typing.get_type_hints(self.fn)
            except Exception:
                hints = {}
            self._input_types = {name: hints.get(name, Any) for name in self.signature.parameters}
        return self._input_types

    @property
    def return_type(self) -> Any:
        if self._return_type is _UNSET:
            try:
                self._return_type = typing.get_type_hints(self.fn).get("return", Any)
            except Exception:
                self._return_type = Any
        return self._return_type

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """Map call arguments to the flow's inputs (defaults applied)."""
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise ConfigError(
                f"arguments do not fit the flow's signature: {exc}",
                flow=self.name,
                hint=f"Call it as `{self.name}{self.signature}`",
            ) from None
        bound.apply_defaults()
        return dict(bound.arguments)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:
        tracer = _trace.current_tracer()
        if tracer is not None:
            return _symbols.FlowCall(tracer, self, args, kwargs)  # type: ignore[return-value]
        # The one import that goes up the layers (docs/architecture.md): a flow awaited
        # outside any flow runs in the current context, which is built on this layer.
        # Deferred, so that defining flows never imports the engine or the backends.
        from .._context.sync import current_context

        # Keywords go in as inputs=, so that a flow parameter named like an option of
        # ctx.run (run_id, inputs) is never taken for one.
        return current_context().run(self, *args, inputs=kwargs)

    def map(self, items: Iterable[Any], /, **shared: Any) -> Coroutine[Any, Any, list[R]]:
        """The flow once per element of *items* (its first argument), *shared* passed to
        each.  Inside a flow, ONE node that inlines one sub-graph per item at run time;
        outside a flow, one run per item in the current context (as ``ctx.map``)."""
        from .dynamic import map_call, map_inputs

        if _trace.current_tracer() is not None:
            return map_call(self, items, shared)  # type: ignore[no-any-return]
        from .._context.sync import current_context

        return current_context().map(self, map_inputs(self, items, shared))  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"<flowdsl flow {self.name!r} ({self.ref})>"


def _traced(flow: Flow[..., Any]) -> Graph:
    check_handlers(flow.name, flow.fn)
    graph = _trace.trace(flow)
    check_types(flow, graph)
    return graph


def _units_of(graph: Graph) -> Iterator[Any]:
    """The steps and branches a graph runs: its nodes', and what its maps and loops run."""
    for node in graph.nodes_by_id.values():
        if node.fn is not None:
            yield node.fn
        body = getattr(node.spec, "body", None)
        if body is not None and not isinstance(body, Flow):
            yield body


_RETRY_ON_DEFAULT: tuple[type[BaseException], ...] = (Exception,)


def _decorate(cls: type[_Unit[..., Any]], fn: Callable[..., Any] | None, options: Any) -> Any:
    """``@cls`` and ``@cls(**options)`` alike."""
    if fn is not None:
        return cls(fn, **options)
    return lambda f: cls(f, **options)


@overload
def step(fn: Callable[P, Coroutine[Any, Any, R]], /) -> Step[P, R]: ...
@overload
def step(fn: Callable[P, R], /) -> Step[P, R]: ...
@overload
def step(
    *,
    name: str | None = None,
    retries: int = 0,
    timeout: float | None = None,
    retry_on: tuple[type[BaseException], ...] = ...,
    backoff: float = 1.0,
    version: str | None = None,
    cache: bool = False,
) -> Callable[[Callable[P, Coroutine[Any, Any, R]]], Step[P, R]]: ...


def step(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    retries: int = 0,
    timeout: float | None = None,
    retry_on: tuple[type[BaseException], ...] = _RETRY_ON_DEFAULT,
    backoff: float = 1.0,
    version: str | None = None,
    cache: bool = False,
) -> Any:
    """Mark a function as a step.

    ``retries`` more attempts follow a failure whose exception is one of ``retry_on``,
    after an exponential delay starting at ``backoff`` seconds (with jitter); ``timeout``
    bounds each attempt; ``version`` marks a deliberate change for resume; ``cache=True``
    reuses results across runs for equal inputs.
    """

    options = dict(name=name, retries=retries, timeout=timeout, retry_on=retry_on)
    options.update(backoff=backoff, version=version, cache=cache)
    return _decorate(Step, fn, options)


@overload
def branch(fn: Callable[P, Coroutine[Any, Any, R]], /) -> Branch[P, R]: ...
@overload
def branch(
    *,
    name: str | None = None,
    retries: int = 0,
    timeout: float | None = None,
    retry_on: tuple[type[BaseException], ...] = ...,
    backoff: float = 1.0,
    version: str | None = None,
) -> Callable[[Callable[P, Coroutine[Any, Any, R]]], Branch[P, R]]: ...


def branch(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    retries: int = 0,
    timeout: float | None = None,
    retry_on: tuple[type[BaseException], ...] = _RETRY_ON_DEFAULT,
    backoff: float = 1.0,
    version: str | None = None,
) -> Any:
    """Mark a function as a branch: its value (str, bool, int or Enum) picks a case."""

    options = dict(name=name, retries=retries, timeout=timeout, retry_on=retry_on)
    options.update(backoff=backoff, version=version, cache=False)
    return _decorate(Branch, fn, options)


def flow(
    fn: Callable[P, Coroutine[Any, Any, R]] | None = None, /, *, name: str | None = None
) -> Any:
    """Mark an ``async def`` as a flow; its body is traced into a graph right away."""

    def wrap(f: Callable[P, Coroutine[Any, Any, R]]) -> Flow[P, R]:
        result = Flow(f, name=name)
        result.try_trace()
        return result

    return wrap(fn) if fn is not None else wrap
