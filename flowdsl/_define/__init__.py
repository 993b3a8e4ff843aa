"""The definition layer: what a flow *is*, before anything runs.

``graph`` (the immutable DAG and the ``Unit`` protocol its nodes refer to), ``trace`` (a flow
body run once with symbols becomes a graph) and ``dsl`` (the ``@step``, ``@branch`` and
``@flow`` decorators).  Nothing here knows about stores, brokers or contexts.
"""
