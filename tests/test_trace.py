"""The tracer: node ids, sub-flows and cases, and every mistake it refuses at definition time."""

from __future__ import annotations

import asyncio
import enum
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Any, Literal

import anyio
import attrs
import pytest

import flowdsl as fd
from flowdsl._define import trace as _trace
from flowdsl._define.graph import Input, NodeKind, Ref
from flowdsl._define.graph import Literal as LiteralExpr

pytestmark = pytest.mark.anyio


# --- steps shared by the tests ------------------------------------------------------------


@attrs.frozen
class Label:
    name: str
    score: int


@fd.step
async def classify(ticket: str) -> Label:
    return Label("urgent" if "!" in ticket else "calm", len(ticket))


@fd.step
async def sentiment(ticket: str) -> int:
    return ticket.count("!")


@fd.step
async def escalate(ticket: str, mood: int) -> str:
    return f"escalated {ticket} ({mood})"


@fd.step
async def draft_reply(ticket: str, label: str) -> str:
    return f"reply to {ticket} as {label}"


@fd.step
async def lookup(table: dict[str, int]) -> dict[str, int]:
    return {k: v * 10 for k, v in table.items()}


@fd.step
async def combine(*parts: Any) -> str:
    return "+".join(map(str, parts))


@fd.branch
async def route(label: str) -> Literal["escalate", "auto"]:
    return "escalate" if label == "urgent" else "auto"


@fd.branch
async def louder(mood: int) -> bool:
    return mood > 1


class Tier(enum.Enum):
    GOLD = "gold"
    BASIC = "basic"


@fd.branch
async def tier(ticket: str) -> Tier:
    return Tier.GOLD if ticket.startswith("vip") else Tier.BASIC


@fd.flow
async def sub(ticket: str) -> str:
    label = await classify(ticket)
    return label.name


@fd.flow
async def triage(ticket: str) -> str:
    label = await classify(ticket)
    mood = await sentiment(ticket)

    async def escalation() -> str:
        first = await escalate(ticket, mood)
        return await louder(mood).cases(
            {True: lambda: escalate(first, mood), False: lambda: draft_reply(first, "calm")}
        )

    return await route(label.name).cases(
        escalate=escalation,
        auto=lambda: draft_reply(ticket, label.name),
    )


@fd.flow
async def twice(ticket: str) -> list[str]:
    a = await sub(ticket)
    b = await sub(ticket)
    c = await classify(ticket)
    return [a, b, c.name]


# --- node ids -----------------------------------------------------------------------------


def test_node_ids_are_readable_and_namespaced() -> None:
    assert triage.graph.nodes == (
        "classify",
        "sentiment",
        "route",
        "route.escalate/escalate",
        "route.escalate/louder",
        "route.escalate/louder.true/escalate",
        "route.escalate/louder.false/draft_reply",
        "route.escalate/louder.join",
        "route.auto/draft_reply",
        "route.join",
    )
    graph = triage.graph
    assert graph["route"].kind is NodeKind.BRANCH
    assert graph["route"].labels == ("escalate", "auto")
    assert graph["route.join"].kind is NodeKind.JOIN
    assert graph["route.escalate/louder.true/escalate"].guard == (
        ("route", "escalate"),
        ("route.escalate/louder", "true"),
    )
    assert graph.inputs == ("ticket",)


def test_repeated_calls_and_sub_flows_get_numbered_ids() -> None:
    assert twice.graph.nodes == ("sub/classify", "sub-2/classify", "classify")
    assert sub.graph.nodes == ("classify",)


def test_enum_case_ids_use_member_names() -> None:
    @fd.flow
    async def by_tier(ticket: str) -> str:
        return await tier(ticket).cases(
            {Tier.GOLD: lambda: escalate(ticket, 3), Tier.BASIC: lambda: draft_reply(ticket, "b")}
        )

    assert by_tier.graph.nodes == (
        "tier",
        "tier.GOLD/escalate",
        "tier.BASIC/draft_reply",
        "tier.join",
    )


def test_repeated_calls_are_numbered_in_call_order() -> None:
    @fd.flow
    async def three(ticket: str) -> list[int]:
        return [await sentiment(ticket), await sentiment(ticket), await sentiment("x")]

    assert three.graph.nodes == ("sentiment", "sentiment-2", "sentiment-3")


def test_tracing_twice_gives_the_same_graph() -> None:
    again = _trace.trace(triage)
    assert again.nodes == triage.graph.nodes
    assert again.edges == triage.graph.edges
    assert again.fingerprint == triage.graph.fingerprint
    assert again is not triage.graph


def test_fingerprint_changes_with_the_wiring() -> None:
    @fd.flow
    async def one(ticket: str) -> str:
        return await draft_reply(ticket, "a")

    @fd.flow
    async def other(ticket: str) -> str:
        return await draft_reply(ticket, "b")

    assert one.graph.nodes == other.graph.nodes
    assert one.graph.fingerprint != other.graph.fingerprint


MODULE = """
import flowdsl as fd


@fd.flow
async def early(ticket: str) -> str:
    # `shout` is defined below: tracing waits for first use.
    mood = await shout(ticket)
    return await shout(mood)


@fd.step
async def shout(text: str) -> str:
    return text.upper() + "!"


@fd.step
async def count(text: str) -> int:
    return len(text)


@fd.branch
async def pick(n: int) -> bool:
    return n > 3


@fd.flow
async def inner(text: str) -> int:
    return await count(text)


@fd.flow
async def shaped(ticket: str) -> int:
    n = await count(ticket)
    m = await inner(ticket)
    return await pick(n).cases({True: lambda: inner(ticket), False: lambda: count("x")})
"""


def _load(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_step_defined_after_the_flow_defers_tracing(tmp_path: Path) -> None:
    path = tmp_path / "deferred_mod.py"
    path.write_text(MODULE)
    module = _load(path, "deferred_mod")
    assert module.early._graph is None  # `shout` did not exist yet when `early` was defined
    assert module.early.graph.nodes == ("shout", "shout-2")
    assert module.shaped._graph is not None  # everything it needs was defined before it
    assert fd.run(module.early, "hi") == "HI!!"


def test_ids_and_fingerprint_are_stable_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "stable_mod.py"
    path.write_text(MODULE)
    module = _load(path, "stable_mod")
    script = textwrap.dedent(
        """
        import json, sys
        sys.path.insert(0, sys.argv[1])
        import stable_mod
        print(json.dumps({
            name: [list(getattr(stable_mod, name).graph.nodes),
                   getattr(stable_mod, name).graph.fingerprint]
            for name in ("early", "shaped")
        }))
        """
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=120,
    )
    theirs = json.loads(out.stdout)
    ours = {
        name: [list(getattr(module, name).graph.nodes), getattr(module, name).graph.fingerprint]
        for name in ("early", "shaped")
    }
    assert theirs == ours
    assert ours["shaped"][0] == [
        "count",
        "inner/count",
        "pick",
        "pick.true/inner/count",
        "pick.false/count",
        "pick.join",
    ]


# --- edges and arguments ------------------------------------------------------------------


def test_independent_steps_have_no_edge() -> None:
    edges = {(e.src, e.dst) for e in triage.graph.edges}
    assert ("classify", "sentiment") not in edges
    assert ("sentiment", "classify") not in edges
    assert ("classify", "route") in edges
    assert triage.graph["classify"].data_deps == ()
    assert triage.graph["sentiment"].data_deps == ()


def test_literal_and_input_arguments_are_recorded() -> None:
    @fd.flow
    async def lit(ticket: str) -> str:
        return await draft_reply(ticket, label="fixed")

    node = lit.graph["draft_reply"]
    assert node.args == (Input("ticket"),)
    ((key, expr),) = node.kwargs
    assert key == "label"
    assert isinstance(expr, LiteralExpr)
    assert expr.value == "fixed"


def test_projections_are_recorded_on_the_ref() -> None:
    @fd.flow
    async def proj(ticket: str) -> str:
        label = await classify(ticket)
        return await draft_reply(ticket, label.name)

    assert proj.graph["draft_reply"].args == (Input("ticket"), Ref("classify", (("attr", "name"),)))


async def test_projections_apply_at_run_time() -> None:
    @fd.flow
    async def proj(ticket: str, table: dict[str, int]) -> list[Any]:
        label = await classify(ticket)
        scaled = await lookup(table)
        joined = await combine(label.name, label.score, scaled["a"], table["b"])
        return [joined, label.name, scaled["b"]]

    async with fd.Context() as ctx:
        result = await ctx.run(proj, "hi!", {"a": 1, "b": 2})
    assert result == ["urgent+3+10+2", "urgent", 20]


async def test_containers_of_results_become_arguments() -> None:
    @fd.flow
    async def contain(ticket: str) -> str:
        label = await classify(ticket)
        mood = await sentiment(ticket)
        return await combine([label.name, mood], {"m": mood}, [ticket])

    assert set(contain.graph["combine"].data_deps) == {"classify", "sentiment"}
    async with fd.Context() as ctx:
        assert await ctx.run(contain, "a!") == "['urgent', 1]+{'m': 1}+['a!']"


async def test_sub_flows_are_inlined_and_run() -> None:
    async with fd.Context() as ctx:
        assert await ctx.run(twice, "x!") == ["urgent", "urgent", "urgent"]
        assert await ctx.run(triage, "x!!") == "escalated escalated x!! (2) (2)"
        assert await ctx.run(triage, "x!") == "reply to escalated x! (1) as calm"
        assert await ctx.run(triage, "x") == "reply to x as calm"


async def test_a_case_may_hand_on_an_outer_value() -> None:
    @fd.flow
    async def maybe(ticket: str) -> Any:
        mood = await sentiment(ticket)
        return await louder(mood).cases({True: lambda: escalate(ticket, mood), False: lambda: mood})

    assert maybe.graph.nodes == ("sentiment", "louder", "louder.true/escalate", "louder.join")
    async with fd.Context() as ctx:
        assert await ctx.run(maybe, "a") == 0
        assert await ctx.run(maybe, "a!!") == "escalated a!! (2)"


# --- steps outside flows ------------------------------------------------------------------


async def test_a_step_called_outside_a_flow_is_its_coroutine_function() -> None:
    coro = classify("hey!")
    assert inspect.iscoroutine(coro)
    assert await coro == Label("urgent", 4)
    assert await route("calm") == "auto"
    assert classify.__name__ == "classify"
    assert classify.__wrapped__ is not None  # type: ignore[attr-defined]


# --- mistakes refused at definition time --------------------------------------------------

USE_BRANCH = (
    r"\. Inside a flow, step results are placeholders until the flow runs: decide with an "
    r"@fd\.branch step \(`await route\(x\)\.cases\(\.\.\.\)`\), or move the logic into a step$"
)


USE_LOOP = USE_BRANCH[:-1] + (
    r"; for a `while` that repeats steps until a result says stop, write "
    r"`await fd\.loop\(body, state, max_iterations=N\)` with a body returning "
    r"fd\.Continue\(next_state\) or fd\.Done\(result\)$"
)
USE_MAP = (
    r"\. Inside a flow, a step's list result is a placeholder until the flow runs: to run a "
    r"step \(or a flow\) once per element, write `await step\.map\(values\)`; to compute "
    r"over the whole list, do it inside a step$"
)


def _refused(what: str, on: str = "the result of 'classify'", hint: str = USE_BRANCH) -> str:
    return rf"^flow 'bad': {what} on {on} inside a flow body{hint}"


async def _if(ticket: str) -> Any:
    if await classify(ticket):
        return 1
    return 2


async def _while(ticket: str) -> Any:
    label = await classify(ticket)
    while label:
        pass


async def _bool(ticket: str) -> Any:
    return bool(await classify(ticket))


async def _not(ticket: str) -> Any:
    return not await classify(ticket)


async def _for(ticket: str) -> Any:
    return [c for c in await classify(ticket)]


async def _add(ticket: str) -> Any:
    return (await sentiment(ticket)) + 1


async def _radd(ticket: str) -> Any:
    return 1 + await sentiment(ticket)


async def _fstring(ticket: str) -> Any:
    label = await classify(ticket)
    return f"label: {label}"


async def _eq(ticket: str) -> Any:
    return (await classify(ticket)) == "urgent"


async def _lt(ticket: str) -> Any:
    return (await sentiment(ticket)) < 3


async def _len(ticket: str) -> Any:
    return len(await classify(ticket))


async def _input_if(ticket: str) -> Any:
    if ticket:
        return 1


@pytest.mark.parametrize(
    ("body", "match"),
    [
        pytest.param(
            _if,
            _refused(r"bool\(\) \(an `if`, `while`, `and`/`or` or `not`\)", hint=USE_LOOP),
            id="if",
        ),
        pytest.param(
            _while, _refused(r"bool\(\) \(an `if`, `while`.*\)", hint=USE_LOOP), id="while"
        ),
        pytest.param(_bool, _refused(r"bool\(\) .*", hint=USE_LOOP), id="bool"),
        pytest.param(_not, _refused(r"bool\(\) .*", hint=USE_LOOP), id="not"),
        pytest.param(_for, _refused("iteration", hint=USE_MAP), id="for"),
        pytest.param(
            _add, _refused(r"arithmetic \(__add__\)", "the result of 'sentiment'"), id="+"
        ),
        pytest.param(
            _radd, _refused(r"arithmetic \(__radd__\)", "the result of 'sentiment'"), id="r+"
        ),
        pytest.param(
            _fstring, _refused(r"string formatting \(an f-string or format\(\)\)"), id="f"
        ),
        pytest.param(_eq, _refused(r"comparison \(==\)"), id="=="),
        pytest.param(_lt, _refused(r"comparison \(<\)", "the result of 'sentiment'"), id="<"),
        pytest.param(_len, _refused(r"len\(\)", hint=USE_MAP), id="len"),
        pytest.param(
            _input_if, _refused(r"bool\(\) .*", "input 'ticket'", hint=USE_LOOP), id="input"
        ),
    ],
)
def test_using_a_result_as_a_python_value_says_use_a_branch(body: Any, match: str) -> None:
    with pytest.raises(fd.TracingError, match=match):
        fd.flow(name="bad")(body)


AWAITED = (
    r"^flow 'bad': the flow body awaited something that is not a step, branch or flow "
    r"\(it {how}\)\. A flow body only wires steps together; move real awaits \(sleeps, I/O, "
    r"asyncio\.gather\) into a @fd\.step; steps with no data dependency already run "
    r"concurrently$"
)


async def _asyncio_sleep0(ticket: str) -> Any:
    await asyncio.sleep(0)


async def _asyncio_sleep(ticket: str) -> Any:
    await asyncio.sleep(0.5)


async def _anyio_sleep(ticket: str) -> Any:
    await anyio.sleep(0)  # noqa: ASYNC115 - the mistake under test


async def _gather(ticket: str) -> Any:
    return await asyncio.gather(classify(ticket), sentiment(ticket))


GATHERED = (
    r"^flow 'bad': `classify\(\.\.\.\)` was handed to asyncio \(asyncio\.gather, "
    r"ensure_future, \.\.\.\) inside a flow body\. A flow body only wires steps together"
)


@pytest.mark.parametrize(
    ("body", "how"),
    [
        pytest.param(_asyncio_sleep0, "tried to suspend with NoneType", id="asyncio.sleep(0)"),
        pytest.param(_asyncio_sleep, "needs a running event loop: .*", id="asyncio.sleep(0.5)"),
        pytest.param(_anyio_sleep, "needs a running event loop: .*", id="anyio.sleep(0)"),
    ],
)
def test_awaiting_something_else_is_refused(body: Any, how: str) -> None:
    with pytest.raises(fd.TracingError, match=AWAITED.format(how=how)):
        fd.flow(name="bad")(body)


def test_asyncio_gather_of_step_calls_is_refused_before_asyncio_looks_for_a_loop() -> None:
    # Once asyncio looks for a loop, 3.12 and 3.13 warn "There is no current event loop"
    # and make one, and 3.11 makes one silently: the call must be refused before that.
    with pytest.raises(fd.TracingError, match=GATHERED):
        fd.flow(name="bad")(_gather)


async def test_asyncio_gather_of_step_calls_is_refused_inside_a_running_loop() -> None:
    # With a loop running, asyncio would otherwise schedule the step calls as tasks.
    with pytest.raises(fd.TracingError, match=GATHERED):
        fd.flow(name="bad")(_gather)


async def test_awaiting_something_else_is_refused_inside_a_running_loop() -> None:
    # Defined in a notebook cell, with an event loop running: the await suspends at once.
    with pytest.raises(fd.TracingError, match=AWAITED.format(how="tried to suspend with .*")):
        fd.flow(name="bad")(_anyio_sleep)


def test_a_value_used_outside_its_case_is_refused() -> None:
    async def leak(ticket: str) -> Any:
        leaked = []

        async def escalation() -> Any:
            value = await escalate(ticket, 1)
            leaked.append(value)
            return value

        await route(ticket).cases(escalate=escalation, auto=lambda: draft_reply(ticket, "x"))
        return await draft_reply(leaked[0], "y")

    with pytest.raises(
        fd.TracingError,
        match=r"^flow 'bad', node 'draft_reply': argument 1 is the result of "
        r"'route\.escalate/escalate', which was produced inside case 'escalate' of branch "
        r"'route' and is used outside it\. A case's values exist only when that case runs: "
        r"return the value from the case and use what `await branch\(\.\.\.\)\.cases\(\.\.\.\)` "
        r"gives$",
    ):
        fd.flow(name="bad")(leak)


def test_a_value_used_in_a_sibling_case_is_refused() -> None:
    async def leak(ticket: str) -> Any:
        leaked = []

        async def escalation() -> Any:
            value = await escalate(ticket, 1)
            leaked.append(value)
            return value

        return await route(ticket).cases(
            escalate=escalation, auto=lambda: draft_reply(leaked[0], "x")
        )

    with pytest.raises(
        fd.TracingError,
        match=r"^flow 'bad', node 'route\.auto/draft_reply': argument 1 is the result of "
        r"'route\.escalate/escalate', which was produced inside case 'escalate' of branch "
        r"'route' and is used outside it\. ",
    ):
        fd.flow(name="bad")(leak)


async def _unknown_literal(ticket: str) -> Any:
    return await route(ticket).cases(escalate=lambda: classify(ticket), later=lambda: 1)


async def _unknown_enum(ticket: str) -> Any:
    return await tier(ticket).cases({Tier.GOLD: lambda: classify(ticket), "SILVER": lambda: 1})


async def _unknown_bool(ticket: str) -> Any:
    mood = await sentiment(ticket)
    return await louder(mood).cases({True: lambda: classify(ticket), "maybe": lambda: 1})


@pytest.mark.parametrize(
    ("body", "match"),
    [
        pytest.param(
            _unknown_literal,
            r"^flow 'bad', node 'route': unknown case key\(s\) 'later'\. `route` can only "
            r"return one of \['auto', 'escalate'\]$",
            id="Literal",
        ),
        pytest.param(
            _unknown_enum,
            r"^flow 'bad', node 'tier': unknown case key\(s\) 'SILVER'\. `tier` can only "
            r"return one of \['BASIC', 'GOLD', 'basic', 'gold'\]$",
            id="Enum",
        ),
        pytest.param(
            _unknown_bool,
            r"^flow 'bad', node 'louder': unknown case key\(s\) 'maybe'\. `louder` can only "
            r"return one of \['false', 'true'\]$",
            id="bool",
        ),
    ],
)
def test_an_unknown_case_key_is_refused(body: Any, match: str) -> None:
    with pytest.raises(fd.TracingError, match=match):
        fd.flow(name="bad")(body)


def test_a_step_called_without_await_is_refused() -> None:
    async def forgot(ticket: str) -> Any:
        classify(ticket)
        return 1

    with pytest.raises(
        fd.TracingError,
        match=r"^flow 'bad', node 'classify': `classify\(\.\.\.\)` is called but never awaited\. "
        r"`classify` is a step; inside a flow write `x = await classify\(\.\.\.\)`, not "
        r"`classify\(\.\.\.\)`$",
    ):
        fd.flow(name="bad")(forgot)


def test_an_unawaited_call_passed_on_is_refused() -> None:
    async def forgot(ticket: str) -> Any:
        label = classify(ticket)
        return await draft_reply(ticket, label)

    with pytest.raises(
        fd.TracingError,
        match=r"^flow 'bad', node 'draft_reply': argument 2 is `classify\(\.\.\.\)`, a call that "
        r"was never awaited\. Write `x = await classify\(\.\.\.\)` and pass `x`$",
    ):
        fd.flow(name="bad")(forgot)


def test_a_branch_awaited_without_cases_is_refused() -> None:
    async def bare(ticket: str) -> Any:
        return await route(ticket)

    with pytest.raises(
        fd.TracingError,
        match=r"^flow 'bad', node 'route': `route\(\.\.\.\)` is a branch; awaiting it alone does "
        r"nothing\. Write `await route\(\.\.\.\)\.cases\(name=lambda: step\(\.\.\.\), \.\.\.\)`$",
    ):
        fd.flow(name="bad")(bare)


def test_a_case_that_is_not_callable_is_refused() -> None:
    async def eager(ticket: str) -> Any:
        return await route(ticket).cases(escalate=classify(ticket), auto=lambda: 1)

    with pytest.raises(
        fd.TracingError,
        match=r"^flow 'bad', node 'route': case 'escalate' is a StepCall, not a zero-argument "
        r"callable\. Write `escalate=lambda: step\(\.\.\.\)` so that only the chosen case runs$",
    ):
        fd.flow(name="bad")(eager)


def test_awaiting_a_result_again_is_refused() -> None:
    async def again(ticket: str) -> Any:
        label = await classify(ticket)
        return await label

    with pytest.raises(
        fd.TracingError,
        match=r"^flow 'bad': awaiting the result of 'classify', which is already a value\. ",
    ):
        fd.flow(name="bad")(again)


def test_a_constant_the_codec_cannot_carry_is_refused() -> None:
    async def odd(ticket: str) -> Any:
        return await draft_reply(ticket, object())

    with pytest.raises(
        fd.TracingError,
        match=r"^flow 'bad', node 'draft_reply': argument 2 is a constant of type object that "
        r"cannot be recorded in the graph\. ",
    ):
        fd.flow(name="bad")(odd)


def test_arguments_that_do_not_fit_the_signature_are_refused() -> None:
    async def extra(ticket: str) -> Any:
        return await classify(ticket, 3)

    with pytest.raises(
        fd.TracingError,
        match=r"^flow 'bad', node 'classify': `classify` called with arguments that do not fit "
        r"its signature: too many positional arguments\. `classify\(ticket: '?str'?\) -> ",
    ):
        fd.flow(name="bad")(extra)


async def _star(*tickets: str) -> int:
    return 1


async def _options(ticket: str, **options: str) -> int:
    return 1


@pytest.mark.parametrize(("body", "name"), [(_star, "tickets"), (_options, "options")])
def test_variadic_flow_parameters_are_refused(body: Any, name: str) -> None:
    with pytest.raises(
        fd.TracingError,
        match=rf"^flow 'bad': parameter '{name}' is variadic \(\*args or \*\*kwargs\)\. Give every "
        r"flow input a name; pass a list or dict for many values$",
    ):
        fd.flow(name="bad")(body)


def test_a_non_async_flow_is_refused() -> None:
    def plain(ticket: str) -> str:
        return ticket

    with pytest.raises(
        fd.TracingError,
        match=r"^@fd\.flow needs an `async def` function; 'plain' is not\. Write `async def` for "
        r"the flow body$",
    ):
        fd.flow(plain)  # type: ignore[arg-type]


RECURSIVE = """
import flowdsl as fd


@fd.step
async def dec(n: int) -> int:
    return n - 1


@fd.flow
async def countdown(n: int) -> int:
    return await countdown(await dec(n))


@fd.flow
async def ping(n: int) -> int:
    return await pong(n)


@fd.flow
async def pong(n: int) -> int:
    return await ping(n)
"""


def test_recursion_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "recursive_mod.py"
    path.write_text(RECURSIVE)
    module = _load(path, "recursive_mod")
    with pytest.raises(
        fd.TracingError,
        match=r"^flow 'countdown': flow 'countdown' calls itself \(through countdown\)\. A flow "
        r"is a finite graph; recursion has no end at definition time\. For work that repeats "
        r"until a result says stop, write `await fd\.loop\(body, state, max_iterations=N\)`$",
    ):
        module.countdown.graph  # noqa: B018
    with pytest.raises(
        fd.TracingError,
        match=r"^flow 'ping': flow 'ping' calls itself \(through ping -> pong\)\. ",
    ):
        module.ping.graph  # noqa: B018


def test_bad_names_are_refused() -> None:
    with pytest.raises(fd.TracingError, match=r"^step name 'no-dash' is not a valid name\. "):
        fd.step(name="no-dash")(classify.fn)
