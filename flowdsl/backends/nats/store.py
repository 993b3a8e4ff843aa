"""The NATS store: runs and node journals in a JetStream key-value bucket (``store="nats://..."``).

Layout, in one bucket per deployment (``prefix=``, default ``flowdsl``; its stream is
``KV_{prefix}``), every key built from base64url tokens (no padding; ``=`` stands for the
empty string), because run and node ids hold characters NATS keys refuse or give meaning
to (``.`` separates tokens, ``*`` and ``>`` are wildcards, spaces and most punctuation are
not allowed)::

    run.{b64(run_id)}                 the run record (JSON)
    node.{b64(run_id)}.{b64(node_id)} the journal: one key per finished node (JSON)
    cache.{b64(cache key)}            ``@fd.step(cache=True)`` results
    lease.{b64(run_id)}               who drives the run, until when (JSON)
    blob.{sha256 hex}                 head of a large value: its size and chunk count
    blob.{sha256 hex}.{i}             its chunks (raw bytes)

Committing a node is one KV ``create`` of its key: the server refuses a second create of
a live key (compare-and-set on revision 0), so the first commit wins, whoever else
finishes the node.  A run's status changes by ``update`` against the revision it was read
at, retried on a conflict, so no update is lost.  A run's lease is taken the same way:
``create`` when there is none, else ``update`` against the revision that showed it free,
ran out or ours; its expiry is wall-clock time, so the hosts' clocks must agree to well
within a lease (NTP does).

Large values: text up to ``inline_max`` bytes (32 KiB by default) sits in its record; a
longer one is stored once per distinct content under its SHA-256, in chunks of at most
256 KiB in the same bucket (the server's max payload is 1 MB by default).  Chunks rather
than the object store because chunks of content-addressed data are idempotent to write
(two workers storing the same value write the same bytes, in any order), need no
consumer per read (the object store streams each object through a fresh consumer), and
keep one consistency model, revisions of one bucket, for everything.  Blobs are not
collected when the nodes that used them are forgotten: a resume after a code change
leaves its old large values behind (they are content-addressed, so nothing reads them by
mistake).

Every record read back is checked before it is believed: a key written by hand or by
another program raises :class:`~flowdsl.CheckpointError` naming the run and the node.
Nothing is ever unpickled or evaluated: records are JSON.

``list_runs`` reads every run record (one consumer streams the bucket's ``run.*`` keys)
and sorts them by creation time: fine for thousands of runs, slow for millions.

The URL (``url``), the connection (``link``), the key encoding (``keys``) and the bucket
(``bucket``) are shared with the NATS broker.  nats-py runs on asyncio only: under trio,
:meth:`NATSStore.open` refuses with :class:`~flowdsl.ConfigError`.  See docs/nats.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final

import anyio
import attrs
from anyio.lowlevel import checkpoint_if_cancelled

from ..._errors import CheckpointError, ConfigError
from ..._records import NodeRecord, RunRecord, RunStatus
from .. import _validate as v
from .._retention import ENDED
from ..base import ExpectedNodes, Store
from .bucket import Bucket
from .keys import (
    Malformed,
    cache_key,
    dump_json,
    id_of,
    load_json,
    node_key,
    run_key,
    to_token,
)
from .leases import NATSLeases
from .link import NatsLink
from .url import DEFAULT_PREFIX, INLINE_MAX, NatsURL, nats_modules
from .watch import Watch

__all__ = ["DEFAULT_PREFIX", "INLINE_MAX", "NATSStore"]

log = logging.getLogger("flowdsl.nats")

_RECORD_VERSION: Final = 1
_WRITTEN_KEPT: Final = 10_000
WATCHED: Final = "node.>"  # the journal's keys, for the watch of what workers commit

# --- the store ------------------------------------------------------------------------------

_RESTORE_HINT: Final = (
    "Restore the bucket from a backup, or delete the run's keys (nats kv del BUCKET KEY) "
    "and start it again"
)


class NATSStore(NATSLeases, Store):
    """Runs and node journals in a JetStream key-value bucket.

    *url* is ``nats://[token@|user:password@]host:4222[,host2:4222...]`` (``tls://`` for
    TLS), with options in its query string or as keywords (see :class:`NatsOptions`).
    """

    def __init__(self, url: str, **options: Any) -> None:
        nats_modules()  # a missing client fails here, where the store is named
        self._url = NatsURL.parse(url, **options)
        self.url = self._url.shown
        self.options = self._url.options
        self.bucket = self.options.prefix
        self._link = NatsLink(self._url)
        self._kv: Bucket | None = None
        self.ttl = self.options.ttl
        self._pruned_at = 0.0
        # The lease of each run this store took, as (owner, revision) at its last write:
        # renewing and releasing go against that revision, without reading it first.
        self._leases: dict[str, tuple[str, int]] = {}
        # The run records this store wrote, with their revisions, while their runs go on:
        # the next update goes against them without reading first.
        self._written: dict[str, tuple[RunRecord, int]] = {}
        self._unwatched = False  # the server refused the journal watch

    @classmethod
    def from_url(cls, url: str) -> NATSStore:
        return cls(url)

    def __repr__(self) -> str:
        state = "open" if self._kv is not None else "closed"
        return f"<NATSStore {self.url!r} bucket={self.bucket!r} {state}>"

    @property
    def link(self) -> NatsLink:
        return self._link

    # --- lifetime -------------------------------------------------------------------------

    async def open(self) -> None:
        await checkpoint_if_cancelled()
        if self._kv is not None:
            return
        await self._link.open()
        try:
            self._kv = await Bucket.open(self._link, self.options)
        except BaseException:
            await self._link.close()
            raise

    async def close(self) -> None:
        kv, self._kv = self._kv, None
        if kv is not None:
            with anyio.CancelScope(shield=True):
                await kv.stop()
        await self._link.close()

    @property
    def _bucket(self) -> Bucket:
        if self._kv is None:
            raise ConfigError(
                f"the store {self.url} is not open",
                hint="Use it inside `async with ctx:` or call `await store.open()` first",
            )
        return self._kv

    # --- runs -----------------------------------------------------------------------------

    async def create_run(self, record: RunRecord) -> tuple[RunRecord, bool]:
        await checkpoint_if_cancelled()
        key = run_key(record.run_id)
        data = await self._encode_run(record)
        while True:
            revision = await self._bucket.create_at(key, data, "create a run", record.run_id)
            if revision is not None:
                self._wrote(record, revision)
                return record, True
            stored = await self.get_run(record.run_id)
            if stored is not None:
                # Our own create, when its reply was lost and the call was retried.
                return stored, stored == record
            # Deleted between the create and the read: try again.

    @property
    def _watch(self) -> Watch:
        """The journal watch (the bucket makes it on first use)."""
        return self._bucket.watch(WATCHED)

    def _wrote(self, record: RunRecord, revision: int) -> None:
        written = self._written
        written[record.run_id] = (record, revision)
        if len(written) > _WRITTEN_KEPT:  # runs ended elsewhere, or never updated again
            del written[next(iter(written))]

    async def get_run(self, run_id: str) -> RunRecord | None:
        await checkpoint_if_cancelled()
        got = await self._bucket.get(run_key(run_id), "read a run", run_id)
        return None if got is None else await self._decode_run(run_id, got[0])

    async def update_run(
        self,
        run_id: str,
        *,
        status: RunStatus,
        result: str | None = None,
        error: str | None = None,
        failed_node: str | None = None,
        fingerprint: str | None = None,
        code: dict[str, str] | None = None,
        traceback: str | None = None,
    ) -> None:
        await checkpoint_if_cancelled()
        key = run_key(run_id)
        # First against the record and revision this store last wrote (most runs are
        # updated only by their driver): no read, unless another process wrote since.
        got = self._written.pop(run_id, None)
        while True:
            if got is None:
                read = await self._bucket.get(key, "read a run", run_id)
                if read is None:
                    raise CheckpointError(
                        f"run {run_id!r} does not exist in {self.url}",
                        hint="Create the run (ctx.start) before updating it",
                    )
                got = (await self._decode_run(run_id, read[0]), read[1])
            record, last = got
            changes: dict[str, Any] = {
                "status": status,
                "result": result,
                "error": error,
                "failed_node": failed_node,
                "traceback": traceback,
                "updated_at": time.time(),
            }
            if fingerprint is not None:
                changes["fingerprint"] = fingerprint
            if code is not None:
                changes["code"] = code
            updated = attrs.evolve(record, **changes)
            data = await self._encode_run(updated)
            # Compare-and-set on the revision read: a concurrent update makes us read again
            # rather than overwrite it with stale fields.
            revision = await self._bucket.update_at(key, data, last, "update a run", run_id)
            if revision is not None:
                if not status.ended:
                    self._wrote(updated, revision)
                break
            got = None
        if status.ended and self.ttl is not None:
            await self._expire()

    # --- retention ------------------------------------------------------------------------

    async def prune(
        self, *, older_than: float, statuses: frozenset[RunStatus] | None = None
    ) -> list[str]:
        await checkpoint_if_cancelled()
        cutoff = time.time() - older_than
        allowed = statuses if statuses is not None else ENDED
        pruned = []
        for key, data in await self._bucket.scan("run.*", "list the runs to prune"):
            try:
                fields = load_json(data, "the run record")
                run_id = id_of(key, "run")
                status = RunStatus(fields.get("status"))
                updated = fields.get("updated_at")
                old = isinstance(updated, int | float) and updated < cutoff
            except (Malformed, ValueError, AttributeError):
                continue  # a record this store cannot read is left for a person to see
            if status not in allowed or not old:
                continue
            # Nodes first: a run record without its journal would resume from nothing.
            await self._forget_journal(run_id)
            signals = await self._bucket.scan(
                f"signal.{to_token(run_id)}.>", "list a pruned run's signals", run_id
            )
            for signal_key, _ in signals:
                await self._bucket.delete(signal_key, "prune a run's signals", run_id)
            await self._bucket.delete(key, "prune a run", run_id)
            pruned.append(run_id)
        return pruned

    async def _forget_journal(self, run_id: str) -> None:
        """Delete every node of the run, scanning again until none is left: a scan under
        load can miss keys written just before it."""
        for _ in range(5):
            nodes = await self._bucket.scan(
                f"node.{to_token(run_id)}.*", "list a pruned run's journal", run_id
            )
            if not nodes:
                return
            await self.forget_nodes(run_id, [id_of(k, "node") for k, _ in nodes])

    async def _expire(self) -> None:
        """Prune the runs past the store's ``ttl``, at most every tenth of it."""
        assert self.ttl is not None
        now = time.time()
        if now - self._pruned_at < min(self.ttl / 10, 60.0):
            return
        self._pruned_at = now
        await self.prune(older_than=self.ttl)

    async def list_runs(self, *, limit: int = 50) -> list[RunRecord]:
        await checkpoint_if_cancelled()
        if limit <= 0:
            return []
        entries = await self._bucket.scan("run.*", "list the runs")
        runs = []
        for key, data in entries:
            run_id = id_of(key, "run")
            runs.append(await self._decode_run(run_id, data))
        runs.sort(key=lambda r: (r.created_at, r.run_id), reverse=True)
        return runs[:limit]

    async def _encode_run(self, record: RunRecord) -> bytes:
        seal = self.seal
        state = seal.run_state_of(record)
        extra: dict[str, Any] = {}
        if record.traceback is not None:  # absent from records written before tracebacks
            extra["traceback"] = await self._bucket.pack(record.traceback, record.run_id)
        return dump_json(
            {
                **extra,
                "v": _RECORD_VERSION,
                "run_id": record.run_id,
                "flow": record.flow,
                "flow_ref": record.flow_ref,
                "fingerprint": record.fingerprint,
                "inputs": await self._bucket.pack(record.inputs, record.run_id),
                "status": record.status.value,
                "created_at": record.created_at,
                "updated_at": record.updated_at,
                "result": None
                if record.result is None
                else await self._bucket.pack(record.result, record.run_id),
                "error": None
                if record.error is None
                else await self._bucket.pack(record.error, record.run_id),
                "failed_node": record.failed_node,
                "code": record.code,
                "check": seal.run_head(record),
                "state_check": state,
            }
        )

    async def _decode_run(self, run_id: str, data: bytes) -> RunRecord:
        try:
            fields = load_json(data, "the run record")
            if not isinstance(fields, dict) or fields.get("v") != _RECORD_VERSION:
                raise Malformed("the run record is not an object of this version")
            bucket = self._bucket
            fields["inputs"] = await bucket.unpack(fields.get("inputs"), "inputs", run_id)
            fields["result"] = await bucket.unpack_optional(fields.get("result"), "result", run_id)
            for name in ("error", "traceback"):
                fields[name] = await bucket.unpack_optional(
                    fields.get(name), name, run_id, json_text=False
                )
            return v.run_record(run_id, fields, self.seal)
        except Malformed as exc:
            raise self._corrupted(run_id, None, str(exc)) from None

    # --- the journal ----------------------------------------------------------------------

    async def commit_node(self, run_id: str, record: NodeRecord) -> bool:
        await checkpoint_if_cancelled()
        data = await self._node_data(run_id, record)
        key = node_key(run_id, record.node_id)
        if await self._bucket.create(key, data, "commit a node", run_id):
            return True
        return await self._ours(run_id, key, data)

    async def commit_nodes(self, records: Sequence[tuple[str, NodeRecord]]) -> list[bool]:
        """The nodes' creates pipelined: one round trip for a batch worker's lot."""
        await checkpoint_if_cancelled()
        if not records:
            return []
        items = [
            (node_key(run_id, record.node_id), await self._node_data(run_id, record))
            for run_id, record in records
        ]
        created = await self._bucket.create_many(items, "commit nodes", records[0][0])
        return [
            first or await self._ours(run_id, key, data)
            for first, (key, data), (run_id, _) in zip(created, items, records, strict=True)
        ]

    async def _ours(self, run_id: str, key: str, data: bytes) -> bool:
        """Whether the node under *key*, found taken by a create, holds *data*.  Taken by
        another worker (first commit wins), or by this very commit when its reply was lost
        and it was retried; only the latter holds exactly our record."""
        got = await self._bucket.get(key, "read a node", run_id)
        return got is not None and got[0] == data

    async def _node_data(self, run_id: str, record: NodeRecord) -> bytes:
        return dump_json(
            {
                "v": _RECORD_VERSION,
                "node_id": record.node_id,
                "value": await self._bucket.pack(record.value, run_id),
                "attempts": record.attempts,
                "started_at": record.started_at,
                "finished_at": record.finished_at,
                "code": record.code,
                "usage": record.usage,
                "check": self.seal.node(run_id, record),
            }
        )

    async def load_node(self, run_id: str, node_id: str) -> NodeRecord | None:
        await checkpoint_if_cancelled()
        key = node_key(run_id, node_id)
        got = await self._bucket.get(key, "read a node", run_id)
        return None if got is None else await self._decode_node(run_id, key, got[0])

    async def load_nodes(self, run_id: str) -> dict[str, NodeRecord]:
        await checkpoint_if_cancelled()
        entries = await self._bucket.scan(f"node.{to_token(run_id)}.*", "read the journal", run_id)
        records: dict[str, NodeRecord] = {}
        for key, data in entries:
            record = await self._decode_node(run_id, key, data)
            records[record.node_id] = record
        return records

    async def lookup_nodes(
        self, keys: Sequence[tuple[str, str]], *, expected: ExpectedNodes = None
    ) -> dict[tuple[str, str], NodeRecord]:
        await checkpoint_if_cancelled()
        pairs = list(dict.fromkeys(keys))
        names = [node_key(run_id, node_id) for run_id, node_id in pairs]
        run_id = pairs[0][0] if pairs else None
        found: dict[tuple[str, str], NodeRecord] = {}
        want = expected or {}
        if want:
            # Expected records (a client checking completions) were committed a moment
            # ago: the journal watch has most of them (docs/nats.md).  It only ever
            # confirms: what it lacks, or shows otherwise than expected, is read.
            pairs, names = await self._confirmed(pairs, names, want, found)
        # KV has no multi-get: the reads are pipelined, one round trip in all.
        values = await self._bucket.get_many(names, "read nodes", run_id)
        for (run_id, node_id), name, value in zip(pairs, names, values, strict=True):
            if value is not None:
                record = want.get((run_id, node_id))
                found[run_id, node_id] = await self._decode_node(run_id, name, value, record)
        return found

    async def _confirmed(
        self,
        pairs: list[tuple[str, str]],
        names: list[str],
        want: Mapping[tuple[str, str], NodeRecord],
        found: dict[tuple[str, str], NodeRecord],
    ) -> tuple[list[tuple[str, str]], list[str]]:
        """Put in *found* the expected records the journal watch shows as expected (the
        nodes *pairs*, under the keys *names*); the pairs and keys left to read."""
        if self._unwatched:
            return pairs, names
        try:
            taken = await self._watch.take(names)
        except CheckpointError as exc:
            # A shortcut, not a need: a server that refuses the watch's consumer (a
            # limit on consumers, a permission) leaves every check to a read.
            log.warning("NATS at %s: checking against reads, without a watch: %s", self.url, exc)
            self._unwatched = True
            return pairs, names
        left: list[tuple[str, str]] = []
        left_names: list[str] = []
        for pair, name, value in zip(pairs, names, taken, strict=True):
            record = want.get(pair)
            if value is not None and record is not None:
                try:
                    if await self._decode_node(pair[0], name, value, record) is record:
                        found[pair] = record
                        continue
                except CheckpointError:
                    pass  # read, and refused from what the read finds
            left.append(pair)
            left_names.append(name)
        return left, left_names

    async def forget_nodes(self, run_id: str, node_ids: list[str]) -> None:
        await checkpoint_if_cancelled()
        keys = [node_key(run_id, node_id) for node_id in node_ids]
        # Before the deletes: the watch takes no value of these keys until it has seen
        # their delete markers, so none forgotten here is taken from it afterwards.
        self._watch.forget(keys)
        async with anyio.create_task_group() as tg:
            for key in keys:
                tg.start_soon(self._bucket.delete, key, "forget a node", run_id)

    async def _decode_node(
        self, run_id: str, key: str, data: bytes, expected: NodeRecord | None = None
    ) -> NodeRecord:
        node_id: str | None = None
        try:
            node_id = id_of(key, "node")
            fields = load_json(data, "the node record")
            if not isinstance(fields, dict) or fields.get("v") != _RECORD_VERSION:
                raise Malformed("the node record is not an object of this version")
            if fields.get("node_id") != node_id:
                raise Malformed(f"the record under this node's key names {fields.get('node_id')!r}")
            fields["value"] = await self._bucket.unpack(fields.get("value"), "value", run_id)
            return v.node_record(run_id, node_id, fields, self.seal, expected=expected)
        except Malformed as exc:
            raise self._corrupted(run_id, node_id or key, str(exc)) from None

    # --- the step cache -------------------------------------------------------------------

    async def get_cached(self, key: str) -> str | None:
        await checkpoint_if_cancelled()
        got = await self._bucket.get(cache_key(key), "read the cache")
        if got is None:
            return None
        try:
            fields = load_json(got[0], "the cache entry")
            if not isinstance(fields, dict) or "value" not in fields:
                raise Malformed("the cache entry is not an object with a value")
            value = await self._bucket.unpack(fields["value"], "the cached value", None)
            v.check_cached(self.seal, key, value, fields.get("check"))
            return value
        except Malformed as exc:
            raise CheckpointError(
                f"cache entry {key!r} in {self.url} is corrupted: {exc}",
                hint=f"Delete the entry: nats kv del {self.bucket} {cache_key(key)}",
            ) from None

    async def put_cached(self, key: str, value: str) -> None:
        await checkpoint_if_cancelled()
        check = self.seal.cached(key, value)
        data = dump_json({"value": await self._bucket.pack(value), "check": check})
        await self._bucket.put(cache_key(key), data, "write the cache")

    # --- errors ---------------------------------------------------------------------------

    def _corrupted(self, run_id: str, node_id: str | None, what: str) -> CheckpointError:
        where = f"{self.url} (bucket {self.bucket!r})"
        return v.corrupted(where, run_id, node_id, what, _RESTORE_HINT)

    # --- signals (fd.wait_for) --------------------------------------------------------------

    async def put_signal(self, run_id: str, name: str, value: str) -> int:
        """Append *value* (JSON text) to the run's signals called *name*; its index.

        Each signal is a key of its own, created at the first free index (a create of a
        live key is refused), so two senders never take the same index.
        """
        await checkpoint_if_cancelled()
        data = dump_json({"value": await self._bucket.pack(value, run_id)})
        index = 0
        while not await self._bucket.create(
            _signal_key(run_id, name, index), data, "send a signal", run_id
        ):
            index += 1
        return index

    async def get_signal(self, run_id: str, name: str, index: int) -> str | None:
        """The *index*-th signal *name* sent to the run (from 0), or ``None`` if not yet."""
        await checkpoint_if_cancelled()
        got = await self._bucket.get(_signal_key(run_id, name, index), "read a signal", run_id)
        if got is None:
            return None
        try:
            fields = load_json(got[0], "the signal")
            if not isinstance(fields, dict) or "value" not in fields:
                raise Malformed("the signal is not an object with a value")
            return await self._bucket.unpack(fields["value"], "the signal", run_id)
        except Malformed as exc:
            raise self._corrupted(run_id, None, str(exc)) from None


def _signal_key(run_id: str, name: str, index: int) -> str:
    return f"signal.{to_token(run_id)}.{to_token(name)}.{index}"
