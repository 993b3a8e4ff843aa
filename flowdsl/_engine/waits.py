"""Waits: a run that waits for a value sent from outside (``fd.wait_for``).

Signals live in the store, per run and name, in the order they were sent
(``put_signal``/``get_signal``), whichever process sent them.  A wait consumes the first
signal of its name that no other wait of the run consumed: it takes it by committing its
own record, ``{"name", "signal": index, "value"}``, so each signal is consumed exactly
once, and a signal sent before the run got to its wait is simply there when it does.
The indices taken are read back from the journal on resume (records whose marker starts
with ``wait:``).

A wait with a timeout journals its deadline (``<id>#deadline``) the first time it starts,
so a timeout holds across restarts.  While it waits it polls the store, backing off from
50 ms to half a second; a signal sent through a context that drives the run wakes it at
once.  It holds no task on a broker and no worker slot: only this poll.

When every piece of work the run has in flight is a wait, the run is *parked*: its status
is ``waiting`` and its :class:`~flowdsl.Run` is told, so that leaving the context neither
waits for it nor cancels it (see ``_context``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Mapping
from typing import Any

import anyio

from .. import _codec
from .. import events as ev
from .._define.graph import DYNAMIC_KINDS, Node, NodeKind
from .._errors import CodecError
from .._records import NodeRecord, RunStatus
from .scheduler import Executor

__all__ = ["Signals", "counting", "has_waits", "wait"]

FIRST_POLL = 0.05
MAX_POLL = 0.5


class Signals:
    """One run's waits: which signal indices are taken, and whether the run is parked."""

    def __init__(self, dyn: Any) -> None:
        self.dyn = dyn
        self.taken: dict[str, dict[int, str]] = {}  # name -> index -> the wait's id
        self.busy = 0  # nodes in flight at the executor
        self.waiting: dict[str, str] = {}  # wait id -> signal name, for waits without one
        self.parked = False
        self.wake = anyio.Event()
        run = dyn.run
        if hasattr(run, "waker"):
            run.waker = self.poke

    def load(self, journal: Mapping[str, NodeRecord]) -> None:
        """Take the signals the journal says waits consumed (or rejected)."""
        for node_id, record in journal.items():
            if not record.code.startswith("wait:"):
                continue
            try:
                data = _codec.loads(record.value)
            except CodecError:
                continue
            if isinstance(data, dict) and isinstance(data.get("signal"), int):
                self.taken.setdefault(str(data.get("name")), {})[data["signal"]] = node_id

    def poke(self) -> None:
        self.wake.set()

    def release(self, node_ids: list[str]) -> None:
        """Forgotten records give their signals back (their waits will run again)."""
        gone = set(node_ids)
        for taken in self.taken.values():
            for index in [i for i, owner in taken.items() if owner in gone]:
                del taken[index]

    def free(self, name: str) -> int:
        taken = self.taken.get(name, {})
        index = 0
        while index in taken:
            index += 1
        return index

    async def settle(self) -> None:
        """Park the run when only waits are left in it; unpark it when work resumes."""
        parked = bool(self.waiting) and self.busy == 0
        if parked == self.parked:
            return
        self.parked = parked
        run, store = self.dyn.run, self.dyn.store
        status = RunStatus.WAITING if parked else RunStatus.RUNNING
        with anyio.CancelScope(shield=True):
            await store.update_run(run.run_id, status=status)
        if parked and run.observed:
            self.dyn.emit(ev.RunWaiting(run.run_id, time.time(), tuple(sorted(self.waiting))))
        park = getattr(run, "park", None)
        if park is not None:
            park(parked)


class _Counting(Executor):
    """An executor that counts the nodes in flight, so that a run knows when only waits
    are left in it.  It offers no bare jobs: every node passes through ``execute``."""

    def __init__(self, inner: Any, signals: Signals) -> None:
        self.inner = inner
        self.signals = signals

    def execute(
        self, run: Any, node: Node, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Awaitable[tuple[NodeRecord, Any]]:
        # Counted from now (not from when its task starts), or a wait polling meanwhile
        # would park a run that is about to work.
        self.signals.busy += 1
        return self._counted(run, node, args, kwargs)

    async def _counted(
        self, run: Any, node: Node, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[NodeRecord, Any]:
        try:
            return await self.inner.execute(run, node, args, kwargs)  # type: ignore[no-any-return]
        finally:
            self.signals.busy -= 1


def counting(executor: Any, signals: Signals) -> Any:
    return _Counting(executor, signals)


def has_waits(graph: Any, seen: frozenset[str] = frozenset()) -> bool:
    """Whether a graph, or a flow it maps or loops over, waits for a signal."""
    for node_id in graph.order:
        node = graph[node_id]
        if node.kind is NodeKind.WAIT:
            return True
        if node.kind in DYNAMIC_KINDS and node.spec.is_flow:
            body = node.spec.body
            if body.ref not in seen and has_waits(body.graph, seen | {body.ref}):
                return True
    return False


async def wait(scope: Any, run: Any, node: Node, full: str, marker: str) -> tuple[Any, Any]:
    """Wait for signal ``node.spec.name``; the wait's record data and the decoded value."""
    dyn = scope.dyn
    spec = node.spec
    base, store = dyn.run, dyn.store
    signals: Signals = await dyn.signals()
    journal = await scope._journal()
    deadline: float | None = None
    if spec.timeout is not None:
        kept = journal.get(f"{node.id}#deadline")
        try:
            deadline = float(_codec.loads(kept.value)) if kept is not None else None
        except (CodecError, TypeError, ValueError):
            deadline = None
        if deadline is None:
            now = time.time()
            deadline = now + spec.timeout
            record = NodeRecord(f"{full}#deadline", _codec.dumps(deadline), 1, now, now, marker)
            await dyn.commit(record)
    delay = FIRST_POLL
    announced = False
    try:
        while True:
            index = signals.free(spec.name)
            # Taken before the read: another wait of this name polls the next index.
            signals.taken.setdefault(spec.name, {})[index] = full
            try:
                text = await store.get_signal(base.run_id, spec.name, index)
            finally:
                if signals.taken[spec.name].get(index) == full:
                    del signals.taken[spec.name][index]
            if text is not None:
                signals.taken[spec.name][index] = full
                signals.waiting.pop(full, None)
                await signals.settle()
                return await _received(dyn, node, full, marker, index, text)
            now = time.time()
            if deadline is not None and now >= deadline:
                raise dyn.failed(
                    full,
                    f"no signal {spec.name!r} came within the wait's timeout of {spec.timeout} s",
                    hint=f"Send it (`ctx.signal(run_id, {spec.name!r}, value)`) and resume "
                    "the run: the deadline is journaled, so a resume takes a signal that is "
                    "there but does not wait again",
                )
            if not announced:
                announced = True
                signals.waiting[full] = spec.name
                if base.observed:
                    dyn.emit(ev.WaitStarted(base.run_id, full, now, spec.name, deadline))
            await signals.settle()
            pause = delay if deadline is None else max(0.0, min(delay, deadline - now))
            with anyio.move_on_after(pause):
                await signals.wake.wait()
            if signals.wake.is_set():
                signals.wake = anyio.Event()
                delay = FIRST_POLL
            else:
                delay = min(delay * 2, MAX_POLL)
    finally:
        signals.waiting.pop(full, None)


async def _received(
    dyn: Any, node: Node, full: str, marker: str, index: int, text: str
) -> tuple[Any, Any]:
    spec = node.spec
    base = dyn.run
    try:
        data = _codec.loads(text)
        value = _codec.from_data(data, spec.type, what=f"signal {spec.name!r}")
    except CodecError as exc:
        # The bad signal is consumed (journaled as rejected), so that a resume after a
        # good one is sent takes that one.
        now = time.time()
        rejected = {"name": spec.name, "signal": index, "rejected": True}
        record = NodeRecord(f"{full}#rejected{index}", _codec.dumps(rejected), 1, now, now, marker)
        await dyn.commit(record)
        raise dyn.failed(
            full,
            f"signal {spec.name!r} (number {index}) cannot be read: {exc.problem}",
            hint="Send a value of the type the wait names, then resume the run; the bad "
            "signal is skipped",
        ) from exc
    if base.observed:
        dyn.emit(ev.SignalReceived(base.run_id, full, time.time(), spec.name, index))
    return {"name": spec.name, "signal": index, "value": data}, value
