"""flowdsl: LLM workflows as plain async functions, traced into a DAG, run anywhere.

How the package stacks, top down; each layer imports only the layers below it (the
contracts in pyproject.toml, checked by ``lint-imports``; docs/architecture.md):

- ``cli/`` (the ``flowdsl`` command) and ``testing/`` (helpers for users' tests).
- ``service/`` (``flowdsl serve`` and :class:`Client`; grpc is imported only when a client
  or a service is made) and ``ui/`` (the inspector, ``flowdsl ui``).
- ``_context/``: :class:`Context` and :class:`Run`, the user's handle; ``fd.run`` and the
  current context.
- ``llm/``: LLM providers, called from inside steps.
- ``_executors/``: how a ready node reaches where it runs: here (real time), or through a
  broker to workers (batch).
- ``_engine/``: one run of a graph: the scheduler's state and its one loop, the runner of
  one node, what a resume reuses.
- ``backends/``: stores and brokers, one package per technology (memory, sqlite, redis,
  nats), independent of each other, behind the interfaces of ``backends/base.py``.
- ``_define/``: what a flow is: the graph and the ``Unit`` protocol its nodes refer to, the
  registry of units, the tracer and the ``@step``/``@branch``/``@flow`` decorators.
- Foundations: ``_secret``, ``events``, ``_records``, ``_urls``, ``_otel`` (OpenTelemetry
  spans, when it is installed); then ``_codec``; then ``_errors``.

One import goes upwards, deferred to call time: a flow awaited outside any flow runs in the
current context, so ``_define/dsl.py`` imports ``_context/sync.py`` when that happens.
"""

from __future__ import annotations

from . import events as events
from . import llm as llm
from ._context.context import Context as Context
from ._context.run import Run as Run
from ._context.sync import current_context as current_context
from ._context.sync import run as run
from ._define.dsl import Branch as Branch
from ._define.dsl import Flow as Flow
from ._define.dsl import Step as Step
from ._define.dsl import branch as branch
from ._define.dsl import flow as flow
from ._define.dsl import step as step
from ._define.dynamic import Continue as Continue
from ._define.dynamic import Done as Done
from ._define.dynamic import loop as loop
from ._define.dynamic import wait_for as wait_for
from ._define.graph import Edge as Edge
from ._define.graph import Graph as Graph
from ._define.graph import Node as Node
from ._engine.runner import StepInfo as StepInfo
from ._engine.runner import current_step as current_step
from ._errors import BackendUnavailable as BackendUnavailable
from ._errors import CheckpointError as CheckpointError
from ._errors import CodecError as CodecError
from ._errors import ConfigError as ConfigError
from ._errors import FlowError as FlowError
from ._errors import RunBusy as RunBusy
from ._errors import StepFailed as StepFailed
from ._errors import TracingError as TracingError
from ._records import RunStatus as RunStatus
from ._secret import Secret as Secret
from ._version import __version__ as __version__
from .service.client import Client as Client

__all__ = [
    "BackendUnavailable",
    "Branch",
    "CheckpointError",
    "Client",
    "CodecError",
    "ConfigError",
    "Context",
    "Continue",
    "Done",
    "Edge",
    "Flow",
    "FlowError",
    "Graph",
    "Node",
    "Run",
    "RunBusy",
    "RunStatus",
    "Secret",
    "Step",
    "StepFailed",
    "StepInfo",
    "TracingError",
    "branch",
    "current_context",
    "current_step",
    "events",
    "flow",
    "llm",
    "loop",
    "run",
    "step",
    "wait_for",
]


def _fixup_module_metadata() -> None:
    # Tracebacks and reprs say `flowdsl.StepFailed`, not `flowdsl._errors.StepFailed`.
    for name in __all__:
        obj = globals()[name]
        if isinstance(obj, type) and obj.__module__.startswith(("flowdsl._", "flowdsl.service.")):
            obj.__module__ = __name__


_fixup_module_metadata()
del _fixup_module_metadata
