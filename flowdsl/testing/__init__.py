"""Helpers for testing flows: crash-and-resume checks, and a deterministic LLM.

``check_resume`` and ``crash_points`` check that a flow resumed after a crash ends as an
uninterrupted run; ``FakeLLM`` stands in for a provider in tests and examples.
"""

from __future__ import annotations

from ._crash import CrashPoint as CrashPoint
from ._crash import InjectedCrash as InjectedCrash
from ._crash import ResumeReport as ResumeReport
from ._crash import check_resume as check_resume
from ._crash import crash_points as crash_points
from ._fake_llm import FakeLLM as FakeLLM
from ._fake_llm import FakeReply as FakeReply

__all__ = [
    "CrashPoint",
    "FakeLLM",
    "FakeReply",
    "InjectedCrash",
    "ResumeReport",
    "check_resume",
    "crash_points",
]
