"""bench/compare.py without the packages it runs on says which and how to install them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

HIDE_H11 = ("import runpy, sys; sys.modules['h11'] = None; sys.argv = ['bench/compare.py']; "
            "runpy.run_path('bench/compare.py', run_name='__main__')")


def test_a_missing_package_is_named_with_the_command_that_installs_it():
    """No h11: exit non-zero, naming h11 and the pip command (it raised ValueError on a
    closed log file after the simulator died)."""
    proc = subprocess.run([sys.executable, "-c", HIDE_H11], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "cannot import h11" in proc.stderr
    assert f"{sys.executable} -m pip install -r {REPO / 'tests' / 'requirements.txt'}" in proc.stderr
