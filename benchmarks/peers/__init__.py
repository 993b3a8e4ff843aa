"""flowdsl beside LangGraph and DBOS: the same workloads, written idiomatically in each.

``python -m benchmarks.peers`` (``nox -s bench_peers``, which installs the peers into its own
environment) prints one table: every figure a median over rounds, with its ratio to the
plain-asyncio floor and to flowdsl.  The pieces, bottom up:

- ``_workloads``: the workloads, defined once (step bodies and sizes from
  :mod:`benchmarks.workloads`, plus the crash-and-resume chain);
- ``_measure``: how a workload is timed and weighed, the same for every system;
- ``floor``, ``flowdsl_impl``, ``langgraph_impl``, ``dbos_impl``: one module per system, each
  a set of entry points ``w1``, ``w2``, ``w3_steps``, ``long_chain``, ``crash``, ``resume``
  (and variants) that run one workload and return a JSON-able record;
- ``_child``: runs one entry point in a fresh process;
- ``__main__``: the rounds, the crashes, the table, the targets.
"""
