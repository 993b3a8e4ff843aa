"""One measurement in a fresh process: ``python -m benchmarks.peers._child SYSTEM ENTRY ARGS OUT``.

A fresh process per system and workload keeps one system's global state (DBOS's, above all),
imports and garbage out of another's figures.  The measurement goes to the JSON file *OUT*
(never to stdout, where a peer may log).  *ARGS* is JSON: ``{"directory": ..., "quick": ...}``
for a workload; ``{"directory": ..., "log": ..., "hang": bool}`` for ``crash`` and ``resume``.
"""

from __future__ import annotations

import time

_STARTED = time.perf_counter()

import importlib  # noqa: E402  (the clock starts before any import)
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

SYSTEMS = ("floor", "flowdsl_impl", "langgraph_impl", "dbos_impl")
RESUME = ("crash", "resume")


def main(argv: list[str]) -> None:
    system, entry, raw, out = argv
    if system not in SYSTEMS:
        raise SystemExit(f"unknown system {system!r}; choose from {', '.join(SYSTEMS)}")
    args = json.loads(raw)
    directory = Path(args["directory"])

    from . import _workloads as pw  # imports flowdsl: the workloads are flowdsl steps

    shared = time.perf_counter()
    # Only a module from the fixed list above, and only a name it exports.
    module = importlib.import_module(f"benchmarks.peers.{system}")
    imported = time.perf_counter()
    if entry not in module.__all__:
        raise SystemExit(f"{system} has no entry {entry!r}; it has {', '.join(module.__all__)}")
    result: dict[str, Any]
    if entry in RESUME:
        hang = pw.CRASH_AT if args.get("hang") else None
        pw.set_log(Path(args["log"]), hang_at=hang)
        result = getattr(module, entry)(directory)
    else:
        sizes = pw.QUICK if args.get("quick") else pw.FULL
        result = getattr(module, entry)(sizes, directory)
    result["shared_import_s"] = shared - _STARTED
    result["import_s"] = imported - shared
    Path(out).write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1:])
