"""Errors: the hierarchy, the message shape (flow, node, hint), pickling, and real failures."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

import flowdsl as fd
from flowdsl._errors import StepCodecFailed

# --- the hierarchy ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (fd.TracingError, TypeError),
        (fd.StepFailed, RuntimeError),
        (fd.CodecError, TypeError),
        (fd.CheckpointError, RuntimeError),
        (fd.ConfigError, ValueError),
        (fd.BackendUnavailable, ConnectionError),
    ],
)
def test_each_error_is_a_flow_error_and_its_builtin(cls: type[Exception], builtin: type) -> None:
    assert issubclass(cls, fd.FlowError)
    assert issubclass(cls, builtin)
    with pytest.raises(builtin):
        raise cls("problem")


def test_backend_unavailable_builds_its_message_from_its_fields() -> None:
    away = fd.BackendUnavailable(
        "the Redis server at redis://h:6379/0",
        operation="reading run 'r1'",
        waited=30,
        reason="Connection refused",
    )
    assert str(away) == (
        "the Redis server at redis://h:6379/0 has not answered for 30 s (reading run 'r1'): "
        "Connection refused. Check that the server runs and is reachable from this machine"
    )
    assert (away.server, away.operation, away.waited) == (
        "the Redis server at redis://h:6379/0",
        "reading run 'r1'",
        30,
    )
    first = fd.BackendUnavailable("the NATS server at nats://h:4222", reason="refused", hint="H")
    assert str(first) == "cannot reach the NATS server at nats://h:4222: refused. H"
    back = pickle.loads(pickle.dumps(away))  # noqa: S301 - our own bytes
    assert (back.server, back.operation, back.waited, back.reason, str(back)) == (
        away.server,
        away.operation,
        away.waited,
        away.reason,
        str(away),
    )


def test_flow_error_is_an_exception() -> None:
    assert issubclass(fd.FlowError, Exception)
    assert not issubclass(fd.FlowError, TypeError | ValueError | RuntimeError)


def test_a_step_codec_failure_is_both() -> None:
    assert issubclass(StepCodecFailed, fd.StepFailed)
    assert issubclass(StepCodecFailed, fd.CodecError)


@pytest.mark.parametrize(
    "name",
    ["FlowError", "TracingError", "StepFailed", "CodecError", "CheckpointError", "ConfigError"],
)
def test_errors_are_shown_as_flowdsl_names(name: str) -> None:
    cls = getattr(fd, name)
    assert cls.__module__ == "flowdsl"
    assert f"{cls.__module__}.{cls.__qualname__}" == f"flowdsl.{name}"


# --- the message shape --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "it broke"),
        ({"flow": "triage"}, "flow 'triage': it broke"),
        ({"node": "classify"}, "node 'classify': it broke"),
        (
            {"flow": "triage", "node": "classify", "hint": "Do this instead"},
            "flow 'triage', node 'classify': it broke. Do this instead",
        ),
        ({"hint": "Try again"}, "it broke. Try again"),
    ],
)
def test_messages_name_flow_node_and_hint(kwargs: dict[str, Any], message: str) -> None:
    error = fd.FlowError("it broke", **kwargs)
    assert str(error) == message
    assert error.problem == "it broke"
    assert error.flow == kwargs.get("flow")
    assert error.node == kwargs.get("node")
    assert error.hint == kwargs.get("hint")


def test_a_problem_ending_in_a_period_is_not_doubled() -> None:
    assert str(fd.ConfigError("bad URL.", hint="Use memory://")) == "bad URL. Use memory://"


def test_step_failed_carries_node_and_run() -> None:
    error = fd.StepFailed("step failed", flow="f", node="n", run_id="r-1")
    assert error.node_id == "n"
    assert error.run_id == "r-1"


# --- pickling -----------------------------------------------------------------------------

ERRORS = [
    fd.FlowError("plain"),
    fd.TracingError("bad body", flow="f", hint="Use @fd.branch"),
    fd.CodecError("cannot encode", node="n"),
    fd.CheckpointError("corrupt", flow="f", node="n", hint="Resume"),
    fd.ConfigError("bad url", hint="Use sqlite:///x.db"),
    fd.BackendUnavailable("the store x", node="n", hint="Wait"),
    fd.StepFailed("step failed", flow="f", node="n", hint="h"),
    StepCodecFailed("cannot encode", flow="f", node="n"),
]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_pickling_round_trips(error: fd.FlowError) -> None:
    # multiprocessing and pytest-xdist pickle exceptions; flowdsl itself never does.
    back = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes
    assert type(back) is type(error)
    assert str(back) == str(error)
    assert (back.problem, back.flow, back.node, back.hint) == (
        error.problem,
        error.flow,
        error.node,
        error.hint,
    )


def test_pickling_keeps_the_run_id() -> None:
    error = fd.StepFailed("step failed", flow="f", node="n", run_id="r-1")
    back = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes
    assert back.run_id == "r-1"


# --- errors from real runs ----------------------------------------------------------------


@fd.step
async def explode(x: int) -> int:
    raise KeyError(f"no {x}")


@fd.flow
async def exploding(x: int) -> int:
    return await explode(x)


@fd.branch
async def loose(x: int) -> str:
    return "elsewhere"


@fd.step
async def ident(x: int) -> int:
    return x


@fd.flow
async def lost(x: int) -> int:
    return await loose(x).cases(here=lambda: ident(x), there=lambda: ident(0))


@pytest.mark.anyio
async def test_a_failed_step_names_flow_node_and_cause() -> None:
    async with fd.Context() as ctx:
        with pytest.raises(fd.StepFailed) as info:
            await ctx.run(exploding, 3, run_id="e-1")
    error = info.value
    assert str(error) == "flow 'exploding', node 'explode': step failed: KeyError: 'no 3'"
    assert error.node_id == "explode"
    assert error.run_id == "e-1"
    assert isinstance(error.__cause__, KeyError)


class Opaque:
    pass


@fd.step
async def opaque() -> Any:
    return Opaque()


@fd.flow
async def carries_opaque() -> Any:
    return await opaque()


@pytest.mark.anyio
async def test_a_codec_failure_gives_its_hint_once() -> None:
    async with fd.Context() as ctx:
        with pytest.raises(fd.CodecError) as info:
            await ctx.run(carries_opaque)
    message = str(info.value)
    assert message.count("Values crossing steps must be") == 1
    assert message.startswith(
        "flow 'carries_opaque', node 'opaque': step failed: CodecError: cannot encode the "
        "result of 'opaque' of type "
    )


@pytest.mark.anyio
async def test_an_unknown_case_at_run_time_names_the_key_and_the_cases() -> None:
    async with fd.Context() as ctx:
        with pytest.raises(fd.StepFailed) as info:
            await ctx.run(lost, 1)
    assert info.value.node_id == "loose"
    cause = info.value.__cause__
    assert isinstance(cause, LookupError)
    assert str(cause) == (
        "branch 'loose' returned 'elsewhere', which is none of its cases: 'here', 'there'; "
        "return one of those, or add a case for it"
    )


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: fd.Context(max_concurrency=0), r"^max_concurrency must be at least 1, not 0$"),
        (
            lambda: fd.Context(store="bogus://x"),
            r"^unknown store URL 'bogus://x'\. Use memory://, sqlite:///path\.db, "
            r"redis://host:6379/0 or nats://host:4222$",
        ),
    ],
)
def test_bad_context_options_are_config_errors(make: Any, match: str) -> None:
    with pytest.raises(fd.ConfigError, match=match):
        make()


def test_an_async_on_event_is_refused() -> None:
    async def callback(event: Any) -> None:
        pass

    with pytest.raises(
        fd.ConfigError, match=r"^on_event must be a plain function; .* Use `run\.events\(\)` "
    ):
        fd.Context(on_event=callback)


@pytest.mark.anyio
async def test_running_something_that_is_not_a_flow() -> None:
    with pytest.raises(
        fd.ConfigError,
        match=r"^'explode' is not a flow\. Pass a function decorated with @fd\.flow; a step runs "
        r"by calling it directly$",
    ):
        await fd.Context().run(explode, 1)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_arguments_that_do_not_fit_the_flow() -> None:
    with pytest.raises(
        fd.ConfigError,
        match=r"^flow 'exploding': arguments do not fit the flow's signature: .*\. Call it as "
        r"`exploding\(x: '?int'?\) -> '?int'?`$",
    ):
        await fd.Context().run(exploding, 1, 2)


@pytest.mark.anyio
async def test_start_needs_an_entered_context() -> None:
    with pytest.raises(fd.ConfigError, match=r"^flow 'exploding': start\(\) needs an entered "):
        await fd.Context().start(exploding, 1)


@pytest.mark.anyio
async def test_resuming_an_unknown_run() -> None:
    with pytest.raises(fd.CheckpointError, match=r"^no run 'nope' in store memory://\. "):
        await fd.Context().resume("nope")


def test_bad_step_options_are_tracing_errors() -> None:
    with pytest.raises(fd.TracingError, match=r"^node 'x': retries must be 0 or more, not -1$"):
        fd.step(name="x", retries=-1)(explode.fn)
    with pytest.raises(fd.TracingError, match=r"^timeout must be positive seconds, not 0$"):
        fd.step(timeout=0)(explode.fn)
