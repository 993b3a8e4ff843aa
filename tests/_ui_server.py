"""The inspector's tests' helpers: a store with runs in it (finished, failed in real time
and in batch, left waiting), a run the test holds open, how a traceback names the line
that failed, and the app served by uvicorn on a loopback port, in a thread of the test
process."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import uvicorn

import flowdsl as fd
from flowdsl.testing import FakeLLM

import ui_flows

READY_TIMEOUT = 20.0


def fake_llm() -> FakeLLM:
    def answer(prompt: str) -> str:
        if prompt.startswith("Which team"):
            return "billing"
        return "Thanks for writing: your invoice is corrected and a refund is on its way."

    return FakeLLM(answer)


async def populate(url: str, signing_key: Any = None) -> None:
    """Three runs: two finished triages (one per branch case) and a failed ingest (their
    records signed with *signing_key*, if given)."""
    ui_flows.FIXED.clear()  # a test that fixed the ingest must not make this one finish
    async with fd.Context(store=url, llm=fake_llm(), signing_key=signing_key) as ctx:
        await ctx.run(ui_flows.triage, "my invoice is wrong", run_id="t-finished")
        await ctx.run(ui_flows.triage, "the site is down and I am angry", run_id="t-urgent")
        with contextlib.suppress(fd.StepFailed):
            await ctx.run(ui_flows.ingest, "data.txt", run_id="t-failed")


def line_of(code: str) -> int:
    """The line of ui_flows.py that holds *code* (a failing step's `raise`)."""
    lines = Path(ui_flows.__file__).read_text(encoding="utf-8").splitlines()
    [number] = [i for i, line in enumerate(lines, 1) if code in line]
    return number


def raised_in(function: str, code: str) -> str:
    """How a traceback names the line of ui_flows.py holding *code*, in *function*."""
    return f'ui_flows.py", line {line_of(code)}, in {function}'


PARSE_RAISES = raised_in("parse", 'raise ValueError(f"cannot parse')
SHOUT_RAISES = raised_in("shout", 'raise RuntimeError(f"cannot shout')


async def fail_in_batch(url: str, run_id: str) -> None:
    """ui_flows.ingest failed by a batch worker of this process (its failure, traceback
    included, comes back as a completion message through the broker)."""
    async with fd.Context(batch=True, store=url, broker=url, workers=1) as ctx:
        with contextlib.suppress(fd.StepFailed):
            await ctx.run(ui_flows.ingest, "data.txt", run_id=run_id)


async def leave_waiting(url: str, run_id: str, text: str) -> None:
    """ui_flows.campaign started and left waiting for its signal (its context ends)."""
    async with fd.Context(store=url) as ctx:
        run = await ctx.start(ui_flows.campaign, text, run_id=run_id)
        async for event in run.events():
            if isinstance(event, fd.events.RunWaiting):
                break


class HeldRun:
    """Runs ``ui_flows.gated`` in a thread of its own (its own event loop), so that it
    stays running, on ``hold``, until the test opens ``ui_flows.GATE``."""

    def __init__(self, url: str, run_id: str) -> None:
        self.url = url
        self.run_id = run_id
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def start(self) -> HeldRun:
        ui_flows.GATE.clear()
        self._thread.start()
        return self

    def _main(self) -> None:
        async def drive() -> None:
            async with fd.Context(store=self.url) as ctx:
                self.result = await ctx.run(ui_flows.gated, 4, run_id=self.run_id)

        try:
            anyio.run(drive)
        except BaseException as exc:
            self.error = exc

    def finish(self) -> Any:
        ui_flows.GATE.set()
        self._thread.join(READY_TIMEOUT)
        assert not self._thread.is_alive(), "the held run did not finish"
        if self.error is not None:
            raise self.error
        return self.result


class ServedApp:
    """An ASGI app served by uvicorn from a thread, on a socket bound to a free port."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(
            app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServedApp:
        self._thread.start()
        deadline = time.monotonic() + READY_TIMEOUT
        while not self.server.started:  # uvicorn sets it once it serves
            assert self._thread.is_alive(), "uvicorn stopped while starting"
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(READY_TIMEOUT)
        self.sock.close()
