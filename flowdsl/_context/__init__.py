"""The user's handle: ``Context`` (options, backends, runs) and ``Run`` (one run)."""

from __future__ import annotations

from .context import Context as Context
from .run import Run as Run
from .sync import current_context as current_context
from .sync import run as run

__all__ = ["Context", "Run", "current_context", "run"]
