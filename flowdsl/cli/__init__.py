"""The ``flowdsl`` command."""

from __future__ import annotations

from .main import main as main

__all__ = ["main"]
