"""``flowdsl serve`` as a subprocess, for the tests that need a real process: one to
SIGKILL, replicas on one store, the command line talking to a service.

:func:`serve` starts one and waits for its banner (which names the URL it listens on);
the tests' ``services`` fixtures stop whatever they started.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
LISTENING = re.compile(r"listening on (grpcs?://\S+)")


class Service:
    """One ``flowdsl serve`` process."""

    def __init__(self, proc: subprocess.Popen[str], url: str, banner: str) -> None:
        self.proc = proc
        self.url = url
        self.banner = banner

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        assert self.proc.returncode == -signal.SIGKILL

    def stop(self) -> str:
        """SIGTERM; what it printed from then on."""
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err
        return err

    def reap(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def service_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a service serving ``service_flows`` (gates and step log in
    *tmp_path*)."""
    gates = tmp_path / "gates"
    gates.mkdir(exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    env["FD_SERVICE_GATE"] = str(gates)
    env["FD_SERVICE_LOG"] = str(tmp_path / "steps.log")
    return env


def serve(store: str, env: dict[str, str], *extra: str) -> Service:
    """Start ``flowdsl serve --store STORE --import service_flows`` on a free port."""
    args = [
        sys.executable,
        "-m",
        "flowdsl",
        "serve",
        "--store",
        store,
        "--import",
        "service_flows",
        "--listen",
        "127.0.0.1:0",
        "--grace",
        "0",
        *extra,
    ]
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    match = LISTENING.search(line)
    if match is None:
        rest = proc.communicate(timeout=30)[1]
        pytest.fail(f"flowdsl serve did not start: {line}{rest}")
    return Service(proc, match.group(1), line)
