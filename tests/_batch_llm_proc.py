"""Subprocesses for the provider batch API crash tests.

    python _batch_llm_proc.py serve STORE KIND BASE_URL [options]
    python _batch_llm_proc.py start STORE KIND BASE_URL RUN_ID... [options]

``serve`` is a worker process (``flowdsl._executors.batch.serve``) whose provider (``KIND``:
openai or anthropic, at ``BASE_URL``) has ``batch_api``; it prints ``ready``.  ``start``
is a client with one in-process worker that starts ``batch_llm_steps:ask_flow`` once per
``RUN_ID`` (the question is the run id), prints ``started``, then each result.  Options:
``--lease``, ``--poll-every``, ``--flush-after``, ``--max-requests``, ``--workers`` (for
``start``: 0 leaves the steps to worker processes).
"""

from __future__ import annotations

import argparse
from typing import Any

import anyio

import flowdsl as fd
from flowdsl._executors.batch import serve

from batch_llm_steps import ask_flow

MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-3-5-haiku-latest"}


def provider(args: argparse.Namespace) -> Any:
    options = fd.llm.BatchAPI(
        flush_after=args.flush_after, poll_every=args.poll_every, max_requests=args.max_requests
    )
    if args.kind == "openai":
        return fd.llm.OpenAI(
            api_key="k", base_url=args.base_url, model=MODELS["openai"], batch_api=options
        )
    return fd.llm.Anthropic(
        api_key="k", base_url=args.base_url, model=MODELS["anthropic"], batch_api=options
    )


async def serve_main(args: argparse.Namespace) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(
            lambda task_status: serve(
                args.store,
                imports=("batch_llm_steps",),
                lease=args.lease,
                llm=provider(args),
                task_status=task_status,
            )
        )
        print("ready", flush=True)


async def start_main(args: argparse.Namespace) -> None:
    llm = provider(args)
    async with fd.Context(
        batch=True, store=args.store, workers=args.workers, lease=args.lease, llm=llm
    ) as ctx:
        runs = [await ctx.start(ask_flow, rid, run_id=rid) for rid in args.run_ids]
        print("started", flush=True)
        for run in runs:
            print(await run.result(), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["serve", "start"])
    parser.add_argument("store")
    parser.add_argument("kind", choices=sorted(MODELS))
    parser.add_argument("base_url")
    parser.add_argument("run_ids", nargs="*")
    parser.add_argument("--lease", type=float, default=30.0)
    parser.add_argument("--poll-every", type=float, default=0.05)
    parser.add_argument("--flush-after", type=float, default=30.0)
    parser.add_argument("--max-requests", type=int, default=None)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    anyio.run(serve_main if args.command == "serve" else start_main, args)


if __name__ == "__main__":
    main()
