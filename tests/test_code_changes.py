"""Code that changes between a crash and its resume.

Each test writes version 1 of a flow module into ``tmp_path``, imports it, runs it until a
step fails, then overwrites the module's source with version 2 and imports it again under
the same name, so that the ``module:qualname`` references and the node ids match while the
step source differs, exactly as when a user edits a file and resumes.

What a resume reuses is decided per node by its *marker* (see ``flowdsl/_resume.py``):
the step's code hash, or its ``version=`` when it has one, plus the node's own wiring.
"""

from __future__ import annotations

import importlib
import itertools
import linecache
import shutil
import sys
import textwrap
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import flowdsl as fd
from flowdsl import events as ev
from flowdsl.backends import MemoryStore

pytestmark = pytest.mark.anyio

# Shared with the generated modules, which import them from here: a module's own globals
# would start from zero again when it is re-imported.
CALLS: Counter[str] = Counter()
FAIL = {"on": True}

_names = itertools.count()

HEADER = """\
import flowdsl as fd
from test_code_changes import CALLS, FAIL

"""

# load -> enrich -> polish --> finish
#     \-> side ---------------/
V1 = """\
@fd.step
async def load(x: int) -> int:
    CALLS["load"] += 1
    return x + 1


@fd.step
async def enrich(x: int) -> int:
    CALLS["enrich"] += 1
    return x * 10


@fd.step
async def polish(x: int) -> int:
    CALLS["polish"] += 1
    return x + 5


@fd.step
async def side(x: int) -> int:
    CALLS["side"] += 1
    return x - 1


@fd.step
async def finish(a: int, b: int) -> list[int]:
    CALLS["finish"] += 1
    if FAIL["on"]:
        raise RuntimeError("not yet")
    return [a, b]


@fd.flow
async def pipeline(x: int) -> list[int]:
    base = await load(x)
    rich = await polish(await enrich(base))
    other = await side(base)
    return await finish(rich, other)
"""


class Modules:
    """Writes flow modules under one module name and (re-)imports them."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.name = f"fd_code_change_{next(_names)}"
        self.path = directory / f"{self.name}.py"

    def load(self, body: str) -> ModuleType:
        sys.modules.pop(self.name, None)
        self.path.write_text(HEADER + textwrap.dedent(body))
        # The file may be rewritten within the same second at the same size: drop the
        # cached bytecode and source lines so that the new text is what gets hashed.
        shutil.rmtree(self.directory / "__pycache__", ignore_errors=True)
        importlib.invalidate_caches()
        linecache.checkcache(str(self.path))
        linecache.clearcache()
        return importlib.import_module(self.name)


@pytest.fixture
def modules(tmp_path: Path) -> Iterator[Modules]:
    CALLS.clear()
    FAIL["on"] = True
    sys.path.insert(0, str(tmp_path))
    mods = Modules(tmp_path)
    try:
        yield mods
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(mods.name, None)


ContextFactory = Callable[..., fd.Context]


@pytest.fixture(
    params=[
        "memory",
        "sqlite",
        # Batch on NATS and on Redis, a worker in the process (on NATS the resume forgets
        # the changed nodes' records while the client's journal watch follows the bucket).
        pytest.param("nats-batch", marks=pytest.mark.nats),
        pytest.param("redis-batch", marks=pytest.mark.redis),
    ]
)
def contexts(request: pytest.FixtureRequest, tmp_path: Path) -> ContextFactory:
    if request.param.endswith("-batch"):
        backend = request.getfixturevalue("anyio_backend")
        if (backend if isinstance(backend, str) else backend[0]) != "asyncio":
            pytest.skip(
                "the Redis and NATS clients run on asyncio only (their backends refuse trio)"
            )
        server = request.getfixturevalue(f"{request.param.removesuffix('-batch')}_server")
        url = f"{server.url}?prefix={tmp_path.name[-20:]}"

        def batch(**kwargs: Any) -> fd.Context:
            return fd.Context(batch=True, broker=url, store=url, workers=1, **kwargs)

        return batch
    store: Any = MemoryStore() if request.param == "memory" else f"sqlite:///{tmp_path}/c.db"

    def make(**kwargs: Any) -> fd.Context:
        return fd.Context(store=store, **kwargs)

    return make


async def crash(contexts: ContextFactory, flow: Any, *args: Any, run_id: str = "r") -> None:
    """Run *flow* until its failing step fails."""
    async with contexts() as ctx:
        with pytest.raises(fd.StepFailed):
            await ctx.run(flow, *args, run_id=run_id)


async def resume(
    contexts: ContextFactory, run_id: str = "r", **options: Any
) -> tuple[Any, list[Any]]:
    events: list[Any] = []
    async with contexts(on_event=events.append) as ctx:
        result = await ctx.resume(run_id, **options)
    return result, events


def invalidated(events: list[Any]) -> dict[str, str]:
    return {e.node_id: e.reason for e in events if isinstance(e, ev.StepInvalidated)}


def reused(events: list[Any]) -> set[str]:
    return {e.node_id for e in events if isinstance(e, ev.StepReused)}


def started(events: list[Any]) -> set[str]:
    return {e.node_id for e in events if isinstance(e, ev.StepStarted)}


async def uninterrupted(flow: Any, *args: Any) -> Any:
    saved = CALLS.copy()
    async with fd.Context() as ctx:
        result = await ctx.run(flow, *args)
    CALLS.clear()
    CALLS.update(saved)
    return result


def code_of(module: ModuleType, step: str) -> str:
    return str(getattr(module, step).code_hash)


# --- a changed step -----------------------------------------------------------------------


async def test_a_changed_step_runs_again_with_everything_downstream(
    modules: Modules, contexts: ContextFactory
) -> None:
    v1 = modules.load(V1)
    await crash(contexts, v1.pipeline, 1)
    assert CALLS == {"load": 1, "enrich": 1, "polish": 1, "side": 1, "finish": 1}

    v2 = modules.load(V1.replace("return x * 10", "return x * 100"))
    assert code_of(v2, "enrich") != code_of(v1, "enrich")
    assert code_of(v2, "polish") == code_of(v1, "polish")
    FAIL["on"] = False
    result, events = await resume(contexts, flow=v2.pipeline)

    assert result == [205, 1] == await uninterrupted(v2.pipeline, 1)
    # enrich changed; polish is unchanged but fed by enrich; finish had no record.
    assert invalidated(events) == {"enrich": "changed", "polish": "upstream"}
    assert reused(events) == {"load", "side"}
    assert started(events) == {"enrich", "polish", "finish"}
    assert CALLS == {"load": 1, "enrich": 2, "polish": 2, "side": 1, "finish": 2}
    assert {e.run_id for e in events if isinstance(e, ev.StepInvalidated)} == {"r"}


async def test_resume_imports_the_changed_module_by_the_recorded_reference(
    modules: Modules, contexts: ContextFactory
) -> None:
    v1 = modules.load(V1)
    await crash(contexts, v1.pipeline, 2)
    modules.load(V1.replace("return x - 1", "return x - 2"))
    FAIL["on"] = False
    result, events = await resume(contexts)  # no flow=: `module:pipeline` is imported
    assert result == [35, 1]
    assert invalidated(events) == {"side": "changed"}
    assert reused(events) == {"load", "enrich", "polish"}


async def test_strict_resume_refuses_a_code_change_and_keeps_the_journal(
    modules: Modules, contexts: ContextFactory
) -> None:
    v1 = modules.load(V1)
    await crash(contexts, v1.pipeline, 1)
    v2 = modules.load(V1.replace("return x + 5", "return x + 6"))
    FAIL["on"] = False
    with pytest.raises(
        fd.CheckpointError,
        match=r"^flow 'pipeline', node 'polish': the code or wiring of node\(s\) 'polish' "
        r"changed since run 'r' ran them\. Resume without strict=True ",
    ):
        await resume(contexts, flow=v2.pipeline, strict=True)
    assert CALLS["finish"] == 1  # nothing ran

    # The refusal forgot nothing: a non-strict resume still reuses what did not change.
    result, events = await resume(contexts, flow=v2.pipeline)
    assert result == [26, 1]
    assert invalidated(events) == {"polish": "changed"}
    assert reused(events) == {"load", "enrich", "side"}


async def test_strict_resume_of_an_unchanged_flow_reuses_everything(
    modules: Modules, contexts: ContextFactory
) -> None:
    v1 = modules.load(V1)
    await crash(contexts, v1.pipeline, 1)
    v1_again = modules.load(V1)  # re-imported, same source
    FAIL["on"] = False
    result, events = await resume(contexts, flow=v1_again.pipeline, strict=True)
    assert result == [25, 1]
    assert reused(events) == {"load", "enrich", "polish", "side"}
    assert invalidated(events) == {}


async def test_strict_resume_refuses_a_changed_graph(
    modules: Modules, contexts: ContextFactory
) -> None:
    v1 = modules.load(V1)
    await crash(contexts, v1.pipeline, 1)
    v2 = modules.load(V1.replace("other = await side(base)", "other = await side(rich)"))
    with pytest.raises(
        fd.CheckpointError,
        match=r"^flow 'pipeline': the graph of flow 'pipeline' changed since run 'r' started\. "
        r"Resume without strict=True",
    ):
        await resume(contexts, flow=v2.pipeline, strict=True)


# --- version= -------------------------------------------------------------------------------

V1_VERSIONED = V1.replace("@fd.step\nasync def enrich", '@fd.step(version="1")\nasync def enrich')


async def test_a_version_bump_runs_the_step_again_without_a_code_change(
    modules: Modules, contexts: ContextFactory
) -> None:
    v1 = modules.load(V1_VERSIONED)
    await crash(contexts, v1.pipeline, 1)
    v2 = modules.load(V1_VERSIONED.replace('version="1"', 'version="2"'))
    FAIL["on"] = False
    result, events = await resume(contexts, flow=v2.pipeline)
    assert result == [25, 1]
    assert invalidated(events) == {"enrich": "changed", "polish": "upstream"}
    assert CALLS["enrich"] == 2


@pytest.mark.parametrize("strict", [False, True])
async def test_with_a_version_code_changes_under_the_same_version_are_reused(
    modules: Modules, contexts: ContextFactory, strict: bool
) -> None:
    # With version= set, the version IS the marker: editing the body without bumping it
    # says "this change does not matter for results already computed".
    v1 = modules.load(V1_VERSIONED)
    await crash(contexts, v1.pipeline, 1)
    old_code = code_of(v1, "enrich")  # hashed from the file: before it is rewritten
    v2 = modules.load(V1_VERSIONED.replace("return x * 10", "return x * 1000"))
    assert code_of(v2, "enrich") != old_code
    FAIL["on"] = False
    result, events = await resume(contexts, flow=v2.pipeline, strict=strict)
    assert result == [25, 1]  # enrich's old journaled result (20), not 2000
    assert invalidated(events) == {}
    assert reused(events) == {"load", "enrich", "polish", "side"}
    assert CALLS["enrich"] == 1


# --- shape changes ------------------------------------------------------------------------


async def test_a_journaled_node_that_no_longer_exists_is_a_checkpoint_error(
    modules: Modules, contexts: ContextFactory
) -> None:
    v1 = modules.load(V1)
    await crash(contexts, v1.pipeline, 1)
    v2 = modules.load(
        V1.replace("    other = await side(base)\n", "").replace(
            "await finish(rich, other)", "await finish(rich, base)"
        )
    )
    assert "side" not in v2.pipeline.graph.nodes
    FAIL["on"] = False
    pattern = (
        r"^flow 'pipeline', node 'side': run 'r' has results for node\(s\) 'side' that no "
        r"longer exist in the flow\. The flow changed shape since the run started; "
    )
    with pytest.raises(fd.CheckpointError, match=pattern):
        await resume(contexts, flow=v2.pipeline)
    with pytest.raises(fd.CheckpointError, match=r"^flow 'pipeline': the graph of flow "):
        await resume(contexts, flow=v2.pipeline, strict=True)
    assert CALLS["finish"] == 1
    # Restoring the old code finishes the run.
    v1_again = modules.load(V1)
    result, _ = await resume(contexts, flow=v1_again.pipeline)
    assert result == [25, 1]


async def test_a_changed_wiring_runs_that_node_again(
    modules: Modules, contexts: ContextFactory
) -> None:
    v1 = modules.load(V1)
    await crash(contexts, v1.pipeline, 1)
    # side's argument now comes from polish instead of load; side's code is unchanged.
    v2 = modules.load(V1.replace("other = await side(base)", "other = await side(rich)"))
    assert code_of(v2, "side") == code_of(v1, "side")
    FAIL["on"] = False
    result, events = await resume(contexts, flow=v2.pipeline)
    assert result == [25, 24] == await uninterrupted(v2.pipeline, 1)
    assert invalidated(events) == {"side": "changed"}
    assert reused(events) == {"load", "enrich", "polish"}
    assert CALLS["side"] == 2


async def test_a_changed_literal_argument_runs_that_node_again(
    modules: Modules, contexts: ContextFactory
) -> None:
    body = V1.replace("async def side(x: int)", "async def side(x: int, k: int = 1)").replace(
        "return x - 1", "return x - k"
    )
    v1 = modules.load(body.replace("await side(base)", "await side(base, 1)"))
    await crash(contexts, v1.pipeline, 1)
    v2 = modules.load(body.replace("await side(base)", "await side(base, 2)"))
    FAIL["on"] = False
    result, events = await resume(contexts, flow=v2.pipeline)
    assert result == [25, 0]
    assert invalidated(events) == {"side": "changed"}


async def test_a_step_added_after_the_crash_runs_and_the_rest_is_reused(
    modules: Modules, contexts: ContextFactory
) -> None:
    v1 = modules.load(V1)
    await crash(contexts, v1.pipeline, 1)
    v2 = modules.load(
        V1.replace(
            "    return await finish(rich, other)",
            "    other = await side(other)\n    return await finish(rich, other)",
        )
    )
    FAIL["on"] = False
    result, events = await resume(contexts, flow=v2.pipeline)
    assert result == [25, 0]
    assert invalidated(events) == {}
    assert reused(events) == {"load", "enrich", "polish", "side"}
    assert started(events) == {"side-2", "finish"}


async def test_a_renamed_flow_parameter_is_a_checkpoint_error(
    modules: Modules, contexts: ContextFactory
) -> None:
    v1 = modules.load(V1)
    await crash(contexts, v1.pipeline, 1)
    v2 = modules.load(
        V1.replace("async def pipeline(x: int)", "async def pipeline(y: int)").replace(
            "base = await load(x)", "base = await load(y)"
        )
    )
    FAIL["on"] = False
    with pytest.raises(
        fd.CheckpointError,
        match=r"^flow 'pipeline': the stored inputs of run 'r' cannot be read: the run's inputs "
        r"\['x'\] do not match the flow's parameters \['y'\]",
    ):
        await resume(contexts, flow=v2.pipeline)


# --- branches -----------------------------------------------------------------------------

BRANCHY = """\
@fd.step
async def load(x: int) -> int:
    CALLS["load"] += 1
    return x + 1


@fd.branch
async def route(x: int) -> str:
    CALLS["route"] += 1
    return "big" if x > 5 else "small"


@fd.step
async def shout(x: int) -> int:
    CALLS["shout"] += 1
    return x * 100


@fd.step
async def whisper(x: int) -> int:
    CALLS["whisper"] += 1
    return -x


@fd.step
async def finish(a: int, b: int) -> list[int]:
    CALLS["finish"] += 1
    if FAIL["on"]:
        raise RuntimeError("not yet")
    return [a, b]


@fd.flow
async def pipeline(x: int) -> list[int]:
    base = await load(x)
    picked = await route(base).cases(big=lambda: shout(base), small=lambda: whisper(base))
    return await finish(base, picked)
"""


async def test_a_changed_branch_decides_again_and_its_cases_follow(
    modules: Modules, contexts: ContextFactory
) -> None:
    v1 = modules.load(BRANCHY)
    await crash(contexts, v1.pipeline, 1)
    assert CALLS == {"load": 1, "route": 1, "whisper": 1, "finish": 1}
    v2 = modules.load(BRANCHY.replace("x > 5", "x > 0"))
    FAIL["on"] = False
    result, events = await resume(contexts, flow=v2.pipeline)
    assert result == [2, 200] == await uninterrupted(v2.pipeline, 1)
    assert invalidated(events) == {"route": "changed", "route.small/whisper": "upstream"}
    assert reused(events) == {"load"}
    assert CALLS == {"load": 1, "route": 2, "whisper": 1, "shout": 1, "finish": 2}


async def test_a_changed_case_step_runs_again_and_the_branch_decision_is_reused(
    modules: Modules, contexts: ContextFactory
) -> None:
    v1 = modules.load(BRANCHY)
    await crash(contexts, v1.pipeline, 1)
    v2 = modules.load(BRANCHY.replace("return -x", "return -x * 2"))
    FAIL["on"] = False
    result, events = await resume(contexts, flow=v2.pipeline)
    assert result == [2, -4]
    assert invalidated(events) == {"route.small/whisper": "changed"}
    assert reused(events) == {"load", "route"}
    assert CALLS["route"] == 1
