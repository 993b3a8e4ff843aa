"""How many requests a provider has in flight, and how many tokens it spends per minute.

One :class:`Limits` belongs to one provider object and is shared by every run and step
that uses that object.  anyio's primitives belong to one event loop, so the state lives in
a run variable: all runs of one event loop (the usual case: one process, one loop) share
it; a second loop (``fd.run`` called again, another thread) gets fresh state.

Tokens per minute are a token bucket: a request first takes an estimate (its prompt's
length in characters / 4, plus its ``max_tokens``), waiting until the bucket holds that
many; when the answer reports the real usage, the difference is given back or owed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.lowlevel
import attrs

from .._errors import ConfigError

__all__ = ["Limits", "TokenBucket"]


@attrs.define(eq=False)
class TokenBucket:
    """``per_minute`` tokens, refilled continuously; waiters are served in order."""

    per_minute: float
    level: float = attrs.field(init=False)
    stamp: float = attrs.field(init=False)
    _lock: anyio.Lock = attrs.field(init=False, factory=anyio.Lock)

    def __attrs_post_init__(self) -> None:
        self.level = self.per_minute
        self.stamp = anyio.current_time()

    def _refill(self) -> None:
        now = anyio.current_time()
        self.level = min(self.per_minute, self.level + (now - self.stamp) * self.per_minute / 60)
        self.stamp = now

    async def take(self, tokens: float) -> None:
        """Wait until *tokens* (at most a minute's worth) are available, and take them."""
        tokens = min(tokens, self.per_minute)
        async with self._lock:
            self._refill()
            while self.level < tokens:
                await anyio.sleep((tokens - self.level) * 60 / self.per_minute)
                self._refill()
            self.level -= tokens

    def settle(self, taken: float, used: float) -> None:
        """Correct an estimate once the real count is known; the level may go negative."""
        self._refill()
        self.level = min(self.per_minute, self.level + min(taken, self.per_minute) - used)


@attrs.define(eq=False)
class _LoopLimits:
    slots: anyio.CapacityLimiter | None
    bucket: TokenBucket | None


class Limits:
    """A provider's limit on requests in flight and on tokens per minute (``None``: none)."""

    def __init__(self, max_concurrency: int | None, tokens_per_minute: int | None) -> None:
        if max_concurrency is not None and max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be at least 1, not {max_concurrency}")
        if tokens_per_minute is not None and tokens_per_minute < 1:
            raise ConfigError(f"tokens_per_minute must be at least 1, not {tokens_per_minute}")
        self.max_concurrency = max_concurrency
        self.tokens_per_minute = tokens_per_minute
        self._var: anyio.lowlevel.RunVar[_LoopLimits] = anyio.lowlevel.RunVar("flowdsl_llm_limits")

    def _current(self) -> _LoopLimits:
        try:
            return self._var.get()
        except LookupError:
            limits = _LoopLimits(
                anyio.CapacityLimiter(self.max_concurrency) if self.max_concurrency else None,
                TokenBucket(self.tokens_per_minute) if self.tokens_per_minute else None,
            )
            self._var.set(limits)
            return limits

    def statistics(self) -> tuple[int, int]:
        """``(in flight, waiting)`` in the current event loop."""
        slots = self._current().slots
        if slots is None:
            return 0, 0
        stats = slots.statistics()
        return stats.borrowed_tokens, stats.tasks_waiting

    @asynccontextmanager
    async def slot(self, estimate: int) -> AsyncIterator[_Settle]:
        """Hold one request slot and *estimate* tokens for the duration of a request."""
        limits = self._current()
        settle = _Settle(limits.bucket, float(estimate))
        if limits.bucket is not None:
            await limits.bucket.take(estimate)
        if limits.slots is None:
            yield settle
            return
        async with limits.slots:
            yield settle


@attrs.define(eq=False)
class _Settle:
    bucket: TokenBucket | None
    taken: float

    def used(self, tokens: int) -> None:
        if self.bucket is not None:
            self.bucket.settle(self.taken, tokens)
