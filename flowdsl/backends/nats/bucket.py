"""A JetStream key-value bucket and the calls flowdsl makes on it, each retried while the
server is away; values larger than ``inline_max`` are stored once, by content hash, in
chunks of the same bucket (see the store's notes for why not the object store).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any, Final

import anyio

from .keys import Malformed, check_json_text, dump_json, field, from_bytes, load_json, to_bytes
from .link import NatsLink, quietly, storage_type
from .publisher import Publisher, Refused, raise_refused
from .requests import Requests
from .url import NatsOptions
from .watch import Watch

__all__ = ["Bucket"]

_CHUNK: Final = 256 * 1024
_HEX: Final = re.compile(r"^[0-9a-f]{64}$")
_WRONG_LAST: Final = (10071, 10164)  # JSStreamWrongLastSequence, and its constant form

# --- a bucket -------------------------------------------------------------------------------


class Bucket:
    """A JetStream key-value bucket and the calls flowdsl makes on it, each retried while
    the server is away; large values are stored once, by content hash, in chunks."""

    def __init__(
        self, link: NatsLink, kv: Any, *, inline_max: int, name: str | None = None
    ) -> None:
        self.link = link
        self.kv = kv
        name = name if name is not None else str(kv._name)
        # What a KV get asks JetStream for, sent by get_many without nats-py's KV layer.
        self._stream = f"KV_{name}"
        self._get_subject = f"$JS.API.STREAM.MSG.GET.{self._stream}"
        self._key_prefix = f"$KV.{name}."
        # A bucket that allows direct gets is read with them: the reply is the stored
        # message itself, where a message get wraps it in JSON and base64 (both ends
        # pay for that).  Made only for buckets of one replica (a direct get may be
        # answered by a replica that lags behind); an older bucket keeps message gets.
        self._direct = bool(getattr(kv, "_direct", False))
        self._direct_subject = f"$JS.API.DIRECT.GET.KV_{name}.$KV.{name}."
        self._requests = Requests(link)
        self._watches: dict[str, Watch] = {}  # by key pattern, made on first use
        self._publisher: Publisher | None = None  # for create_many, made on first use
        # Every record must fit in one message: chunks and inline values stay well below
        # the server's max payload (1 MB by default).
        max_payload = int(link.nc.max_payload or 1024 * 1024)
        self.max_payload = max_payload
        self.chunk = max(1024, min(_CHUNK, max_payload - 4096))
        self.inline_max = min(inline_max, max(256, max_payload // 8))

    @classmethod
    async def open(cls, link: NatsLink, options: NatsOptions) -> Bucket:
        """The deployment's bucket, created on first use."""
        from nats.js.api import KeyValueConfig
        from nats.js.errors import BadRequestError, BucketNotFoundError

        js = link.require("store")
        name = options.prefix
        config = KeyValueConfig(
            bucket=name,
            description="flowdsl runs and node journals",
            history=1,
            replicas=options.replicas,
            direct=options.replicas == 1,
            storage=storage_type(options),
        )

        async def op() -> Any:
            try:
                return await js.key_value(name)
            except BucketNotFoundError:
                pass
            try:
                return await js.create_key_value(config=config)
            except BadRequestError:  # created meanwhile by another process
                return await js.key_value(name)

        kv = await link.call(f"open the bucket {name}", op)
        return cls(link, kv, inline_max=options.inline_max, name=name)

    async def get(self, key: str, what: str, run_id: str | None = None) -> tuple[bytes, int] | None:
        from nats.js.errors import KeyNotFoundError

        kv = self.kv

        async def op() -> tuple[bytes, int] | None:
            try:
                entry = await kv.get(key)
            except KeyNotFoundError:  # never written, deleted or purged
                return None
            return bytes(entry.value or b""), int(entry.revision)

        return await self.link.call(what, op, run_id=run_id)

    async def get_many(
        self, keys: list[str], what: str, run_id: str | None = None
    ) -> list[bytes | None]:
        """The values of *keys* (None where a key has none), read with pipelined
        requests: one round trip for the lot, where :meth:`get` pays one each."""
        if not keys:
            return []
        requests = self._requests
        timeout = self.link.url.options.timeout
        if self._direct:
            asks = [(self._direct_subject + key, b"") for key in keys]
            stored = [self._key_prefix + key for key in keys]  # each reply's subject

            async def direct() -> list[bytes | None]:
                with anyio.fail_after(timeout):
                    replies = await requests.request(asks)
                return [_direct_value(r, s) for r, s in zip(replies, stored, strict=True)]

            return await self.link.call(what, direct, run_id=run_id)
        items = [
            (self._get_subject, b'{"last_by_subj":"%s"}' % (self._key_prefix + key).encode())
            for key in keys
        ]

        async def op() -> list[bytes | None]:
            with anyio.fail_after(timeout):
                replies = await requests.request(items)
            return [_kv_value(reply.data) for reply in replies]

        return await self.link.call(what, op, run_id=run_id)

    def watch(self, pattern: str) -> Watch:
        """The :class:`~.watch.Watch` of the keys under *pattern* (``node.>``), made on
        first use (it starts following the writes at its first :meth:`~.watch.Watch.take`)."""
        watcher = self._watches.get(pattern)
        if watcher is None:
            watcher = self._watches[pattern] = Watch(
                self.link, self._stream, self._key_prefix, pattern
            )
        return watcher

    async def stop(self) -> None:
        for watcher in self._watches.values():
            await watcher.stop()
        self._watches.clear()
        await self._requests.stop()
        if self._publisher is not None:
            await self._publisher.stop()

    async def create_many(
        self, items: list[tuple[str, bytes]], what: str, run_id: str | None = None
    ) -> list[bool]:
        """KV create of each ``(key, value)``, pipelined (one round trip for the lot, as
        the KV's own create is a publish expecting no earlier value): True for each key
        this call wrote, False for each that existed.  A key refused is tried again alone
        by :meth:`create`, which takes a deleted key (its delete marker is an earlier
        value: a forgotten node committed again)."""
        if self._publisher is None:
            self._publisher = Publisher(self.link)
        publisher = self._publisher
        expect = {"Nats-Expected-Last-Subject-Sequence": "0"}
        messages = [(self._key_prefix + key, value, dict(expect)) for key, value in items]
        timeout = self.link.url.options.timeout

        async def op() -> list[Refused | None]:
            with anyio.fail_after(timeout):
                return await publisher.publish(messages)

        results = await self.link.call(what, op, run_id=run_id)
        raise_refused(
            [r for r in results if r is not None and r.err_code not in _WRONG_LAST],
            what,
            self.link.url.shown,
        )
        return [
            r is None or await self.create(key, value, what, run_id)
            for r, (key, value) in zip(results, items, strict=True)
        ]

    async def update_many(self, items: list[tuple[str, bytes, int]], what: str) -> list[int | None]:
        """KV update of each ``(key, value, last)`` against revision *last*, pipelined (one
        round trip for the lot): the revision written for each, None where the key is at
        another revision."""
        if not items:
            return []
        if self._publisher is None:
            self._publisher = Publisher(self.link)
        publisher = self._publisher
        messages = [
            (self._key_prefix + key, value, {"Nats-Expected-Last-Subject-Sequence": str(last)})
            for key, value, last in items
        ]
        timeout = self.link.url.options.timeout

        async def op() -> tuple[list[Refused | None], list[int]]:
            sequences: list[int] = []
            with anyio.fail_after(timeout):
                return await publisher.publish(messages, sequences), sequences

        results, sequences = await self.link.call(what, op)
        raise_refused(
            [r for r in results if r is not None and r.err_code not in _WRONG_LAST],
            what,
            self.link.url.shown,
        )
        return [seq if r is None else None for r, seq in zip(results, sequences, strict=True)]

    async def create(self, key: str, value: bytes, what: str, run_id: str | None) -> bool:
        """KV create: True when this call wrote the key, False when it existed."""
        return await self.create_at(key, value, what, run_id) is not None

    async def create_at(self, key: str, value: bytes, what: str, run_id: str | None) -> int | None:
        """KV create: the revision written, or None when the key existed."""
        from nats.js.errors import KeyWrongLastSequenceError

        kv = self.kv

        async def op() -> int | None:
            try:
                return int(await kv.create(key, value))
            except KeyWrongLastSequenceError:
                return None

        return await self.link.call(what, op, run_id=run_id)

    async def update(self, key: str, value: bytes, last: int, what: str, run_id: str) -> bool:
        return await self.update_at(key, value, last, what, run_id) is not None

    async def update_at(
        self, key: str, value: bytes, last: int, what: str, run_id: str
    ) -> int | None:
        """KV update against revision *last*: the revision written, or None when the key
        is at another revision."""
        from nats.js.errors import KeyWrongLastSequenceError

        kv = self.kv

        async def op() -> int | None:
            try:
                return int(await kv.update(key, value, last=last))
            except KeyWrongLastSequenceError:
                return None

        return await self.link.call(what, op, run_id=run_id)

    async def put(self, key: str, value: bytes, what: str) -> None:
        kv = self.kv

        async def op() -> None:
            await kv.put(key, value)

        await self.link.call(what, op)

    async def delete(self, key: str, what: str, run_id: str, *, last: int | None = None) -> bool:
        """Delete *key*; with *last*, only if it is still at that revision (False if not)."""
        from nats.js.errors import APIError

        kv = self.kv

        async def op() -> bool:
            try:
                await kv.delete(key, last=last)
            except APIError as exc:
                # The server's "wrong last sequence" (kv.delete does not translate it).
                if exc.err_code in _WRONG_LAST:
                    return False
                raise
            return True

        return await self.link.call(what, op, run_id=run_id)

    async def scan(
        self, pattern: str, what: str, run_id: str | None = None
    ) -> list[tuple[str, bytes]]:
        """The latest value of every live key matching *pattern*, streamed by one
        short-lived consumer (a get per key would cost a round trip each).

        Not through nats-py's KV watcher: its "initial values are all in" marker can come
        before they are (nats-py #842), and a journal read short of a record would run a
        finished step again.  A pull consumer delivers nothing until asked, so the
        pending count it is created with is exactly the number of keys to read.
        """
        from nats.errors import TimeoutError as NatsTimeout
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        link, stream = self.link, self._stream
        timeout = link.url.options.timeout
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            ack_policy=AckPolicy.NONE,
            filter_subject=self._key_prefix + pattern,
            inactive_threshold=max(30.0, timeout * 4),  # the server drops it if we die
            mem_storage=True,
        )

        async def op() -> list[tuple[str, bytes]]:
            js = link.require("store")
            info = await js.add_consumer(stream, config)
            try:
                return await self._read_keys(js, info, timeout, NatsTimeout)
            finally:
                with anyio.CancelScope(shield=True):
                    await quietly(lambda: js.delete_consumer(stream, info.name))

        return await link.call(what, op, run_id=run_id)

    async def _read_keys(
        self, js: Any, info: Any, fetch_wait: float, timed_out: type[Exception]
    ) -> list[tuple[str, bytes]]:
        pending = int(info.num_pending or 0)
        found: dict[str, bytes] = {}
        if not pending:
            return []
        sub = await js.pull_subscribe_bind(consumer=info.name, stream=self._stream)
        try:
            got = 0
            while got < pending:
                try:
                    msgs = await sub.fetch(min(pending - got, 256), timeout=fetch_wait)
                except timed_out:
                    # Fewer came than counted: keys deleted since (their messages gone).
                    if not (await sub.consumer_info()).num_pending:
                        break
                    continue
                for msg in msgs:
                    got += 1
                    key = str(msg.subject)[len(self._key_prefix) :]
                    if (msg.headers or {}).get("KV-Operation"):  # a delete or purge marker
                        found.pop(key, None)
                    else:
                        found[key] = bytes(msg.data or b"")
        finally:
            with anyio.CancelScope(shield=True):
                await quietly(sub.unsubscribe)
        return list(found.items())

    async def pack(self, text: str, run_id: str | None = None) -> str | dict[str, str]:
        """Text kept inline, or a reference to its content-addressed blob."""
        data = to_bytes(text)
        if len(data) <= self.inline_max:
            return text
        return {"blob": await self.put_blob(data, run_id)}

    async def put_blob(self, data: bytes, run_id: str | None = None) -> str:
        """Store *data* once by content; its SHA-256 (hex) names it."""
        digest = hashlib.sha256(data).hexdigest()
        head = f"blob.{digest}"
        if await self.get(head, "read a large value", run_id) is None:
            # Chunks first, head last: a head always finds its chunks.  Writing the same
            # content twice (two workers) writes the same bytes, so needs no coordination.
            chunks = [data[i : i + self.chunk] for i in range(0, len(data), self.chunk)]
            async with anyio.create_task_group() as tg:
                for i, chunk in enumerate(chunks):
                    tg.start_soon(self.put, f"{head}.{i}", chunk, "store a large value")
            info = dump_json({"size": len(data), "chunks": len(chunks)})
            await self.put(head, info, "store a large value")
        return digest

    async def get_blob(self, digest: object, what: str, run_id: str | None = None) -> bytes:
        """The bytes :meth:`put_blob` stored; Malformed when they are missing or altered."""
        if not isinstance(digest, str) or not _HEX.match(digest):
            raise Malformed(f"{what}'s blob reference is not a SHA-256")
        head = await self.get(f"blob.{digest}", "read a large value", run_id)
        if head is None:
            raise Malformed(f"{what}'s blob {digest[:16]}... is missing")
        info = load_json(head[0], "a blob head")
        if not isinstance(info, dict):
            raise Malformed(f"{what}'s blob head is not an object")
        size = field(info, "size", int)
        count = field(info, "chunks", int)
        if not 0 < count <= size // 1024 + 2:
            raise Malformed(f"{what}'s blob head names {count} chunks for {size} bytes")
        parts: list[bytes | None] = [None] * count

        async def fetch(i: int) -> None:
            got = await self.get(f"blob.{digest}.{i}", "read a large value", run_id)
            parts[i] = None if got is None else got[0]

        async with anyio.create_task_group() as tg:
            for i in range(count):
                tg.start_soon(fetch, i)
        if any(part is None for part in parts):
            raise Malformed(f"{what}'s blob {digest[:16]}... lost a chunk")
        data = b"".join(p for p in parts if p is not None)
        if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
            raise Malformed(f"{what}'s blob {digest[:16]}... does not match its hash")
        return data

    async def unpack(
        self, value: object, what: str, run_id: str | None, *, json_text: bool = True
    ) -> str:
        """The text :meth:`pack` was given; Malformed for anything it cannot have made."""
        if isinstance(value, str):
            return check_json_text(value, what) if json_text else value
        if not (isinstance(value, dict) and set(value) == {"blob"}):
            raise Malformed(f"{what} is neither text nor a blob reference")
        data = await self.get_blob(value["blob"], what, run_id)
        try:
            text = from_bytes(data)
        except UnicodeDecodeError:
            raise Malformed(f"{what}'s blob is not UTF-8 text") from None
        return check_json_text(text, what) if json_text else text

    async def unpack_optional(
        self, value: object, what: str, run_id: str | None, *, json_text: bool = True
    ) -> str | None:
        if value is None:
            return None
        return await self.unpack(value, what, run_id, json_text=json_text)


def _direct_value(reply: Any, subject: str) -> bytes | None:
    """The value in a reply to a direct get of *subject* (None: no such key, or deleted);
    a server error is raised as nats-py's, so that the link retries the transient ones."""
    from nats.js.errors import APIError

    headers = reply.headers or {}
    if not reply.data and "Status" in headers:
        if headers["Status"] == "404":
            return None
        APIError.from_msg(reply)  # raises (503: away, retried)
    if headers.get("Nats-Subject") != subject:
        raise Malformed("the server's reply to a KV read is not of the key asked for")
    if "KV-Operation" in headers:
        return None  # a delete or purge marker
    return bytes(reply.data)


def _kv_value(reply: bytes) -> bytes | None:
    """The value in a reply to a stream message get (None: no such key, or deleted);
    a server error is raised as nats-py's, so that the link retries the transient ones."""
    from nats.js.errors import APIError

    try:
        answer = json.loads(reply)
    except ValueError:
        raise Malformed("the server's reply to a KV read is not JSON") from None
    if not isinstance(answer, dict):
        raise Malformed("the server's reply to a KV read is not an object")
    error = answer.get("error")
    if isinstance(error, dict):
        if error.get("code") == 404:
            return None
        APIError.from_error(error)  # raises
    message = answer.get("message")
    if not isinstance(message, dict):
        raise Malformed("the server's reply to a KV read holds no message")
    headers = message.get("hdrs")
    if headers and b"KV-Operation" in base64.b64decode(headers):
        return None  # a delete or purge marker
    return base64.b64decode(message.get("data") or b"")
