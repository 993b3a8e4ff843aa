"""What the Redis and NATS benchmarks share: the tables and targets of a broker's section.

Each broker module measures its own floor (raw client throughput) and flowdsl on that
broker; this module turns the measurements into the same two tables and three targets,
so the two reports cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from . import workloads as w
from ._harness import Section, Table, Target, median

__all__ = ["TARGET_SHARE", "TRIVIAL_CONCURRENCY", "TRIVIAL_RUNS", "W2_SLOTS", "report"]

TARGET_SHARE = 0.40  # flowdsl's steps/s per worker process, as a share of the floor
TRIVIAL_RUNS = 100
STEPS = w.FANOUT + 2
TRIVIAL_CONCURRENCY = 64  # slots per worker process for trivial steps
W2_SLOTS = 32  # slots per worker process for W2: what makes latency the bound
PROCESS_COUNTS = (("flowdsl, 1 worker process", 1), ("flowdsl, 2 worker processes", 2))


def report(
    section: Section,
    trivial: dict[str, Any],
    w2: Any,
    *,
    runs: int,
    floors: tuple[tuple[str, str, str], tuple[str, str, str]],
) -> dict[str, Any]:
    """Add the throughput and W2 tables and their targets to *section*; return the data.

    *floors* names the one-at-a-time floor and the batched one as ``(key in trivial,
    label in the table, key in the data)``.
    """
    (one_key, one_label, one_data), (many_key, many_label, many_data) = floors
    floor = median(trivial[one_key])
    many = median(trivial[many_key])
    table = Table(
        "1 KB messages (floor) and trivial steps (flowdsl: W2 with delay 0, "
        f"{TRIVIAL_RUNS} runs x {STEPS} steps at once)",
        ["system", "messages or steps/s", "per worker process", "per process / floor"],
    )
    table.add(one_label, floor, "-", "-")
    table.add(many_label, many, "-", "-")
    data: dict[str, Any] = {one_data: floor, many_data: many}
    for name, processes in PROCESS_COUNTS:
        steps = median([TRIVIAL_RUNS * STEPS / b.wall for b in trivial[name]])
        per_process = steps / processes
        table.add(name, steps, per_process, f"{per_process / floor:.0%}")
        data[name] = steps
        section.targets.append(
            Target(
                f"{name}: steps/s per process >= {TARGET_SHARE:.0%} of the one-at-a-time floor",
                per_process,
                TARGET_SHARE * floor,
                "steps/s",
                at_least=True,
            )
        )
    slots = 2 * W2_SLOTS
    bound = slots / (w.FANOUT * w.LEAF_DELAY)  # runs/s if only the stand-in latency limits
    w2_table = Table(
        f"W2: {runs} runs at once, {w.FANOUT} leaves of {w.LEAF_DELAY * 1000:.0f} ms, "
        f"2 worker processes x {W2_SLOTS} slots",
        ["runs/s", "latency bound runs/s", "share of the bound", "p50 s", "p99 s", "wall s"],
    )
    w2_rate = runs / w2.wall
    w2_table.add(w2_rate, bound, f"{w2_rate / bound:.0%}", w2.p50, w2.p99, w2.wall)
    data["w2"] = {"runs": runs, "wall_s": w2.wall, "runs_per_s": w2_rate, "bound": bound}
    section.targets.append(
        Target(
            "W2 runs/s within 80% of the latency bound (slots / (leaves x delay))",
            w2_rate,
            0.8 * bound,
            "runs/s",
            at_least=True,
        )
    )
    section.tables += [table, w2_table]
    section.notes.append(
        f"W2 bound: {slots} worker slots, each leaf holding one for {w.LEAF_DELAY} s, "
        f"{w.FANOUT} leaves a run (the 2 trivial steps of a run are not counted)"
    )
    return data
