"""The user's handle: ``Context`` (options, backends, runs) and ``Run`` (one run)."""

from __future__ import annotations

from .context import Context as Context
from .context import Run as Run
from .context import current_context as current_context
from .context import run as run

__all__ = ["Context", "Run", "current_context", "run"]
