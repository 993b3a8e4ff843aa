"""What a pip user gets: the sdist and the wheel, built as a release builds them.

The sdist is built from the tree and the wheel from the unpacked sdist (``python -m build``'s
default), so a file the sdist forgets is a file the wheel lacks.  Both pass ``twine check``;
the wheel installs into a fresh virtual environment and imports from there.

The build runs without isolation (hatchling comes with the ``test`` extra), so nothing is
downloaded while the tests run.
"""

from __future__ import annotations

import email.parser
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import flowdsl

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "flowdsl"
DIST_INFO = f"{PACKAGE}-{flowdsl.__version__}.dist-info"


def _clean_env() -> dict[str, str]:
    # PYTHONPATH would put a source tree ahead of the installed wheel.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(*args: str | Path, cwd: Path) -> str:
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=_clean_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _package_files() -> list[str]:
    """Every file under flowdsl/ that the package has, as wheel paths (``flowdsl/x.proto``).

    What git tracks or would track (ignored files left out, as hatchling leaves them out),
    so a new data file is expected in the wheel without anyone listing it here.
    """
    if (ROOT / ".git").exists() and shutil.which("git"):
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", PACKAGE],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\0")
        files = [f for f in listed if f and (ROOT / f).is_file()]
    else:
        files = [
            p.relative_to(ROOT).as_posix()
            for p in (ROOT / PACKAGE).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")
        ]
    assert f"{PACKAGE}/__init__.py" in files
    return sorted(files)


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT, cwd=out)
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel}


def test_twine_check_passes(dist: dict[str, Path]) -> None:
    output = _run(
        sys.executable, "-m", "twine", "check", "--strict", dist["sdist"], dist["wheel"], cwd=ROOT
    )
    assert output.count("PASSED") == 2, output


def test_the_wheel_holds_the_package_and_nothing_else(dist: dict[str, Path]) -> None:
    with zipfile.ZipFile(dist["wheel"]) as whl:
        names = set(whl.namelist())
        metadata = email.parser.Parser().parsestr(whl.read(f"{DIST_INFO}/METADATA").decode())
    expected = _package_files()
    assert f"{PACKAGE}/py.typed" in expected
    data_files = [f for f in expected if not f.endswith(".py")]
    assert [f for f in data_files if f not in names] == []
    assert [f for f in expected if f not in names] == []
    strays = [
        n for n in names if not n.startswith((f"{PACKAGE}/", f"{DIST_INFO}/")) or "/tests/" in n
    ]
    assert strays == []
    assert not any(n.startswith(("tests/", "benchmarks/", "examples/", "docs/")) for n in names)
    assert not any("__pycache__" in n or n.endswith((".pyc", ".pyo")) for n in names)
    assert f"{DIST_INFO}/licenses/LICENSE" in names
    assert metadata["Version"] == flowdsl.__version__
    assert metadata["License-Expression"] == "MIT"
    assert metadata.get_all("License-File") == ["LICENSE"]
    assert "Typing :: Typed" in metadata.get_all("Classifier")


def test_the_sdist_holds_what_the_wheel_is_built_from(dist: dict[str, Path]) -> None:
    with tarfile.open(dist["sdist"]) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    for needed in ("LICENSE", "README.md", "pyproject.toml", *_package_files()):
        assert needed in names, needed
    assert not any(n.startswith((".venv", ".nox", ".hypothesis", "dist/")) for n in names)


def test_the_wheel_installs_and_imports_in_a_fresh_venv(
    dist: dict[str, Path], tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = Path(_run(python, "-I", "-c", purelib, cwd=tmp_path).strip())
    _run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "--no-deps",
        "--no-index",
        dist["wheel"],
        cwd=tmp_path,
    )
    # Then flowdsl's dependencies come from this test run's own site-packages (appended after the
    # venv's, so nothing is downloaded); the source tree, which an editable install puts on
    # sys.path, is not among them, so flowdsl can only come from the installed wheel.
    outer = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    (site / "_test_dependencies.pth").write_text("".join(f"{p}\n" for p in outer))
    probe = (
        "import importlib.resources, flowdsl; "
        "print(flowdsl.__file__); print(flowdsl.__version__); "
        "print(importlib.resources.files('flowdsl').joinpath('py.typed').is_file())"
    )
    file, version, typed = _run(python, "-I", "-c", probe, cwd=tmp_path).split()
    assert Path(file).resolve() == (site / PACKAGE / "__init__.py").resolve()
    assert version == flowdsl.__version__
    assert typed == "True"
    # The console script the wheel declares, from the venv, prints the same version.
    assert _run(venv / "bin" / "flowdsl", "--version", cwd=tmp_path).strip() == (
        f"flowdsl {flowdsl.__version__}"
    )
