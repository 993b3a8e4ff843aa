"""The public face of the package: what ``import flowdsl`` exports, imports and never contains."""

from __future__ import annotations
import __future__

import json
import re
import subprocess
import sys
import traceback
import types
from pathlib import Path

import pytest

import flowdsl as fd

PACKAGE_DIR = Path(fd.__file__).parent
REPO_ROOT = PACKAGE_DIR.parent


def _public_names(module: types.ModuleType) -> set[str]:
    """Names a user sees on *module*: not underscored, not ``from __future__`` features,
    and not submodules that importing the package bound as a side effect."""
    names = set()
    for name in dir(module):
        if name.startswith("_"):
            continue
        value = getattr(module, name)
        if isinstance(value, __future__._Feature):
            continue
        if isinstance(value, types.ModuleType) and name not in module.__all__:
            assert value.__name__.startswith(f"{module.__name__}."), (
                f"{module.__name__}.{name} is the third-party module {value.__name__}; "
                f"import it under a private name"
            )
            continue
        names.add(name)
    return names


def test_all_lists_exactly_the_public_names() -> None:
    exported = _public_names(fd)
    listed = set(fd.__all__)
    assert sorted(listed - exported) == [], "in __all__ but not defined"
    assert sorted(exported - listed) == [], "public but missing from __all__"
    assert len(fd.__all__) == len(listed), "__all__ has duplicates"


@pytest.mark.parametrize("module", [fd, fd.events], ids=lambda m: m.__name__)
def test_every_name_in_all_resolves(module: types.ModuleType) -> None:
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert missing == []


@pytest.mark.parametrize("name", sorted(n for n in fd.__all__ if isinstance(getattr(fd, n), type)))
def test_public_classes_belong_to_the_package(name: str) -> None:
    cls = getattr(fd, name)
    assert cls.__module__ == "flowdsl"
    assert f"{cls.__module__}.{cls.__qualname__}" == f"flowdsl.{name}"


def test_tracebacks_name_the_public_error_class() -> None:
    error = fd.StepFailed("step failed: ValueError: boom", flow="triage", node="classify")
    [line] = traceback.format_exception_only(error)
    assert line.startswith("flowdsl.StepFailed: flow 'triage', node 'classify': step failed")


def test_event_classes_belong_to_the_events_module() -> None:
    for name in fd.events.__all__:
        value = getattr(fd.events, name)
        if isinstance(value, type):
            assert value.__module__ == "flowdsl.events", name


def test_import_does_not_load_optional_backends() -> None:
    # OpenTelemetry may be installed (flowdsl[otel]); flowdsl only looks it up in
    # sys.modules. The inspector's web stack is imported by `flowdsl ui` alone.
    heavy = (
        "redis",
        "nats",
        "openai",
        "anthropic",
        "opentelemetry",
        "starlette",
        "uvicorn",
        "grpc",
        "google",
        "grpc_tools",
    )
    code = (
        "import json, sys\n"
        "import flowdsl\n"
        f"heavy = {heavy!r}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


# Data read from a store or a broker must never be able to run code.
FORBIDDEN = {
    "import pickle": re.compile(
        r"^\s*(?:import|from)\s+(?:c?pickle|_pickle)\b|['\"]pickle['\"]", re.M
    ),
    "cloudpickle": re.compile(r"\bcloudpickle\b"),
    "dill": re.compile(r"\bdill\b"),
    "shelve/marshal": re.compile(r"^\s*(?:import|from)\s+(?:shelve|marshal)\b", re.M),
    "eval(": re.compile(r"(?<!\w)eval\s*\("),
    "exec(": re.compile(r"(?<!\w)exec\s*\("),
}


def _sources() -> list[Path]:
    files = sorted(PACKAGE_DIR.rglob("*.py"))
    assert len(files) > 5, f"found only {files} under {PACKAGE_DIR}"
    return files


@pytest.mark.parametrize("what", sorted(FORBIDDEN))
def test_sources_never_deserialize_code(what: str) -> None:
    pattern = FORBIDDEN[what]
    hits = []
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        for match in pattern.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            hits.append(f"{path.relative_to(REPO_ROOT)}:{line}: {match.group().strip()}")
    assert hits == [], f"{what} found in the package"


@pytest.mark.parametrize(
    ("snippet", "what"),
    [
        ("import pickle\n", "import pickle"),
        ("from pickle import loads\n", "import pickle"),
        ("mod = __import__('pickle')\n", "import pickle"),
        ("import cloudpickle\n", "cloudpickle"),
        ("x = eval(text)\n", "eval("),
        ("builtins.exec(code)\n", "exec("),
    ],
)
def test_the_patterns_catch_what_they_are_for(snippet: str, what: str) -> None:
    assert FORBIDDEN[what].search(snippet)


@pytest.mark.parametrize(
    "snippet", ["value = evaluate(expr)\n", "await create_subprocess_exec(cmd)\n", "# no pickle\n"]
)
def test_the_patterns_spare_innocent_code(snippet: str) -> None:
    assert not any(p.search(snippet) for p in FORBIDDEN.values())
