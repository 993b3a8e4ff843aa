"""Every fenced code block of README.md, examples/README.md and docs/*.md runs as written.

The conventions a document follows (``_docs.py`` reads and runs the blocks):

- ``python``, ``sh``, ``bash``, ``shell`` and ``console`` blocks run; blocks in any other
  language (``text``, ``toml``, ``mermaid``, ``{eval-rst}``...) or with none do not.
- A line ``<!-- fragment -->`` immediately before the opening fence marks a fragment, which
  does not run; ``<!-- fragment: the reason -->`` says why.  Mark only what truly cannot run
  here: a command that needs a remote server or an API key, a server that runs until
  Ctrl-C, a package installation, a benchmark that runs for minutes, a signature listing.
- The python blocks of a document run in document order and share their state.  If any of
  them uses top-level ``await``, they all run as cells of one Jupyter kernel (nbclient and
  ipykernel), as in a notebook; otherwise as one script (one interpreter, no event loop
  running, ``__name__ == "__main__"``).
- A python block that opens with a docstring naming a file ``test_*.py`` is a test module:
  it is also written to that file and run with pytest.
- An ``sh`` block runs as one bash script that stops at the first failing command.  In a
  ``console`` block each ``$ `` line (with ``\\`` continuations) is a command and the lines
  under it are what it prints: a command shown printing ``Error: ...`` must fail with that
  error (``...`` stands for anything), any other must succeed, and a complete JSON line
  shown must be printed.  A command ending in ``&`` runs in the background until the
  document's blocks are done.
- Each document's blocks run in a fresh directory holding a copy of ``examples/``, with
  ``flowdsl`` and ``python`` the interpreter and the tree under test, no API keys, no
  ``FLOWDSL_*`` variables and ``TRIAGE_LATENCY=0.01``.  ``redis.md`` and ``nats.md`` get
  ``REDIS_URL`` and ``NATS_URL`` of a test server.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from _docs import (
    CONSOLE,
    PYTHON,
    SHELL,
    TIMEOUT,
    Block,
    KernelRunner,
    ScriptRunner,
    blocks_of,
    commands_of,
    dangling_fragment_marks,
    kernel,
    named_test_module,
    needs_kernel,
    run_console,
    run_shell,
    stop_background,
)

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [
    ROOT / "README.md",
    ROOT / "examples" / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
]
SERVERS = {
    "redis.md": ("redis", "redis_server", "REDIS_URL"),
    "nats.md": ("nats", "nats_server", "NATS_URL"),
}
# Test ids: a document's path from the root (two documents are called README.md).
IDS = [str(p.relative_to(ROOT)) for p in DOCUMENTS]
SCRUBBED = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "TRIAGE_MODEL", "REDIS_URL", "NATS_URL")


def _runnable(path: Path) -> bool:
    return any(block.runs for block in blocks_of(path))


def _params() -> list[Any]:
    params = []
    for path in DOCUMENTS:
        if not _runnable(path):
            continue
        marks = [pytest.mark.slow]
        server = SERVERS.get(path.name)
        if server is not None:
            marks.append(getattr(pytest.mark, server[0]))
        params.append(pytest.param(path, id=str(path.relative_to(ROOT)), marks=marks))
    return params


@pytest.fixture(scope="module")
def shims(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``flowdsl`` and ``python`` commands that are this interpreter and this tree."""
    bin_dir = tmp_path_factory.mktemp("bin")
    scripts = {
        "python": f'exec "{sys.executable}" "$@"',
        "flowdsl": f'exec "{sys.executable}" -m flowdsl "$@"',
        # Installing packages would change the environment every other test runs in.
        "pip": 'echo "the docs test does not install packages: mark the block a fragment" >&2\n'
        "exit 1",
    }
    for name, body in scripts.items():
        shim = bin_dir / name
        shim.write_text(f"#!/bin/sh\n{body}\n")
        shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def _environment(shims: Path) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in SCRUBBED and not k.startswith("FLOWDSL_")
    }
    env["PATH"] = f"{shims}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["TRIAGE_LATENCY"] = "0.01"
    env["COLUMNS"] = "120"
    env.pop("PYTEST_CURRENT_TEST", None)
    env.pop("PYTEST_ADDOPTS", None)
    return env


@pytest.mark.parametrize("path", _params())
def test_every_block_runs(
    path: Path, tmp_path: Path, shims: Path, request: pytest.FixtureRequest
) -> None:
    blocks = [block for block in blocks_of(path) if block.runs]
    work = tmp_path / "work"
    shutil.copytree(ROOT / "examples", work / "examples")
    env = _environment(shims)
    server = SERVERS.get(path.name)
    if server is not None:
        env[server[2]] = request.getfixturevalue(server[1]).url
    python = [block for block in blocks if block.lang in PYTHON]
    background: list[subprocess.Popen[str]] = []
    try:
        if any(needs_kernel(block) for block in python):
            with kernel(work, env) as cells:
                _run_all(blocks, cells, work, env, background)
        else:
            script = ScriptRunner(work, env, tmp_path / "script.log")
            try:
                _run_all(blocks, script, work, env, background)
            finally:
                script.close()
    finally:
        stop_background(background)


def _run_all(
    blocks: list[Block],
    python: KernelRunner | ScriptRunner,
    cwd: Path,
    env: dict[str, str],
    background: list[subprocess.Popen[str]],
) -> None:
    for block in blocks:
        if block.lang in PYTHON:
            failure = python.run(block)
            module = named_test_module(block)
            if failure is None and module is not None:
                failure = _pytest(block, module, cwd, env)
        elif block.lang in SHELL:
            failure = run_shell(block, cwd, env)
        else:
            assert block.lang in CONSOLE
            failure = run_console(block, cwd, env, background)
        if failure is not None:
            pytest.fail(f"{block.where} ({block.lang}) does not run as written:\n{failure}")


def _pytest(block: Block, module: str, cwd: Path, env: dict[str, str]) -> str | None:
    (cwd / module).write_text(block.text, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", module],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    if done.returncode != 0:
        return f"pytest {module} failed:\n{done.stdout}\n{done.stderr}"
    return None


# --- the conventions themselves -----------------------------------------------------------


@pytest.mark.parametrize("path", DOCUMENTS, ids=IDS)
def test_fragment_marks_sit_on_a_fence(path: Path) -> None:
    assert dangling_fragment_marks(path) == [], (
        f"{path.name}: a `<!-- fragment -->` line must be immediately followed by a fence"
    )


@pytest.mark.parametrize("path", DOCUMENTS, ids=IDS)
def test_python_blocks_parse(path: Path) -> None:
    for block in blocks_of(path):
        if block.lang in PYTHON and not block.fragment:
            needs_kernel(block)  # a SyntaxError even with top-level await allowed fails


def test_blocks_and_commands_are_read_as_documented(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(
        "text\n\n```python\nx = 1\n```\n\n<!-- fragment -->\n```python\nreturn x\n```\n\n"
        "```console\n$ flowdsl run a.py:f \\\n      --input 1\n2\n$ flowdsl run a.py:g\n"
        "Error: flow 'g': ...\n$ flowdsl worker --broker sqlite:///q.db &\n```\n\n"
        "```toml\n[x]\n```\n\n<!-- fragment -->\n\ntext\n"
        "<!-- fragment: needs a key -->\n```sh\nx\n```\n",
        encoding="utf-8",
    )
    blocks = blocks_of(doc)
    assert [(b.line, b.lang, b.fragment, b.runs) for b in blocks] == [
        (3, "python", False, True),
        (8, "python", True, False),
        (12, "console", False, True),
        (21, "toml", False, False),
        (29, "sh", True, False),
    ]
    run, fail, worker = commands_of(blocks[2])
    assert run.text == "flowdsl run a.py:f \\\n      --input 1"
    assert run.expected == ("2",)
    assert (run.line, fail.line, worker.line) == (13, 16, 18)
    assert fail.errors == ["Error: flow 'g': ..."]
    assert worker.background
    assert not run.background
    assert dangling_fragment_marks(doc) == [25]
    await_block = Block(doc, 1, "python", "async with x:\n    pass\n", False)
    assert needs_kernel(await_block)
    assert not needs_kernel(blocks[0])
