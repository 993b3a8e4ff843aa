"""Developer sessions: ``nox`` runs tests (on each Python), lint and typecheck; ``nox -s dist``,
``docs``, ``bench``, ...

Every session that runs the test suite goes through :func:`run_tests`, so the way pytest is
installed and invoked cannot drift between sessions (the shape urllib3's noxfile uses).
"""

from __future__ import annotations

import glob
import os
import shutil

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.error_on_missing_interpreters = True
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
# Every version the classifiers in pyproject.toml claim; `nox -s tests` runs all of them.
PYTHONS = ["3.11", "3.12", "3.13"]
DOCS_BUILD = os.path.join("docs", "_build", "html")


def _find_pyenv_interpreters() -> None:
    """Put each interpreter pyenv has installed on PATH, newest patch release first.

    pyenv's shims run only the versions `pyenv global` names: nox would find a
    `python3.12` shim and then fail to run it.
    """
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    found = glob.glob(os.path.join(root, "versions", "3.*", "bin"))

    def version(bin_dir: str) -> tuple[int, ...]:
        name = os.path.basename(os.path.dirname(bin_dir))
        return tuple(int(p) if p.isdigit() else -1 for p in name.split("."))

    bins = sorted(found, key=version, reverse=True)
    if bins:
        os.environ["PATH"] = os.pathsep.join([*bins, os.environ.get("PATH", "")])


_find_pyenv_interpreters()


def run_tests(
    session: nox.Session,
    *,
    extras: str = "test",
    pytest_args: tuple[str, ...] = (),
    default_posargs: tuple[str, ...] = ("tests",),
) -> None:
    """Install flowdsl with *extras* and run pytest over *default_posargs* (or posargs)."""
    session.install("-e", f".[{extras}]")
    session.run("python", "--version")
    session.run(
        "python",
        "-m",
        "pytest",
        "--strict-config",
        "--strict-markers",
        "-ra",
        "--durations=10",
        *pytest_args,
        *(session.posargs or default_posargs),
    )


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The whole suite, on asyncio and trio (the ``anyio_backend`` fixture covers both).

    One session per Python: ``nox -s tests-3.13`` runs one of them.
    """
    run_tests(session)


@nox.session(python=PYTHON)
def dist(session: nox.Session) -> None:
    """Build the sdist and the wheel into dist/ as a release does, and ``twine check`` them.

    Built with build isolation, from a clean dist/, so what is checked is what would be
    uploaded.  (tests/test_distribution.py checks the same artifacts' contents.)
    """
    session.install("build", "twine")
    shutil.rmtree("dist", ignore_errors=True)
    session.run("python", "-m", "build", "--outdir", "dist")
    session.run("twine", "check", "--strict", *sorted(glob.glob(os.path.join("dist", "*"))))


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff (the lint rules and the formatter, checked, never applied) and lint-imports
    (the layers of docs/architecture.md, as pyproject.toml's contracts state them)."""
    session.install("ruff", "import-linter")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    # import-linter finds flowdsl by importing it: the package, without its extras.
    session.install("-e", ".")
    session.run("lint-imports", "--no-cache")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict over flowdsl/ (settings in pyproject.toml)."""
    session.install(
        "-e",
        ".[all]",
        "mypy",
        "types-grpcio",
        "types-grpcio-health-checking",
        "types-grpcio-reflection",
        "types-protobuf",
    )
    session.run("mypy", "--version")
    session.run("mypy", "--strict", "flowdsl")


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the Sphinx docs; any warning fails the build."""
    session.install("-e", ".", "sphinx", "myst-parser", "furo")
    session.run(
        "sphinx-build", "-W", "--keep-going", "-b", "html", "docs", DOCS_BUILD, *session.posargs
    )


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """flowdsl's own benchmarks (``python -m benchmarks``); posargs go to the benchmark."""
    session.install("-e", ".[all]")
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session(python=PYTHON)
def bench_batch(session: nox.Session) -> None:
    """Batch throughput (issue 20): W2 in batch on the SQLite queue, Redis and NATS beside
    real time and the raw broker floors; needs redis-server and nats-server on PATH."""
    session.install("-e", ".[all]")
    session.run("python", "-m", "benchmarks.batch", *session.posargs)


@nox.session(python=PYTHON)
def bench_peers(session: nox.Session) -> None:
    """flowdsl beside LangGraph and DBOS; the peers live in this session's venv only.

    ``langgraph-checkpoint-sqlite`` is LangGraph's SQLite checkpointer, needed for W3.
    """
    session.install("-e", ".[all]", "langgraph", "langgraph-checkpoint-sqlite", "dbos")
    session.run("python", "-m", "benchmarks.peers", *session.posargs)


# The oldest grpcio-tools flowdsl supports: the checked-in code is generated with it, so
# the lower bounds of the `serve` extra (grpcio, protobuf) are the versions it targets.
GRPCIO_TOOLS = "grpcio-tools==1.62.3"
PROTO_ROOT = os.path.join("flowdsl", "service", "protos")
PROTO_FILE = "flowdsl/v1/flows.proto"  # relative to PROTO_ROOT: its name in the descriptor pool
GENERATED = os.path.join("flowdsl", "service", "_generated")


@nox.session(python=PYTHON)
def proto(session: nox.Session) -> None:
    """Regenerate flowdsl/service/_generated from the .proto; fail if that changed anything."""
    import shutil
    import tempfile

    session.install(GRPCIO_TOOLS)
    with tempfile.TemporaryDirectory() as out:
        session.run(
            "python",
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            os.path.join(PROTO_ROOT, PROTO_FILE),
        )
        made = os.path.join(out, os.path.dirname(PROTO_FILE))
        for name in sorted(os.listdir(made)):
            with open(os.path.join(made, name), encoding="utf-8") as file:
                text = file.read()
            # protoc names the module by the file's path in the pool (flowdsl.v1); inside
            # the package it lives here, so the one import between the two files follows.
            text = text.replace(
                "from flowdsl.v1 import flows_pb2",
                "from flowdsl.service._generated import flows_pb2",
            )
            with open(os.path.join(GENERATED, name), "w", encoding="utf-8") as file:
                file.write(text)
        shutil.rmtree(made)
    session.run("git", "add", "--intent-to-add", GENERATED, external=True)
    session.run("git", "diff", "--exit-code", "--stat", "--", GENERATED, external=True)


@nox.session(python=PYTHON)
def serve_oldest(session: nox.Session) -> None:
    """The service's tests on the lower bounds of the `serve` extra (what the checked-in
    generated code targets)."""
    session.install(
        "-e",
        ".[test]",
        "grpcio==1.62.3",
        "grpcio-health-checking==1.62.3",
        "grpcio-reflection==1.62.3",
        "grpcio-tools==1.62.3",
        "protobuf==4.25.1",
    )
    session.run(
        "python",
        "-m",
        "pytest",
        "--strict-config",
        "--strict-markers",
        "tests/test_service.py",
        "tests/test_service_client.py",
        "tests/test_service_process.py",
        *session.posargs,
    )
