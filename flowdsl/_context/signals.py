"""Sending a signal to a run (``ctx.signal``, ``flowdsl signal``): checked, then stored.

The run's waits pick it up from the store (see ``_engine/waits.py``), in this process or
any other: the sender needs nothing but the store.
"""

from __future__ import annotations

from typing import Any

from .. import _codec
from .._define.trace import check_name
from .._errors import CodecError, ConfigError, FlowError, TracingError
from .._records import RunStatus

__all__ = ["send_signal", "signal_run"]


async def signal_run(store: Any, live: Any, run_id: str, name: str, value: Any) -> None:
    """``ctx.signal``: *value* encoded and stored; *live*, the run if this context drives
    it, is woken at once rather than at its waits' next poll."""
    await send_signal(store, run_id, name, _codec.encode(value, what="the signal"))
    if live is not None and live.waker is not None:
        live.waker()


async def send_signal(store: Any, run_id: str, name: str, value_json: str) -> int:
    """Store signal *name* (JSON text *value_json*) for run *run_id*; its index."""
    try:
        check_name(name, "signal")
    except TracingError:
        raise ConfigError(
            f"signal name {name!r} is not a valid name",
            hint="Use the name the flow waits for: `fd.wait_for(name, ...)`",
        ) from None
    try:
        _codec.loads(value_json)
    except CodecError as exc:
        raise ConfigError(f"the signal's value is not JSON: {exc.problem}") from None
    record = await store.get_run(run_id)
    if record is None:
        raise FlowError(
            f"no run {run_id!r} in store {store.url}",
            hint="Check the run id (`flowdsl runs list`) and the store URL",
        )
    if record.status is RunStatus.FINISHED:
        # A failed or cancelled run still takes signals: a resume can consume them (a wait
        # that timed out, say).
        raise FlowError(
            f"run {run_id!r} has finished; a signal cannot reach it",
            flow=record.flow,
            hint="Signal a run that is running, waiting, or failed and about to be resumed; "
            "`flowdsl runs show` shows its state",
        )
    index: int = await store.put_signal(run_id, name, value_json)
    return index
