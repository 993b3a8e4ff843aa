"""Integrity checks of what a store keeps and a queue carries, bound to whose it is.

Every node record, run record, task and completion is written with a *check*: a digest of
a canonical encoding of its identity (run, node, attempt, code) and its value.  A record
that was corrupted, truncated, or moved to another node or run no longer matches and
raises :class:`~flowdsl.CheckpointError` naming the run and the node.

Without a key the check is a SHA-256 digest, which anyone can recompute: it catches
accidents, not an attacker.  With a signing key (``fd.Context(signing_key=fd.Secret(...))``,
``flowdsl worker --signing-key-env VAR``) it is an HMAC-SHA256, which nobody without the
key can make, so deliberate tampering is detected too.  Older keys can be given for
verification only, so that a key can be rotated while records signed with the old one are
still being read.

The forms::

    sd:<32 hex>                 SHA-256, truncated to 128 bits, no key
    hs:<8 hex key id>:<64 hex>  HMAC-SHA256 under the key whose id (a hash) is given

A process with a key refuses what carries no check or only a digest: an attacker who can
write the store could otherwise strip the signature and recompute a digest.  Records that
an older flowdsl wrote (no check at all) are accepted only where no key is configured.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable
from typing import Any, Final

__all__ = ["UNKEYED", "Invalid", "Seal"]

_SD: Final = "sd:"
_HS: Final = "hs:"


class Invalid(Exception):
    """A check that does not hold; its text says why (never which key or value)."""


def key_id(key: bytes) -> str:
    """A short public name of *key*: which key signed a record, without revealing it."""
    return hashlib.blake2b(key, digest_size=4, person=b"flowdsl-kid").hexdigest()


def _encode(parts: Iterable[Any]) -> bytes:
    # Each part with its length first, so that no two different sequences of parts give
    # the same bytes ("a|b" + "c" vs "a" + "b|c"); None is "-" (no length), so that it
    # differs from every text.
    return "|".join(
        [
            "-:" if part is None else f"{len(text)}:{text}"
            for part in parts
            for text in (part if type(part) is str else repr(part),)
        ]
    ).encode("utf-8", "surrogatepass")


class Seal:
    """Makes and verifies checks, with a signing key or without.

    *key* signs (and verifies) new checks; *old_keys* only verify.  ``trust_signed`` (for
    read-only displays such as ``flowdsl runs show`` run without the key) accepts signed
    checks it cannot verify instead of refusing them.
    """

    __slots__ = ("_key", "_keys", "_kid", "trust_signed")

    def __init__(
        self,
        key: bytes | None = None,
        old_keys: Iterable[bytes] = (),
        *,
        trust_signed: bool = False,
    ) -> None:
        self._key = key
        self._kid = key_id(key) if key is not None else ""
        keys = {} if key is None else {self._kid: key}
        for old in old_keys:
            keys.setdefault(key_id(old), old)
        self._keys = keys
        self.trust_signed = trust_signed

    @property
    def signed(self) -> bool:
        """Whether this seal signs (has a key) and so refuses unsigned data."""
        return self._key is not None

    def __repr__(self) -> str:
        state = f"signing with key {self._kid}" if self._key is not None else "unkeyed"
        return f"<Seal {state}, {len(self._keys)} key(s) to verify>"

    # --- making and checking ---------------------------------------------------------------

    def make(self, kind: str, *parts: Any) -> str:
        """The check of *parts* (identity first, then value) as a record of *kind*."""
        data = _encode((kind, *parts))
        if self._key is None:
            return _SD + hashlib.sha256(data).hexdigest()[:32]
        return f"{_HS}{self._kid}:{hmac.digest(self._key, data, 'sha256').hex()}"

    def verify(self, check: object, kind: str, *parts: Any) -> None:
        """Raise :class:`Invalid` unless *check* is the check of *parts* as *kind*."""
        self._verify(check, lambda: _encode((kind, *parts)))

    def make_text(self, kind: str, text: str) -> str:
        """``make(kind, text)`` for one part of text: a message's body (a client and its
        workers seal thousands a second)."""
        data = _text_bytes(kind, text)
        if self._key is None:
            return _SD + hashlib.sha256(data).hexdigest()[:32]
        return f"{_HS}{self._kid}:{hmac.digest(self._key, data, 'sha256').hex()}"

    def verify_text(self, check: object, kind: str, text: str) -> None:
        """``verify(check, kind, text)`` for one part of text."""
        self._verify(check, lambda: _text_bytes(kind, text))

    def _verify(self, check: object, data: Callable[[], bytes]) -> None:
        if check is None or check == "":
            if self._key is not None:
                raise Invalid(
                    "it carries no signature (written by an older flowdsl, or tampered "
                    "with), and this process requires signed data"
                )
            return
        if not isinstance(check, str):
            raise Invalid("its integrity check is not text")
        if check.startswith(_SD):
            if self._key is not None:
                raise Invalid(
                    "it is not signed (written by a process without the signing key, or "
                    "tampered with), and this process requires signed data"
                )
            expected = hashlib.sha256(data()).hexdigest()[:32]
            if not hmac.compare_digest(check[len(_SD) :], expected):
                raise Invalid("its content does not match its integrity check")
            return
        if check.startswith(_HS):
            kid, _, mac = check[len(_HS) :].partition(":")
            key = self._keys.get(kid)
            if key is None:
                if not self._keys and self.trust_signed:
                    return
                if not self._keys:
                    raise Invalid("it is signed, and this process has no signing key to verify it")
                raise Invalid(f"it is signed with a key this process does not know ({kid})")
            if not hmac.compare_digest(mac, hmac.digest(key, data(), "sha256").hex()):
                raise Invalid("its content does not match its signature")
            return
        raise Invalid("its integrity check is of no known form")

    # --- the records and messages flowdsl keeps --------------------------------------------

    def node(self, run_id: str, record: Any) -> str:
        """The check of a :class:`~flowdsl._records.NodeRecord` of *run_id*."""
        # Every committed node pays for this: one encoding, one hash, no intermediate list
        # (the same bytes as make("node", *_node_parts(...))).
        data = _node_bytes(run_id, record)
        if self._key is None:
            return _SD + hashlib.sha256(data).hexdigest()[:32]
        return f"{_HS}{self._kid}:{hmac.digest(self._key, data, 'sha256').hex()}"

    def verify_node(self, run_id: str, record: Any, check: object) -> None:
        self._verify(check, lambda: _node_bytes(run_id, record))

    def run_head(self, record: Any) -> str:
        """The check of what a run record never changes: its identity and inputs."""
        return self.make("run", *_head_parts(record))

    def verify_run_head(self, record: Any, check: object) -> None:
        self.verify(check, "run", *_head_parts(record))

    def run_state(
        self,
        run_id: str,
        status: str,
        result: str | None,
        error: str | None,
        failed_node: str | None,
        traceback: str | None = None,
    ) -> str:
        """The check of how a run stands: status, result, error, failed node and the
        failure's traceback."""
        return self.make(
            "state", *_state_parts(run_id, status, result, error, failed_node, traceback)
        )

    def run_state_of(self, record: Any) -> str:
        """:meth:`run_state` of a :class:`~flowdsl._records.RunRecord`."""
        return self.make("state", *_record_state(record))

    def verify_run_state(self, record: Any, check: object) -> None:
        self.verify(check, "state", *_record_state(record))

    def cached(self, key: str, value: str) -> str:
        """The check of a cached step result under its cache key."""
        return self.make("cache", key, value)

    def verify_cached(self, key: str, value: str, check: object) -> None:
        self.verify(check, "cache", key, value)


def _record_state(record: Any) -> tuple[Any, ...]:
    return _state_parts(
        record.run_id,
        record.status.value,
        record.result,
        record.error,
        record.failed_node,
        record.traceback,
    )


def _state_parts(
    run_id: str,
    status: str,
    result: str | None,
    error: str | None,
    failed_node: str | None,
    traceback: str | None,
) -> tuple[Any, ...]:
    # A traceback is a part only when there is one: the checks of records written before
    # tracebacks were kept (and of every run that did not fail) stay what they were.
    if traceback is None:
        return (run_id, status, result, error, failed_node)
    return (run_id, status, result, error, failed_node, traceback)


def _text_bytes(kind: str, text: str) -> bytes:
    # The bytes _encode((kind, text)) gives, without its walk over the parts.
    return f"{len(kind)}:{kind}|{len(text)}:{text}".encode("utf-8", "surrogatepass")


def _node_bytes(run_id: str, record: Any) -> bytes:
    usage = record.usage
    if usage is None:
        usage_part = "-:"
    else:
        import json

        text = json.dumps(usage, sort_keys=True, separators=(",", ":"))
        usage_part = f"{len(text)}:{text}"
    node_id, code, value = record.node_id, record.code, record.value
    attempts = repr(record.attempts)
    started, finished = repr(record.started_at), repr(record.finished_at)
    return (
        f"4:node|{len(run_id)}:{run_id}|{len(node_id)}:{node_id}|{len(attempts)}:{attempts}"
        f"|{len(code)}:{code}|{len(started)}:{started}|{len(finished)}:{finished}"
        f"|{usage_part}|{len(value)}:{value}"
    ).encode("utf-8", "surrogatepass")


def _node_parts(run_id: str, record: Any) -> tuple[Any, ...]:
    usage = record.usage
    usage_text = None
    if usage is not None:
        import json

        usage_text = json.dumps(usage, sort_keys=True, separators=(",", ":"))
    return (
        run_id,
        record.node_id,
        record.attempts,
        record.code,
        record.started_at,
        record.finished_at,
        usage_text,
        record.value,
    )


def _head_parts(record: Any) -> tuple[Any, ...]:
    return (record.run_id, record.flow, record.flow_ref, record.created_at, record.inputs)


#: The seal of a process without a key: digests only.
UNKEYED: Final = Seal()


def seal_from(signing_key: Any = None, old_keys: Iterable[Any] = ()) -> Seal:
    """The seal a context's ``signing_key=`` and ``old_signing_keys=`` make: each a
    :class:`~flowdsl.Secret` (or text or bytes), revealed here."""
    if signing_key is None:
        if list(old_keys):
            from ._errors import ConfigError

            raise ConfigError(
                "old_signing_keys= without signing_key=",
                hint="Old keys only verify what was signed before a rotation; give the "
                "current key as signing_key= too",
            )
        return UNKEYED
    return Seal(_key_bytes(signing_key), [_key_bytes(k) for k in old_keys])


def _key_bytes(key: Any) -> bytes:
    from ._errors import ConfigError
    from ._secret import Secret

    if isinstance(key, Secret):
        key = key.reveal()
    if isinstance(key, str):
        key = key.encode()
    if not isinstance(key, bytes):
        raise ConfigError(
            f"a signing key must be an fd.Secret, text or bytes, not {type(key).__name__}",
            hint='Write signing_key=fd.Secret("FLOWDSL_SIGNING_KEY")',
        )
    if len(key) < 16:
        raise ConfigError(
            f"a signing key of {len(key)} bytes is too short to be one",
            hint="Use at least 16 random bytes, for example: "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))'",
        )
    return key
