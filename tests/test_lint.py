"""The type checker and the linter, as tests: what CI runs is the test suite alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parent.parent


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)


def test_mypy_strict_passes_on_the_package(tmp_path: Path) -> None:
    """Every module type-checks under --strict (pyproject.toml [tool.mypy]) against trio's
    own types: selenium (the console's browser tests) installs trio-typing, whose old
    ``trio-stubs`` would win over them, so trio is put on MYPYPATH (searched first; the
    config reads it silently)."""
    (tmp_path / "trio").symlink_to(Path(trio.__file__).parent, target_is_directory=True)
    result = run("mypy", "ollama_proxy", env={**os.environ, "MYPYPATH": str(tmp_path)})
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_passes():
    """Lint (errors, import order, bugbear, trio/async pitfalls, pytest style) is clean."""
    result = run("ruff", "check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr
