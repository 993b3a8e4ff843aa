"""Processes for the OpenTelemetry tests: each sets its own tracer provider.

    python _otel_proc.py realtime BACKEND OUT   runs otel_steps' flows in real time
    python _otel_proc.py client URL OUT         runs them in batch on URL, no own workers
    python _otel_proc.py worker URL OUT         serves URL's tasks until killed

Every process writes the spans it ended to OUT, one JSON object a line.  The tests run
these in subprocesses because a tracer provider can be set once per process: set in the
test process, it would trace (and change the path of) every later test.  ``realtime``
and ``client`` collect spans with the SDK's in-memory exporter and write them at the end;
``worker`` writes each span as it ends, since it is killed, not stopped.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import flowdsl as fd
from flowdsl.testing import FakeLLM

import otel_steps


def as_data(span: ReadableSpan) -> dict[str, Any]:
    context = span.context
    assert context is not None
    return {
        "name": span.name,
        "trace_id": format(context.trace_id, "032x"),
        "span_id": format(context.span_id, "016x"),
        "parent_id": format(span.parent.span_id, "016x") if span.parent else None,
        "attributes": dict(span.attributes or {}),
        "status": span.status.status_code.name,
        "events": [event.name for event in span.events],
        "kind": span.kind.name,
    }


class FileExporter(SpanExporter):
    """Each span as a JSON line, written and flushed as it ends."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("a", encoding="utf-8")

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        for span in spans:
            self.file.write(json.dumps(as_data(span)) + "\n")
        self.file.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.file.close()


def provider(exporter: SpanExporter) -> None:
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(tracer_provider)


def dump(exporter: InMemorySpanExporter, out: Path) -> None:
    with out.open("w", encoding="utf-8") as file:
        for span in exporter.get_finished_spans():
            file.write(json.dumps(as_data(span)) + "\n")


async def run_flows(ctx: fd.Context) -> None:
    async with ctx:
        await ctx.run(otel_steps.traced, "otters", run_id="r-traced")
        await ctx.run(otel_steps.plain, 3, run_id="r-plain")
        with contextlib.suppress(fd.StepFailed):
            await ctx.run(otel_steps.failing, 1, run_id="r-failing")


def main(argv: list[str]) -> None:
    mode, where, out = argv[0], argv[1], Path(argv[2])
    llm = FakeLLM("Otters hold hands while they sleep")
    if mode == "worker":
        from flowdsl._executors.batch import serve

        provider(FileExporter(out))

        async def work() -> None:
            async with anyio.create_task_group() as tg:
                await tg.start(functools.partial(serve, where, imports=("otel_steps",), llm=llm))
                print("ready", flush=True)

        anyio.run(work)
        return
    memory = InMemorySpanExporter()
    provider(memory)
    if mode == "realtime":
        anyio.run(run_flows, fd.Context(llm=llm), backend=where)
    else:
        anyio.run(run_flows, fd.Context(batch=True, broker=where, workers=0))
    dump(memory, out)
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
