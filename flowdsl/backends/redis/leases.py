"""The Redis store's run leases (the store's part of one driver per run): a key per run
holding its driver's name, expiring on the server's clock (PX), so that hosts whose clocks
differ agree on when it ran out; each operation one Lua script (``scripts``)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from ..._errors import CheckpointError
from ..._records import Lease
from .keys import Layout, Malformed, from_bytes, to_bytes

__all__ = ["RedisLeases"]


class RedisLeases:
    """The lease methods of :class:`~flowdsl.backends.redis.store.RedisStore`."""

    layout: Layout

    async def _script(self, name: str, what: str, keys: list[str], args: list[Any]) -> Any:
        raise NotImplementedError  # the store's

    def _corrupted(self, run_id: str, node_id: str | None, what: str) -> CheckpointError:
        raise NotImplementedError  # the store's

    async def acquire_lease(
        self, run_id: str, owner: str, ttl: float, *, replacing: str | None = None
    ) -> Lease | None:
        held = await self._script(
            "acquire_lease",
            f"taking the lease of run {run_id!r}",
            [self.layout.lease(run_id)],
            [to_bytes(owner), _milliseconds(ttl), to_bytes(replacing or "")],
        )
        if not held:
            return None
        try:
            holder = from_bytes(held[0], "the lease's owner")
        except Malformed as exc:
            raise self._corrupted(run_id, None, str(exc)) from None
        # PTTL is -1 for a key written by hand without an expiry: it never runs out.
        left = int(held[1])
        expires = math.inf if left < 0 else time.time() + left / 1000
        return Lease(run_id, holder, expires)

    async def renew_leases(self, owner: str, run_ids: Sequence[str], ttl: float) -> list[str]:
        ids = list(run_ids)
        if not ids:
            return []
        lost = await self._script(
            "renew_leases",
            "renewing run leases",
            [self.layout.lease(run_id) for run_id in ids],
            [to_bytes(owner), _milliseconds(ttl)],
        )
        return [ids[int(i) - 1] for i in lost]

    async def release_lease(self, run_id: str, owner: str) -> None:
        await self._script(
            "release_lease",
            f"releasing the lease of run {run_id!r}",
            [self.layout.lease(run_id)],
            [to_bytes(owner)],
        )


def _milliseconds(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))
