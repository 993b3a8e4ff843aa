"""A process that starts or resumes a run, for the one-driver-per-run tests.

    python _driver_proc.py start STORE RUN_ID X DELAY [--broker URL] [--no-wait]
    python _driver_proc.py resume STORE RUN_ID [--broker URL] [--no-wait]

``start`` runs :func:`batch_steps.slow_chain` on ``X`` and ``DELAY`` under ``RUN_ID``;
``resume`` resumes ``RUN_ID``; both in a context on the store ``STORE`` (real time), or in
batch mode with one in-process worker when ``--broker`` is given.  It prints ``entered``
once its context is open, then one line: ``result <JSON>``, or ``error <class> <message>``
(exit status 3) when the call raised a flowdsl error.
"""

from __future__ import annotations

import argparse
import json
import sys

import anyio

import flowdsl as fd

import batch_steps as bs


async def main_async(args: argparse.Namespace) -> int:
    if args.broker:
        ctx = fd.Context(batch=True, broker=args.broker, store=args.store, workers=1)
    else:
        ctx = fd.Context(store=args.store)
    wait = not args.no_wait
    try:
        async with ctx:
            print("entered", flush=True)
            if args.command == "start":
                run = await ctx.start(
                    bs.slow_chain, args.x, args.delay, run_id=args.run_id, wait=wait
                )
                result = await run.result()
            else:
                result = await ctx.resume(args.run_id, wait=wait)
    except fd.FlowError as exc:
        print(f"error {type(exc).__name__} {exc}", flush=True)
        return 3
    print(f"result {json.dumps(result)}", flush=True)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["start", "resume"])
    parser.add_argument("store")
    parser.add_argument("run_id")
    parser.add_argument("x", type=int, nargs="?", default=0)
    parser.add_argument("delay", type=float, nargs="?", default=0.0)
    parser.add_argument("--broker", default=None)
    parser.add_argument("--no-wait", action="store_true")
    args = parser.parse_args()
    sys.exit(anyio.run(main_async, args))


if __name__ == "__main__":
    main()
