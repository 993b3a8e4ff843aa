"""flowdsl: LLM workflows as plain async functions, traced into a DAG, run anywhere.

How the package stacks, bottom up (each layer imports only those below it):

- ``_errors``, ``events``, ``_codec``: the error hierarchy, the event records, and the one
  codec every value crosses.
- ``_graph``: the immutable DAG; ``_trace`` and ``_dsl``: the decorators and the tracer that
  turns a flow body into a graph.
- ``_scheduler``: the run state machine and the one loop that drives it; ``_runner``: one
  node's attempts, retries, timeout and events.
- ``stores/``: where journals live; ``contexts/``: executors that carry nodes to where they
  run; ``_context``: :class:`Context` and :class:`Run`, the user's handle on all of it.
- ``llm/``: LLM providers reached from inside steps; ``testing``: helpers for users' tests;
  ``cli``: the ``flowdsl`` command; ``service/``: ``flowdsl serve`` and :class:`Client`
  (grpc is imported only when a client or a service is made).
"""

from __future__ import annotations

from . import events as events
from . import llm as llm
from ._context.context import Context as Context
from ._context.context import Run as Run
from ._context.context import current_context as current_context
from ._context.context import run as run
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
from ._errors import StepFailed as StepFailed
from ._errors import TracingError as TracingError
from ._records import RunStatus as RunStatus
from ._secret import Secret as Secret
from .service.client import Client as Client

__version__ = "0.1.0"

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
