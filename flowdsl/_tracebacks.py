"""A failed node's traceback as text a store may keep and a page may show.

The run record keeps the traceback of the exception that failed the run beside its error
message (``RunRecord.traceback``), so that ``flowdsl runs show --traceback`` and the
inspector can show where the step failed after the process that ran it is gone.  A
traceback quotes messages and source lines, so the text is masked like every message
flowdsl prints (credentials in URLs, the values of known secrets), and it is bounded: a
deep recursion must not make a run record megabytes long.

In batch mode the step fails in a worker process: the worker formats the traceback and
sends it with the failure (``Completion.traceback``), and the client's error carries it
(``remote_traceback`` on the ``__cause__`` it raises from).
"""

from __future__ import annotations

import traceback as _tb

from ._secret import redact
from ._urls import hide_credentials

__all__ = ["MAX_TRACEBACK", "failure_traceback", "format_traceback"]

#: Characters of traceback text kept; a longer one keeps its start and its end.
MAX_TRACEBACK = 16_000
_HEAD = 3_000  # the first frames say how the step was called; the end says where it failed


def format_traceback(exc: BaseException, *, limit: int = MAX_TRACEBACK) -> str:
    """*exc*'s traceback, masked and at most *limit* characters.

    The exceptions *exc* was raised from are left out: a library's error (an LLM SDK's,
    say) may quote a credential that only the error flowdsl raised from it has masked.
    """
    try:
        text = "".join(_tb.format_exception(exc, chain=False))
    except Exception:  # an exception whose __str__ raises: its type says enough
        text = f"{type(exc).__name__} (its message could not be formatted)\n"
    return bounded(redact(hide_credentials(text)), limit)


def bounded(text: str, limit: int = MAX_TRACEBACK) -> str:
    """*text*, or its start and end with what was left out counted between them."""
    if len(text) <= limit:
        return text
    head = min(_HEAD, limit // 4)
    marker = "\n  ... {} characters left out ...\n"
    tail = limit - head - len(marker.format(len(text)))
    left_out = len(text) - head - tail
    return text[:head] + marker.format(left_out) + text[len(text) - tail :]


def failure_traceback(exc: BaseException) -> str | None:
    """The traceback to keep for a run that *exc* (a ``StepFailed``) failed: the step's
    exception's, formatted here, or the one its worker sent; ``None`` when it has none."""
    cause = exc.__cause__
    if cause is None:
        return None
    sent = getattr(cause, "remote_traceback", None)
    if isinstance(sent, str):
        return bounded(sent) if sent else None
    return format_traceback(cause)
