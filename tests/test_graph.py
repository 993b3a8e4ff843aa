"""The traced graph as data and as pictures: nodes, edges, Mermaid, DOT, notebook output."""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser
from typing import Any

import attrs
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import flowdsl as fd
from flowdsl._define.graph import Edge, NodeKind

from strategies import DagSpec, build_flow, dag_specs


@fd.step
async def fetch(url: str) -> str:
    return url


@fd.step
async def parse(page: str, strict: bool) -> list[str]:
    return [page]


@fd.step
async def summarize(words: list[str], page: str) -> str:
    return " ".join(words) + page


@fd.branch
async def kind(page: str) -> str:
    return "long" if len(page) > 10 else "short"


@fd.flow
async def digest(url: str) -> str:
    page = await fetch(url)
    other = await fetch("https://example.org")
    words = await parse(page, strict=True)

    async def long() -> str:
        first = await summarize(words, page)
        return await summarize([first], other)

    return await kind(page).cases(long=long, short=lambda: fetch(url))


def test_nodes_are_ids_in_call_order() -> None:
    graph = digest.graph
    assert graph.nodes == (
        "fetch",
        "fetch-2",
        "parse",
        "kind",
        "kind.long/summarize",
        "kind.long/summarize-2",
        "kind.short/fetch",
        "kind.join",
    )
    assert len(graph) == 8
    assert isinstance(graph["parse"], fd.Node)
    assert [graph[n].kind for n in ("fetch", "kind", "kind.join")] == [
        NodeKind.STEP,
        NodeKind.BRANCH,
        NodeKind.JOIN,
    ]


def test_edges_separate_data_from_cases() -> None:
    edges = set(digest.graph.edges)
    assert edges == {
        Edge("fetch", "parse"),
        Edge("fetch", "kind"),
        # The first node of a case hangs on its branch; it also takes data from outside.
        Edge("parse", "kind.long/summarize"),
        Edge("fetch", "kind.long/summarize"),
        Edge("kind", "kind.long/summarize", kind="case", case="long"),
        # A node fed from inside its case needs no case edge of its own.
        Edge("kind.long/summarize", "kind.long/summarize-2"),
        Edge("fetch-2", "kind.long/summarize-2"),
        Edge("kind", "kind.short/fetch", kind="case", case="short"),
        # The join takes the branch's choice and whichever case's result was chosen.
        Edge("kind", "kind.join", kind="control"),
        Edge("kind.long/summarize-2", "kind.join", case="long"),
        Edge("kind.short/fetch", "kind.join", case="short"),
    }
    assert len(digest.graph.edges) == len(edges)  # no duplicates
    assert all(isinstance(e, fd.Edge) for e in edges)


def test_graph_is_immutable() -> None:
    with pytest.raises(AttributeError):
        digest.graph.flow = "other"  # type: ignore[misc]


# --- parsing the renderings ----------------------------------------------------------------

MERMAID_NODE = re.compile(
    r'^    (?P<id>n_[0-9a-f]+)(?:\["(?P<step>[^"\n]*)"\]|\{"(?P<branch>[^"\n]*)"\}'
    r'|\(\("(?P<join>[^"\n]*)"\)\))$'
)
MERMAID_EDGE = re.compile(
    r'^    (?P<src>n_[0-9a-f]+) (?:-->|-->\|"(?P<case>[^"\n]*)"\||(?P<control>-\.->)) '
    r"(?P<dst>n_[0-9a-f]+)$"
)


def mermaid_unescape(text: str) -> str:
    # Numeric references first: HTML maps &#133; to an ellipsis, flowdsl means U+0085.
    return html.unescape(re.sub(r"&#(\d+);", lambda m: chr(int(m[1])), text))


def parse_mermaid(text: str) -> tuple[dict[str, tuple[str, NodeKind]], set[Edge]]:
    """Node ids by Mermaid id with their kinds, and the edges, or an assertion error."""
    assert text.endswith("\n")
    lines = text[:-1].split("\n")
    assert lines[0] == "flowchart TD"
    nodes: dict[str, tuple[str, NodeKind]] = {}
    edges: set[Edge] = set()
    for line in lines[1:]:
        node = MERMAID_NODE.match(line)
        if node is not None:
            shape = next(k for k in ("step", "branch", "join") if node[k] is not None)
            assert node["id"] not in nodes
            nodes[node["id"]] = (mermaid_unescape(node[shape]), NodeKind(shape))
            continue
        edge = MERMAID_EDGE.match(line)
        assert edge is not None, f"not a Mermaid statement: {line!r}"
        src, dst = nodes[edge["src"]][0], nodes[edge["dst"]][0]
        if edge["control"]:
            edges.add(Edge(src, dst, kind="control"))
        elif edge["case"] is not None:
            edges.add(Edge(src, dst, kind="case", case=mermaid_unescape(edge["case"])))
        else:
            edges.add(Edge(src, dst))
    return nodes, edges


DOT_STRING = r'"(?:[^"\\\n]|\\.)*"'
DOT_NODE = re.compile(rf"^    (?P<id>{DOT_STRING}) \[shape=(?P<shape>box|diamond|circle)\];$")
DOT_EDGE = re.compile(
    rf"^    (?P<src>{DOT_STRING}) -> (?P<dst>{DOT_STRING})"
    rf"(?: \[(?:label=(?P<label>{DOT_STRING})|(?P<dashed>style=dashed))\])?;$"
)
DOT_SHAPES = {"box": NodeKind.STEP, "diamond": NodeKind.BRANCH, "circle": NodeKind.JOIN}


def dot_unquote(text: str) -> str:
    assert text[0] == text[-1] == '"'
    escapes = {"\\": "\\", '"': '"', "n": "\n", "r": "\r"}
    return re.sub(r"\\(.)", lambda m: escapes[m[1]], text[1:-1])


def parse_dot(text: str) -> tuple[str, list[tuple[str, NodeKind]], set[tuple[str, str, str]]]:
    lines = text[:-1].split("\n")
    header = re.fullmatch(rf"digraph ({DOT_STRING}) \{{", lines[0])
    assert header is not None
    assert lines[1] == "    rankdir=TB;"
    assert lines[-1] == "}"
    nodes: list[tuple[str, NodeKind]] = []
    edges: set[tuple[str, str, str]] = set()
    for line in lines[2:-1]:
        node = DOT_NODE.match(line)
        if node is not None:
            nodes.append((dot_unquote(node["id"]), DOT_SHAPES[node["shape"]]))
            continue
        edge = DOT_EDGE.match(line)
        assert edge is not None, f"not a DOT statement: {line!r}"
        style = "dashed" if edge["dashed"] else dot_unquote(edge["label"]) if edge["label"] else ""
        edges.add((dot_unquote(edge["src"]), dot_unquote(edge["dst"]), style))
    return dot_unquote(header[1]), nodes, edges


def dot_edges(graph: fd.Graph) -> set[tuple[str, str, str]]:
    out = set()
    for e in graph.edges:
        style = "dashed" if e.kind == "control" else (e.case or "") if e.kind == "case" else ""
        out.add((e.src, e.dst, style))
    return out


def check_renderings(graph: fd.Graph) -> None:
    nodes, edges = parse_mermaid(graph.to_mermaid())
    assert sorted(n for n, _ in nodes.values()) == sorted(graph.nodes)
    assert all(graph[n].kind is k for n, k in nodes.values())
    # A case's result feeding its join is drawn as a plain data arrow.
    assert edges == {attrs.evolve(e, case=None) if e.kind == "data" else e for e in graph.edges}

    name, dot_nodes, dot_edge_set = parse_dot(graph.to_dot())
    assert name == graph.flow
    assert [n for n, _ in dot_nodes] == list(graph.nodes)
    assert all(graph[n].kind is k for n, k in dot_nodes)
    assert dot_edge_set == dot_edges(graph)


def test_mermaid_has_every_node_and_edge() -> None:
    text = digest.graph.to_mermaid()
    check_renderings(digest.graph)
    assert '{"kind"}' in text  # a branch is a diamond
    assert '(("kind.join"))' in text  # a join a circle
    assert '-->|"long"|' in text


def test_dot_has_every_node_and_edge() -> None:
    text = digest.graph.to_dot()
    assert text.startswith('digraph "digest" {\n')
    assert '    "kind" -> "kind.long/summarize" [label="long"];\n' in text
    assert '    "kind" -> "kind.join" [style=dashed];\n' in text
    assert '    "fetch" -> "parse";\n' in text


# Case labels may hold anything but '/', and they become part of node ids.
case_labels = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="/"),
    min_size=1,
    max_size=12,
)


@given(labels=st.lists(case_labels, min_size=1, max_size=4, unique=True))
@example(labels=['say "hi"', "a<b>&c", "two\nlines", "back\\slash", "p|q]#", "tab\there"])
@example(labels=["#quot;", "&#10;", "\\n", "\u2028", "\x85", "%% comment", "-->"])
def test_special_characters_are_escaped(labels: list[str]) -> None:
    @fd.step
    async def echo(text: str) -> str:
        return text

    @fd.branch
    async def choose(text: str) -> str:
        return text

    async def body(text: str) -> str:
        value = await echo(text)
        table: dict[Any, Any] = {label: (lambda: echo(value)) for label in labels}
        return await choose(value).cases(table)

    flow = fd.flow(name="escapes")(body)
    assert {f"choose.{label}/echo" for label in labels} <= set(flow.graph.nodes)
    check_renderings(flow.graph)
    # Nothing a JavaScript or Python reader would take for a line break.
    for line in flow.graph.to_mermaid().splitlines()[1:]:
        assert line.startswith("    n_")


@given(spec=dag_specs())
def test_random_graphs_render(spec: DagSpec) -> None:
    check_renderings(build_flow(spec).graph)


# --- notebooks -----------------------------------------------------------------------------


class _Cells(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.code: list[str] = []
        self._in_code = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "code":
            self._in_code = True
            self.code.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "code":
            self._in_code = False

    def handle_data(self, data: str) -> None:
        if self._in_code:
            self.code[-1] += data


def test_notebook_html_lists_every_node() -> None:
    graph = fd.flow(name="escapes")(_weird_body).graph
    text = graph._repr_html_()
    cells = _Cells()
    cells.feed(text)
    cells.close()
    assert cells.code == list(graph.nodes)
    assert "<script" not in text
    assert f"{len(graph)} nodes" in text


def test_notebook_markdown_is_the_mermaid_chart() -> None:
    graph = digest.graph
    text = graph._repr_markdown_()
    assert text == f"```mermaid\n{graph.to_mermaid()}```"


@fd.step
async def _echo(text: str) -> str:
    return text


@fd.branch
async def _choose(text: str) -> str:
    return text


async def _weird_body(text: str) -> str:
    return await _choose(text).cases(
        {"<script>alert(1)<script>": lambda: _echo(text), 'a"b&c': lambda: _echo(text)}
    )
