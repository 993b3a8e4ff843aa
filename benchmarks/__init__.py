"""flowdsl's benchmarks: plain scripts that print tables, never pass/fail tests.

``python -m benchmarks`` (or ``nox -s bench``) runs them all; ``--only w1,w2`` selects,
``--quick`` makes a short smoke run, ``--json FILE`` keeps the figures.  The workloads are
defined once, in :mod:`benchmarks.workloads`, for flowdsl, its floors and its peers.
"""
