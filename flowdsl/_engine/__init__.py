"""The engine: one run of a graph, whatever carries its nodes.

``scheduler`` (the run state as plain data and the one loop that drives it), ``spawn`` (the
task group it spawns into), ``runner`` (one node's attempts, timeout, codec and commit) and
``resume`` (which journaled results a resume may reuse).
"""
