"""The definition layer: what a flow *is*, before anything runs.

``graph`` (the immutable DAG, the ``Unit`` protocol its nodes refer to, case labels),
``units`` (the registry of steps and branches, import by ``module:qualname``), ``symbols``
and ``trace`` (a flow body run once with symbols becomes a graph) and ``dsl`` (the
``@step``, ``@branch`` and ``@flow`` decorators).  Nothing here knows about stores, brokers
or contexts; the one import upwards is ``dsl``'s deferred one, for a flow awaited outside
any flow (it runs in the current context).
"""
