"""Executors: how a ready node reaches the place it runs and its result comes back.

``realtime``: here, at once.  ``batch``: as a task message through a broker to workers.
Both hand the node to the same runner, so a step cannot behave differently in the two modes.
"""
