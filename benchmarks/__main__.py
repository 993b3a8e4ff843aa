"""``python -m benchmarks``: every benchmark, one after the other, in this process.

    python -m benchmarks                      # the full suite (about 3 minutes)
    python -m benchmarks --quick              # a ~30 s smoke run
    python -m benchmarks --only w1,w3         # some of them
    python -m benchmarks --json out.json      # keep the figures (and the machine)
    python -m benchmarks --markdown out.md    # the tables as Markdown (docs/performance.md)

Each workload module has ``run(config) -> Section``.  Benchmarks owned elsewhere
(``store_floor``, ``llm_overhead``) expose ``main()``, which prints its own report; they
run when their module exists, with their own defaults.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import sys
import time
from collections.abc import Callable
from contextlib import redirect_stdout
from typing import Any

from rich.console import Console

from ._harness import Config, Section, machine, run_section

# name -> module; the order in which they run.
SECTIONS = ("w1", "w2", "w3", "batch", "map")
MODULES = {
    "w1": "benchmarks.w1_chain",
    "w2": "benchmarks.w2_fanout",
    "w3": "benchmarks.w3_durable",
    "batch": "benchmarks.batch",
    "map": "benchmarks.dynamic_map",
}
# Owned by other modules' authors: a `main()` that parses its own arguments and prints.
FOREIGN = {
    "store_floor": "benchmarks.store_floor",
    "llm_overhead": "benchmarks.llm_overhead",
    "redis": "benchmarks.redis_bench",
    "nats": "benchmarks.nats_bench",
    "service": "benchmarks.service_bench",
}
ALL = (*SECTIONS, *FOREIGN)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description="flowdsl's benchmarks"
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run (~30 s)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(ALL)}")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per measurement")
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    parser.add_argument("--markdown", metavar="FILE", help="write the tables as Markdown")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()] or list(ALL)
    unknown = sorted(set(chosen) - set(ALL))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(ALL)}")
    args.chosen = [name for name in ALL if name in chosen]
    return args


def run_foreign(name: str, console: Console, *, quick: bool) -> dict[str, Any]:
    """Run another author's ``main()`` with no arguments of ours; keep what it printed."""
    try:
        module = importlib.import_module(FOREIGN[name])
    except ModuleNotFoundError as exc:
        if exc.name != FOREIGN[name]:
            raise
        console.print(f"[dim]{name}: not present ({FOREIGN[name]}), skipped[/dim]")
        return {"skipped": "module not present"}
    main: Callable[[], Any] = module.main
    console.rule(f"[bold]{name} ({FOREIGN[name]})")
    saved = sys.argv
    # Their own defaults; a quick run asks for fewer rounds (both take --rounds).
    sys.argv = [FOREIGN[name], *(("--rounds", "3") if quick else ())]
    out = io.StringIO()
    start = time.perf_counter()
    try:
        with redirect_stdout(out):
            main()
    finally:
        sys.argv = saved
    text = out.getvalue()
    console.print(text, end="", highlight=False, markup=False)
    return {"output": text, "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    console = Console(width=max(Console().width, 120))
    config = Config(quick=args.quick, rounds=args.rounds)
    info = machine()
    console.print(
        f"flowdsl {info['flowdsl']}, Python {info['python']}, anyio {info['anyio']}, "
        f"trio {info['trio']}, SQLite {info['sqlite']}; {info['nproc']} CPUs "
        f"({info['processor']}); load {info['load_average_at_start']}; git {info['git']}"
        + ("; --quick" if args.quick else ""),
        highlight=False,
    )
    sections: list[Section] = []
    foreign: dict[str, Any] = {}
    start = time.perf_counter()
    for name in args.chosen:
        if name in FOREIGN:
            foreign[name] = run_foreign(name, console, quick=args.quick)
            continue
        module = importlib.import_module(MODULES[name])
        section = run_section(module.run, config)
        section.show(console)
        sections.append(section)
    total = time.perf_counter() - start
    missed = [t for s in sections for t in s.targets if not t.met]
    console.rule("[bold]targets")
    for section in sections:
        for target in section.targets:
            style = "green" if target.met else "bold red"
            console.print(f"{section.key}: {target.describe()}", style=style, highlight=False)
    console.print(f"{len(missed)} target(s) missed; {total:.0f} s in all", highlight=False)
    if args.json:
        report = {
            "machine": info,
            "command": " ".join(["python -m benchmarks", *(argv or sys.argv[1:])]),
            "quick": args.quick,
            "seconds": total,
            "sections": {s.key: s.to_json() for s in sections},
            "foreign": foreign,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write("\n\n".join(s.to_markdown() for s in sections) + "\n")
            for name, result in foreign.items():
                if "output" in result:
                    f.write(f"\n### {name}\n\n```\n{result['output']}```\n")


main()
