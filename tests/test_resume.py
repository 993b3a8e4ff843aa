"""Resume: finished nodes come from the journal, the rest runs; run ids make starts idempotent.

Each flow counts its steps' executions in ``CALLS`` (reset for every test), so a test can
say exactly what ran before a failure or a cancellation and what ran on resume.  Stores:
the in-memory one (one store object shared by the contexts of a test) and SQLite in
``tmp_path`` (a file that a brand-new context opens, as another process would).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest

import flowdsl as fd
from flowdsl import events as ev
from flowdsl._records import RunStatus
from flowdsl.backends import MemoryStore
from flowdsl.backends.sqlite.store import SQLiteStore

pytestmark = pytest.mark.anyio

CALLS: Counter[str] = Counter()
# The "bug": a module-level switch the steps read.  Flipping it changes no code, so the
# step's code hash is the same and nothing is invalidated: the failed node simply has no
# journal record and runs again.
BUGGY = {"on": True}
GATES: dict[str, anyio.Event] = {}

ContextFactory = Callable[..., fd.Context]


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    CALLS.clear()
    BUGGY["on"] = True
    GATES.clear()
    yield
    GATES.clear()


@pytest.fixture(params=["memory", "sqlite"])
def contexts(request: pytest.FixtureRequest, tmp_path: Path) -> ContextFactory:
    """Makes contexts that share one store: a memory store object, or an SQLite file."""
    store: Any = MemoryStore() if request.param == "memory" else f"sqlite:///{tmp_path}/r.db"

    def make(**kwargs: Any) -> fd.Context:
        return fd.Context(store=store, **kwargs)

    return make


async def gate(name: str) -> None:
    """Wait until the test opens gate *name* (created on first use)."""
    event = GATES.setdefault(name, anyio.Event())
    await event.wait()


def open_gate(name: str) -> None:
    GATES.setdefault(name, anyio.Event()).set()


def of(events: list[Any], kind: type[Any], run_id: str | None = None) -> list[Any]:
    return [e for e in events if isinstance(e, kind) and (run_id is None or e.run_id == run_id)]


def node_ids(events: list[Any], kind: type[Any]) -> list[str]:
    return sorted(e.node_id for e in of(events, kind))


# --- a pipeline with a bug ----------------------------------------------------------------


@fd.step
async def fetch(doc: str) -> str:
    CALLS["fetch"] += 1
    return doc.upper()


@fd.step
async def parse(text: str) -> list[str]:
    CALLS["parse"] += 1
    return text.split()


@fd.step
async def summarize(text: str) -> int:
    CALLS["summarize"] += 1
    return len(text)


@fd.step
async def analyze(words: list[str], chars: int) -> int:
    CALLS["analyze"] += 1
    if BUGGY["on"]:
        raise ZeroDivisionError("the bug")
    return len(words) if chars else 0


@fd.step
async def report(words: int, chars: int) -> str:
    CALLS["report"] += 1
    return f"{words} words, {chars} chars"


@fd.flow
async def pipeline(doc: str) -> str:
    text = await fetch(doc)
    words = await parse(text)
    chars = await summarize(text)  # concurrent with parse
    count = await analyze(words, chars)
    return await report(count, chars)


async def test_a_fixed_bug_resumes_running_only_the_failed_node_and_its_downstream(
    contexts: ContextFactory,
) -> None:
    events: list[Any] = []
    async with contexts(on_event=events.append) as ctx:
        with pytest.raises(fd.StepFailed) as info:
            await ctx.run(pipeline, "a b c", run_id="nb")
        assert info.value.node_id == "analyze"
        assert isinstance(info.value.__cause__, ZeroDivisionError)
        assert CALLS == {"fetch": 1, "parse": 1, "summarize": 1, "analyze": 1}

        BUGGY["on"] = False  # the user fixes the bug
        events.clear()
        assert await ctx.resume("nb") == "3 words, 5 chars"

    # The fixed step and what depends on it ran; the rest came from the journal.
    assert CALLS == {"fetch": 1, "parse": 1, "summarize": 1, "analyze": 2, "report": 1}
    assert node_ids(events, ev.StepStarted) == ["analyze", "report"]
    reused = of(events, ev.StepReused)
    assert sorted(e.node_id for e in reused) == ["fetch", "parse", "summarize"]
    assert {e.reason for e in reused} == {"journal"}
    assert {e.run_id for e in reused} == {"nb"}
    assert not of(events, ev.StepInvalidated)  # a flag flip is not a code change
    (started,) = of(events, ev.RunStarted)
    assert started.resumed
    (finished,) = of(events, ev.RunFinished)
    assert finished.result == "3 words, 5 chars"


async def test_a_failed_run_stays_failed_until_resumed(contexts: ContextFactory) -> None:
    async with contexts() as ctx:
        with pytest.raises(fd.StepFailed):
            await ctx.run(pipeline, "a b", run_id="f1")
        before = dict(CALLS)
        BUGGY["on"] = False
        # Running the same id again gives the stored failure: it never runs twice.
        with pytest.raises(
            fd.StepFailed, match=r"^flow 'pipeline', node 'analyze': the run ended failed: "
        ) as info:
            await ctx.run(pipeline, "a b", run_id="f1")
        assert "Resume it with `ctx.resume('f1')`" in str(info.value)
        assert dict(CALLS) == before
        assert (await ctx.store.get_run("f1")).status is fd.RunStatus.FAILED
        assert await ctx.resume("f1") == "2 words, 3 chars"
        assert (await ctx.store.get_run("f1")).status is fd.RunStatus.FINISHED


# --- run ids: idempotent start ------------------------------------------------------------


@fd.step
async def slow_double(x: int) -> int:
    CALLS["slow_double"] += 1
    await gate("slow_double")
    return 2 * x


@fd.flow
async def doubling(x: int) -> int:
    return await slow_double(x)


async def test_starting_a_run_id_twice_returns_the_same_run_and_runs_once(
    contexts: ContextFactory,
) -> None:
    async with contexts() as ctx:
        first = await ctx.start(doubling, 21, run_id="t-42")
        second = await ctx.start(doubling, 21, run_id="t-42")
        assert second is first
        assert first.run_id == "t-42"
        open_gate("slow_double")
        assert await first.result() == 42
        assert await second.result() == 42
    assert CALLS == {"slow_double": 1}


async def test_starting_a_finished_run_id_returns_its_stored_result_without_running(
    contexts: ContextFactory,
) -> None:
    open_gate("slow_double")
    async with contexts() as ctx:
        assert await ctx.run(doubling, 5, run_id="done") == 10
    events: list[Any] = []
    async with contexts(on_event=events.append) as ctx:
        run = await ctx.start(doubling, 5, run_id="done")
        assert run.status is fd.RunStatus.FINISHED
        assert await run.result() == 10
        assert await ctx.run(doubling, 5, run_id="done") == 10
    assert CALLS == {"slow_double": 1}
    assert events == []


async def test_a_run_id_without_one_is_generated_and_each_start_is_a_new_run(
    contexts: ContextFactory,
) -> None:
    open_gate("slow_double")
    async with contexts() as ctx:
        one = await ctx.start(doubling, 1)
        two = await ctx.start(doubling, 1)
        assert one.run_id != two.run_id
        assert [await one.result(), await two.result()] == [2, 2]
    assert CALLS == {"slow_double": 2}


async def test_a_run_id_of_another_flow_is_refused(contexts: ContextFactory) -> None:
    open_gate("slow_double")
    async with contexts() as ctx:
        await ctx.run(doubling, 1, run_id="mine")
        with pytest.raises(
            fd.CheckpointError,
            match=r"^flow 'pipeline': run 'mine' exists and belongs to flow 'doubling'\. ",
        ):
            await ctx.run(pipeline, "x", run_id="mine")
    assert "fetch" not in CALLS


# --- resume: finished, unknown, cancelled -------------------------------------------------


async def test_resuming_a_finished_run_returns_its_result_and_runs_nothing(
    contexts: ContextFactory,
) -> None:
    BUGGY["on"] = False
    async with contexts() as ctx:
        assert await ctx.run(pipeline, "x y", run_id="fin") == "2 words, 3 chars"
    before = dict(CALLS)
    events: list[Any] = []
    async with contexts(on_event=events.append) as ctx:
        assert await ctx.resume("fin") == "2 words, 3 chars"
        assert await ctx.resume("fin", strict=True) == "2 words, 3 chars"
    assert dict(CALLS) == before
    assert not of(events, ev.StepStarted)


async def test_resuming_an_unknown_run_is_a_checkpoint_error(contexts: ContextFactory) -> None:
    async with contexts() as ctx:
        with pytest.raises(
            fd.CheckpointError,
            match=r"^no run 'nope' in store (memory://|sqlite:///\S+)\. Check the run id "
            r"\(`flowdsl runs list`\) and the store URL$",
        ):
            await ctx.resume("nope")
    # Also from a context that is not entered: resume opens the store itself.
    with pytest.raises(fd.CheckpointError, match=r"^no run 'nope' in store "):
        await contexts().resume("nope")


async def test_a_cancelled_run_resumes(contexts: ContextFactory) -> None:
    scope = anyio.CancelScope()

    def cancel_when_blocked(event: Any) -> None:
        if isinstance(event, ev.StepStarted) and event.node_id == "slow_double":
            scope.cancel()  # as a Ctrl-C or a killed notebook cell would

    async with contexts(on_event=cancel_when_blocked) as ctx:
        with scope:
            await ctx.run(chained, 4, run_id="cx")
        assert scope.cancelled_caught
        record = await ctx.store.get_run("cx")
        assert record.status is fd.RunStatus.CANCELLED
        assert set(await ctx.store.load_nodes("cx")) == {"inc"}

    open_gate("slow_double")
    events: list[Any] = []
    async with contexts(on_event=events.append) as ctx:
        assert await ctx.resume("cx") == 11
    assert CALLS == {"inc": 1, "slow_double": 2, "plus_one": 1}
    assert node_ids(events, ev.StepReused) == ["inc"]


@fd.step
async def inc(x: int) -> int:
    CALLS["inc"] += 1
    return x + 1


@fd.step
async def plus_one(x: int) -> int:
    CALLS["plus_one"] += 1
    return x + 1


@fd.flow
async def chained(x: int) -> int:
    return await plus_one(await slow_double(await inc(x)))


# --- at-least-once for in-flight nodes, exactly-once for finished ones --------------------


@fd.step
async def quick(x: int) -> int:
    CALLS["quick"] += 1
    return x + 100


@fd.step
async def stuck(x: int) -> int:
    CALLS["stuck"] += 1
    await gate("stuck")
    return x + 200


@fd.step
async def join(a: int, b: int) -> list[int]:
    CALLS["join"] += 1
    return [a, b]


@fd.flow
async def fan(x: int) -> list[int]:
    first = await inc(x)
    return await join(await quick(first), await stuck(first))


async def test_in_flight_nodes_run_again_and_finished_nodes_never(
    contexts: ContextFactory,
) -> None:
    seen: set[tuple[type[Any], str | None]] = set()
    scope = anyio.CancelScope()

    def crash_when_stuck_is_in_flight(event: Any) -> None:
        seen.add((type(event), event.node_id))
        if {(ev.StepStarted, "stuck"), (ev.StepFinished, "quick")} <= seen:
            scope.cancel()

    async with contexts(on_event=crash_when_stuck_is_in_flight) as ctx:
        with scope:
            await ctx.run(fan, 1, run_id="fl")
        assert set(await ctx.store.load_nodes("fl")) == {"inc", "quick"}
    assert CALLS == {"inc": 1, "quick": 1, "stuck": 1}

    open_gate("stuck")
    events: list[Any] = []
    async with contexts(on_event=events.append) as ctx:
        assert await ctx.resume("fl") == [102, 202]
    # In flight at the crash: at least once (here twice).  Finished: exactly once.
    assert CALLS == {"inc": 1, "quick": 1, "stuck": 2, "join": 1}
    assert node_ids(events, ev.StepReused) == ["inc", "quick"]
    assert node_ids(events, ev.StepStarted) == ["join", "stuck"]


@fd.step
async def broken(x: int) -> int:
    CALLS["broken"] += 1
    raise RuntimeError("broken")


@fd.flow
async def siblings(x: int) -> list[int]:
    return [await broken(x), await quick(x)]


async def test_a_finished_event_means_the_node_is_in_the_journal(
    contexts: ContextFactory,
) -> None:
    events: list[Any] = []
    async with contexts(on_event=events.append) as ctx:
        with pytest.raises(fd.StepFailed, match=r"node 'broken'"):
            await ctx.run(siblings, 1, run_id="sib")
        journal = await ctx.store.load_nodes("sib")
    # Whatever reported StepFinished is durable.  (`quick` may also have been cut short,
    # before or after its body ran: it was in flight, and runs again on resume.)
    finished = {e.node_id for e in of(events, ev.StepFinished)}
    assert finished <= set(journal)
    assert set(journal) <= {"quick"}


async def test_a_run_left_running_by_a_dead_process_is_resumed_by_start(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/dead.db"
    async with fd.Context(store=url) as ctx:
        with pytest.raises(fd.StepFailed):
            await ctx.run(pipeline, "p q r", run_id="dead")
    # A process that died mid-run leaves its record RUNNING, with no one running it.  (By
    # the store: a hand-edited status no longer matches the record's integrity check.)
    store = SQLiteStore(tmp_path / "dead.db")
    await store.open()
    await store.update_run("dead", status=RunStatus.RUNNING)
    await store.close()
    BUGGY["on"] = False
    events: list[Any] = []
    async with fd.Context(store=url, on_event=events.append) as ctx:
        run = await ctx.start(pipeline, "p q r", run_id="dead")
        assert await run.result() == "3 words, 5 chars"
    assert CALLS == {"fetch": 1, "parse": 1, "summarize": 1, "analyze": 2, "report": 1}
    assert node_ids(events, ev.StepReused) == ["fetch", "parse", "summarize"]


# --- types after a resume from SQLite in a new context ------------------------------------


class Mood(enum.Enum):
    CALM = "calm"
    ANGRY = "angry"


@attrs.frozen
class Ticket:
    subject: str
    priority: int


@dataclasses.dataclass(frozen=True)
class Stamp:
    at: dt.datetime
    raw: bytes


@dataclasses.dataclass(frozen=True)
class Summary:
    ticket: Ticket
    mood: Mood
    stamp: Stamp
    when: dt.datetime
    blob: bytes
    pair: tuple[int, str]


@fd.step
async def make_ticket(text: str) -> Ticket:
    CALLS["make_ticket"] += 1
    return Ticket(text, 3)


@fd.step
async def make_mood(text: str) -> Mood:
    CALLS["make_mood"] += 1
    return Mood.ANGRY if "!" in text else Mood.CALM


@fd.step
async def make_stamp(text: str) -> Stamp:
    CALLS["make_stamp"] += 1
    return Stamp(dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC), text.encode())


@fd.step
async def make_when(text: str) -> dt.datetime:
    CALLS["make_when"] += 1
    return dt.datetime(2025, 1, 2, 3, 4, 5, 600, tzinfo=dt.UTC)


@fd.step
async def make_blob(text: str) -> bytes:
    CALLS["make_blob"] += 1
    return b"\x00\xffbinary" + text.encode()


@fd.step
async def make_pair(text: str) -> tuple[int, str]:
    CALLS["make_pair"] += 1
    return (len(text), text)


seen_types: list[tuple[type[Any], ...]] = []


@fd.step
async def combine(
    ticket: Ticket, mood: Mood, stamp: Stamp, when: dt.datetime, blob: bytes, pair: tuple[int, str]
) -> Summary:
    CALLS["combine"] += 1
    seen_types.append(tuple(type(v) for v in (ticket, mood, stamp, stamp.at, when, blob, pair)))
    if BUGGY["on"]:
        raise RuntimeError("combine is broken")
    return Summary(ticket, mood, stamp, when, blob, pair)


@fd.flow
async def typed(text: str) -> Summary:
    return await combine(
        await make_ticket(text),
        await make_mood(text),
        await make_stamp(text),
        await make_when(text),
        await make_blob(text),
        await make_pair(text),
    )


async def test_results_come_back_as_their_annotated_types_after_a_resume_from_sqlite(
    tmp_path: Path,
) -> None:
    seen_types.clear()
    url = f"sqlite:///{tmp_path}/typed.db"
    async with fd.Context(store=url) as ctx:
        with pytest.raises(fd.StepFailed, match=r"node 'combine'"):
            await ctx.run(typed, "help!", run_id="ty")

    BUGGY["on"] = False
    expected_types = (Ticket, Mood, Stamp, dt.datetime, dt.datetime, bytes, tuple)
    async with fd.Context(store=url) as ctx:  # a new context: values come from the file
        result = await ctx.resume("ty")
    assert seen_types == [expected_types] * 2
    assert CALLS["make_ticket"] == CALLS["make_pair"] == 1
    assert CALLS["combine"] == 2
    assert result == Summary(
        Ticket("help!", 3),
        Mood.ANGRY,
        Stamp(dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC), b"help!"),
        dt.datetime(2025, 1, 2, 3, 4, 5, 600, tzinfo=dt.UTC),
        b"\x00\xffbinaryhelp!",
        (5, "help!"),
    )
    assert type(result.pair) is tuple

    # A finished run read back in yet another context: the flow's result type again.
    async with fd.Context(store=url) as ctx:
        again = await ctx.resume("ty")
        started = await ctx.start(typed, "help!", run_id="ty")
        assert await started.result() == result
    assert again == result
    assert type(again) is Summary
    assert type(again.ticket) is Ticket
    assert type(again.mood) is Mood
    assert again.stamp.at.tzinfo is not None
    assert CALLS["combine"] == 2


# --- malformed and tampered records -------------------------------------------------------


def raw(path: Path, *statements: str) -> None:
    """SQL on the store's file behind its back, as a bad disk or a meddler would."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        for statement in statements:
            db.execute(statement)
    finally:
        db.close()


# (SQL, the error's anchored pattern); the run is "tm", its failed node is "analyze".
TAMPERING = [
    (
        "UPDATE nodes SET value = '{garbage' WHERE node_id = 'parse'",
        r"^node 'parse': run 'tm' in sqlite:///\S+ is corrupted: the stored value is not valid",
    ),
    (
        "UPDATE nodes SET attempts = 'many' WHERE node_id = 'fetch'",
        r"^node 'fetch': run 'tm' in sqlite:///\S+ is corrupted: attempts is 'many', not a count",
    ),
    (
        "UPDATE nodes SET finished_at = X'00' WHERE node_id = 'summarize'",
        r"^node 'summarize': run 'tm' in sqlite:///\S+ is corrupted: finished_at is bytes",
    ),
    (
        # Valid JSON of the wrong type, in a record without an integrity check (as an
        # older flowdsl wrote them): the store accepts it, decoding it does not.
        "UPDATE nodes SET value = '\"many\"', integrity = NULL WHERE node_id = 'summarize'",
        r"^flow 'pipeline', node 'summarize': the journaled result of node 'summarize' in run "
        r"'tm' cannot be read: ",
    ),
    pytest.param(
        'UPDATE nodes SET value = \'{"not": "a list"}\', integrity = NULL '
        "WHERE node_id = 'parse'",
        r"^flow 'pipeline', node 'parse': the journaled result of node 'parse' in run 'tm' "
        r"cannot be read: ",
        id="dict-as-list",
    ),
    pytest.param(
        "UPDATE nodes SET value = '2.5', integrity = NULL WHERE node_id = 'summarize'",
        r"^flow 'pipeline', node 'summarize': the journaled result of node 'summarize' in run "
        r"'tm' cannot be read: ",
        id="float-as-int",
    ),
    pytest.param(
        "UPDATE nodes SET value = '3' WHERE node_id = 'summarize'",
        r"^node 'summarize': run 'tm' in sqlite:///\S+ is corrupted: the record of this node: "
        r"its content does not match its integrity check",
        id="valid-but-edited",
    ),
    (
        "UPDATE runs SET inputs = 'garbage'",
        r"^run 'tm' in sqlite:///\S+ is corrupted: the stored inputs is not valid JSON",
    ),
    (
        "UPDATE runs SET status = 'exploded'",
        r"^run 'tm' in sqlite:///\S+ is corrupted: status 'exploded' is not a known run status",
    ),
]


@pytest.mark.parametrize(("sql", "pattern"), TAMPERING)
async def test_a_tampered_record_is_a_checkpoint_error_naming_the_run_and_node(
    tmp_path: Path, sql: str, pattern: str
) -> None:
    url = f"sqlite:///{tmp_path}/t.db"
    async with fd.Context(store=url) as ctx:
        with pytest.raises(fd.StepFailed):
            await ctx.run(pipeline, "one two", run_id="tm")
    raw(tmp_path / "t.db", sql)
    BUGGY["on"] = False
    before = dict(CALLS)
    async with fd.Context(store=url) as ctx:
        with pytest.raises(fd.CheckpointError, match=pattern):
            await ctx.resume("tm")
    # Nothing ran on data the store could not vouch for.
    assert dict(CALLS) == before


@fd.step
async def flaky_square(x: int) -> int:
    CALLS["flaky_square"] += 1
    if BUGGY["on"]:
        raise RuntimeError("flaky")
    return x * x


@fd.flow
async def squaring(x: int) -> int:
    return await plus_one(await flaky_square(await inc(x)))


INPUT_TAMPERING = [
    (
        'UPDATE runs SET inputs = \'{"x": "three"}\'',
        r"^flow 'squaring': the stored inputs of run 'sq' cannot be read: cannot decode "
        r"input 'x' as int",
    ),
    (
        "UPDATE runs SET inputs = '[3]'",
        r"^flow 'squaring': the stored inputs of run 'sq' cannot be read: inputs are not a "
        r"JSON object",
    ),
    pytest.param(
        "UPDATE runs SET inputs = '{\"y\": 3}'",
        r"^flow 'squaring': the stored inputs of run 'sq' cannot be read: the run's inputs "
        r"\['y'\] do not match the flow's parameters \['x'\]",
        id="unknown-input-name",
    ),
]


@pytest.mark.parametrize(("sql", "pattern"), INPUT_TAMPERING)
async def test_tampered_inputs_are_a_checkpoint_error_naming_the_run(
    tmp_path: Path, sql: str, pattern: str
) -> None:
    url = f"sqlite:///{tmp_path}/t.db"
    async with fd.Context(store=url) as ctx:
        with pytest.raises(fd.StepFailed):
            await ctx.run(squaring, 3, run_id="sq")
    # Without a journal every node needs the inputs; the record's integrity check goes
    # (as in a record an older flowdsl wrote), so that the inputs' decoding is what fails.
    raw(tmp_path / "t.db", sql, "UPDATE runs SET integrity = NULL", "DELETE FROM nodes")
    BUGGY["on"] = False
    before = dict(CALLS)
    async with fd.Context(store=url) as ctx:
        with pytest.raises(fd.CheckpointError, match=pattern):
            await ctx.resume("sq")
    assert dict(CALLS) == before


@pytest.mark.parametrize(
    "stored",
    [
        '"seventeen"',
        "[1, 2]",
        "17.5",
    ],
)
async def test_a_tampered_stored_result_is_a_checkpoint_error(tmp_path: Path, stored: str) -> None:
    BUGGY["on"] = False
    url = f"sqlite:///{tmp_path}/t.db"
    async with fd.Context(store=url) as ctx:
        assert await ctx.run(squaring, 3, run_id="res") == 17
    db = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    # Without its state's integrity check (as an older flowdsl wrote it), so that the
    # result's decoding is what fails; with it, any edit fails (tests/test_security.py).
    db.execute("UPDATE runs SET result = ?, state_integrity = NULL", (stored,))
    db.close()
    async with fd.Context(store=url) as ctx:
        with pytest.raises(
            fd.CheckpointError,
            match=r"^flow 'squaring': the stored result of run 'res' cannot be read: ",
        ):
            await ctx.resume("res")
