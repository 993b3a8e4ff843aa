"""Executors: how each kind of context carries a ready node to where it runs.

``realtime``: in this process, as soon as the node is ready.  Batch executors ship the
node as a task message through a queue to workers and wait for the result.
"""
