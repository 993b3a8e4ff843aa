"""What a run reports while it runs.

Every event is a frozen, slotted attrs class with ``run_id``, ``node_id`` (``None`` for the
run-level ones) and ``at`` (seconds since the epoch, as :func:`time.time` gives).  The
same classes reach ``run.events()`` and ``fd.Context(on_event=...)`` in every mode; in
batch mode they are read back from the store or broker through the codec, as a tagged
union keyed by the class name.

Results inside events are the step's *encoded* form (JSON-compatible data): an event is a
report, not a channel for values, and it must look the same whichever process produced it.
"""

from __future__ import annotations

from typing import Any

import attrs

__all__ = [
    "BranchTaken",
    "Event",
    "MapStarted",
    "RunFailed",
    "RunFinished",
    "RunStarted",
    "RunWaiting",
    "SignalReceived",
    "StepFailed",
    "StepFinished",
    "StepInvalidated",
    "StepRetrying",
    "StepReused",
    "StepSkipped",
    "StepStarted",
    "TokenDelta",
    "WaitStarted",
]


@attrs.frozen
class RunStarted:
    """A run began (or resumed: ``resumed`` is true)."""

    run_id: str
    flow: str
    at: float
    resumed: bool = False
    node_id: None = None


@attrs.frozen
class StepStarted:
    """An attempt of a node started executing."""

    run_id: str
    node_id: str
    at: float
    attempt: int = 1


@attrs.frozen
class StepFinished:
    """A node finished; ``result`` is its encoded value (the case label, for a branch)."""

    run_id: str
    node_id: str
    at: float
    result: Any = None
    attempt: int = 1
    duration: float = 0.0


@attrs.frozen
class StepRetrying:
    """An attempt failed and another follows after ``delay`` seconds."""

    run_id: str
    node_id: str
    at: float
    error: str
    attempt: int
    delay: float


@attrs.frozen
class StepFailed:
    """A node failed for good (its retries, if any, are spent)."""

    run_id: str
    node_id: str
    at: float
    error: str
    attempt: int = 1


@attrs.frozen
class StepSkipped:
    """A node inside a branch case that was not chosen; it never runs."""

    run_id: str
    node_id: str
    at: float


@attrs.frozen
class StepReused:
    """A resumed run took a node's result from the journal (or the cache) instead of running it.

    ``reason`` is ``"journal"`` or ``"cache"``.
    """

    run_id: str
    node_id: str
    at: float
    reason: str = "journal"


@attrs.frozen
class StepInvalidated:
    """On resume, a journaled result is not reused: the node's code or wiring changed
    (``reason="changed"``) or something upstream of it will run again (``"upstream"``)."""

    run_id: str
    node_id: str
    at: float
    reason: str = "changed"


@attrs.frozen
class BranchTaken:
    """A branch node chose ``case``; the other cases' nodes are skipped."""

    run_id: str
    node_id: str
    at: float
    case: str
    attempt: int = 1


@attrs.frozen
class MapStarted:
    """A map node has its list: ``items`` items follow, each as a node ``<id>[<index>]``
    (a mapped flow's nodes as ``<id>[<index>]/<node>``)."""

    run_id: str
    node_id: str
    at: float
    items: int


@attrs.frozen
class WaitStarted:
    """A wait found no signal ``name`` yet; the run waits for one (until ``deadline``, a
    timestamp, when it has a timeout)."""

    run_id: str
    node_id: str
    at: float
    name: str
    deadline: float | None = None


@attrs.frozen
class SignalReceived:
    """A wait consumed signal ``name`` (the ``index``-th sent to the run under that name)."""

    run_id: str
    node_id: str
    at: float
    name: str
    index: int = 0


@attrs.frozen
class RunWaiting:
    """Everything the run can do now waits for a signal: its status is ``waiting``, and it
    holds no task and no worker until one arrives."""

    run_id: str
    at: float
    waits: tuple[str, ...] = ()
    node_id: None = None


@attrs.frozen
class TokenDelta:
    """A piece of LLM output as it streams, from inside a step."""

    run_id: str
    node_id: str
    at: float
    text: str
    attempt: int = 1


@attrs.frozen
class RunFinished:
    """The run finished; ``result`` is the flow's encoded result."""

    run_id: str
    at: float
    result: Any = None
    usage: dict[str, Any] | None = None
    node_id: None = None


@attrs.frozen
class RunFailed:
    """The run failed (``node_id`` names the failing node when there is one) or was cancelled."""

    run_id: str
    at: float
    error: str
    node_id: str | None = None
    cancelled: bool = False


Event = (
    RunStarted
    | StepStarted
    | StepFinished
    | StepRetrying
    | StepFailed
    | StepSkipped
    | StepReused
    | StepInvalidated
    | BranchTaken
    | MapStarted
    | WaitStarted
    | SignalReceived
    | RunWaiting
    | TokenDelta
    | RunFinished
    | RunFailed
)
"""Any event a run reports."""

EVENT_TYPES: tuple[type[Any], ...] = (
    RunStarted,
    StepStarted,
    StepFinished,
    StepRetrying,
    StepFailed,
    StepSkipped,
    StepReused,
    StepInvalidated,
    BranchTaken,
    MapStarted,
    WaitStarted,
    SignalReceived,
    RunWaiting,
    TokenDelta,
    RunFinished,
    RunFailed,
)
