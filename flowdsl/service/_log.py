"""Each run's events numbered by ``seq``, for watchers that come and go.

A run the service drives gets a :class:`RunLog` that its events are appended to as they
happen (``fd.Context(on_event=...)``); ``seq`` is the event's position in the log, from 1.
A watcher asks for the events after the last ``seq`` it saw, so after a reconnect it
misses nothing and sees nothing twice.  Resuming the run appends to the same log.

A run nobody drives here (it ended before the service started, or another process drives
it) has no live log: its log is made from the store instead, always the same way, so that
its ``seq`` numbers do not change from one call to the next: ``RunStarted``, one
``StepFinished`` per journaled node in the order they finished, then ``RunFinished`` or
``RunFailed`` if the run ended.  A run that is resumed here starts its live log with that
history, so its numbering goes on from what a watcher saw of it.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import AsyncIterator
from typing import Any

import anyio
import attrs

from .. import _codec
from .. import events as ev
from .._errors import CodecError
from .._records import NodeRecord, RunRecord, RunStatus

__all__ = ["Entry", "LogBook", "RunLog", "history_of"]

_TERMINAL = (ev.RunFinished, ev.RunFailed)


@attrs.frozen
class Entry:
    """One event as it crosses the wire: the event's class name and its JSON text.

    The text is made when a watcher first asks for it: most runs are never watched.
    """

    seq: int
    type: str
    node_id: str | None
    event: Any = attrs.field(repr=False)

    @functools.cached_property
    def json(self) -> str:
        return _codec.dumps(_codec.converter.unstructure(self.event))


@attrs.define(eq=False)
class RunLog:
    """The events of one run, in order; ``open`` while a driver may still add to it."""

    run_id: str
    entries: list[Entry] = attrs.field(factory=list)
    open: bool = False
    # Made by a watcher that waits, set by the next change: a run nobody watches makes none.
    _changed: anyio.Event | None = attrs.field(default=None, init=False)

    def append(self, event: Any) -> None:
        self.entries.append(
            Entry(len(self.entries) + 1, type(event).__name__, event.node_id, event)
        )
        if isinstance(event, _TERMINAL):
            self.open = False
        self._wake()

    def reopen(self) -> None:
        self.open = True
        self._wake()

    def close(self) -> None:
        self.open = False
        self._wake()

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def follow(self, after: int) -> AsyncIterator[Entry]:
        """The entries after *after*, as they come, until the log closes."""
        while True:
            while after < len(self.entries):
                entry = self.entries[after]
                after += 1
                yield entry
            if not self.open:
                return
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()


def history_of(record: RunRecord, journal: dict[str, NodeRecord]) -> list[Any]:
    """The events a run's store records tell, the same list every time for the same records."""
    events: list[Any] = [ev.RunStarted(record.run_id, record.flow, record.created_at)]
    for node in sorted(journal.values(), key=lambda n: (n.finished_at, n.node_id)):
        events.append(
            ev.StepFinished(
                record.run_id,
                node.node_id,
                node.finished_at,
                result=_json_or_text(node.value),
                attempt=node.attempts,
                duration=node.duration,
            )
        )
    if record.status is RunStatus.FINISHED:
        result = _json_or_text(record.result) if record.result is not None else None
        events.append(ev.RunFinished(record.run_id, record.updated_at, result))
    elif record.status in (RunStatus.FAILED, RunStatus.CANCELLED):
        events.append(
            ev.RunFailed(
                record.run_id,
                record.updated_at,
                record.error or record.status.value,
                record.failed_node,
                cancelled=record.status is RunStatus.CANCELLED,
            )
        )
    return events


def _json_or_text(text: str) -> Any:
    try:
        return _codec.loads(text)
    except CodecError:
        return text


class LogBook:
    """The logs this service keeps: every open one, and the newest *keep* closed ones (so
    that a watcher reconnecting soon after a run ended sees the same numbers)."""

    def __init__(self, keep: int = 10_000) -> None:
        self.keep = keep
        self._logs: dict[str, RunLog] = {}
        self._closed: collections.OrderedDict[str, None] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._logs)

    def get(self, run_id: str) -> RunLog | None:
        return self._logs.get(run_id)

    def add(self, log: RunLog) -> RunLog:
        self._logs[log.run_id] = log
        self.settled(log)
        return log

    def settled(self, log: RunLog) -> None:
        """Note whether *log* is open; forget the oldest closed logs past *keep*."""
        if log.open:
            self._closed.pop(log.run_id, None)
            return
        self._closed[log.run_id] = None
        self._closed.move_to_end(log.run_id)
        while len(self._closed) > self.keep:
            run_id, _ = self._closed.popitem(last=False)
            self._logs.pop(run_id, None)
