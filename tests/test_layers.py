"""The package's architecture holds by itself: the import-linter contracts of pyproject.toml (layers that
import only downwards, no import cycles) pass, and an import that breaks them fails the check."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sharedstate"

pytest.importorskip("importlinter", reason="import-linter is in the test extra: pip install -e '.[test]'")

#: Runs the contracts of a pyproject.toml against the package found first on PYTHONPATH.
_LINT = (
    "import sys; from importlinter.cli import lint_imports; "
    "sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))"
)


def _lint(package_parent: Path, config: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run(
        [sys.executable, "-c", _LINT, str(config)],
        cwd=package_parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )


def test_the_layer_and_cycle_contracts_hold():
    result = _lint(ROOT, ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def _copy_with(tmp_path: Path, module: str, line: str) -> Path:
    """A copy of the package whose ``module`` (a path under the package) has ``line`` added."""
    copy = tmp_path / "sharedstate"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / module
    target.write_text(target.read_text() + "\n" + line + "\n")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


@pytest.mark.parametrize(
    ("module", "line", "reported"),
    [
        # The bottom layer reaching for the command line.
        ("_errors.py", "import sharedstate._cli", "sharedstate._errors is not allowed to import sharedstate._cli"),
        # A backend reaching up for the facade (what RedisState subclassing State was).
        (
            "backends/local.py",
            "from sharedstate._state import State",
            "sharedstate.backends is not allowed to import sharedstate._state",
        ),
        # The server importing a backend: the two sit side by side and stay independent.
        (
            "server/store.py",
            "import sharedstate.backends.local",
            "sharedstate.server is not allowed to import sharedstate.backends",
        ),
    ],
)
def test_an_import_that_goes_up_a_layer_fails_the_check(tmp_path, module, line, reported):
    result = _lint(_copy_with(tmp_path, module, line), tmp_path / "pyproject.toml")
    assert result.returncode == 1, result.stdout + result.stderr
    assert reported in " ".join(result.stdout.split()), result.stdout


def test_an_import_cycle_inside_a_package_fails_the_check(tmp_path):
    # server.service imports server.store: the store importing the service closes a circle.
    result = _lint(
        _copy_with(tmp_path, "server/store.py", "import sharedstate.server.service"), tmp_path / "pyproject.toml"
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "No cycles are allowed in sharedstate.server" in " ".join(result.stdout.split()), result.stdout
