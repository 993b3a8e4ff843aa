"""The package keeps its shape: the layers of docs/architecture.md hold (import-linter's
contracts in pyproject.toml) and no module grows past 600 lines."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _servers import is_ci

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "flowdsl"
MAX_LINES = 600


def _lint_imports() -> str:
    """The `lint-imports` command import-linter installs (the `test` extra has it)."""
    found = shutil.which("lint-imports") or shutil.which(
        "lint-imports", path=str(Path(sys.executable).parent)
    )
    if found is None:
        message = "lint-imports is missing: pip install -e '.[test]'"
        if is_ci():
            pytest.fail(message)
        pytest.skip(message)
    return found


def test_the_layers_and_the_independent_backends_hold() -> None:
    result = subprocess.run(
        [_lint_imports(), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def _too_long(paths: list[Path]) -> dict[str, int]:
    """The modules among *paths* (files, or folders searched through) over the limit."""
    files = [f for p in paths for f in (sorted(p.rglob("*.py")) if p.is_dir() else [p])]
    sizes = {f: len(f.read_text(encoding="utf-8").splitlines()) for f in files}
    return {str(f.relative_to(ROOT)): n for f, n in sizes.items() if n > MAX_LINES}


def test_no_module_is_over_600_lines() -> None:
    assert _too_long([PACKAGE]) == {}
