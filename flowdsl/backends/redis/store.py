"""The Redis store: run records and node journals on a Redis server (``store="redis://..."``).

Layout, under one key prefix per deployment (``prefix=``, default ``flowdsl``)::

    {prefix}:run:{run_id}     hash: the run record, one field per attribute
    {prefix}:runs             sorted set: run ids scored by created_at (for list_runs)
    {prefix}:nodes:{run_id}   hash: the journal, node id -> the node's record (JSON)
    {prefix}:blob:{sha256}    string: a large value, once per distinct content
    {prefix}:blobrefs         hash: sha256 -> how many records and cache entries use it
    {prefix}:cache            hash: cache key -> a value (JSON) or a blob reference
    {prefix}:lease:{run_id}   string: who drives the run; expires (PX) unless renewed

Committing a node is one ``HSETNX`` (first commit wins), with its blob in the same Lua
script when the value is larger than :data:`INLINE_MAX` bytes.  Every field read back is
checked before it is believed: a key written by hand or by another program raises
:class:`~flowdsl.CheckpointError` naming the run and the node.

The connection (``link``), the key names and encodings (``keys``) and the Lua scripts
(``scripts``) are shared with the Redis broker.

Only redis-py's asyncio client is used, so the Redis backend runs under asyncio; under
trio, :meth:`RedisStore.open` refuses with :class:`~flowdsl.ConfigError`.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from typing import Any, Final

from anyio.lowlevel import checkpoint_if_cancelled

from ... import _codec
from ..._errors import CheckpointError
from ..._records import NodeRecord, RunRecord, RunStatus
from .. import _validate as v
from .._retention import ENDED, parse_ttl
from ..base import ExpectedNodes, Store
from .batches import ScriptBatcher, see_through
from .keys import (
    INLINE_MAX,
    Layout,
    Malformed,
    blob_text,
    encode_node,
    float_text,
    from_bytes,
    node_from_fields,
    parse_cached,
    parse_node,
    run_fields,
    to_bytes,
)
from .leases import RedisLeases
from .link import (
    DEFAULT_PREFIX,
    Command,
    LuaScript,
    RedisLink,
    RedisURL,
    parse_prefix,
    require_asyncio,
)
from .scripts import (
    ACQUIRE_LEASE,
    COMMIT_NODE,
    CREATE_RUN,
    FORGET_NODES,
    PRUNE_RUN,
    PUT_CACHED,
    RELEASE_LEASE,
    RENEW_LEASES,
    UPDATE_RUN,
)

__all__ = ["DEFAULT_PREFIX", "INLINE_MAX", "RedisStore"]


_SCRIPTS: Final = {
    name: LuaScript.of(source)
    for name, source in (
        ("create_run", CREATE_RUN),
        ("update_run", UPDATE_RUN),
        ("commit_node", COMMIT_NODE),
        ("forget_nodes", FORGET_NODES),
        ("put_cached", PUT_CACHED),
        ("acquire_lease", ACQUIRE_LEASE),
        ("renew_leases", RENEW_LEASES),
        ("release_lease", RELEASE_LEASE),
        ("prune_run", PRUNE_RUN),
    )
}
_RUN_FIELDS: Final = frozenset(v.RUN_FIELDS)
_TIMES: Final = ("created_at", "updated_at")
# The checks are missing from records written before integrity checks, the traceback from
# those written before tracebacks were kept (and from every run that did not fail).
_OPTIONAL_RUN_FIELDS: Final = frozenset(
    {"result", "error", "failed_node", "check", "state_check", "traceback"}
)
_RESTORE_HINT: Final = (
    "Delete the run's keys ({keys}) and start it again, or restore the server's data from a backup"
)


class RedisStore(RedisLeases, Store):
    """Runs and node journals on a Redis server, shared by every process that uses it.

    *url* is ``redis://[user:password@]host:port/db`` (``rediss://`` for TLS), optionally
    with ``?prefix=NAME``; *prefix* (default ``flowdsl``) keeps deployments on one server
    apart.  Durability is the server's: with ``appendonly yes`` and ``appendfsync always``
    a committed node survives the server being killed.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str | None = None,
        retry_for: float = 30.0,
        ttl: float | None = None,
    ) -> None:
        self._link = RedisLink(RedisURL.parse(url), retry_for=retry_for)
        self.prefix = parse_prefix(self._link.url, prefix)
        self.layout = Layout(self.prefix)
        self.url = self._link.url.shown
        self._batcher: ScriptBatcher | None = None
        self.ttl = parse_ttl(self._link.url.query_ttl if ttl is None else ttl, self.url)
        self._pruned_at = 0.0

    @classmethod
    def from_url(cls, url: str) -> RedisStore:
        return cls(url)

    @classmethod
    def reading_through(cls, link: RedisLink, prefix: str) -> RedisStore:
        """A store on another object's open connection (a broker's), for reading records;
        it neither opens nor closes the connection."""
        store = cls.__new__(cls)
        store._link = link
        store.prefix = prefix
        store.layout = Layout(prefix)
        store.url = link.url.shown
        store._batcher = None
        store.ttl = None
        store._pruned_at = 0.0
        return store

    def __repr__(self) -> str:
        state = "open" if self._link.is_open else "closed"
        return f"<RedisStore {self.url!r} prefix={self.prefix!r} {state}>"

    @property
    def server(self) -> tuple[str, str]:
        """What identifies this store's data: the connection and the prefix."""
        return (self._link.url.connect, self.prefix)

    # --- lifetime -------------------------------------------------------------------------

    async def open(self) -> None:
        if self._link.is_open:
            require_asyncio(self.url)
            return
        await self._link.open()

    async def close(self) -> None:
        if self._batcher is not None:
            batcher, self._batcher = self._batcher, None
            await batcher.aclose()
        await self._link.close()

    def _client(self) -> Any:
        return self._link.require("store")

    async def _script(self, name: str, what: str, keys: list[str], args: list[Any]) -> Any:
        client, script = self._client(), _SCRIPTS[name]
        if self._batcher is None or self._batcher.client is not client:
            self._batcher = ScriptBatcher(self._link)
        # Sent with the calls of the same tick; a retry (the server was away) goes alone.
        first: list[Awaitable[Any]] = [self._batcher.call(script, keys, args)]
        return await self._link.call(
            what, lambda: first.pop() if first else self._link.run_script(script, keys, args)
        )

    # --- runs -----------------------------------------------------------------------------

    async def create_run(self, record: RunRecord) -> tuple[RunRecord, bool]:
        fields = run_fields(record)
        fields["check"] = to_bytes(self.seal.run_head(record))
        fields["state_check"] = to_bytes(self.seal.run_state_of(record))
        args: list[Any] = [to_bytes(record.run_id), repr(record.created_at)]
        for name, value in fields.items():
            args += [name, value]
        key = self.layout.run(record.run_id)
        stored = await self._script(
            "create_run", f"creating run {record.run_id!r}", [key, self.layout.runs], args
        )
        if not stored:
            return record, True
        return self._run_from_hash(record.run_id, _pairs(stored)), False

    async def get_run(self, run_id: str) -> RunRecord | None:
        client = self._client()
        key = self.layout.run(run_id)
        data = await self._link.call(f"reading run {run_id!r}", lambda: client.hgetall(key))
        if not data:
            return None
        return self._run_from_hash(run_id, data)

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
        setting: dict[str, bytes] = {
            "status": to_bytes(status.value),
            "updated_at": repr(time.time()).encode(),
        }
        dropping: list[str] = []
        optional = {"result": result, "error": error, "failed_node": failed_node}
        for name, value in {**optional, "traceback": traceback}.items():
            if value is None:
                dropping.append(name)
            else:
                setting[name] = to_bytes(value)
        if fingerprint is not None:
            setting["fingerprint"] = to_bytes(fingerprint)
        if code is not None:
            setting["code"] = to_bytes(_codec.dumps(code))
        state = self.seal.run_state(run_id, status.value, result, error, failed_node, traceback)
        setting["state_check"] = to_bytes(state)
        args: list[Any] = [len(setting)]
        for name, data in setting.items():
            args += [name, data]
        args += dropping
        updated = await self._script(
            "update_run", f"updating run {run_id!r}", [self.layout.run(run_id)], args
        )
        if not updated:
            raise CheckpointError(
                f"run {run_id!r} does not exist in {self.url}",
                hint="Create the run (ctx.start) before updating it",
            )
        if status.ended and self.ttl is not None:
            await self._expire()

    # --- retention ------------------------------------------------------------------------

    async def prune(
        self, *, older_than: float, statuses: frozenset[RunStatus] | None = None
    ) -> list[str]:
        client = self._client()
        cutoff = time.time() - older_than
        allowed = [s.value for s in (statuses or ENDED)]
        # A run last updated before the cutoff was created before it: its score is lower.
        raw_ids = await self._link.call(
            "listing runs to prune",
            lambda: client.zrangebyscore(self.layout.runs, "-inf", repr(cutoff)),
        )
        pruned = []
        for raw in raw_ids:
            run_id = _node_name(raw)
            keys = [self.layout.run(run_id), self.layout.nodes(run_id), self.layout.runs]
            done = await self._script(
                "prune_run",
                f"pruning run {run_id!r}",
                [*keys, self.layout.blobrefs],
                [self.prefix, raw, repr(cutoff), *allowed],
            )
            if done == 1:
                await self._forget_signals(client, run_id)
                pruned.append(run_id)
        return pruned

    async def _forget_signals(self, client: Any, run_id: str) -> None:
        # Signal keys end with the signal's name: the run's are found by a pattern, its
        # id escaped so that glob characters in it match only themselves.
        escaped = "".join(f"\\{c}" if c in "*?[]\\" else c for c in run_id)
        pattern = f"{self.prefix}:signals:{escaped}:*"

        async def delete() -> None:
            keys = [key async for key in client.scan_iter(match=pattern, count=500)]
            if keys:
                await client.delete(*keys)

        await self._link.call(f"pruning the signals of run {run_id!r}", delete)

    async def _expire(self) -> None:
        """Prune the runs past the store's ``ttl``, at most every tenth of it."""
        assert self.ttl is not None
        now = time.time()
        if now - self._pruned_at < min(self.ttl / 10, 60.0):
            return
        self._pruned_at = now
        await self.prune(older_than=self.ttl)

    async def list_runs(self, *, limit: int = 50) -> list[RunRecord]:
        if limit <= 0:
            return []
        client = self._client()
        ids = await self._link.call(
            "listing runs", lambda: client.zrevrange(self.layout.runs, 0, limit - 1)
        )
        if not ids:
            return []

        async def read_all() -> list[Any]:
            async with client.pipeline(transaction=False) as pipe:
                for raw in ids:
                    pipe.hgetall(self.layout.run(from_bytes(raw, "run id")))
                return list(await pipe.execute())

        try:
            names = [from_bytes(raw, "run id") for raw in ids]
        except Malformed as exc:
            raise CheckpointError(
                f"the run list {self.layout.runs} in {self.url} is corrupted: {exc}",
                hint=f"Delete the key {self.layout.runs} (list_runs only reads it)",
            ) from None
        hashes = await self._link.call("listing runs", read_all)
        # A run whose hash was deleted by hand drops out of the list.
        return [self._run_from_hash(n, h) for n, h in zip(names, hashes, strict=True) if h]

    # --- the journal ----------------------------------------------------------------------

    async def commit_node(self, run_id: str, record: NodeRecord) -> bool:
        """First commit wins.  Cancelled, it has committed nothing: a write already sent
        is seen through and then taken back, so that a node is never in the journal
        without its caller having been able to report it done (the node runs again on
        resume, as every node in flight does)."""
        await checkpoint_if_cancelled()
        # Node tasks are cancelled natively (asyncio's task.cancel, which anyio's shields
        # do not stop), so the write runs as a task of its own that a cancellation of
        # ours cannot interrupt halfway.
        write = asyncio.ensure_future(self._commit_node(run_id, record))
        try:
            return await asyncio.shield(write)
        except asyncio.CancelledError:
            if await see_through(write):
                await see_through(self.forget_nodes(run_id, [record.node_id]))
            raise

    async def _commit_node(self, run_id: str, record: NodeRecord) -> bool:
        client = self._client()
        field, digest, blob = encode_node(record, self.seal.node(run_id, record))
        key = self.layout.nodes(run_id)
        what = f"committing node {record.node_id!r} of run {run_id!r}"
        if not digest:
            created = await self._link.call(
                what, lambda: client.hsetnx(key, to_bytes(record.node_id), field)
            )
            return bool(created)
        done = await self._script(
            "commit_node",
            what,
            [key, self.layout.blob(digest), self.layout.blobrefs],
            [to_bytes(record.node_id), field, digest, blob],
        )
        return bool(done == 1)

    async def load_nodes(self, run_id: str) -> dict[str, NodeRecord]:
        client = self._client()
        key = self.layout.nodes(run_id)
        raw = await self._link.call(f"reading run {run_id!r}", lambda: client.hgetall(key))
        parsed: dict[str, dict[str, Any]] = {}
        for raw_id, raw_record in raw.items():
            node_id = _node_name(raw_id)
            try:
                parsed[node_id] = parse_node(raw_record)
            except Malformed as exc:
                raise self._corrupted(run_id, node_id, str(exc)) from None
        blobs = await self._blobs(parsed.values(), f"reading run {run_id!r}")
        out: dict[str, NodeRecord] = {}
        for node_id, data in parsed.items():
            try:
                blob = blobs.get(data.get("blob", ""))
                out[node_id] = node_from_fields(run_id, node_id, data, blob, self.seal)
            except Malformed as exc:
                raise self._corrupted(run_id, node_id, str(exc)) from None
        return out

    async def load_node(self, run_id: str, node_id: str) -> NodeRecord | None:
        """One node's record, or ``None`` (for the broker's duplicate commits)."""
        client = self._client()
        key = self.layout.nodes(run_id)
        raw = await self._link.call(
            f"reading run {run_id!r}", lambda: client.hget(key, to_bytes(node_id))
        )
        if raw is None:
            return None
        return await self.node_from_raw(run_id, node_id, raw)

    async def node_from_raw(
        self, run_id: str, node_id: str, raw: object, expected: NodeRecord | None = None
    ) -> NodeRecord:
        """A stored record (as HGET returned it) read back and checked."""
        try:
            data = parse_node(raw)
        except Malformed as exc:
            raise self._corrupted(run_id, node_id, str(exc)) from None
        blob: object = None
        if "blob" in data:
            client = self._client()
            blob_key = self.layout.blob(data["blob"])
            blob = await self._link.call(f"reading run {run_id!r}", lambda: client.get(blob_key))
        try:
            return node_from_fields(run_id, node_id, data, blob, self.seal, expected)
        except Malformed as exc:
            raise self._corrupted(run_id, node_id, str(exc)) from None

    async def lookup_nodes(
        self, keys: Sequence[tuple[str, str]], *, expected: ExpectedNodes = None
    ) -> dict[tuple[str, str], NodeRecord]:
        pairs = list(dict.fromkeys(keys))
        if not pairs:
            return {}
        by_run: dict[str, list[str]] = {}
        for run_id, node_id in pairs:
            by_run.setdefault(run_id, []).append(node_id)
        pairs = [(run_id, node_id) for run_id, nodes in by_run.items() for node_id in nodes]
        # One HMGET per run (a batch's tasks come from few runs), all in one trip.
        commands: list[Command] = [
            [b"HMGET", self.layout.nodes(run_id), *(to_bytes(n) for n in nodes)]
            for run_id, nodes in by_run.items()
        ]

        async def read_all() -> list[Any]:
            replies = await self._link.send(commands)
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            # A reply that is not a list (not a Redis server?) fails the count check below.
            return [raw for raws in replies if isinstance(raws, list) for raw in raws]

        raws = await self._link.call("reading node records", read_all)
        if len(raws) != len(pairs):
            raise CheckpointError(
                f"the reply to reading {len(pairs)} node records from {self.url} is malformed",
                hint="Check that the URL names a Redis server",
            )
        parsed: dict[tuple[str, str], dict[str, Any]] = {}
        for key, raw in zip(pairs, raws, strict=True):
            if raw is not None:
                try:
                    parsed[key] = parse_node(raw)
                except Malformed as exc:
                    raise self._corrupted(*key, str(exc)) from None
        blobs = await self._blobs(parsed.values(), "reading node records")
        want = expected or {}
        out: dict[tuple[str, str], NodeRecord] = {}
        for key, data in parsed.items():
            try:
                blob = blobs.get(data.get("blob", ""))
                out[key] = node_from_fields(*key, data, blob, self.seal, want.get(key))
            except Malformed as exc:
                raise self._corrupted(*key, str(exc)) from None
        return out

    async def _blobs(self, records: Iterable[Mapping[str, Any]], what: str) -> dict[str, object]:
        """The blobs of the *records* (parsed) that keep their value by content hash, in
        one read: digest -> the blob (None when missing)."""
        digests = sorted({d["blob"] for d in records if "blob" in d})
        if not digests:
            return {}
        client = self._client()
        keys = [self.layout.blob(d) for d in digests]
        values = await self._link.call(what, lambda: client.mget(keys))
        return dict(zip(digests, values, strict=True))

    async def forget_nodes(self, run_id: str, node_ids: list[str]) -> None:
        if not node_ids:
            return
        await self._script(
            "forget_nodes",
            f"forgetting nodes of run {run_id!r}",
            [self.layout.nodes(run_id), self.layout.blobrefs],
            [self.prefix, *(to_bytes(n) for n in node_ids)],
        )

    # --- the step cache -------------------------------------------------------------------

    async def get_cached(self, key: str) -> str | None:
        client = self._client()
        raw = await self._link.call(
            "reading the step cache", lambda: client.hget(self.layout.cache, to_bytes(key))
        )
        if raw is None:
            return None
        try:
            data = parse_cached(raw)
            if "value" in data:
                value = str(data["value"])
            else:
                blob_key = self.layout.blob(data["blob"])
                blob = await self._link.call("reading the step cache", lambda: client.get(blob_key))
                value = blob_text(data["blob"], blob)
            v.check_cached(self.seal, key, value, data["check"])
            return value
        except Malformed as exc:
            raise CheckpointError(
                f"cache entry {key!r} in {self.url} is corrupted: {exc}",
                hint=f"Delete the entry (HDEL {self.layout.cache} KEY)",
            ) from None

    async def put_cached(self, key: str, value: str) -> None:
        data = to_bytes(value)
        check = self.seal.cached(key, value)
        if len(data) > INLINE_MAX:
            digest = hashlib.sha256(data).hexdigest()
            entry = to_bytes(_codec.dumps({"blob": digest, "check": check}))
            blob = data
        else:
            digest, blob = "", b""
            entry = to_bytes(_codec.dumps({"value": value, "check": check}))
        await self._script(
            "put_cached",
            "writing the step cache",
            [self.layout.cache, self.layout.blob(digest or "-"), self.layout.blobrefs],
            [self.prefix, to_bytes(key), entry, digest, blob],
        )

    # --- reading back ---------------------------------------------------------------------

    def _run_from_hash(self, run_id: str, data: Mapping[Any, Any]) -> RunRecord:
        try:
            fields = {from_bytes(k, "a field name"): v for k, v in data.items()}
            unknown = set(fields) - _RUN_FIELDS
            missing = _RUN_FIELDS - _OPTIONAL_RUN_FIELDS - set(fields)
            if unknown or missing:
                raise Malformed(
                    f"the run hash has unknown fields {sorted(unknown)} or lacks {sorted(missing)}"
                )

            values: dict[str, object] = {
                name: from_bytes(raw, name) for name, raw in fields.items() if name not in _TIMES
            }
            for name in _TIMES:
                values[name] = float_text(fields[name], name)
            values["code"] = v.load_json(from_bytes(fields["code"], "code"), "code")
            return v.run_record(run_id, values, self.seal)
        except Malformed as exc:
            raise self._corrupted(run_id, None, str(exc)) from None

    def _corrupted(self, run_id: str, node_id: str | None, what: str) -> CheckpointError:
        keys = f"{self.layout.run(run_id)}, {self.layout.nodes(run_id)}"
        return v.corrupted(self.url, run_id, node_id, what, _RESTORE_HINT.format(keys=keys))

    # --- signals (fd.wait_for) --------------------------------------------------------------

    def _signal_key(self, run_id: str, name: str) -> str:
        # A signal name is an identifier (no ':'), so the name ends the key unambiguously.
        return f"{self.prefix}:signals:{run_id}:{name}"

    async def put_signal(self, run_id: str, name: str, value: str) -> int:
        """Append *value* (JSON text) to the run's signals called *name*; its index."""
        client = self._client()
        key, data = self._signal_key(run_id, name), to_bytes(value)
        length = await self._link.call(
            f"sending signal {name!r} to run {run_id!r}", lambda: client.rpush(key, data)
        )
        return int(length) - 1

    async def get_signal(self, run_id: str, name: str, index: int) -> str | None:
        """The *index*-th signal *name* sent to the run (from 0), or ``None`` if not yet."""
        client = self._client()
        key = self._signal_key(run_id, name)
        raw = await self._link.call(
            f"reading signal {name!r} of run {run_id!r}", lambda: client.lindex(key, index)
        )
        if raw is None:
            return None
        try:
            return v.check_json(from_bytes(raw, "the signal"), "the signal")
        except Malformed as exc:
            raise self._corrupted(run_id, None, str(exc)) from None


def _pairs(flat: list[Any]) -> dict[Any, Any]:
    return dict(zip(flat[0::2], flat[1::2], strict=True))


def _node_name(raw: object) -> str:
    try:
        return from_bytes(raw, "node id")
    except Malformed:
        return repr(raw)
