"""The type checker and the linter, as tests: what CI runs is the test suite alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_mypy_strict_passes_on_the_package():
    """Every module type-checks under --strict (pyproject.toml [tool.mypy])."""
    result = run("mypy", "ollama_proxy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_passes():
    """Lint (errors, import order, bugbear, trio/async pitfalls, pytest style) is clean."""
    result = run("ruff", "check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr
