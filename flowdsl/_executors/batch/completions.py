"""A successful task's completion message, written field by field.

A worker writes one completion per task.  :func:`~flowdsl.backends.messages.encode_completion`
unstructures the message with the converter and encodes the result: most of the cost of
finishing a trivial step.  :func:`ok_completion` writes the same text (the same fields in
the same order, the check last over the text before it, as ``messages`` seals it) from
the record's fields directly; what it cannot write the usual way (a value that is not a
finite float, a lone surrogate) goes to ``encode_completion``.  ``tests/test_batch_pool.py``
holds the two texts equal.
"""

from __future__ import annotations

import math
from json.encoder import encode_basestring
from typing import Final

from ... import _codec
from ..._integrity import Seal
from ..._records import NodeRecord
from ...backends.messages import PROTOCOL, Completion, encode_completion

__all__ = ["ok_completion"]

_TAIL: Final = f'"error":null,"error_kind":null,"traceback":null,"v":{PROTOCOL}}}'


def ok_completion(run_id: str, node_id: str, record: NodeRecord, seal: Seal) -> str:
    """The text of ``encode_completion(Completion(run_id, node_id, True, record), seal)``."""
    started, finished, attempts = record.started_at, record.finished_at, record.attempts
    if not (
        type(started) is float
        and type(finished) is float
        and type(attempts) is int
        and math.isfinite(started)
        and math.isfinite(finished)
    ):
        return _slow(run_id, node_id, record, seal)
    usage = "null" if record.usage is None else _codec.dumps(record.usage)
    body = (
        f'{{"run_id":{encode_basestring(run_id)},"node_id":{encode_basestring(node_id)},'
        f'"ok":true,"record":{{"node_id":{encode_basestring(record.node_id)},'
        f'"value":{encode_basestring(record.value)},"attempts":{attempts!r},'
        f'"started_at":{started!r},"finished_at":{finished!r},'
        f'"code":{encode_basestring(record.code)},"usage":{usage}}},{_TAIL}'
    )
    if not body.isascii():
        try:
            body.encode()
        except UnicodeEncodeError:  # a lone surrogate: the codec escapes the whole text
            return _slow(run_id, node_id, record, seal)
    return f'{body[:-1]},"check":"{seal.make("completion", body)}"}}'


def _slow(run_id: str, node_id: str, record: NodeRecord, seal: Seal) -> str:
    return encode_completion(Completion(run_id, node_id, True, record), seal)
