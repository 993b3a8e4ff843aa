"""The NATS store's run leases (the store's part of one driver per run): a key per run
(``lease.{b64(run_id)}``) holding its driver's name and its expiry, taken with ``create``
when there is none, else ``update`` against the revision that showed it free, ran out or
ours.  The expiry is wall-clock time, so the hosts' clocks must agree to well within a
lease (NTP does)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import anyio
from anyio.lowlevel import checkpoint_if_cancelled

from ..._errors import CheckpointError
from ..._records import Lease
from .. import _validate as v
from .bucket import Bucket
from .keys import Malformed, dump_json, field, lease_key, load_json

__all__ = ["NATSLeases"]


class NATSLeases:
    """The lease methods of :class:`~flowdsl.backends.nats.store.NATSStore`."""

    # The lease of each run this store took, as (owner, revision) at its last write:
    # renewing and releasing go against that revision, without reading it first.
    _leases: dict[str, tuple[str, int]]

    @property
    def _bucket(self) -> Bucket:
        raise NotImplementedError  # the store's

    def _corrupted(self, run_id: str, node_id: str | None, what: str) -> CheckpointError:
        raise NotImplementedError  # the store's

    async def acquire_lease(
        self, run_id: str, owner: str, ttl: float, *, replacing: str | None = None
    ) -> Lease | None:
        await checkpoint_if_cancelled()
        key = lease_key(run_id)
        # Most leases are of new runs: create first, read only when one is there.
        revision = await self._bucket.create_at(
            key, self._lease(owner, ttl), "take a run's lease", run_id
        )
        while revision is None:
            now = time.time()
            got = await self._bucket.get(key, "read a run's lease", run_id)
            if got is None:
                revision = await self._bucket.create_at(
                    key, self._lease(owner, ttl), "take a run's lease", run_id
                )
                continue  # None: another took it meanwhile, look again
            held = self._decode_lease(run_id, got[0])
            if held.owner not in (owner, replacing) and held.expires_at > now:
                return held
            # Against the revision read: of two takers, one wins, the other looks again.
            revision = await self._bucket.update_at(
                key, self._lease(owner, ttl), got[1], "take a run's lease", run_id
            )
        self._leases[run_id] = (owner, revision)
        return None

    async def renew_leases(self, owner: str, run_ids: Sequence[str], ttl: float) -> list[str]:
        await checkpoint_if_cancelled()
        lost: list[str] = []
        failed: list[Exception] = []

        # Against the revision this store wrote, all in one pipeline: where it still stands,
        # the lease is still ours; the others are read first, one by one.
        wanted = list(dict.fromkeys(run_ids))
        known = [(r, self._leases.get(r)) for r in wanted]
        fast = [(r, k[1]) for r, k in known if k is not None and k[0] == owner]
        revisions = await self._bucket.update_many(
            [(lease_key(r), self._lease(owner, ttl), last) for r, last in fast], "renew leases"
        )
        renewed = {r: (owner, rev) for (r, _), rev in zip(fast, revisions, strict=True) if rev}
        self._leases.update(renewed)

        async def renew(run_id: str) -> None:
            key = lease_key(run_id)
            try:
                while True:
                    got = await self._bucket.get(key, "read a run's lease", run_id)
                    if got is None or self._decode_lease(run_id, got[0]).owner != owner:
                        self._leases.pop(run_id, None)
                        lost.append(run_id)
                        return
                    revision = await self._bucket.update_at(
                        key, self._lease(owner, ttl), got[1], "renew a lease", run_id
                    )
                    if revision is not None:
                        self._leases[run_id] = (owner, revision)
                        return
            except Exception as exc:  # raised below as itself, not in a group
                failed.append(exc)

        async with anyio.create_task_group() as tg:
            for run_id in wanted:
                if run_id not in renewed:
                    tg.start_soon(renew, run_id)
        if failed:
            raise failed[0]
        return [run_id for run_id in run_ids if run_id in lost]

    async def release_lease(self, run_id: str, owner: str) -> None:
        await checkpoint_if_cancelled()
        key = lease_key(run_id)
        known = self._leases.pop(run_id, None)
        # Only at the revision this store wrote: a lease taken over meanwhile stays.
        if (
            known is not None
            and known[0] == owner
            and await self._bucket.delete(key, "release a run's lease", run_id, last=known[1])
        ):
            return
        got = await self._bucket.get(key, "read a run's lease", run_id)
        if got is not None and self._decode_lease(run_id, got[0]).owner == owner:
            # Only the revision read: a lease taken over meanwhile stays with its taker.
            await self._bucket.delete(key, "release a run's lease", run_id, last=got[1])

    @staticmethod
    def _lease(owner: str, ttl: float) -> bytes:
        return dump_json({"owner": owner, "expires_at": time.time() + ttl})

    def _decode_lease(self, run_id: str, data: bytes) -> Lease:
        try:
            fields = load_json(data, "the lease")
            if not isinstance(fields, dict):
                raise Malformed("the lease is not a JSON object")
            owner = field(fields, "owner", str)
            expires = v.timestamp(fields.get("expires_at"), "the lease's expiry")
        except Malformed as exc:
            raise self._corrupted(run_id, None, str(exc)) from None
        return Lease(run_id, owner, expires)
