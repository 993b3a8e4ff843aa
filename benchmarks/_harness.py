"""What every benchmark shares: interleaved rounds, medians, targets, tables and JSON.

A figure is the median over rounds; in each round every system runs once, side by side in
this process, in an order that alternates from round to round (so that neither side always
runs on a warmer or a colder machine).  A ratio or a difference to the floor is computed
per round, from the two measurements of that round, and its median is reported: on a shared
and noisy machine a pair measured together drifts less than two medians taken apart.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import attrs
from rich.console import Console
from rich.table import Table as RichTable

__all__ = [
    "ROOT",
    "Config",
    "Section",
    "Table",
    "Target",
    "interleaved",
    "machine",
    "median",
    "paired",
    "percentile",
    "quiet_gc",
    "run_section",
    "standalone",
    "subprocess_env",
]

T = TypeVar("T")
#: The repository's root: what a subprocess needs on its path to import ``benchmarks``.
ROOT = Path(__file__).resolve().parent.parent


@attrs.frozen
class Config:
    """What the command line chose for every workload."""

    quick: bool = False
    rounds: int | None = None  # None: each workload's own default

    def pick(self, default: int, quick: int) -> int:
        """A count: *rounds* if given, else the workload's quick or full default."""
        if self.rounds is not None:
            return self.rounds
        return quick if self.quick else default


@attrs.frozen
class Target:
    """A promise from an issue, and whether this run kept it."""

    what: str
    measured: float
    limit: float
    unit: str
    at_least: bool = False  # True: measured must be >= limit

    @property
    def met(self) -> bool:
        return self.measured >= self.limit if self.at_least else self.measured <= self.limit

    def describe(self) -> str:
        sign = ">=" if self.at_least else "<="
        verdict = "met" if self.met else "MISSED"
        limit = f"target {sign} {fmt(self.limit)}"
        return f"{self.what}: {fmt(self.measured)} {self.unit} ({limit}) {verdict}"

    def to_json(self) -> dict[str, Any]:
        return {
            "what": self.what,
            "measured": self.measured,
            "limit": self.limit,
            "unit": self.unit,
            "at_least": self.at_least,
            "met": self.met,
        }


@attrs.define
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]] = attrs.field(factory=list)

    def add(self, *cells: Any) -> None:
        self.rows.append(list(cells))

    def to_rich(self) -> RichTable:
        table = RichTable(title=self.title, title_justify="left")
        for i, column in enumerate(self.columns):
            table.add_column(column, justify="left" if i == 0 else "right")
        for row in self.rows:
            table.add_row(*(fmt(cell) for cell in row))
        return table

    def to_markdown(self) -> str:
        lines = [
            "| " + " | ".join(self.columns) + " |",
            "|" + "|".join("---" for _ in self.columns) + "|",
        ]
        lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in self.rows]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"title": self.title, "columns": self.columns, "rows": self.rows}


@attrs.define
class Section:
    """One workload's results: tables for people, ``data`` for machines."""

    key: str
    title: str
    tables: list[Table] = attrs.field(factory=list)
    targets: list[Target] = attrs.field(factory=list)
    notes: list[str] = attrs.field(factory=list)
    data: dict[str, Any] = attrs.field(factory=dict)
    seconds: float = 0.0
    load_after: list[float] = attrs.field(factory=list)  # the 1, 5, 15-minute load averages

    def show(self, console: Console) -> None:
        console.rule(f"[bold]{self.title}")
        for table in self.tables:
            console.print(table.to_rich())
        for target in self.targets:
            style = "green" if target.met else "bold red"
            console.print(f"  target: {target.describe()}", style=style, highlight=False)
        for note in self.notes:
            console.print(f"  note: {note}", style="dim", highlight=False)
        console.print(
            f"  ({self.seconds:.1f} s; load average after: {self.load_after})", style="dim"
        )

    def to_markdown(self) -> str:
        parts = [f"### {self.title}"]
        for table in self.tables:
            parts.append(f"{table.title}\n\n{table.to_markdown()}")
        if self.targets:
            parts.append("\n".join(f"- {t.describe()}" for t in self.targets))
        if self.notes:
            parts.append("\n".join(f"- {n}" for n in self.notes))
        return "\n\n".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "tables": [t.to_json() for t in self.tables],
            "targets": [t.to_json() for t in self.targets],
            "notes": self.notes,
            "data": self.data,
            "seconds": self.seconds,
            "load_after": self.load_after,
        }


def fmt(value: Any) -> str:
    """Numbers to a few significant digits; everything else as it is."""
    if isinstance(value, bool) or not isinstance(value, float | int):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """The *q*-th percentile (0..100) by linear interpolation between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@contextmanager
def quiet_gc() -> Iterator[None]:
    """Start a measurement with no garbage left from the previous one (GC stays enabled:
    collections caused by the measured code are part of its cost)."""
    gc.collect()
    yield


async def interleaved(
    rounds: int,
    systems: Mapping[str, Callable[[], Awaitable[T]]],
    *,
    warmup: int = 1,
) -> dict[str, list[T]]:
    """Run every system once per round, the order reversed every other round.

    Each system is an async callable returning its own measurement (a duration, or a
    record of several figures).  *warmup* untimed rounds come first: tracing, imports and
    caches are not what a benchmark of the steady state should see.
    """
    names = list(systems)
    out: dict[str, list[T]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            with quiet_gc():
                value = await systems[name]()
            if r >= warmup:
                out[name].append(value)
    return out


def paired(a: Sequence[float], b: Sequence[float], op: Callable[[float, float], float]) -> float:
    """The median of ``op(a[i], b[i])`` over rounds: a ratio or difference per round."""
    return median([op(x, y) for x, y in zip(a, b, strict=True)])


def machine() -> dict[str, Any]:
    """What the figures were measured on."""

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "absent"

    return {
        "nproc": os.cpu_count(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "flowdsl": version("flowdsl"),
        "anyio": version("anyio"),
        "trio": version("trio"),
        "sqlite": _sqlite_version(),
        "load_average_at_start": _load(),
        "git": _git_state(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _load() -> list[float]:
    """The machine's 1, 5 and 15-minute load averages: how shared it was."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _git_state() -> str:
    """The commit measured, and whether the engine had uncommitted changes."""
    import subprocess

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown"
    dirty = git("status", "--porcelain", "--", "flowdsl")
    return f"{commit} (flowdsl/ with uncommitted changes)" if dirty else commit


def _sqlite_version() -> str:
    import sqlite3

    return sqlite3.sqlite_version


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_section(run: Callable[[Config], Section], config: Config) -> Section:
    start = time.perf_counter()
    section = run(config)
    section.seconds = time.perf_counter() - start
    section.load_after = _load()
    return section


def standalone(run: Callable[[Config], Section]) -> None:
    """``python -m benchmarks.<workload>``: one workload, with the suite's options."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per measurement")
    args = parser.parse_args()
    console = Console()
    run_section(run, Config(quick=args.quick, rounds=args.rounds)).show(console)


def subprocess_env() -> dict[str, str]:
    """The environment for a Python subprocess that imports ``benchmarks.workloads``."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), path) if p)}
