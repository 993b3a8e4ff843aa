"""Batches on Redis: the broker's batch finishing (many tasks completed, dead-lettered or
committed and completed in one script, ``scripts.FINISH_MANY``), and the store's script
calls made in one tick of the loop sent in one write (:class:`ScriptBatcher`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

from ..._integrity import Seal
from ..messages import Finished
from .keys import Layout, encode_node, queued_field, to_bytes
from .link import LuaScript, RedisLink

__all__ = ["ScriptBatcher", "finish_many_call", "see_through"]

T = TypeVar("T")


def finish_many_call(
    layout: Layout,
    seal: Seal,
    fixed: list[str],
    group: str,
    keep: int,
    items: Sequence[Finished],
) -> tuple[list[str], list[Any]]:
    """``(keys, args)`` of one FINISH_MANY call for *items*; *fixed* are the broker's
    tasks, queued, completions, events and dead keys."""
    keys = [*fixed, layout.blobrefs]
    args: list[Any] = [group, keep, repr(time.time())]
    for item in items:
        field, digest, blob = b"", "", b""
        if item.record is not None:
            field, digest, blob = encode_node(item.record, seal.node(item.run_id, item.record))
            what = "k" if digest else "j"  # a value inline needs no blob arguments
        else:
            what = "d" if item.dead is not None else "c"
        args += [
            what,
            item.task_id,
            queued_field(item.run_id, item.node_id),
            to_bytes(item.payload),
            len(item.events),
        ]
        for run_id, text in item.events:
            args += [to_bytes(run_id), to_bytes(text)]
        if what == "k":
            keys += [layout.nodes(item.run_id), layout.blob(digest)]
            args += [to_bytes(item.node_id), field, digest, blob]
        elif what == "j":
            keys.append(layout.nodes(item.run_id))
            args += [to_bytes(item.node_id), field]
        elif item.dead is not None:
            args += [to_bytes(item.run_id), to_bytes(item.node_id), to_bytes(item.dead)]
    return keys, args


class ScriptBatcher:
    """Script calls made in the same tick of the loop, sent in one write.

    A client drives a thousand runs at once: their runs are created, their leases taken
    and released, their states written by as many concurrent calls, each a round trip of
    its own on a connection of its own.  The first call of a tick schedules one send for
    the next; the calls made meanwhile join it.  Each caller gets its own reply, or its
    own error; when the send as a whole fails (the server is away), every caller gets
    that error and retries alone, as it would have without the batch.  The send runs in a
    task of its own: a caller cancelled meanwhile does not take the others' calls with it.
    """

    def __init__(self, link: RedisLink) -> None:
        self.link = link
        self.client = link.client
        self._pending: list[tuple[LuaScript, list[Any], list[Any], asyncio.Future[Any]]] = []
        self._sending: set[asyncio.Task[None]] = set()

    def call(self, script: LuaScript, keys: list[Any], args: list[Any]) -> asyncio.Future[Any]:
        """The reply of *script* run with *keys* and *args*, sent with this tick's."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._send)
        self._pending.append((script, keys, args, future))
        return future

    async def aclose(self, *, grace: float = 5.0) -> None:
        """Let the sends on their way end (for at most *grace* seconds, then cancel them):
        a send outliving its store would hold a pooled connection the store is closing."""
        if self._sending:
            _, late = await asyncio.wait(set(self._sending), timeout=grace)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)

    def _send(self) -> None:
        calls, self._pending = self._pending, []
        calls = [call for call in calls if not call[3].done()]  # drop the cancelled
        if calls:
            task = asyncio.get_running_loop().create_task(self._execute(calls))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _execute(
        self, calls: list[tuple[LuaScript, list[Any], list[Any], asyncio.Future[Any]]]
    ) -> None:
        try:
            replies = await self.link.run_scripts([call[:3] for call in calls])
        except BaseException as exc:
            for *_, future in calls:
                if not future.done():
                    future.set_exception(
                        exc if isinstance(exc, Exception) else ConnectionError(str(exc))
                    )
            if not isinstance(exc, Exception):
                raise
            return
        for (*_, future), reply in zip(calls, replies, strict=True):
            if future.done():
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)


async def see_through(work: Awaitable[T]) -> T:
    """The result of *work*, run to its end whatever cancellations this task receives
    meanwhile (the caller re-raises the one it is handling)."""
    task = asyncio.ensure_future(work)
    while True:
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                return task.result()
