"""Runs as a store keeps them: inputs written and read back, the flow a record names, and
a journal replayed into a fresh run state on resume.

Everything read here is untrusted data: what does not decode is a :class:`CheckpointError`
that names the run, never a value guessed at.
"""

from __future__ import annotations

import time
from typing import Any

from .. import _codec
from .. import events as ev
from .._define.dsl import Flow
from .._define.graph import Node
from .._define.units import find_ref
from .._engine.derived import journaled_value
from .._engine.resume import plan_reuse
from .._engine.scheduler import RunState
from .._errors import CheckpointError, CodecError, ConfigError
from .._records import RunRecord, RunStatus
from ..backends.base import Store
from .run import Run, stored_failure

__all__ = [
    "check_same_flow",
    "decode_inputs",
    "decode_result",
    "encode_inputs",
    "import_flow",
    "replay",
    "settle_from_record",
]


def encode_inputs(
    flow: Flow[..., Any], inputs: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The flow's inputs as the run record keeps them, and as the run sees them.

    Both come from one round trip through the codec, so a run's steps see what a resumed
    run would read back from its record.
    """
    types = flow.input_types
    encoded: dict[str, Any] = {}
    decoded: dict[str, Any] = {}
    for name, value in inputs.items():
        try:
            data, value2 = _codec.roundtrip(value, types.get(name, Any), what=f"input {name!r}")
        except CodecError as exc:
            raise CodecError(
                exc.problem,
                flow=flow.name,
                hint=f"Pass a value of the type `{flow.name}` annotates for {name!r}: "
                "flow inputs cross the codec like step results",
            ) from exc
        encoded[name] = data
        decoded[name] = value2
    return encoded, decoded


def decode_inputs(record: RunRecord, flow: Flow[..., Any]) -> dict[str, Any]:
    """The inputs of the run *record* keeps, as *flow*'s parameters annotate them."""
    try:
        data = _codec.loads(record.inputs)
        if not isinstance(data, dict):
            raise CodecError("inputs are not a JSON object")
        types = flow.input_types
        if set(data) != set(types):
            raise CodecError(
                f"the run's inputs {sorted(data)} do not match the flow's parameters "
                f"{sorted(types)}"
            )
        return {
            name: _codec.from_data(value, types.get(name, Any), what=f"input {name!r}")
            for name, value in data.items()
        }
    except CodecError as exc:
        raise CheckpointError(
            f"the stored inputs of run {record.run_id!r} cannot be read: {exc.problem}",
            flow=flow.name,
            hint="The store is corrupted, or the flow's parameters changed since the run",
        ) from exc


def decode_result(record: RunRecord, flow: Flow[..., Any]) -> Any:
    """The result of the finished run *record* keeps, as *flow*'s return annotation says."""
    try:
        return _codec.decode(record.result or "null", flow.return_type, what="the stored result")
    except CodecError as exc:
        raise CheckpointError(
            f"the stored result of run {record.run_id!r} cannot be read: {exc.problem}",
            flow=flow.name,
            hint="The store is corrupted or the flow's return type changed",
        ) from exc


def import_flow(record: RunRecord) -> Flow[..., Any]:
    """The flow a run record names by ``module:qualname``, among the modules this process
    has imported already.

    A run record is data from a store, which whoever can write the store may have
    edited: the module it names is never imported for it.  The caller imports the flow's
    module first (``flowdsl resume --import MODULE``) or passes the flow.
    """
    otherwise = "pass the flow: `ctx.resume(run_id, flow=my_flow)`"
    obj = find_ref(
        record.flow_ref,
        what=f"the flow of run {record.run_id!r}",
        flow=record.flow,
        otherwise=f"import its module first (`flowdsl resume {record.run_id} --import "
        f"MODULE`), or {otherwise}",
    )
    if not isinstance(obj, Flow):
        raise ConfigError(
            f"{record.flow_ref!r} is not a flow", flow=record.flow, hint=otherwise.capitalize()
        )
    return obj


def settle_from_record(run: Run, record: RunRecord) -> None:
    """End *run* as its ended *record* says: its stored result, or its failure."""
    if record.status is RunStatus.FINISHED:
        run._settle(RunStatus.FINISHED, decode_result(record, run.flow))
    else:
        run._settle(record.status, error=stored_failure(record))


def check_same_flow(record: RunRecord, flow: Flow[..., Any]) -> None:
    """Refuse to run *flow* under the id of a run of another flow."""
    if record.flow != flow.name:
        raise CheckpointError(
            f"run {record.run_id!r} exists and belongs to flow {record.flow!r}",
            flow=flow.name,
            hint="Choose another run id, or resume it with its own flow",
        )


async def replay(
    store: Store, run: Run, state: RunState, ready: list[Node], strict: bool
) -> tuple[list[Node], frozenset[str]]:
    """Feed *run*'s journal into *state*; return the nodes that must still run, and the
    ids of the records kept (a batch resume drops their tasks: they never run again).

    Journaled results that :func:`plan_reuse` allows are fed in as if their nodes had just
    finished; the records of nodes that changed (and of what depends on them) are
    forgotten, so that they run again.
    """
    plan = run.plan
    journal = await store.load_nodes(run.run_id)
    reuse = plan_reuse(
        flow=run.flow_name,
        run_id=run.run_id,
        nodes=plan.nodes,
        order=plan.graph.order,
        markers=plan.markers,
        journal=journal,
        strict=strict,
    )
    rerun: dict[str, str] | None = None
    if reuse.stale:
        await store.forget_nodes(run.run_id, list(reuse.stale))
        # Kept on the run record, so that `flowdsl runs show` can say what ran again, why.
        before = await store.get_run(run.run_id)
        rerun = dict(before.code) if before is not None else {}
        rerun.update((n, "changed" if n in reuse.changed else "upstream") for n in reuse.stale)
    await store.update_run(
        run.run_id, status=RunStatus.RUNNING, fingerprint=plan.fingerprint, code=rerun
    )
    now = time.time()
    if run.observed:
        for node_id in reuse.stale:
            why = "changed" if node_id in reuse.changed else "upstream"
            run.emit(ev.StepInvalidated(run.run_id, node_id, now, why))
    pending = list(ready)
    dispatch: list[Node] = []
    while pending:
        node = pending.pop(0)
        if node.id not in reuse.reused:
            dispatch.append(node)
            continue
        record = journal[node.id]
        # A map's or a loop's value is put together from its items' or iterations' records.
        value = journaled_value(run, node, journal)
        if record.usage:
            run.add_usage(record.usage)
        if run.observed:
            run.emit(ev.StepReused(run.run_id, node.id, now, "journal"))
        pending.extend(state.complete(node.id, value))
    return dispatch, frozenset(journal) - frozenset(reuse.stale)
