"""The ``flowdsl`` command: the group (:mod:`.main`) with one module per command."""

from __future__ import annotations

from .graph import graph
from .main import cli as cli
from .main import main as main
from .resume import resume
from .run import run
from .runs import runs
from .serve import serve as serve_command
from .signal import signal
from .ui import ui as ui_command
from .worker import worker

for _command in (run, graph, runs, resume, signal, worker, ui_command, serve_command):
    cli.add_command(_command)
del _command

__all__ = ["cli", "main"]
