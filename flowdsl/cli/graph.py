"""``flowdsl graph``: a flow's graph as Mermaid or Graphviz DOT."""

from __future__ import annotations

import click

from .._define.graph import Graph
from .load import load_flow

__all__ = ["graph"]


@click.command()
@click.argument("target")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["mermaid", "dot"]),
    default="mermaid",
    show_default=True,
    help="Mermaid flowchart or Graphviz DOT.",
)
def graph(target: str, fmt: str) -> None:
    """Print the graph of the flow TARGET.

    \b
    Examples:
      flowdsl graph examples/support_triage.py:support_triage
      flowdsl graph app.flows:triage --format dot | dot -Tsvg > triage.svg
    """
    flow_graph: Graph = load_flow(target).graph
    text = flow_graph.to_mermaid() if fmt == "mermaid" else flow_graph.to_dot()
    click.echo(text, nl=False)
