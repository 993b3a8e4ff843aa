"""``python -m benchmarks.peers``: flowdsl beside LangGraph, DBOS and the plain-asyncio floor.

    python -m benchmarks.peers                   # the full run (about 6 minutes on 2 cores)
    python -m benchmarks.peers --quick           # a smoke run (under a minute)
    python -m benchmarks.peers --only w1,resume  # some workloads: w1, w2, w3, long, resume
    python -m benchmarks.peers --systems floor,flowdsl,langgraph
    python -m benchmarks.peers --json out.json --markdown out.md

``nox -s bench_peers`` installs LangGraph and DBOS into its own environment and runs this;
a system whose package is missing is skipped with a note.  Every measurement runs in a fresh
process (``benchmarks.peers._child``); in each round every system runs every workload once,
in an order reversed from one round to the next.  A figure is the median over rounds; a
ratio is the median of the per-round ratios (a pair measured in the same round drifts less
on a shared machine than two medians taken apart).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib import metadata, util
from pathlib import Path
from typing import Any

import attrs
from rich.console import Console
from rich.table import Table as RichTable

from .._harness import ROOT, Target, fmt, machine, median, subprocess_env
from ._workloads import CHAIN_STEPS, CRASH_AT, CRASH_CHAIN, CRASH_GRACE, FULL, QUICK, Sizes

Record = dict[str, Any]

WORKLOADS = ("w1", "w2", "w3", "long", "resume")
FAMILIES = ("floor", "flowdsl", "langgraph", "dbos")
#: The package each family needs, and the distributions whose versions the report names.
NEEDS = {"langgraph": "langgraph", "dbos": "dbos"}
VERSIONS = (
    "flowdsl",
    "anyio",
    "langgraph",
    "langgraph-checkpoint",
    "langgraph-checkpoint-sqlite",
    "langchain-core",
    "aiosqlite",
    "dbos",
    "sqlalchemy",
)
CHILD_TIMEOUT = 1800.0
FLOOR_W1 = "floor: direct await"


@attrs.frozen
class Job:
    """One system running one workload: a row group of the table."""

    workload: str
    family: str
    label: str
    module: str
    entry: str

    @property
    def key(self) -> str:
        return f"{self.workload}/{self.label}"


def jobs_for(sizes: Sizes) -> list[Job]:
    snapshots = f"LangGraph SqliteSaver, state = every result (N={sizes.snapshot_chain:,})"
    return [
        Job("w1", "floor", FLOOR_W1, "floor", "w1"),
        Job("w1", "flowdsl", "flowdsl", "flowdsl_impl", "w1"),
        Job("w1", "langgraph", "LangGraph StateGraph", "langgraph_impl", "w1"),
        Job("w1", "langgraph", "LangGraph functional API", "langgraph_impl", "w1_functional"),
        Job("w2", "floor", "floor: asyncio.gather", "floor", "w2"),
        Job("w2", "flowdsl", "flowdsl", "flowdsl_impl", "w2"),
        Job("w2", "langgraph", "LangGraph StateGraph (Send)", "langgraph_impl", "w2"),
        Job("w2", "dbos", "DBOS (asyncio.gather of steps)", "dbos_impl", "w2"),
        Job("w3", "floor", "floor: sqlite3 INSERT + COMMIT", "floor", "w3_steps"),
        Job("w3", "flowdsl", "flowdsl, store=sqlite", "flowdsl_impl", "w3_steps"),
        Job("w3", "flowdsl", "flowdsl, store=sqlite ?durability=full", "flowdsl_impl", "w3_full"),
        Job(
            "w3",
            "langgraph",
            "LangGraph InMemorySaver (not durable)",
            "langgraph_impl",
            "w3_steps_memory",
        ),
        Job("w3", "langgraph", "LangGraph SqliteSaver", "langgraph_impl", "w3_steps"),
        Job("w3", "langgraph", "LangGraph AsyncSqliteSaver", "langgraph_impl", "w3_steps_async"),
        Job("w3", "dbos", "DBOS on SQLite", "dbos_impl", "w3_steps"),
        Job("long", "floor", "floor: one row per result", "floor", "long_chain"),
        Job("long", "flowdsl", "flowdsl", "flowdsl_impl", "long_chain"),
        Job(
            "long",
            "langgraph",
            "LangGraph SqliteSaver, state = last result",
            "langgraph_impl",
            "long_chain",
        ),
        Job("long", "langgraph", snapshots, "langgraph_impl", "long_chain_snapshots"),
        Job("long", "dbos", "DBOS on SQLite", "dbos_impl", "long_chain"),
        Job("resume", "floor", "floor: sqlite3 journal, skip what it holds", "floor", "resume"),
        Job("resume", "flowdsl", "flowdsl: ctx.resume(run_id)", "flowdsl_impl", "resume"),
        Job(
            "resume",
            "langgraph",
            "LangGraph AsyncSqliteSaver: ainvoke(None)",
            "langgraph_impl",
            "resume",
        ),
        Job("resume", "dbos", "DBOS: recovery at launch", "dbos_impl", "resume"),
    ]


# --- figures: what each workload's records become -------------------------------------------


@attrs.frozen
class Figure:
    workload: str
    name: str
    get: Callable[[Record], float]
    ratios: bool = True  # False: a count, where a ratio means nothing


def _per_step_us(r: Record) -> float:
    return float(r["seconds"] / (r["runs"] * CHAIN_STEPS) * 1e6)


FIGURES = (
    Figure("w1", "µs per step", _per_step_us),
    Figure("w2", "runs per second", lambda r: r["runs"] / r["wall"]),
    Figure("w2", "p50 latency, ms", lambda r: r["p50"] * 1e3),
    Figure("w2", "p99 latency, ms", lambda r: r["p99"] * 1e3),
    Figure("w2", "KiB per in-flight run", lambda r: r["bytes_per_run"] / 1024),
    Figure("w3", "µs per durable step", _per_step_us),
    Figure("long", "file size / raw result bytes", lambda r: r["ratio"]),
    Figure("long", "ms per step, first 20", lambda r: r["first_ms"]),
    Figure("long", "ms per step, last 20", lambda r: r["last_ms"]),
    Figure("long", "ms per step, whole chain", lambda r: r["wall"] / r["steps"] * 1e3),
    Figure("resume", "fresh process: start to result, ms", lambda r: r["wall"] * 1e3),
    Figure(
        "resume", "  of which imports, ms", lambda r: (r["import_s"] + r["shared_import_s"]) * 1e3
    ),
    Figure("resume", "  of which the resume itself, ms", lambda r: r["resume_s"] * 1e3),
    Figure("resume", "finished steps run again", lambda r: r["reran_finished"], ratios=False),
    Figure(
        "resume", "in-flight step run again (1 = yes)", lambda r: r["reran_inflight"], ratios=False
    ),
)
TITLES = {
    "w1": f"W1: {CHAIN_STEPS} trivial steps in a chain, runs in sequence, in memory",
    "w2": "W2: 1 step -> 20 x sleep(50 ms) -> reduce, runs at once, in memory",
    "w3": f"W3: {CHAIN_STEPS} steps of 1 KB results, each durable in SQLite, runs in sequence",
    "long": "W3: one long chain of 1 KB results on SQLite",
    "resume": f"W3: {CRASH_CHAIN}-step durable chain, SIGKILL during step {CRASH_AT}, resumed "
    "in a fresh process",
}


# --- running the children ----------------------------------------------------------------------


class ChildFailed(Exception):
    pass


def child_command(job: Job, entry: str, args: Record, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "benchmarks.peers._child",
        job.module,
        entry,
        json.dumps(args),
        str(out),
    ]


def run_child(job: Job, entry: str, args: Record, directory: Path) -> Record:
    out = directory / f"{entry}.json"
    done = subprocess.run(
        child_command(job, entry, args, out),
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        check=False,
    )
    if done.returncode != 0 or not out.exists():
        raise ChildFailed(f"{job.key}: exit {done.returncode}\n{done.stderr[-3000:]}")
    record: Record = json.loads(out.read_text(encoding="utf-8"))
    record["warnings"] = _warnings(done.stderr)
    return record


def _warnings(stderr: str) -> list[str]:
    """What a system warned about while it was measured (DBOS logs to stderr), once each."""
    seen: dict[str, None] = {}
    for line in stderr.splitlines():
        if "warning" in line.lower():
            # Drop a leading time stamp so that repeats of one warning count once.
            seen.setdefault(line.split("]", 1)[-1].strip()[:200])
    return list(seen)[:3]


def run_workload(job: Job, directory: Path, quick: bool) -> Record:
    return run_child(job, job.entry, {"directory": str(directory), "quick": quick}, directory)


def run_resume(job: Job, directory: Path) -> Record:
    """Crash a run during step CRASH_AT (SIGKILL), then time a fresh process to its result."""
    crash_log, resume_log = directory / "crash.log", directory / "resume.log"
    args = {"directory": str(directory), "log": str(crash_log), "hang": True}
    with open(directory / "crash.err", "w", encoding="utf-8") as err:
        proc = subprocess.Popen(
            child_command(job, "crash", args, directory / "crash.json"),
            cwd=ROOT,
            env=subprocess_env(),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            _wait_for_line(crash_log, f"start {CRASH_AT}", proc)
            time.sleep(CRASH_GRACE)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    start = time.perf_counter()
    args = {"directory": str(directory), "log": str(resume_log)}
    record = run_child(job, "resume", args, directory)
    record["wall"] = time.perf_counter() - start
    finished = {n for kind, n in _log_lines(crash_log) if kind == "end"}
    again = [n for kind, n in _log_lines(resume_log) if kind == "start"]
    record["finished_before"] = sorted(finished)
    record["ran_after"] = again
    record["reran_finished"] = len(set(again) & finished)
    record["reran_inflight"] = int(CRASH_AT in again)
    # The crash must have left exactly the steps before CRASH_AT finished.
    record["correct"] = record["correct"] and finished == set(range(1, CRASH_AT))
    return record


def _wait_for_line(path: Path, line: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if path.exists() and line in path.read_text(encoding="utf-8").splitlines():
            return
        if proc.poll() is not None:
            raise ChildFailed(f"the crashing process exited ({proc.returncode}) before {line!r}")
        time.sleep(0.005)
    raise ChildFailed(f"no {line!r} in {path} after 120 s")


def _log_lines(path: Path) -> list[tuple[str, int]]:
    if not path.exists():
        return []
    pairs = (line.split() for line in path.read_text(encoding="utf-8").splitlines())
    return [(kind, int(n)) for kind, n in pairs]


def measure(
    jobs: Sequence[Job], rounds: int, quick: bool, console: Console
) -> tuple[dict[str, list[Record | None]], list[str]]:
    """Every job once per round, the order reversed every other round; a failure is a
    ``None`` for that round (and a line in the returned list), never the end of the run."""
    records: dict[str, list[Record | None]] = {job.key: [] for job in jobs}
    failures: list[str] = []
    for r in range(rounds):
        order = list(jobs) if r % 2 == 0 else list(jobs)[::-1]
        started = time.perf_counter()
        for job in order:
            began = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="flowdsl-peers-") as tmp:
                try:
                    if job.workload == "resume":
                        record = run_resume(job, Path(tmp))
                    else:
                        record = run_workload(job, Path(tmp), quick)
                except (ChildFailed, subprocess.TimeoutExpired) as exc:
                    failures.append(f"round {r + 1}: {exc}")
                    console.print(f"[red]FAILED[/red] {job.key}: {exc}", highlight=False)
                    records[job.key].append(None)
                    continue
            records[job.key].append(record)
            console.print(f"  {job.key}: {time.perf_counter() - began:.1f} s", style="dim")
        console.print(
            f"round {r + 1}/{rounds}: {time.perf_counter() - started:.0f} s, load {_load()}",
            style="dim",
            highlight=False,
        )
    return records, failures


# --- the report ----------------------------------------------------------------------------------


@attrs.frozen
class Row:
    workload: str
    figure: str
    system: str
    value: float
    x_floor: float | None
    x_flowdsl: float | None
    values: list[float]


def paired_ratio(
    a: Sequence[Record | None], b: Sequence[Record | None], get: Callable[[Record], float]
) -> float | None:
    """The median over rounds of ``get(a) / get(b)``, rounds where both ran."""
    ratios = [get(x) / get(y) for x, y in zip(a, b, strict=True) if x and y and get(y)]
    return median(ratios) if ratios else None


def build_rows(jobs: Sequence[Job], records: dict[str, list[Record | None]]) -> list[Row]:
    rows = []
    for figure in FIGURES:
        group = [job for job in jobs if job.workload == figure.workload]
        refs = [next((j for j in group if j.family == f), None) for f in ("floor", "flowdsl")]
        for job in group:
            row = _row(figure, job, refs, records)
            if row is not None:
                rows.append(row)
    return rows


def _row(
    figure: Figure, job: Job, refs: list[Job | None], records: dict[str, list[Record | None]]
) -> Row | None:
    mine = records[job.key]
    values = [figure.get(r) for r in mine if r]
    if not values:
        return None
    x_floor, x_flowdsl = (
        paired_ratio(mine, records[ref.key], figure.get)
        if ref is not None and figure.ratios
        else None
        for ref in refs
    )
    return Row(figure.workload, figure.name, job.label, median(values), x_floor, x_flowdsl, values)


def find(rows: Sequence[Row], figure: str, system: str) -> Row | None:
    return next((r for r in rows if r.figure == figure and r.system.startswith(system)), None)


def targets(
    jobs: Sequence[Job], records: dict[str, list[Record | None]], rows: Sequence[Row]
) -> list[Target]:
    """The issue's targets, reported (never asserted)."""
    by = {job.key: records[job.key] for job in jobs}
    out = []

    def overhead_ratio(peer: str) -> float | None:
        # (peer - floor) / (flowdsl - floor), per round: overhead over the same work.
        floor, flow, other = by.get(f"w1/{FLOOR_W1}"), by.get("w1/flowdsl"), by.get(peer)
        if not (floor and flow and other):
            return None
        ratios = [
            (_per_step_us(o) - _per_step_us(f)) / (_per_step_us(d) - _per_step_us(f))
            for f, d, o in zip(floor, flow, other, strict=True)
            if f and d and o
        ]
        return median(ratios) if ratios else None

    lg = overhead_ratio("w1/LangGraph StateGraph")
    if lg is not None:
        out.append(Target("W1 overhead per step: LangGraph / flowdsl", lg, 10, "x", True))
    for peer in ("LangGraph SqliteSaver", "DBOS on SQLite"):
        row = find(rows, "µs per durable step", peer)
        if row is not None and row.x_flowdsl is not None:
            out.append(
                Target(f"W3 µs per durable step: {peer} / flowdsl", row.x_flowdsl, 5, "x", True)
            )
    row = find(rows, "file size / raw result bytes", "flowdsl")
    if row is not None:
        out.append(Target("W3 flowdsl file / raw bytes, 1,000 steps", row.value, 1.5, "x"))
    row = find(rows, "KiB per in-flight run", "flowdsl")
    if row is not None and row.x_floor is not None:
        out.append(Target("W2 memory per in-flight run: flowdsl / floor", row.x_floor, 1.5, "x"))
    return out


def rich_table(rows: Sequence[Row], title: str) -> RichTable:
    table = RichTable(title=title, title_justify="left")
    for i, column in enumerate(("figure", "system", "median", "x floor", "x flowdsl")):
        table.add_column(column, justify="left" if i < 2 else "right")
    workload = None
    figure = None
    for row in rows:
        if row.workload != workload:
            if workload is not None:
                table.add_section()
            table.add_row(f"[bold]{TITLES[row.workload]}[/bold]", "", "", "", "")
            workload = row.workload
        table.add_row(
            row.figure if row.figure != figure else "",
            row.system,
            fmt(row.value),
            _ratio(row.x_floor),
            _ratio(row.x_flowdsl),
        )
        figure = row.figure
    return table


def markdown_table(rows: Sequence[Row]) -> str:
    lines = [
        "| workload | figure | system | median | x floor | x flowdsl |",
        "|---|---|---|---:|---:|---:|",
    ]
    for row in rows:
        cells = (
            row.workload.upper() if row.workload != "long" else "W3 long",
            row.figure.strip(),
            row.system,
            fmt(row.value),
            _ratio(row.x_floor),
            _ratio(row.x_flowdsl),
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{fmt(value)}x"


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def versions() -> dict[str, str]:
    found = {}
    for name in VERSIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def memory_total() -> str:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return f"{int(line.split()[1]) / 1024**2:.1f} GiB"
    except OSError:
        pass
    return "unknown"


# --- the command ---------------------------------------------------------------------------------


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.peers",
        description="flowdsl beside LangGraph, DBOS and the plain-asyncio floor",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run (under a minute)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3; quick 1)")
    parser.add_argument("--only", default="", help=f"workloads among {', '.join(WORKLOADS)}")
    parser.add_argument("--systems", default="", help=f"systems among {', '.join(FAMILIES)}")
    parser.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    parser.add_argument("--markdown", metavar="FILE", help="write the table as Markdown")
    args = parser.parse_args(argv)
    args.workloads = _choose(parser, "--only", args.only, WORKLOADS)
    args.families = _choose(parser, "--systems", args.systems, FAMILIES)
    return args


def _choose(
    parser: argparse.ArgumentParser, flag: str, text: str, names: tuple[str, ...]
) -> list[str]:
    chosen = [n.strip() for n in text.split(",") if n.strip()] or list(names)
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        parser.error(f"{flag}: unknown {', '.join(unknown)}; choose from {', '.join(names)}")
    return chosen


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    console = Console(width=max(Console().width, 130))
    sizes = QUICK if args.quick else FULL
    rounds = args.rounds or (1 if args.quick else 3)
    notes = []
    families = []
    for family in args.families:
        package = NEEDS.get(family)
        if package is not None and util.find_spec(package) is None:
            notes.append(f"{family}: not installed here, skipped (`nox -s bench_peers` has it)")
            continue
        families.append(family)
    jobs = [j for j in jobs_for(sizes) if j.workload in args.workloads and j.family in families]
    info = machine()
    info["memory"] = memory_total()
    info["versions"] = versions()
    command = " ".join(["python -m benchmarks.peers", *(argv or sys.argv[1:])])
    console.print(
        f"{command}\nPython {info['python']}, SQLite {info['sqlite']}, {info['nproc']} CPUs "
        f"({info['processor']}), {info['memory']}; git {info['git']}; load at start "
        f"{info['load_average_at_start']}\n"
        + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
        highlight=False,
    )
    start = time.perf_counter()
    records, failures = measure(jobs, rounds, args.quick, console)
    seconds = time.perf_counter() - start
    load_after = _load()
    rows = build_rows(jobs, records)
    goals = targets(jobs, records, rows)
    wrong = sorted({key for key, rs in records.items() for r in rs if r and not r["correct"]})
    notes.append(
        "every result checked against the plain-Python computation: "
        + ("all right" if not wrong else f"WRONG in {', '.join(wrong)} (figures suspect)")
    )
    for key, rs in records.items():
        for warning in sorted({text for r in rs if r for text in r.get("warnings", [])}):
            notes.append(f"{key} warned: {warning}")
    shared = [
        r["shared_import_s"] for j in jobs if j.workload == "resume" for r in records[j.key] if r
    ]
    if shared:
        notes.append(
            "every child process imports the shared workload module, which imports flowdsl: "
            f"{median(shared) * 1e3:.0f} ms (median) of each resume's imports"
        )
    title = (
        f"flowdsl beside its peers: medians of {rounds} round(s), each system in a fresh "
        f"process per workload per round" + (" (--quick sizes)" if args.quick else "")
    )
    console.print(rich_table(rows, title))
    for target in goals:
        style = "green" if target.met else "bold red"
        console.print(f"  target: {target.describe()}", style=style, highlight=False)
    for note in notes + failures:
        console.print(f"  note: {note}", style="dim", highlight=False)
    console.print(
        f"  {seconds:.0f} s in all; load average before {info['load_average_at_start']}, "
        f"after {load_after}",
        style="dim",
        highlight=False,
    )
    if args.json:
        report = {
            "command": command,
            "machine": info,
            "sizes": attrs.asdict(sizes),
            "rounds": rounds,
            "seconds": seconds,
            "load_after": load_after,
            "rows": [attrs.asdict(r) for r in rows],
            "targets": [t.to_json() for t in goals],
            "notes": notes,
            "failures": failures,
            "records": records,
        }
        Path(args.json).write_text(json.dumps(report, indent=2), encoding="utf-8")
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(rows) + "\n", encoding="utf-8")


main()
