"""``@fd.step(cache=True)`` across runs, and ``fd.Secret`` values that never reach a store.

The cache is keyed by the step (its ``module:qualname``), its code (hash, or ``version=``)
and its canonical encoded inputs, and it lives in the context's store.  A secret is
encoded as its name only; its value is looked up where the step runs, in this process or
in the environment variable of that name.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flowdsl as fd
import flowdsl._secret
from flowdsl import events as ev
from flowdsl.backends import MemoryStore

pytestmark = pytest.mark.anyio

CALLS: Counter[str] = Counter()


@pytest.fixture(autouse=True)
def _reset() -> None:
    CALLS.clear()


ContextFactory = Callable[..., fd.Context]


@pytest.fixture(params=["memory", "sqlite"])
def contexts(request: pytest.FixtureRequest, tmp_path: Path) -> ContextFactory:
    store: Any = MemoryStore() if request.param == "memory" else f"sqlite:///{tmp_path}/c.db"

    def make(**kwargs: Any) -> fd.Context:
        return fd.Context(store=store, **kwargs)

    return make


def reused(events: list[Any], run_id: str) -> dict[str, str]:
    return {
        e.node_id: e.reason for e in events if isinstance(e, ev.StepReused) and e.run_id == run_id
    }


# --- cache=True -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Summary:
    words: int
    text: str


@fd.step(cache=True)
async def summarize(text: str, limit: int = 3) -> Summary:
    CALLS["summarize"] += 1
    words = text.split()
    return Summary(len(words), " ".join(words[:limit]))


@fd.step
async def shout(summary: Summary) -> str:
    CALLS["shout"] += 1
    return summary.text.upper()


@fd.flow
async def digest(text: str) -> str:
    return await shout(await summarize(text))


async def test_a_second_run_with_equal_inputs_takes_the_cached_result(
    contexts: ContextFactory,
) -> None:
    events: list[Any] = []
    async with contexts(on_event=events.append) as ctx:
        assert await ctx.run(digest, "one two three four", run_id="first") == "ONE TWO THREE"
        assert await ctx.run(digest, "one two three four", run_id="second") == "ONE TWO THREE"
    assert CALLS == {"summarize": 1, "shout": 2}  # only the cached step is reused
    assert reused(events, "first") == {}
    assert reused(events, "second") == {"summarize": "cache"}
    second_started = {
        e.node_id for e in events if isinstance(e, ev.StepStarted) and e.run_id == "second"
    }
    assert second_started == {"shout"}
    # The reused result is still journaled: resuming the run needs nothing else.
    async with contexts() as ctx:
        journal = await ctx.store.load_nodes("second")
        assert set(journal) == {"summarize", "shout"}
        assert await ctx.resume("second", flow=digest) == "ONE TWO THREE"
    assert CALLS == {"summarize": 1, "shout": 2}


async def test_different_inputs_run_the_cached_step_again(contexts: ContextFactory) -> None:
    events: list[Any] = []
    async with contexts(on_event=events.append) as ctx:
        assert await ctx.run(digest, "a b c d") == "A B C"
        assert await ctx.run(digest, "a b c e") == "A B C"
        assert await ctx.run(digest, "a b c d") == "A B C"
    assert CALLS["summarize"] == 2
    assert [e.reason for e in events if isinstance(e, ev.StepReused)] == ["cache"]


async def test_the_cache_outlives_the_context_in_a_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/cache.db"
    async with fd.Context(store=url) as ctx:
        await ctx.run(digest, "x y")
    events: list[Any] = []
    async with fd.Context(store=url, on_event=events.append) as ctx:  # as a new process would
        assert await ctx.run(digest, "x y") == "X Y"
    assert CALLS["summarize"] == 1
    assert [e.reason for e in events if isinstance(e, ev.StepReused)] == ["cache"]


def make_step(version: str | None, factor: int) -> fd.Step[..., int]:
    """A cached step under one fixed ``module:qualname``, as successive edits of it are."""
    if factor == 2:

        async def scale(x: int) -> int:
            CALLS["scale"] += 1
            return x * 2
    else:

        async def scale(x: int) -> int:
            CALLS["scale"] += 1
            return x * 3

    scale.__qualname__ = "scale"
    step: fd.Step[..., int] = fd.step(cache=True, version=version)(scale)
    return step


def flow_of(step: fd.Step[..., int]) -> fd.Flow[..., int]:
    async def scaled(x: int) -> int:
        return await step(x)

    built: fd.Flow[..., int] = fd.flow(name="scaled")(scaled)
    return built


async def test_a_version_bump_invalidates_the_cache(contexts: ContextFactory) -> None:
    async with contexts() as ctx:
        assert await ctx.run(flow_of(make_step("1", 2)), 5) == 10
        # Same step, same version: a cache hit, even from another definition of it.
        assert await ctx.run(flow_of(make_step("1", 2)), 5) == 10
        assert CALLS["scale"] == 1
        assert await ctx.run(flow_of(make_step("2", 2)), 5) == 10
        assert CALLS["scale"] == 2
        # With a version, the version is the key: a code change under "2" still hits.
        assert await ctx.run(flow_of(make_step("2", 3)), 5) == 10
        assert CALLS["scale"] == 2


async def test_without_a_version_a_code_change_invalidates_the_cache(
    contexts: ContextFactory,
) -> None:
    async with contexts() as ctx:
        doubling = make_step(None, 2)
        assert await ctx.run(flow_of(doubling), 5) == 10
        tripling = make_step(None, 3)  # the step edited: a code change
        assert doubling.code_hash != tripling.code_hash
        assert await ctx.run(flow_of(tripling), 5) == 15
        assert await ctx.run(flow_of(make_step(None, 2)), 5) == 10  # and edited back
    assert CALLS["scale"] == 2


@fd.step(cache=True)
async def echo(value: Any) -> Any:
    CALLS[json.dumps(value, sort_keys=True)] += 1
    return value


@fd.flow
async def echoing(value: Any) -> Any:
    return await echo(value)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=6,
)


@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=JSON, second=JSON)
async def test_cache_hits_exactly_when_the_encoded_inputs_are_equal(
    first: Any, second: Any
) -> None:
    CALLS.clear()
    events: list[Any] = []
    async with fd.Context(on_event=events.append) as ctx:
        assert await ctx.run(echoing, first, run_id="a") == first
        # A dict with its keys in another order is the same input.
        again = dict(reversed(list(second.items()))) if isinstance(second, dict) else second
        assert await ctx.run(echoing, again, run_id="b") == second
    same = json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)
    assert reused(events, "b") == ({"echo": "cache"} if same else {})
    assert sum(CALLS.values()) == (1 if same else 2)


async def test_the_cache_works_in_batch_mode(tmp_path: Path) -> None:
    events: list[Any] = []
    url = f"sqlite:///{tmp_path}/batch.db"
    async with fd.Context(batch=True, store=url, on_event=events.append) as ctx:
        assert await ctx.run(digest, "p q", run_id="one") == "P Q"
        assert await ctx.run(digest, "p q", run_id="two") == "P Q"
    assert reused(events, "two") == {"summarize": "cache"}
    assert CALLS["summarize"] == 1


@fd.step(cache=True)
async def slow_count(text: str) -> int:
    CALLS["slow_count"] += 1
    await anyio.sleep(0.01)  # so that the second call starts while the first runs
    return len(text.split())


@fd.step
async def pair(a: int, b: int) -> list[int]:
    return [a, b]


@fd.flow
async def twice(text: str) -> list[int]:
    # Two nodes, one step, equal arguments, no dependency between them: both are ready at
    # once, and neither finds the other's result in the cache yet.
    return await pair(await slow_count(text), await slow_count(text))


@pytest.mark.parametrize("batch", [False, True], ids=["realtime", "batch"])
async def test_equal_calls_in_one_run_run_the_cached_step_once(tmp_path: Path, batch: bool) -> None:
    events: list[Any] = []
    url = f"sqlite:///{tmp_path}/twice.db"
    async with fd.Context(batch=batch, store=url, on_event=events.append) as ctx:
        assert await ctx.run(twice, "a b c d", run_id="r") == [4, 4]
        journal = await ctx.store.load_nodes("r")
    assert CALLS["slow_count"] == 1
    assert list(reused(events, "r").values()) == ["cache"]  # one of the two, either
    assert set(journal) == {"slow_count", "slow_count-2", "pair"}


async def test_a_failed_cached_call_lets_the_waiting_one_run(tmp_path: Path) -> None:
    FLAKY["fail"] = 1
    async with fd.Context(store=f"sqlite:///{tmp_path}/flaky.db") as ctx:
        results = await ctx.map(echo_flaky, ["x", "x"], return_exceptions=True)
    # The run whose call failed failed; the other, which waited for that call, then ran
    # the step itself instead of taking the failure (or nothing) from it.
    assert sorted(map(type, results), key=str) == sorted([str, fd.StepFailed], key=str)
    assert CALLS["flaky"] == 2


FLAKY = {"fail": 0}


@fd.step(cache=True)
async def flaky(text: str) -> str:
    CALLS["flaky"] += 1
    await anyio.sleep(0.01)
    if FLAKY["fail"]:
        FLAKY["fail"] -= 1
        raise RuntimeError("the first call fails")
    return text


@fd.flow
async def echo_flaky(text: str) -> str:
    return await flaky(text)


# --- secrets --------------------------------------------------------------------------------

KEY = "sk-live-0123456789-DO-NOT-STORE"
SECRET_NAME = "FLOWDSL_TEST_API_KEY"


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> fd.Secret:
    """A secret with a value in this process (and none in the environment)."""
    monkeypatch.delenv(SECRET_NAME, raising=False)
    monkeypatch.setattr(flowdsl._secret, "_VALUES", {})
    return fd.Secret(SECRET_NAME, KEY)


FAIL = {"on": False}


@fd.step
async def authenticate(key: fd.Secret, user: str) -> fd.Secret:
    CALLS["authenticate"] += 1
    assert key.reveal() == KEY
    return key  # a secret passed on: encoded by name again


@fd.step
async def call_api(key: fd.Secret, query: str) -> str:
    CALLS["call_api"] += 1
    value = key.reveal()
    if FAIL["on"]:
        raise ConnectionError("the API is down")
    return f"{query}: answered with a key of {len(value)} characters"


@fd.flow
async def ask(key: fd.Secret, query: str) -> str:
    session = await authenticate(key, "me")
    return await call_api(session, query)


def sqlite_text(path: Path) -> str:
    """Every value of every row of every table, as text, and the raw bytes of the files."""
    conn = sqlite3.connect(path)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        parts = []
        for table in tables:
            for row in conn.execute(f'SELECT * FROM "{table}"'):  # noqa: S608 - names from the file
                parts.extend(
                    v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in row
                )
    finally:
        conn.close()
    for file in path.parent.glob(path.name + "*"):  # the database, its WAL and shm
        parts.append(file.read_bytes().decode("latin-1"))
    return "\n".join(parts)


def memory_text(store: MemoryStore) -> str:
    return repr((store._runs, store._nodes, store._cache))


async def test_a_secret_never_reaches_a_store_or_an_event(
    tmp_path: Path, secret: fd.Secret
) -> None:
    path = tmp_path / "s.db"
    memory = MemoryStore()
    for store in (memory, f"sqlite:///{path}"):
        events: list[Any] = []
        async with fd.Context(store=store, on_event=events.append) as ctx:
            result = await ctx.run(ask, secret, "weather?", run_id="s1")
            run = await ctx.start(ask, secret, "again", run_id="s2")
            streamed = [e async for e in run.events()]
            await run.result()
        assert result == f"weather?: answered with a key of {len(KEY)} characters"
        assert KEY not in repr(events) + repr(streamed)
        assert SECRET_NAME in repr(events)  # the name is what they carry
    assert KEY not in memory_text(memory)
    assert SECRET_NAME in memory_text(memory)
    stored = sqlite_text(path)
    assert KEY not in stored
    assert json.dumps({"secret": SECRET_NAME}, separators=(",", ":")) in stored
    assert KEY not in repr(secret) + str(secret)
    assert CALLS == {"authenticate": 4, "call_api": 4}


async def test_a_secret_never_reaches_the_batch_queue(tmp_path: Path, secret: fd.Secret) -> None:
    path = tmp_path / "q.db"  # the queue's tables and the store's, in one file
    events: list[Any] = []
    async with fd.Context(batch=True, store=f"sqlite:///{path}", on_event=events.append) as ctx:
        result = await ctx.run(ask, secret, "batch?", run_id="b1")
    assert result == f"batch?: answered with a key of {len(KEY)} characters"
    assert KEY not in repr(events)
    assert KEY not in sqlite_text(path)


async def test_a_failed_run_keeps_the_secret_out_of_the_store_and_the_error(
    tmp_path: Path, secret: fd.Secret
) -> None:
    path = tmp_path / "f.db"
    FAIL["on"] = True
    try:
        events: list[Any] = []
        async with fd.Context(store=f"sqlite:///{path}", on_event=events.append) as ctx:
            with pytest.raises(fd.StepFailed) as info:
                await ctx.run(ask, secret, "q", run_id="f1")
    finally:
        FAIL["on"] = False
    assert KEY not in str(info.value)
    assert KEY not in repr(events)
    assert KEY not in sqlite_text(path)


async def test_a_resume_without_the_value_fails_naming_the_secret(
    tmp_path: Path, secret: fd.Secret, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path}/r.db"
    FAIL["on"] = True
    try:
        async with fd.Context(store=url) as ctx:
            with pytest.raises(fd.StepFailed, match=r"node 'call_api'"):
                await ctx.run(ask, secret, "q", run_id="r1")
    finally:
        FAIL["on"] = False

    # A new process: the value given to fd.Secret(...) earlier is gone.
    monkeypatch.setattr(flowdsl._secret, "_VALUES", {})
    async with fd.Context(store=url) as ctx:
        with pytest.raises(
            fd.StepFailed, match=r"^flow 'ask', node 'call_api': step failed: "
        ) as info:
            await ctx.resume("r1", flow=ask)
    cause = info.value.__cause__
    assert isinstance(cause, fd.ConfigError)
    assert str(cause) == (
        f"secret '{SECRET_NAME}' has no value in this process. Set the environment variable "
        f"{SECRET_NAME}, or create fd.Secret('{SECRET_NAME}', value) in this process before "
        "the run resumes"
    )

    # The environment variable of the secret's name provides it.
    monkeypatch.setenv(SECRET_NAME, KEY)
    async with fd.Context(store=url) as ctx:
        result = await ctx.resume("r1", flow=ask)
    assert result == f"q: answered with a key of {len(KEY)} characters"
    assert CALLS["authenticate"] == 1  # journaled: not run again, secret or not


async def test_a_value_given_in_this_process_is_enough_to_resume(
    tmp_path: Path, secret: fd.Secret, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path}/v.db"
    FAIL["on"] = True
    try:
        async with fd.Context(store=url) as ctx:
            with pytest.raises(fd.StepFailed):
                await ctx.run(ask, secret, "q", run_id="v1")
    finally:
        FAIL["on"] = False
    monkeypatch.setattr(flowdsl._secret, "_VALUES", {})
    fd.Secret(SECRET_NAME, KEY)  # what a notebook would run again after a restart
    async with fd.Context(store=url) as ctx:
        assert (
            await ctx.resume("v1", flow=ask) == f"q: answered with a key of {len(KEY)} characters"
        )


def test_secrets_compare_by_name_and_need_one() -> None:
    assert fd.Secret("A", "x") == fd.Secret("A", "y")
    assert fd.Secret("A", "x") != fd.Secret("B", "x")
    with pytest.raises(fd.ConfigError, match=r"^a secret needs a name\. "):
        fd.Secret("", "x")


def test_the_cli_never_shows_a_secret(tmp_path: Path, secret: fd.Secret) -> None:
    from click.testing import CliRunner

    from flowdsl.cli.main import cli

    url = f"sqlite:///{tmp_path}/cli.db"

    async def populate() -> None:
        async with fd.Context(store=url) as ctx:
            await ctx.run(ask, secret, "q", run_id="c1")

    anyio.run(populate)
    runner = CliRunner()
    outputs = []
    for args in (
        ["runs", "list", "--store", url],
        ["runs", "list", "--store", url, "--json"],
        ["runs", "show", "c1", "--store", url],
        ["runs", "show", "c1", "--store", url, "--json"],
    ):
        result = runner.invoke(cli, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        outputs.append(result.output)
    assert "c1" in outputs[0]
    assert SECRET_NAME in outputs[3]  # the inputs are shown, by name
    assert all(KEY not in output for output in outputs)
