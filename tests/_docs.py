"""Reading the fenced code blocks of a Markdown document, and running them as a reader would.

Used by ``test_docs.py``, whose docstring states the conventions.  Three runners share one
working directory per document, so that what one block makes (a file, a store) is there for
the next:

- :class:`ScriptRunner`: one Python interpreter that executes the document's python blocks
  one after the other in ``__main__``, as a script would, with no event loop running;
- :class:`KernelRunner`: one Jupyter kernel (nbclient + ipykernel) that executes them as
  notebook cells, where top-level ``await`` works;
- :func:`run_shell` and :func:`run_console`: bash, for ``sh``/``bash``/``shell`` blocks and
  for the ``$ `` commands of ``console`` blocks.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs

FRAGMENT = "<!-- fragment -->"
# The mark, optionally with the reason the block cannot run: <!-- fragment: needs a key -->
_FRAGMENT = re.compile(r"^<!-- fragment(?:: [^>]*[^ >])? -->$")
PYTHON = frozenset({"python", "py"})
SHELL = frozenset({"sh", "bash", "shell"})
CONSOLE = frozenset({"console"})
RUNNABLE = PYTHON | SHELL | CONSOLE
TIMEOUT = 120.0  # seconds for one block or command: far above what any of them takes

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")


@attrs.frozen
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    fragment: bool

    @property
    def where(self) -> str:
        return f"{self.path.name}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.lang in RUNNABLE and not self.fragment


def blocks_of(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        fence, indent = match["fence"], len(match["indent"])
        info = match["info"].strip()
        lang = info.split()[0].lower() if info else ""
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            closing = lines[j].strip()
            if closing.startswith(fence[0] * len(fence)) and not closing.strip(fence[0]):
                break
            body.append(lines[j][indent:] if lines[j][:indent].isspace() else lines[j])
            j += 1
        fragment = i > 0 and _FRAGMENT.match(lines[i - 1].strip()) is not None
        found.append(Block(path, i + 1, lang, "\n".join(body) + "\n", fragment))
        i = j + 1
    return found


def dangling_fragment_marks(path: Path) -> list[int]:
    """Lines of fragment marks not followed by an opening fence: they mark nothing."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [
        n + 1
        for n, line in enumerate(lines)
        if _FRAGMENT.match(line.strip())
        and (n + 1 >= len(lines) or _FENCE.match(lines[n + 1]) is None)
    ]


def needs_kernel(block: Block) -> bool:
    """Whether a python block uses ``await`` (``async for``, ``async with``) at top level,
    or IPython's ``%`` magics: what only a notebook runs."""
    if any(line.startswith(("%", "!")) for line in block.text.splitlines()):
        return True
    try:
        compile(block.text, block.where, "exec", dont_inherit=True)
    except SyntaxError:
        compile(
            block.text,
            block.where,
            "exec",
            flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
            dont_inherit=True,
        )
        return True
    return False


def named_test_module(block: Block) -> str | None:
    """``test_x.py`` when a python block opens with a docstring naming that file."""
    try:
        tree = ast.parse(block.text)
    except SyntaxError:
        return None
    doc = ast.get_docstring(tree)
    match = re.match(r"(test_\w+\.py)\b", doc or "")
    return match[1] if match else None


# --- python: as a script ------------------------------------------------------------------

_SERVE = r"""
def _flowdsl_docs_serve():
    import json, os, sys, traceback
    import __main__
    results = os.fdopen(int(sys.argv[1]), "w")
    del sys.argv[1]
    namespace = __main__.__dict__
    namespace.pop("_flowdsl_docs_serve", None)
    for request in sys.stdin:
        block = json.loads(request)
        # Padded so that tracebacks (and inspect.getsource) give the document's lines.
        source = "\n" * (block["line"]) + block["code"]
        try:
            exec(compile(source, block["path"], "exec", dont_inherit=True), namespace)
            answer = {"ok": True}
        except BaseException:
            answer = {"ok": False, "error": traceback.format_exc()}
        sys.stdout.flush()
        sys.stderr.flush()
        results.write(json.dumps(answer) + "\n")
        results.flush()
_flowdsl_docs_serve()
"""


class ScriptRunner:
    """One interpreter running python blocks in ``__main__``, as a script does."""

    def __init__(self, cwd: Path, env: dict[str, str], log: Path) -> None:
        read, write = os.pipe()
        self.log = log
        self._log_file = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-c", _SERVE, str(write)],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            text=True,
            pass_fds=(write,),
        )
        os.close(write)
        self.results = os.fdopen(read)

    def run(self, block: Block) -> str | None:
        """Run *block*; its traceback and output if it failed, else ``None``."""
        assert self.process.stdin is not None
        start = self.log.stat().st_size
        request = {"path": str(block.path), "line": block.line, "code": block.text}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = self.results.readline()
        if not answer:
            return f"the interpreter died:\n{self._output_since(start)}"
        result = json.loads(answer)
        if result["ok"]:
            return None
        return f"{result['error']}\noutput:\n{self._output_since(start)}"

    def _output_since(self, start: int) -> str:
        self._log_file.flush()
        with self.log.open() as log:
            log.seek(start)
            return log.read()

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.results.close()
        self._log_file.close()


# --- python: as notebook cells ------------------------------------------------------------


class KernelRunner:
    """One Jupyter kernel running python blocks as cells, in order."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.count = 0

    def run(self, block: Block) -> str | None:
        import nbformat
        from nbclient.exceptions import CellExecutionError

        cell = nbformat.v4.new_code_cell(block.text)
        self.client.nb.cells.append(cell)
        try:
            self.client.execute_cell(cell, len(self.client.nb.cells) - 1)
        except CellExecutionError as exc:
            return str(exc)
        warnings = [
            out["text"]
            for out in cell.outputs
            if out.get("output_type") == "stream"
            and out.get("name") == "stderr"
            and "Warning" in out.get("text", "")
        ]
        if warnings:
            return "the cell printed a warning:\n" + "".join(warnings)
        return None


@contextmanager
def kernel(cwd: Path, env: dict[str, str]) -> Iterator[KernelRunner]:
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.v4.new_notebook()
    client = NotebookClient(
        notebook,
        timeout=int(TIMEOUT),
        kernel_name="python3",
        resources={"metadata": {"path": str(cwd)}},
    )
    with client.setup_kernel(env=env, cwd=str(cwd)):
        yield KernelRunner(client)


# --- shell ----------------------------------------------------------------------------------


def run_shell(block: Block, cwd: Path, env: dict[str, str]) -> str | None:
    """Run an ``sh`` block as one bash script; what went wrong, or ``None``."""
    done = _bash(block.text, cwd, env, strict=True)
    if done.returncode != 0:
        return f"exit code {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return None


@attrs.frozen
class Command:
    line: int
    text: str
    expected: tuple[str, ...]  # the output lines the document shows

    @property
    def background(self) -> bool:
        return _without_comment(self.text).rstrip().endswith("&")

    @property
    def errors(self) -> list[str]:
        return [line for line in self.expected if line.startswith("Error:")]


def commands_of(block: Block) -> list[Command]:
    """The ``$ `` commands of a console block, with the output shown under each."""
    commands: list[Command] = []
    lines = block.text.splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].startswith("$ "):
            i += 1
            continue
        start = i
        text = [lines[i][2:]]
        while text[-1].rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            text.append(lines[i])
        i += 1
        expected = []
        while i < len(lines) and not lines[i].startswith("$ "):
            expected.append(lines[i])
            i += 1
        commands.append(Command(block.line + 1 + start, "\n".join(text), tuple(expected)))
    return commands


def run_console(
    block: Block, cwd: Path, env: dict[str, str], background: list[subprocess.Popen[str]]
) -> str | None:
    """Run a console block's commands; check exit codes, errors and JSON lines shown."""
    for command in commands_of(block):
        where = f"{block.path.name}:{command.line}: $ {command.text}"
        if command.background:
            script = _without_comment(command.text).rstrip().removesuffix("&")
            background.append(
                subprocess.Popen(
                    ["bash", "-c", f"exec {script}"],
                    cwd=cwd,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    text=True,
                    start_new_session=True,
                )
            )
            continue
        done = _bash(command.text, cwd, env, strict=False)
        report = f"{where}\nexit code {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n"
        report += done.stderr
        if command.errors:
            if done.returncode == 0:
                return f"the document shows an error, but the command succeeded:\n{report}"
            actual = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
            for shown in command.errors:
                if not any(_shown_matches(shown, line) for line in actual):
                    return f"the error differs from the document's:\n{shown}\n{report}"
            continue
        if done.returncode != 0:
            return report
        printed = _json_lines(done.stdout)
        for shown in command.expected:
            data = _complete_json(shown)
            if data is not None and data not in printed:
                return f"the document shows this output line, not printed:\n{shown}\n{report}"
    return None


def stop_background(processes: list[subprocess.Popen[str]]) -> None:
    """Ctrl-C for every background command, then wait (and kill what lingers)."""
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _bash(script: str, cwd: Path, env: dict[str, str], *, strict: bool) -> Any:
    options = ["-e", "-o", "pipefail"] if strict else ["-o", "pipefail"]
    return subprocess.run(
        ["bash", *options, "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
    )


def _without_comment(text: str) -> str:
    # Good enough for the documents' commands: a comment starts at "  #" outside quotes.
    return re.sub(r"\s+#[^'\"]*$", "", text)


def _shown_matches(shown: str, actual: str) -> bool:
    """Whether an output line the document shows matches the one printed (``...`` and
    ``…`` stand for anything)."""
    pattern = ".*".join(re.escape(part) for part in re.split(r"\.\.\.|…", shown.strip()))
    return re.fullmatch(pattern, actual.strip()) is not None


def _complete_json(line: str) -> Any:
    if "..." in line or "…" in line or not line.strip().startswith(("{", "[", '"')):
        return None
    try:
        return json.loads(line)
    except ValueError:
        return None


def _json_lines(text: str) -> list[Any]:
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
